//! The control API's requests, done to the running machine (api/ parses them and
//! answers; this is the [`Controller`] it calls). Called on the event loop's thread
//! between events, so a request sees the machine between exits, never mid-change.

use std::sync::atomic::Ordering;

use super::snapshot::Kind;
use super::vcpus::VcpuSet;
use super::{RestoreOptions, Vmm};
use crate::config::{OnReboot, VmConfig};
use crate::api::{ApiServer, ControlError, Controller, InstanceInfo, InstanceState, MachineConfig, SnapshotCreate, SnapshotLoad, SnapshotType};
use crate::stats::{ExitKind, ExitStats};

/// How long a pause waits for a console that takes nothing.
const CONSOLE_STALL: std::time::Duration = std::time::Duration::from_millis(100);

/// The machine and its vCPU threads, for one round of API requests.
pub(super) struct Api<'a> {
    pub vmm: &'a mut Vmm,
    pub set: &'a mut VcpuSet,
    /// Exit statistics taken from the vCPUs so far (GET /stats takes them early).
    pub stats: &'a mut ExitStats,
}

/// Answers every request the socket has ready.
pub(super) fn serve(server: &mut ApiServer, mut api: Api) {
    for incoming in server.take_requests() {
        let response = crate::api::dispatch(&incoming.request, &mut api);
        server.respond(incoming.token, response);
    }
}

impl Controller for Api<'_> {
    fn pause(&mut self) -> Result<(), ControlError> {
        if self.set.paused() {
            return Ok(());
        }
        self.set.pause_all().map_err(|e| ControlError::Internal(e.to_string()))?;
        // What the guest printed before the pause reaches the console before the
        // answer does (as long as the console takes it), so a client that snapshots
        // and then kills skiff has seen all of it.
        self.vmm.console.drain(CONSOLE_STALL);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), ControlError> {
        if self.vmm.control.stopping() {
            return Err(ControlError::Refused("the machine is stopping".into()));
        }
        if !self.set.paused() {
            return Ok(());
        }
        self.vmm.first_resume.get_or_insert_with(std::time::Instant::now);
        self.set.resume_all().map_err(|e| ControlError::Internal(e.to_string()))
    }

    fn create_snapshot(&mut self, p: &SnapshotCreate) -> Result<(), ControlError> {
        let kind = match p.snapshot_type {
            SnapshotType::Full => Kind::Full,
            SnapshotType::Diff => Kind::Diff,
        };
        let taken = self.vmm.create_snapshot(self.set, &p.snapshot_path, &p.mem_file_path, kind)?;
        if self.vmm.config.stats {
            crate::output::stderr(&format!(
                "\r\nskiff: snapshot {} taken in {:.1} ms ({} pages of memory written)\r\n",
                p.snapshot_path.display(),
                taken.ms,
                taken.pages_written
            ));
        }
        Ok(())
    }

    fn load_snapshot(&mut self, _: &SnapshotLoad) -> Result<(), ControlError> {
        Err(ControlError::Refused(
            "this skiff already runs a machine: load a snapshot into a new `skiff restore --api-sock PATH` (or `skiff restore --snapshot PATH`)".into(),
        ))
    }

    fn info(&mut self) -> Result<InstanceInfo, ControlError> {
        let state = if self.set.paused() { InstanceState::Paused } else { InstanceState::Running };
        Ok(InstanceInfo::new(format!("skiff-{}", std::process::id()), state))
    }

    fn machine_config(&mut self) -> Result<MachineConfig, ControlError> {
        let c = &self.vmm.config;
        Ok(MachineConfig { vcpu_count: u32::from(c.cpus), mem_size_mib: c.memory >> 20, smt: false, track_dirty_pages: false })
    }

    fn stats(&mut self) -> Result<serde_json::Value, ControlError> {
        let (s, _) = self.set.take_stats().map_err(|e| ControlError::Internal(e.to_string()))?;
        self.stats.merge(&s);
        let exits: serde_json::Map<String, serde_json::Value> =
            ExitKind::ALL.iter().map(|k| (k.name().split(' ').next().unwrap_or_default().to_string(), self.stats.by_kind.get(*k as usize).copied().unwrap_or(0).into())).collect();
        let ports: serde_json::Map<String, serde_json::Value> = self.stats.ports().map(|(p, n)| (format!("{p:#x}"), n.into())).collect();
        let virtio: Vec<serde_json::Value> = self
            .vmm
            .devices
            .virtio
            .iter()
            .map(|v| serde_json::json!({ "name": v.name, "stats": v.device.stats() }))
            .collect();
        let buses = &self.vmm.devices.buses;
        Ok(serde_json::json!({
            "state": if self.set.paused() { "Paused" } else { "Running" },
            "exits": exits,
            "port_exits": ports,
            "virtio": virtio,
            "doorbell_writes": buses.doorbells_rung(),
            "console_bytes": self.vmm.console_bytes.load(Ordering::Relaxed),
        }))
    }

    fn ctrl_alt_del(&mut self) -> Result<(), ControlError> {
        self.vmm.devices.legacy.i8042.ctrl_alt_del().map_err(|e| ControlError::Refused(format!("SendCtrlAltDel: {e}")))
    }
}

/// `skiff restore --api-sock` without `--snapshot`: no machine yet. The API answers
/// (GET / says "Not started") until `PUT /snapshot/load` restores one, as a fresh
/// Firecracker does; a stop signal ends the wait.
pub fn wait_for_load(server: &mut ApiServer, like: &VmConfig, on_reboot: Option<OnReboot>) -> Result<Vmm, String> {
    let mut loader = Loader { like, on_reboot, vmm: None };
    loop {
        let sig = crate::control::STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            return Err(format!("stopped by signal {sig} while waiting for PUT /snapshot/load"));
        }
        let mut fds = [libc::pollfd { fd: server.fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: one valid pollfd for an fd the server owns, for the call's duration.
        let _ = unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        for incoming in server.take_requests() {
            let response = crate::api::dispatch(&incoming.request, &mut loader);
            server.respond(incoming.token, response);
        }
        if let Some(vmm) = loader.vmm.take() {
            return Ok(vmm);
        }
    }
}

/// The API before a machine exists: only a load can be done.
struct Loader<'a> {
    like: &'a VmConfig,
    /// `skiff restore --on-reboot`, over the snapshot's choice.
    on_reboot: Option<OnReboot>,
    vmm: Option<Vmm>,
}

fn not_yet() -> ControlError {
    ControlError::Refused("no machine yet: load a snapshot first (PUT /snapshot/load)".into())
}

impl Controller for Loader<'_> {
    fn pause(&mut self) -> Result<(), ControlError> {
        Err(not_yet())
    }
    fn resume(&mut self) -> Result<(), ControlError> {
        Err(not_yet())
    }
    fn create_snapshot(&mut self, _: &SnapshotCreate) -> Result<(), ControlError> {
        Err(not_yet())
    }
    fn load_snapshot(&mut self, p: &SnapshotLoad) -> Result<(), ControlError> {
        if self.vmm.is_some() {
            return Err(ControlError::Refused("a snapshot is already loaded".into()));
        }
        // track_dirty_pages needs nothing: a diff is found by comparing with its
        // parent (snapshot/pages.rs), so it is always available.
        let opts =
            RestoreOptions { snapshot: &p.snapshot_path, mem_file: Some(&p.mem_file_path), resume: p.resume_vm, on_reboot: self.on_reboot, relocate: Default::default() };
        let vmm = Vmm::restore(&opts, self.like, Box::new(crate::output::RawStdout)).map_err(|e| ControlError::Refused(e.to_string()))?;
        self.vmm = Some(vmm);
        Ok(())
    }
    fn info(&mut self) -> Result<InstanceInfo, ControlError> {
        Ok(InstanceInfo::new(format!("skiff-{}", std::process::id()), InstanceState::NotStarted))
    }
    fn machine_config(&mut self) -> Result<MachineConfig, ControlError> {
        Err(not_yet())
    }
    fn stats(&mut self) -> Result<serde_json::Value, ControlError> {
        Err(not_yet())
    }
    fn ctrl_alt_del(&mut self) -> Result<(), ControlError> {
        Err(not_yet())
    }
}
