//! Building a machine from a snapshot instead of a kernel: the same machine as
//! `build` makes (vCPUs, chipset, devices in the same places), then the snapshot's
//! state put into it. Guest memory is the memory file mapped private, so pages come
//! in as the guest touches them and the file is never written.
//!
//! Everything that can refuse the snapshot (its checksums and shape, this host's CPU,
//! the disks) is checked before the VM exists; nothing is written anywhere.

use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{CpuId, kvm_clock_data, kvm_cpuid_entry2};

use super::*;
use crate::snapshot::{self, CpuidEntry, Snapshot};
use crate::vcpu::state::VmClock;

/// What the restoring command chose.
pub struct RestoreOptions<'a> {
    pub snapshot: &'a Path,
    /// The memory file, where it is not where the snapshot says.
    pub mem_file: Option<&'a Path>,
    /// Run the guest at once; otherwise it waits, paused, for the API to resume it.
    pub resume: bool,
    /// What a guest reboot does, where not what the snapshotted machine had.
    pub on_reboot: Option<OnReboot>,
    /// Copies of the disks and a vsock socket to use instead of the snapshot's.
    pub relocate: snapshot::Relocation<'a>,
}

impl Vmm {
    /// Builds the machine a snapshot describes and puts its state. `like` gives the
    /// restoring command's own choices (statistics, coalescing, probing); the
    /// machine's shape comes from the snapshot.
    pub fn restore(opts: &RestoreOptions, like: &VmConfig, console: Box<dyn std::io::Write + Send>) -> Result<Self, VmmError> {
        let mut phases = Phases::new();
        let fail = |e: snapshot::SnapshotError| VmmError::Snapshot(format!("{}: {e}", opts.snapshot.display()));
        let mut snap = snapshot::read_snapshot(opts.snapshot).map_err(fail)?;
        if let Some(m) = opts.mem_file {
            snap.memory_file.path = m.to_str().ok_or_else(|| VmmError::Snapshot(format!("{}: not a UTF-8 path", m.display())))?.to_string();
        }
        phases.done("snapshot read and checked");
        let kvm = open_kvm()?;
        check_caps(&kvm)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let host: Vec<CpuidEntry> = supported.as_slice().iter().map(CpuidEntry::from).collect();
        snapshot::check_host(&snap.header, &snapshot::host_cpu_vendor(), &host).map_err(fail)?;
        snap.machine.relocate_and_check(&opts.relocate).map_err(|e| VmmError::Snapshot(format!("{}: {e}", opts.snapshot.display())))?;
        let mut config = snap.machine.config(like);
        if let Some(on_reboot) = opts.on_reboot {
            config.on_reboot = on_reboot;
        }
        let guest_cpuid = cpuid_of(&snap)?;
        // The MSRs that make up a vCPU's state are the snapshot's (no discovery).
        let msr_list: Vec<u32> = snap.vcpus.first().map(|v| v.msrs.0.iter().map(|e| e.index).collect()).unwrap_or_default();
        phases.done("host and disks checked");
        // The probe's cached findings: whether the SYSCALL fix-up is needed here. The
        // guest's CPUID is the snapshot's, never a new probe's.
        let probe = spawn_probe(&supported, like.reprobe)?;
        let disks = open_disks(&config)?;
        let nets = open_nets(&config)?;
        let mem = snapshot::map_memory(opts.snapshot, &snap).map_err(fail)?;
        phases.done("memory mapped, disks opened");
        let (vm, vm_pristine, quirks, probe_origin) = create_vm(&kvm, &mem, probe)?;
        phases.done("VM and chipset created");

        let control = Arc::new(Control::new());
        let console = Console::start(console).map_err(VmmError::Thread)?;
        let out = ConsoleOut::new(console.clone());
        let console_bytes = out.bytes.clone();
        let console_first_byte = out.first_byte.clone();
        let mut devices = build_devices(&kvm, &vm, &mem, &config, &control, out, disks, nets)?;
        let failure_bytes = report_failed_instruction_bytes(&vm);
        let mut vcpus = create_vcpus(&kvm, &vm, &config, &mem, &devices.buses, &control, &supported, &guest_cpuid, quirks.user_syscall_broken, Some(&msr_list))?;
        attach_hypercalls(&mut vcpus, &devices, &quirks);
        // Patched TPR sites in the snapshot's memory call the helper: the vAPIC slots
        // and TPR reports must be on again (they are KVM state outside the vCPU's).
        let (tpr, tpr_why) = if snap.patched_sites.is_empty() {
            (None, "off (restored: the snapshot has no patched TPR sites)".to_string())
        } else if kvm.check_extension_raw(crate::tpr::KVM_CAP_VAPIC as libc::c_ulong) <= 0 {
            return Err(VmmError::Snapshot(format!("{}: has patched TPR sites, and this KVM lacks KVM_CAP_VAPIC", opts.snapshot.display())));
        } else {
            let why = format!("on (restored: the snapshot has {} patched TPR sites)", snap.patched_sites.len());
            let t = Arc::new(crate::tpr::Tpr::new(why.clone()));
            t.set_sites(snap.patched_sites.clone());
            (Some(t), why)
        };
        for v in &mut vcpus {
            v.tpr = tpr.clone();
        }
        phases.done("devices and vCPUs created");
        put_state(&vm, &mut vcpus, &devices, &snap)?;
        phases.done("state put");
        let (coalescing, doorbells) = setup_fast_paths(&kvm, &vm, &config, &vcpus, &mut devices);
        phases.done("ioeventfds and coalescing");
        // Requests the guest queued before the snapshot and no device took yet: a
        // look at every queue, as a notification would make.
        for v in &devices.virtio {
            for (queue, _) in &v.notifiers {
                v.device.notify(*queue);
            }
        }
        Ok(Vmm {
            _kvm: kvm,
            vm,
            config,
            mem,
            vcpus,
            control,
            devices,
            console,
            console_bytes,
            quirks,
            probe_origin,
            console_first_byte,
            cmdline: snap.machine.guest_cmdline.clone(),
            vm_pristine,
            coalescing,
            doorbells,
            failure_bytes,
            guest_cpuid,
            start_paused: !opts.resume,
            diff_base: Some(opts.snapshot.to_path_buf()),
            first_resume: None,
            gdb: None,
            restore_phases: phases.list,
            tpr,
            tpr_why,
        })
    }
}

/// Each phase's milliseconds, for --stats.
struct Phases {
    last: std::time::Instant,
    list: Vec<(&'static str, f64)>,
}

impl Phases {
    fn new() -> Self {
        Phases { last: std::time::Instant::now(), list: Vec::new() }
    }
    fn done(&mut self, what: &'static str) {
        let now = std::time::Instant::now();
        self.list.push((what, now.duration_since(self.last).as_secs_f64() * 1e3));
        self.last = now;
    }
}

/// The snapshot's CPUID table as KVM takes it.
fn cpuid_of(snap: &Snapshot) -> Result<CpuId, VmmError> {
    let entries: Vec<kvm_cpuid_entry2> = snap.header.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
    CpuId::from_entries(&entries).map_err(|e| VmmError::Snapshot(format!("the snapshot's CPUID table: {e:?}")))
}

/// Puts the snapshot's vCPU, chipset, clock and device state into the new machine.
fn put_state(vm: &VmFd, vcpus: &mut [Vcpu], devices: &DeviceManager, snap: &Snapshot) -> Result<(), VmmError> {
    for (vcpu, state) in vcpus.iter_mut().zip(&snap.vcpus) {
        vcpu.restore_state(state)?;
    }
    snap.chipset.state.put(vm).map_err(|e| VmmError::Snapshot(format!("putting the chipset: {e}")))?;
    let clock = VmClock(kvm_clock_data { clock: snap.chipset.clock, ..Default::default() });
    clock.put(vm).map_err(|e| VmmError::Snapshot(format!("putting kvm-clock: {e}")))?;
    devices.restore(&snap.devices).map_err(|e| VmmError::Snapshot(format!("restoring devices: {e}")))
}
