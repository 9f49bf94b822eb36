//! The snapshot file's layout, its checks, and the upgrade from older formats.
//!
//! Format version 1 (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8 | magic `SKIFFSNP` |
//! | 8  | 4 | format version |
//! | 12 | 4 | header length H |
//! | 16 | 4 | section count N |
//! | 20 | 4 | CRC-32 of bytes 0..20 and the header |
//! | 24 | H | header: bincode [`Header`] |
//!
//! then N sections, each a 24-byte preamble and its payload:
//!
//! | size | field |
//! |---|---|
//! | 4 | kind ([`SectionKind`]) |
//! | 4 | the payload's version (its own, not the file's) |
//! | 4 | flags: bit 0 = required (a reader that does not know the kind, or cannot read its version, must refuse; else it skips the section); other bits zero |
//! | 8 | payload length L |
//! | 4 | CRC-32 of the 20 bytes before it and the payload |
//! | L | payload: bincode |
//!
//! and nothing after the last section. The checksum covers the preamble too, so a
//! flipped "required" bit or kind is a checksum error, not a silent skip.
//!
//! Payloads are bincode 1.x (varint integers): one small crate with no dependencies of
//! its own, a frozen wire format, and a byte limit for decoding hostile input
//! (postcard would do as well but brings more crates). vCPU and chipset state is
//! stored as each declared part's name and bytes (`Part::bytes`), read back through
//! the same declared list (`from_parts`), so their layout is KVM's ABI, not serde's.
//!
//! Format version 0 is the older layout, read through [`upgrade_v0`]: the same
//! preamble, a header without the CPU vendor, 20-byte section preambles without flags
//! (every section required), and no patched-sites section.

use std::borrow::Cow;
use std::io::Read;
use std::path::Path;

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Chipset, CpuidEntry, Header, Machine, MemoryFileRef, MemoryRange, PatchedSite, Snapshot, SnapshotError, atomic, memory};
use crate::devices::state::{DEVICE_STATE_VERSION, device_state_readable};
use crate::vcpu::state::{VcpuState, VmState};
use crate::vmm::devices::SavedDevice;

pub const MAGIC: [u8; 8] = *b"SKIFFSNP";
/// The format this skiff writes; it reads this one and every older one.
pub const FORMAT_VERSION: u32 = 1;

const PREAMBLE: usize = 24;
const FLAG_REQUIRED: u32 = 1;
/// Bounds on what a reader accepts, far above any real snapshot (a 4-vCPU one is
/// about 60 KiB): a hostile or wrong file cannot make it allocate much.
const MAX_FILE: u64 = 256 << 20;
const MAX_HEADER: u32 = 1 << 20;
const MAX_SECTIONS: u32 = 4096;
const MAX_VCPUS: usize = 1024;
const MAX_RANGES: usize = 64;
const MAX_PATCH_BYTES: usize = 64;

/// What a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    Vcpu = 1,
    Chipset = 2,
    Devices = 3,
    MemoryMap = 4,
    MemoryFile = 5,
    PatchedSites = 6,
    Machine = 7,
    /// `--net` and `--vsock` (machine.rs `NetworkRecord`); present only when the
    /// machine has such devices, so older snapshots (and older readers of snapshots
    /// without them) are unaffected.
    Network = 8,
}

impl SectionKind {
    pub fn from_id(id: u32) -> Option<Self> {
        use SectionKind::*;
        [Vcpu, Chipset, Devices, MemoryMap, MemoryFile, PatchedSites, Machine, Network].into_iter().find(|k| *k as u32 == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Vcpu => "vcpu",
            SectionKind::Chipset => "chipset",
            SectionKind::Devices => "devices",
            SectionKind::MemoryMap => "memory-map",
            SectionKind::MemoryFile => "memory-file",
            SectionKind::PatchedSites => "patched-sites",
            SectionKind::Machine => "machine",
            SectionKind::Network => "network",
        }
    }

    /// The payload version this skiff writes, and the newest it reads. A kind whose
    /// payload changes shape gets a new version and upgrade code for the old one.
    pub fn version(self) -> u32 {
        match self {
            // Devices are serde values whose shape is DeviceState's: its version is theirs.
            SectionKind::Devices => DEVICE_STATE_VERSION,
            _ => 1,
        }
    }
}

/// Bytes as one length-prefixed run (serde's `Vec<u8>` goes element by element).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[derive(Serialize, Deserialize)]
struct VcpuSection {
    index: u32,
    parts: Vec<(String, Blob)>,
}

#[derive(Serialize, Deserialize)]
struct ChipsetSection {
    parts: Vec<(String, Blob)>,
    clock: u64,
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
}

fn ser<T: Serialize + ?Sized>(what: &'static str, v: &T) -> Result<Vec<u8>, SnapshotError> {
    codec().serialize(v).map_err(|e| SnapshotError::Encode { what, reason: e.to_string() })
}

fn de<T: DeserializeOwned>(kind: &'static str, b: &[u8]) -> Result<T, SnapshotError> {
    // The limit bounds every length prefix by the bytes actually there.
    codec()
        .with_limit(b.len() as u64)
        .deserialize(b)
        .map_err(|e| SnapshotError::Invalid { kind, reason: e.to_string() })
}

fn parts_of(parts: Vec<(&'static str, Vec<u8>)>) -> Vec<(String, Blob)> {
    parts.into_iter().map(|(n, b)| (n.to_string(), Blob(b))).collect()
}

/// Every section's payload, in the order they are written.
pub(super) fn section_payloads(s: &Snapshot) -> Result<Vec<(SectionKind, Vec<u8>)>, SnapshotError> {
    let mut out = Vec::new();
    for (index, v) in s.vcpus.iter().enumerate() {
        let index = u32::try_from(index).map_err(|_| SnapshotError::Encode { what: "vcpu", reason: "too many vCPUs".into() })?;
        out.push((SectionKind::Vcpu, ser("vcpu", &VcpuSection { index, parts: parts_of(v.to_parts()) })?));
    }
    let chipset = ChipsetSection { parts: parts_of(s.chipset.state.to_parts()), clock: s.chipset.clock };
    out.push((SectionKind::Chipset, ser("chipset", &chipset)?));
    out.push((SectionKind::Devices, ser("devices", &s.devices)?));
    out.push((SectionKind::MemoryMap, ser("memory-map", &s.memory_map)?));
    out.push((SectionKind::MemoryFile, ser("memory-file", &s.memory_file)?));
    out.push((SectionKind::PatchedSites, ser("patched-sites", &s.patched_sites)?));
    out.push((SectionKind::Machine, ser("machine", &s.machine)?));
    if !s.machine.network.is_empty() {
        out.push((SectionKind::Network, ser("network", &s.machine.network)?));
    }
    Ok(out)
}

/// One section to frame: kind id, version, required, payload.
pub(super) type OutSection = (u32, u32, bool, Vec<u8>);

/// Frames a header and sections as format version 1.
pub(super) fn frame(header: &Header, sections: &[OutSection]) -> Result<Vec<u8>, SnapshotError> {
    let body = ser("header", header)?;
    let too_big = |what: &'static str| SnapshotError::Encode { what, reason: "too large".into() };
    let count = u32::try_from(sections.len()).map_err(|_| too_big("sections"))?;
    let mut out = Vec::with_capacity(PREAMBLE + body.len() + sections.iter().map(|s| PREAMBLE + s.3.len()).sum::<usize>());
    out.extend(MAGIC);
    out.extend(FORMAT_VERSION.to_le_bytes());
    out.extend(u32::try_from(body.len()).map_err(|_| too_big("header"))?.to_le_bytes());
    out.extend(count.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out);
    h.update(&body);
    out.extend(h.finalize().to_le_bytes());
    out.extend(body);
    for (kind, version, required, payload) in sections {
        let start = out.len();
        out.extend(kind.to_le_bytes());
        out.extend(version.to_le_bytes());
        out.extend((if *required { FLAG_REQUIRED } else { 0 }).to_le_bytes());
        out.extend((payload.len() as u64).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(out.get(start..).unwrap_or_default());
        h.update(payload);
        out.extend(h.finalize().to_le_bytes());
        out.extend(payload);
    }
    Ok(out)
}

/// The snapshot file's bytes. A snapshot the reader would refuse is refused here
/// first: what is written can be read back.
pub fn encode(s: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    if s.vcpus.is_empty() || s.vcpus.len() > MAX_VCPUS {
        return Err(SnapshotError::Encode { what: "vcpu", reason: format!("{} vCPUs", s.vcpus.len()) });
    }
    check_memory(s)?;
    check_patched(&s.patched_sites)?;
    check_machine(s)?;
    let sections: Vec<OutSection> =
        section_payloads(s)?.into_iter().map(|(k, p)| (k as u32, k.version(), true, p)).collect();
    frame(&s.header, &sections)
}

/// Writes the snapshot file atomically (temporary file, fsync, rename).
pub fn write_snapshot(path: &Path, s: &Snapshot) -> Result<(), SnapshotError> {
    use std::io::Write;
    let bytes = encode(s)?;
    atomic::write_atomic(path, |f| f.write_all(&bytes).map_err(SnapshotError::io(path, "writing")))
}

/// Reads and checks a snapshot file: the whole snapshot, or one error saying why not.
pub fn read_snapshot(path: &Path) -> Result<Snapshot, SnapshotError> {
    let file = std::fs::File::open(path).map_err(SnapshotError::io(path, "opening"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(SnapshotError::io(path, "reading"))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(SnapshotError::Invalid { kind: "file", reason: format!("larger than {MAX_FILE} bytes: not a snapshot") });
    }
    decode(&bytes)
}

/// Reads fixed-size fields off a byte slice; running out is `Truncated`.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: impl Fn() -> String) -> Result<&'a [u8], SnapshotError> {
        let truncated = || SnapshotError::Truncated { what: what(), at: self.pos as u64, need: n, len: self.b.len() as u64 };
        let end = usize::try_from(n).ok().and_then(|n| self.pos.checked_add(n)).ok_or_else(truncated)?;
        let s = self.b.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        let b = self.take(4, || what.to_string())?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        let b = self.take(8, || what.to_string())?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    /// The bytes from `start` to the current position.
    fn since(&self, start: usize) -> &'a [u8] {
        self.b.get(start..self.pos).unwrap_or_default()
    }
}

/// A section as framed, its payload checked against its checksum but not decoded.
pub(super) struct RawSection<'a> {
    pub kind: u32,
    pub version: u32,
    pub required: bool,
    pub payload: Cow<'a, [u8]>,
}

/// The version 0 header: no CPU vendor.
#[derive(Serialize, Deserialize)]
pub(super) struct HeaderV0 {
    pub skiff_version: String,
    pub cpuid: Vec<CpuidEntry>,
}

/// Checks and decodes a snapshot file's bytes (see the module comment for the layout).
pub fn decode(b: &[u8]) -> Result<Snapshot, SnapshotError> {
    let (header, sections) = parse_frame(b)?;
    assemble(header, sections)
}

fn parse_frame(b: &[u8]) -> Result<(Header, Vec<RawSection<'_>>), SnapshotError> {
    // A short file that starts like a snapshot (an empty one too) is a truncated
    // one; anything else is not one.
    if b.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(b) {
            SnapshotError::Truncated { what: "the magic".into(), at: 0, need: MAGIC.len() as u64, len: b.len() as u64 }
        } else {
            SnapshotError::BadMagic
        });
    }
    let mut r = Reader { b, pos: 0 };
    if r.take(MAGIC.len() as u64, String::new)? != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = r.u32("the format version")?;
    if version > FORMAT_VERSION {
        return Err(SnapshotError::NewerFormat { found: version });
    }
    let header_len = r.u32("the header length")?;
    let count = r.u32("the section count")?;
    let crc = r.u32("the header checksum")?;
    if header_len > MAX_HEADER || count > MAX_SECTIONS {
        return Err(SnapshotError::Invalid { kind: "header", reason: format!("{header_len} header bytes, {count} sections: out of bounds") });
    }
    let body = r.take(header_len as u64, || "the header".into())?;
    let mut h = crc32fast::Hasher::new();
    h.update(b.get(..PREAMBLE - 4).unwrap_or_default());
    h.update(body);
    if h.finalize() != crc {
        return Err(SnapshotError::HeaderChecksum);
    }
    let v1 = version == FORMAT_VERSION;
    let mut sections = Vec::new();
    for index in 0..count {
        let start = r.pos;
        let what = |field: &str| format!("section {index}'s {field}");
        let kind = r.u32(&what("kind"))?;
        let sversion = r.u32(&what("version"))?;
        let flags = if v1 { r.u32(&what("flags"))? } else { FLAG_REQUIRED };
        let len = r.u64(&what("length"))?;
        let covered = r.since(start);
        let crc = r.u32(&what("checksum"))?;
        let payload = r.take(len, || format!("section {index} ({} bytes)", len))?;
        let mut h = crc32fast::Hasher::new();
        h.update(covered);
        h.update(payload);
        if h.finalize() != crc {
            let kind = SectionKind::from_id(kind).map_or_else(|| format!("kind {kind}"), |k| k.name().to_string());
            return Err(SnapshotError::SectionChecksum { index, kind });
        }
        if flags & !FLAG_REQUIRED != 0 {
            return Err(SnapshotError::Invalid { kind: "file", reason: format!("section {index} has unknown flags {flags:#x}") });
        }
        sections.push(RawSection { kind, version: sversion, required: flags & FLAG_REQUIRED != 0, payload: Cow::Borrowed(payload) });
    }
    let rest = b.len().saturating_sub(r.pos);
    if rest != 0 {
        return Err(SnapshotError::TrailingBytes(rest as u64));
    }
    if v1 {
        Ok((de("header", body)?, sections))
    } else {
        upgrade_v0(de("header", body)?, sections)
    }
}

/// Format 0 -> 1: the CPU vendor comes from the CPUID table the guest was given (leaf
/// 0 is the host's vendor, which KVM passes through), and the missing patched-sites
/// section is an empty one (version 0 had no patching).
pub(super) fn upgrade_v0(h: HeaderV0, mut sections: Vec<RawSection<'_>>) -> Result<(Header, Vec<RawSection<'_>>), SnapshotError> {
    let leaf0 = h.cpuid.iter().find(|e| e.function == 0 && e.index == 0);
    let cpu_vendor = leaf0.map(|e| super::vendor_string(e.ebx, e.edx, e.ecx)).unwrap_or_default();
    if sections.iter().any(|s| s.kind == SectionKind::PatchedSites as u32) {
        return Err(SnapshotError::Invalid { kind: "patched-sites", reason: "in a version 0 file, which had none".into() });
    }
    let none: Vec<PatchedSite> = Vec::new();
    sections.push(RawSection {
        kind: SectionKind::PatchedSites as u32,
        version: SectionKind::PatchedSites.version(),
        required: true,
        payload: Cow::Owned(ser("patched-sites", &none)?),
    });
    Ok((Header { skiff_version: h.skiff_version, cpu_vendor, cpuid: h.cpuid }, sections))
}

fn once<T>(slot: &mut Option<T>, kind: SectionKind, v: T) -> Result<(), SnapshotError> {
    if slot.replace(v).is_some() {
        return Err(SnapshotError::Duplicate(kind.name()));
    }
    Ok(())
}

/// Older payload versions read here. Devices version 1 lacked the keyboard kind,
/// which version 2 appended; version 2 lacked the network and vsock kinds, which
/// version 3 appended: older payloads decode unchanged.
fn upgradable(kind: SectionKind, version: u32) -> bool {
    kind == SectionKind::Devices && device_state_readable(version)
}

/// Decodes every section and checks the whole: each required kind present, vCPUs
/// numbered 0..n, the memory layout consistent.
fn assemble(header: Header, sections: Vec<RawSection<'_>>) -> Result<Snapshot, SnapshotError> {
    let mut vcpus: Vec<(u32, VcpuState)> = Vec::new();
    let (mut chipset, mut devices, mut map, mut file, mut patched, mut machine) = (None, None, None, None, None, None);
    let mut network: Option<super::machine::NetworkRecord> = None;
    for (index, s) in sections.iter().enumerate() {
        let Some(kind) = SectionKind::from_id(s.kind) else {
            if s.required {
                return Err(SnapshotError::UnknownRequired { index: index as u32, kind: s.kind });
            }
            continue;
        };
        // An older version is upgraded here (see `upgradable`). One this skiff cannot
        // read is refused, unless the writer said it may
        // be skipped (a later skiff's extra copy in a newer shape).
        if s.version != kind.version() && !upgradable(kind, s.version) {
            if !s.required {
                continue;
            }
            return Err(SnapshotError::SectionVersion { kind: kind.name(), found: s.version, supported: kind.version() });
        }
        let p = &s.payload[..];
        let name = kind.name();
        match kind {
            SectionKind::Vcpu => {
                let v: VcpuSection = de(name, p)?;
                let state = VcpuState::from_parts(&v.parts.iter().map(|(n, b)| (n.as_str(), &b.0[..])).collect::<Vec<_>>())
                    .map_err(|e| SnapshotError::Invalid { kind: name, reason: format!("vCPU {}: {e}", v.index) })?;
                if vcpus.len() >= MAX_VCPUS {
                    return Err(SnapshotError::Invalid { kind: name, reason: format!("more than {MAX_VCPUS} vCPUs") });
                }
                vcpus.push((v.index, state));
            }
            SectionKind::Chipset => {
                let c: ChipsetSection = de(name, p)?;
                let state = VmState::from_parts(&c.parts.iter().map(|(n, b)| (n.as_str(), &b.0[..])).collect::<Vec<_>>())
                    .map_err(|e| SnapshotError::Invalid { kind: name, reason: e.to_string() })?;
                once(&mut chipset, kind, Chipset { state, clock: c.clock })?;
            }
            SectionKind::Devices => once(&mut devices, kind, de::<Vec<SavedDevice>>(name, p)?)?,
            SectionKind::MemoryMap => once(&mut map, kind, de::<Vec<MemoryRange>>(name, p)?)?,
            SectionKind::MemoryFile => once(&mut file, kind, de::<MemoryFileRef>(name, p)?)?,
            SectionKind::PatchedSites => once(&mut patched, kind, de::<Vec<PatchedSite>>(name, p)?)?,
            SectionKind::Machine => once(&mut machine, kind, de::<Machine>(name, p)?)?,
            SectionKind::Network => once(&mut network, kind, de(name, p)?)?,
        }
    }
    vcpus.sort_by_key(|v| v.0);
    if vcpus.is_empty() {
        return Err(SnapshotError::Missing("vcpu"));
    }
    if let Some((i, (n, _))) = vcpus.iter().enumerate().find(|(i, v)| v.0 as usize != *i) {
        return Err(SnapshotError::Invalid { kind: "vcpu", reason: format!("vCPU {n} where vCPU {i} belongs: indices must be 0..{}", vcpus.len()) });
    }
    let missing = |k: SectionKind| SnapshotError::Missing(k.name());
    let snapshot = Snapshot {
        header,
        vcpus: vcpus.into_iter().map(|v| v.1).collect(),
        chipset: chipset.ok_or_else(|| missing(SectionKind::Chipset))?,
        devices: devices.ok_or_else(|| missing(SectionKind::Devices))?,
        memory_map: map.ok_or_else(|| missing(SectionKind::MemoryMap))?,
        memory_file: file.ok_or_else(|| missing(SectionKind::MemoryFile))?,
        patched_sites: patched.ok_or_else(|| missing(SectionKind::PatchedSites))?,
        machine: Machine { network: network.unwrap_or_default(), ..machine.ok_or_else(|| missing(SectionKind::Machine))? },
    };
    check_memory(&snapshot)?;
    check_machine(&snapshot)?;
    check_patched(&snapshot.patched_sites)?;
    Ok(snapshot)
}

fn check_memory(s: &Snapshot) -> Result<(), SnapshotError> {
    let bad = |kind: &'static str, reason: String| SnapshotError::Invalid { kind, reason };
    if s.memory_map.is_empty() || s.memory_map.len() > MAX_RANGES {
        return Err(bad("memory-map", format!("{} ranges", s.memory_map.len())));
    }
    memory::check_layout(&s.memory_map, &s.memory_file).map_err(|r| bad("memory-map", r))?;
    if let Some(d) = &s.memory_file.diff {
        memory::check_runs(&d.pages, &s.memory_file).map_err(|r| bad("memory-file", r))?;
    }
    Ok(())
}

fn check_machine(s: &Snapshot) -> Result<(), SnapshotError> {
    let ram = s.memory_map.iter().map(|r| r.len).fold(0u64, u64::saturating_add);
    s.machine.check(s.vcpus.len(), ram).map_err(|reason| SnapshotError::Invalid { kind: "machine", reason })
}

fn check_patched(sites: &[PatchedSite]) -> Result<(), SnapshotError> {
    for p in sites {
        if p.original.len() != p.patched.len() || p.original.is_empty() || p.original.len() > MAX_PATCH_BYTES {
            return Err(SnapshotError::Invalid {
                kind: "patched-sites",
                reason: format!("site {:#x}: {} original and {} patched bytes", p.guest_addr, p.original.len(), p.patched.len()),
            });
        }
    }
    Ok(())
}
