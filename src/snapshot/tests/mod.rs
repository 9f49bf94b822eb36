//! The snapshot file: round trips, forward and backward compatibility.

mod kvm;
mod memory;
mod refusals;
mod relocate;

use std::path::PathBuf;

use super::format::{HeaderV0, OutSection, frame, section_payloads};
use super::*;
use crate::devices::state::{DEVICE_STATE_VERSION, DeviceState, PmRegs, SerialRegs};
use crate::devices::virtio::{DeviceState as VirtioDevice, QueueSnapshot, VirtioMmioState};
use crate::vcpu::state::samples;
use crate::vmm::devices::Space;

/// A directory of its own under the system's temporary directory, removed on drop.
pub(super) struct TmpDir(pub PathBuf);

impl TmpDir {
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("skiff-snapshot-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// The directory's entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One device of every kind (every variant of DeviceState).
pub(super) fn sample_devices() -> Vec<SavedDevice> {
    let queue = QueueSnapshot { size: 256, ready: true, desc_table: 0x1000, avail_ring: 0x2000, used_ring: 0x3000, next_avail: 7, next_used: 5 };
    let virtio = |base, device| VirtioMmioState {
        version: 2,
        device_type: 2,
        device_features_sel: 1,
        driver_features_sel: 1,
        driver_features: 1 << 32 | 1 << 29,
        queue_sel: 0,
        status: 0xf,
        interrupt_status: 1,
        config_generation: 0,
        queues: vec![queue.clone(); base as usize % 3 + 1],
        device,
    };
    let states = vec![
        (Space::Pio, 0x3f8, DeviceState::Serial(SerialRegs { line_control: 3, in_buffer: b"ls\n".to_vec(), ..Default::default() })),
        (Space::Pio, 0x60, DeviceState::I8042),
        (Space::Pio, 0x70, DeviceState::Cmos { index: 0x0b, ram: (0..128).collect() }),
        (Space::Pio, 0x80, DeviceState::PostPort { last: 0x42 }),
        (Space::Pio, 0xcf9, DeviceState::ResetControl { value: 2 }),
        (Space::Pio, 0x600, DeviceState::Pm(PmRegs { status: 1, enable: 0x100, control: 1 })),
        (Space::Pio, 0x510, DeviceState::BootMarker),
        (Space::Mmio, 0xd000_0000, DeviceState::Virtio(virtio(0xd000_0000u64, VirtioDevice::Rng))),
        (
            Space::Mmio,
            0xd000_1000,
            DeviceState::Virtio(virtio(0xd000_1000u64, VirtioDevice::Block { capacity_sectors: 1 << 21, read_only: false, id: b"rootfs".to_vec() })),
        ),
    ];
    states.into_iter().map(|(space, base, state)| SavedDevice { version: DEVICE_STATE_VERSION, space, base, state }).collect()
}

pub(super) fn sample_cpuid() -> Vec<CpuidEntry> {
    let e = |function, index, eax, ebx, ecx, edx| CpuidEntry { function, index, flags: 0, eax, ebx, ecx, edx };
    let v = |s: &[u8; 4]| u32::from_le_bytes(*s);
    vec![
        e(0, 0, 0x1f, v(b"Genu"), v(b"ntel"), v(b"ineI")),
        e(1, 0, 0x806f8, 0x0800, 0xfffa3203, 0x178bfbff),
        e(7, 0, 2, 0xf1bf27ab, 0x1b415f6e, 0xbc18c410),
        e(0x4000_0000, 0, 0x4000_0001, v(b"KVMK"), v(b"VMKV"), v(b"M\0\0\0")),
    ]
}

/// A snapshot with every section filled with real-shaped data.
pub(super) fn sample(vcpus: u8) -> Snapshot {
    Snapshot {
        header: Header::for_this_host(sample_cpuid()),
        vcpus: (0..vcpus).map(samples::vcpu).collect(),
        chipset: Chipset { state: samples::vm(), clock: 123_456_789_000 },
        devices: sample_devices(),
        memory_map: vec![
            MemoryRange { guest_addr: 0, len: 1 << 20, file_offset: 0 },
            MemoryRange { guest_addr: 1 << 32, len: 64 << 10, file_offset: 1 << 20 },
        ],
        memory_file: MemoryFileRef { path: "guest.mem".into(), size: (1 << 20) + (64 << 10) + MEMORY_TRAILER_SIZE, id: [7; 16], diff: None },
        patched_sites: vec![PatchedSite { guest_addr: 0x100_0000, original: vec![0x8b, 0x05, 0x80, 0x00, 0xe0, 0xfe], patched: vec![0x0f, 0x01, 0xc1, 0x90, 0x90, 0x90] }],
        machine: sample_machine(vcpus, (1 << 20) + (64 << 10)),
    }
}

/// A machine record that fits `sample`'s vCPUs and memory map.
pub(super) fn sample_machine(cpus: u8, memory: u64) -> Machine {
    Machine {
        cpus,
        memory,
        kernel: "/boot/vmlinux".into(),
        initrd: Some("/boot/initrd.cpio".into()),
        cmdline: "console=ttyS0".into(),
        guest_cmdline: "console=ttyS0 clearcpuid=avx512f".into(),
        pvh: false,
        on_reboot_exit: false,
        guest_defaults: false,
        rng: true,
        pci: false,
        disks: vec![DiskRecord { path: "/tmp/disk.img".into(), read_only: true, id: Some("d0".into()), direct: false, dev: 2049, ino: 77, size: 1 << 20, mtime_ns: 1_700_000_000_000_000_000 }],
        boot: Some(Boot::Multiboot),
        kernel_args: Some("console=ttyS0".into()),
        modules: vec![("/boot/mod1".into(), "mod1 arg".into())],
        exit_device: Some((0xf4, 1)),
        fw_cfg: vec![("opt/skiff/x".into(), b"hello".to_vec())],
        network: crate::snapshot::NetworkRecord { nets: vec![("tap0".into(), [2, 0x5f, 1, 2, 3, 4])], vsock: Some((3, "/tmp/v.sock".into())) },
    }
}

/// Asserts two snapshots hold the same state, section by section.
pub(super) fn assert_same(a: &Snapshot, b: &Snapshot) {
    assert_eq!(a.header, b.header);
    assert_eq!(a.vcpus.len(), b.vcpus.len());
    for (i, (x, y)) in a.vcpus.iter().zip(&b.vcpus).enumerate() {
        assert!(x.diff(y).is_empty(), "vCPU {i}: {:?}", x.diff(y));
    }
    assert!(a.chipset.state.diff(&b.chipset.state).is_empty());
    assert_eq!(a.chipset.clock, b.chipset.clock);
    assert_eq!(a.devices, b.devices);
    assert_eq!(a.memory_map, b.memory_map);
    assert_eq!(a.memory_file, b.memory_file);
    assert_eq!(a.patched_sites, b.patched_sites);
    assert_eq!(a.machine, b.machine);
}

/// The version 1 sections of `s`, as `frame` takes them.
pub(super) fn out_sections(s: &Snapshot) -> Vec<OutSection> {
    section_payloads(s).unwrap().into_iter().map(|(k, p)| (k as u32, k.version(), true, p)).collect()
}

/// A file in format version 0 (see format.rs): the fixture for the upgrade path.
pub(super) fn encode_v0(s: &Snapshot) -> Vec<u8> {
    let h = HeaderV0 { skiff_version: "0.0.9".into(), cpuid: s.header.cpuid.clone() };
    let body = bincode::Options::serialize(bincode::DefaultOptions::new(), &h).unwrap();
    let sections: Vec<_> = section_payloads(s).unwrap().into_iter().filter(|(k, _)| *k != SectionKind::PatchedSites).collect();
    let mut out = MAGIC.to_vec();
    out.extend(0u32.to_le_bytes());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend((sections.len() as u32).to_le_bytes());
    out.extend(crc32fast::hash(&[&out[..], &body[..]].concat()).to_le_bytes());
    out.extend(body);
    for (kind, payload) in sections {
        let start = out.len();
        out.extend((kind as u32).to_le_bytes());
        out.extend(kind.version().to_le_bytes());
        out.extend((payload.len() as u64).to_le_bytes());
        let crc = crc32fast::hash(&[&out[start..], &payload[..]].concat());
        out.extend(crc.to_le_bytes());
        out.extend(payload);
    }
    out
}

#[test]
fn every_section_round_trips() {
    for n in [1, 2, 4] {
        let s = sample(n);
        let bytes = encode(&s).unwrap();
        assert_eq!(&bytes[..8], b"SKIFFSNP");
        assert_same(&s, &decode(&bytes).unwrap());
    }
    // A diff's memory-file section and an empty patched-sites list.
    let mut s = sample(1);
    s.patched_sites.clear();
    s.memory_file.diff = Some(DiffOf { parent_snapshot: "../base.snap".into(), parent_size: 4242, parent_memory_id: [9; 16], pages: vec![(0, 3), (10, 1), (256, 16)] });
    assert_same(&s, &decode(&encode(&s).unwrap()).unwrap());
}

#[test]
fn written_and_read_through_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TmpDir::new("file");
    let path = dir.path("vm.snap");
    let s = sample(2);
    write_snapshot(&path, &s).unwrap();
    assert_eq!(dir.entries(), ["vm.snap"], "no temporary file is left");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_same(&s, &read_snapshot(&path).unwrap());
    // Overwriting replaces it whole.
    let s4 = sample(4);
    write_snapshot(&path, &s4).unwrap();
    assert_eq!(read_snapshot(&path).unwrap().vcpus.len(), 4);
}

#[test]
fn header_says_who_wrote_it() {
    let s = decode(&encode(&sample(1)).unwrap()).unwrap();
    assert_eq!(s.header.skiff_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.header.cpu_vendor, host_cpu_vendor());
    assert_eq!(s.header.cpuid, sample_cpuid());
    assert_eq!(s.header.cpu_vendor.len(), 12);
}

#[test]
fn unknown_optional_sections_are_skipped() {
    let s = sample(2);
    let mut sections = out_sections(&s);
    // A later skiff's sections, of a kind and version this one never heard of, in the
    // middle and at the end.
    sections.insert(1, (0x7f01, 3, false, b"future vCPU extras".to_vec()));
    sections.push((0x7f02, 1, false, vec![0xff; 5000]));
    // A known kind in a version this skiff cannot read, marked optional.
    sections.push((SectionKind::PatchedSites as u32, 2, false, vec![1, 2, 3]));
    let bytes = frame(&s.header, &sections).unwrap();
    assert_same(&s, &decode(&bytes).unwrap());
}

#[test]
fn version_0_files_are_read_through_the_upgrade() {
    let mut s = sample(2);
    let v0 = encode_v0(&s);
    let up = decode(&v0).unwrap();
    // The upgrade supplied what version 0 lacked: the vendor from the guest's CPUID
    // leaf 0, and no patched sites.
    assert_eq!(up.header.cpu_vendor, "GenuineIntel");
    assert_eq!(up.header.skiff_version, "0.0.9");
    assert!(up.patched_sites.is_empty());
    s.header = up.header.clone();
    s.patched_sites.clear();
    assert_same(&s, &up);
    // And it goes on to version 1 when written again.
    let again = encode(&up).unwrap();
    assert_eq!(u32::from_le_bytes(again[8..12].try_into().unwrap()), FORMAT_VERSION);
    assert_same(&up, &decode(&again).unwrap());
}

#[test]
fn version_0_without_leaf_0_has_no_vendor() {
    let mut s = sample(1);
    s.header.cpuid.retain(|e| e.function != 0);
    assert_eq!(decode(&encode_v0(&s)).unwrap().header.cpu_vendor, "");
}

/// Device states are serde values in a format that is not self-describing: a change of
/// DeviceState's shape must come with a new DEVICE_STATE_VERSION (and upgrade code).
/// This pins the encoding of one device of every kind version 1 had: version 2 only
/// appended a kind, so these bytes (a version 1 payload) still decode the same.
#[test]
fn device_state_encoding_is_pinned() {
    let v1: Vec<SavedDevice> = sample_devices().into_iter().map(|d| SavedDevice { version: 1, ..d }).collect();
    let bytes = bincode::Options::serialize(bincode::DefaultOptions::new(), &v1).unwrap();
    assert_eq!((bytes.len(), crc32fast::hash(&bytes)), PINNED_DEVICES, "a version 1 DeviceState changed shape");
    let keyboard = DeviceState::Keyboard(crate::devices::i8042::I8042Regs {
        config: 0x47,
        output: vec![0xfa, 0xab],
        pending: Some(crate::devices::i8042::Pending::KeyboardParameter(0xed)),
        last_was_command: true,
        scanning: false,
    });
    let bytes = bincode::Options::serialize(bincode::DefaultOptions::new(), &keyboard).unwrap();
    assert_eq!(
        (bytes.len(), crc32fast::hash(&bytes), DEVICE_STATE_VERSION),
        (PINNED_KEYBOARD.0, PINNED_KEYBOARD.1, 3),
        "DeviceState changed shape: bump DEVICE_STATE_VERSION, read the old one in snapshot/format.rs, then update this value"
    );
}

const PINNED_KEYBOARD: (usize, u32) = (10, 565_461_280);
const PINNED_DEVICES: (usize, u32) = (329, 2_427_677_232);

#[test]
fn section_kinds_are_stable() {
    // Ids are written in files: they never change meaning.
    let ids: Vec<(u32, &str)> = (0..8).filter_map(SectionKind::from_id).map(|k| (k as u32, k.name())).collect();
    assert_eq!(ids, [(1, "vcpu"), (2, "chipset"), (3, "devices"), (4, "memory-map"), (5, "memory-file"), (6, "patched-sites"), (7, "machine")]);
}

#[test]
fn host_checks() {
    let h = Header { skiff_version: "0.1.0".into(), cpu_vendor: "GenuineIntel".into(), cpuid: sample_cpuid() };
    let mut supported = sample_cpuid();
    check_host(&h, "GenuineIntel", &supported).unwrap();
    let e = check_host(&h, "AuthenticAMD", &supported).unwrap_err().to_string();
    assert_eq!(e, "the snapshot was made on a \"GenuineIntel\" CPU, this host's is \"AuthenticAMD\"");
    // AVX-512F (leaf 7 EBX bit 16) and a KVM feature missing here.
    supported[2].ebx &= !(1 << 16);
    supported.retain(|e| e.function != 0x4000_0000);
    let mut h2 = h.clone();
    h2.cpuid.push(CpuidEntry { function: 0x4000_0001, index: 0, flags: 0, eax: 0x1, ebx: 0, ecx: 0, edx: 0 });
    let e = check_host(&h2, "GenuineIntel", &supported).unwrap_err().to_string();
    assert_eq!(e, "this host lacks CPU features the guest was given: leaf 0x7.0 Ebx bits 0x10000, leaf 0x40000001.0 Eax bits 0x1");
    // Bits that describe the guest, not the host, are not features.
    let mut h3 = h.clone();
    h3.cpuid[1].ecx |= 1 << 31 | 1 << 27;
    h3.cpuid[1].edx |= 1 << 28;
    check_host(&h3, "GenuineIntel", &sample_cpuid()).unwrap();
}
