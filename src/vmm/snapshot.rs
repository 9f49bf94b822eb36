//! Taking a snapshot of a paused machine: every vCPU's state (taken on its own
//! thread), the chipset and kvm-clock, every device's declared state (after its
//! requests in flight finished), the machine's shape, and guest memory in a file of
//! its own. The memory file is written first and the snapshot file last, each
//! atomically, so a snapshot file on disk always names a whole memory file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::Vmm;
use super::vcpus::VcpuSet;
use crate::snapshot::{self, Chipset, CpuidEntry, Header, Machine, Snapshot};
use crate::vcpu::state::{VmClock, VmState};

/// What kind of snapshot to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Full,
    /// Only the pages written since the last snapshot, on top of it.
    Diff,
}

/// What a snapshot took.
#[derive(Clone, Debug)]
pub struct Taken {
    pub pages_written: u64,
    pub ms: f64,
}

impl Vmm {
    /// Writes a snapshot of the paused machine to `path`, its memory to `mem_path`.
    /// Nothing is left under either name when it fails.
    pub(super) fn create_snapshot(&mut self, set: &VcpuSet, path: &Path, mem_path: &Path, kind: Kind) -> Result<Taken, String> {
        let t = Instant::now();
        if !set.paused() {
            return Err("the machine is running: pause it first (PATCH /vm {\"state\": \"Paused\"})".into());
        }
        check_paths(path, mem_path)?;
        let parent = match kind {
            Kind::Full => None,
            Kind::Diff => Some(self.diff_base.clone().ok_or(
                "a diff snapshot needs a full one before it, taken or restored since the machine started or was last reset",
            )?),
        };
        if let Some(p) = &parent
            && same_file(p, path)
        {
            return Err(format!("{}: is the snapshot this diff applies on top of: write the diff elsewhere", path.display()));
        }
        // Everything deferred reaches its device first, then devices finish their
        // requests in flight (inside `save`), so memory and device state agree.
        self.devices.buses.flush_coalesced();
        self.devices.buses.drain_doorbells();
        let vcpus = set.save_all().map_err(|e| e.to_string())?;
        let devices = self.devices.save();
        let state = VmState::get(&self.vm).map_err(|e| format!("reading the chipset: {e}"))?;
        let clock = VmClock::get(&self.vm).map_err(|e| format!("reading kvm-clock: {e}"))?.0.clock;
        let machine = Machine::of(&self.config, &self.cmdline)?;
        let written = match &parent {
            None => snapshot::write_memory_full(mem_path, &self.mem),
            Some(p) => snapshot::changed_since(&self.mem, p).and_then(|dirty| snapshot::write_memory_diff(mem_path, &self.mem, &dirty, p)),
        }
        .map_err(|e| e.to_string())?;
        let snap = Snapshot {
            header: Header::for_this_host(self.guest_cpuid.as_slice().iter().map(CpuidEntry::from).collect()),
            vcpus,
            chipset: Chipset { state, clock },
            devices,
            memory_map: written.map,
            memory_file: written.file,
            patched_sites: self.tpr.as_ref().map(|t| t.sites()).unwrap_or_default(),
            machine,
        };
        if let Err(e) = snapshot::write_snapshot(path, &snap) {
            let _ = std::fs::remove_file(mem_path);
            return Err(e.to_string());
        }
        self.diff_base = Some(path.to_path_buf());
        Ok(Taken { pages_written: written.pages_written, ms: t.elapsed().as_secs_f64() * 1e3 })
    }
}

/// Whether two paths name one existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// Refuses paths that cannot both be written: the same file for both, or a
/// directory that does not exist.
fn check_paths(path: &Path, mem_path: &Path) -> Result<(), String> {
    if path == mem_path {
        return Err(format!("{}: the snapshot and the memory file must be different files", path.display()));
    }
    for p in [path, mem_path] {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(format!("{}: directory {} does not exist", p.display(), dir.display()));
        }
        if p.is_dir() {
            return Err(format!("{}: is a directory", p.display()));
        }
    }
    Ok(())
}
