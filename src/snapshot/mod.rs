//! Snapshot files: what a paused machine is, written so that a later skiff (or this
//! one) can refuse it cleanly or read it exactly.
//!
//! Two files make a snapshot:
//! - the snapshot file (this module's [`Snapshot`]): a header, then sections, each
//!   with its own kind, version, "may a reader that does not know it skip it" flag,
//!   length and CRC-32 (`format.rs`, layout documented there);
//! - the guest-memory file (`memory.rs`): guest RAM at page-aligned offsets, zero
//!   pages left as holes, so restore maps it private and pages come in on first
//!   touch. A diff memory file holds only the pages a dirty bitmap names, and its
//!   snapshot names the snapshot it applies on top of.
//!
//! Reading checks everything (magic, lengths, checksums, versions, every section's
//! content) before it returns, so a caller applies either a whole snapshot or nothing.
//! Writing is atomic (`atomic.rs`): a crash or error never leaves a half-written file
//! under the final name.

mod atomic;
mod format;
mod host;
mod machine;
mod memory;
mod pages;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::vcpu::state::{VcpuState, VmState};
use crate::vmm::devices::SavedDevice;

pub use atomic::write_atomic;
pub use host::check_host;
pub use machine::{Boot, DiskRecord, Machine, NetworkRecord, Relocation};
pub use format::{FORMAT_VERSION, MAGIC, SectionKind, decode, encode, read_snapshot, write_snapshot};
pub use pages::changed_since;
pub use memory::{MEMORY_TRAILER_SIZE, MemoryWritten, PAGE_SIZE, map_memory, write_memory_diff, write_memory_full};

/// Everything a snapshot holds, read back whole and checked, or not at all.
pub struct Snapshot {
    pub header: Header,
    /// One per vCPU, in vCPU index order.
    pub vcpus: Vec<VcpuState>,
    pub chipset: Chipset,
    pub devices: Vec<SavedDevice>,
    /// Guest physical ranges and where each lies in the memory file.
    pub memory_map: Vec<MemoryRange>,
    pub memory_file: MemoryFileRef,
    pub patched_sites: Vec<PatchedSite>,
    /// The machine's shape and the files behind it.
    pub machine: Machine,
}

/// Who wrote the snapshot and what CPU the guest was shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// skiff's package version (information: compatibility is the format version's).
    pub skiff_version: String,
    /// The host CPU's vendor string (CPUID leaf 0), e.g. "GenuineIntel".
    pub cpu_vendor: String,
    /// The CPUID table the guest was given (before the per-vCPU APIC ID and topology
    /// fields, which restore derives again from the vCPU index).
    pub cpuid: Vec<CpuidEntry>,
}

impl Header {
    /// A header for this skiff on this host.
    pub fn for_this_host(cpuid: Vec<CpuidEntry>) -> Self {
        Header { skiff_version: env!("CARGO_PKG_VERSION").into(), cpu_vendor: host_cpu_vendor(), cpuid }
    }
}

/// The host CPU's vendor string, from CPUID leaf 0 (EBX, EDX, ECX).
pub fn host_cpu_vendor() -> String {
    let l0 = std::arch::x86_64::__cpuid(0);
    vendor_string(l0.ebx, l0.edx, l0.ecx)
}

fn vendor_string(ebx: u32, edx: u32, ecx: u32) -> String {
    let bytes: Vec<u8> = [ebx, edx, ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One CPUID entry, in skiff's own stable shape (kvm_cpuid_entry2 without padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry { function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 { function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx, ..Default::default() }
    }
}

/// The VM-wide state: the in-kernel PICs, I/O APIC and PIT, and kvm-clock's value
/// (kept beside `VmState` because an in-place reset must not set it; a restore does).
#[derive(Clone)]
pub struct Chipset {
    pub state: VmState,
    pub clock: u64,
}

/// A range of guest RAM and where its pages are in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The memory file a snapshot goes with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileRef {
    /// Absolute as skiff writes it; a relative path is relative to the snapshot
    /// file's directory.
    pub path: String,
    /// The file's size in bytes (guest RAM plus the identity trailer).
    pub size: u64,
    /// Random identity, also in the memory file's trailer: a memory file that was
    /// replaced or belongs to another snapshot is refused.
    pub id: [u8; 16],
    /// Present for a diff: what it applies on top of, and which pages it holds.
    pub diff: Option<DiffOf>,
}

/// A diff memory file's parent and contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffOf {
    /// The parent snapshot file (relative paths: to this snapshot's directory).
    pub parent_snapshot: String,
    /// Its size in bytes, and its memory file's identity: a parent rewritten since is
    /// refused before anything is mapped.
    pub parent_size: u64,
    pub parent_memory_id: [u8; 16],
    /// The pages this diff holds, as (first page, page count) runs in memory-file
    /// pages. A listed page that reads as a hole is a page the guest zeroed.
    pub pages: Vec<(u64, u64)>,
}

/// A place in guest memory skiff patched (seed 000's TPR accesses, src/tpr/): a
/// restored machine with any turns TPR reports and the vAPIC slots on again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchedSite {
    pub guest_addr: u64,
    pub original: Vec<u8>,
    pub patched: Vec<u8>,
}

/// Why a snapshot could not be written or read: one line each.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {op}: {err}")]
    Io { path: PathBuf, op: &'static str, err: std::io::Error },
    #[error("not a skiff snapshot (wrong magic)")]
    BadMagic,
    #[error("truncated: {what} needs {need} bytes at offset {at}, the file has {len}")]
    Truncated { what: String, at: u64, need: u64, len: u64 },
    #[error("{0} bytes after the last section: the file was extended or damaged")]
    TrailingBytes(u64),
    #[error("checksum mismatch in the header")]
    HeaderChecksum,
    #[error("checksum mismatch in section {index} ({kind})")]
    SectionChecksum { index: u32, kind: String },
    #[error("format version {found} is newer than this skiff reads (up to {FORMAT_VERSION})")]
    NewerFormat { found: u32 },
    #[error("section {index} is of kind {kind}, which this skiff does not know and may not skip")]
    UnknownRequired { index: u32, kind: u32 },
    #[error("section {kind}: version {found}, this skiff reads up to {supported}")]
    SectionVersion { kind: &'static str, found: u32, supported: u32 },
    #[error("section {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
    #[error("no {0} section")]
    Missing(&'static str),
    #[error("a second {0} section")]
    Duplicate(&'static str),
    #[error("memory file {path}: {reason}")]
    MemoryFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Memory(String),
    #[error("{0}")]
    Host(String),
    #[error("encoding {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

impl SnapshotError {
    fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |err| SnapshotError::Io { path, op, err }
    }
}
