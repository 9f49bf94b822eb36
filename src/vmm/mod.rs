//! The machine as a whole: build it (KVM VM, memory, irqchip, devices, vCPUs), run it,
//! reset it, and stop it. The lifecycle: build -> power on -> run (a thread per vCPU,
//! living as long as the machine; the event loop on the main thread) -> a stop request
//! (poweroff, reboot, error, signal) wakes the loop, which pauses every vCPU -> on a
//! reboot, reset in place and resume; otherwise report. Rooms: devices.rs (the device
//! manager), event_loop.rs, vcpus.rs (the vCPU threads as a set), run.rs (the lifecycle).

pub mod acpi;
mod api;
pub use api::wait_for_load;
pub mod devices;
pub mod event_loop;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod reboot;
mod restore;
mod run;
mod snapshot;
pub mod vcpus;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::config::{OnReboot, VmConfig};
use crate::control::{self, Control, StopReason};
use crate::devices::Buses;
use crate::devices::serial::{Console, ConsoleOut, spawn_stdin_pump};
use crate::stats::ExitStats;
use crate::vcpu::msr::MsrSet;
use crate::vcpu::probe::{HostQuirks, ProbeOrigin, ProbePolicy};
use crate::vcpu::reset::Vendor;
use crate::vcpu::state::VmState;
use crate::vcpu::{BootEntry, StateSpec, Vcpu, cpuid, kick, probe};
use devices::DeviceManager;
use layout::*;
pub use reboot::{RebootRecord, RebootSummary};
pub use restore::RestoreOptions;
pub use snapshot::Kind as SnapshotKind;

/// Process exit status when the guest reboots and `--on-reboot=exit` applies.
pub const EXIT_REBOOT: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("/dev/kvm: {0}")]
    KvmOpen(String),
    #[error("/dev/kvm lacks a capability skiff needs: {0}")]
    MissingCap(&'static str),
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("{0}")]
    Memory(#[from] memory::MemoryError),
    #[error("{0}")]
    Load(#[from] loader::LoadError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("{0}")]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error("{0}")]
    Probe(String),
    #[error("device setup: {0}")]
    Device(String),
    #[error("{0}")]
    Disk(String),
    #[error("creating a thread: {0}")]
    Thread(std::io::Error),
    #[error("snapshot {0}")]
    Snapshot(String),
}

/// Capabilities without which skiff cannot run a machine, with their KVM names.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Opens /dev/kvm with an error that says what is wrong.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(|e| {
        VmmError::KvmOpen(match e.errno() {
            libc::ENOENT => "does not exist (is the kvm module loaded? is this a VM without nested virtualization?)".into(),
            libc::EACCES | libc::EPERM => "permission denied (add yourself to the kvm group, or run as root)".into(),
            _ => e.to_string(),
        })
    })
}

pub fn check_caps(kvm: &Kvm) -> Result<(), VmmError> {
    first_missing_cap(|cap| kvm.check_extension(cap))
}

/// The first required capability `has` denies, as the error that names it.
fn first_missing_cap(has: impl Fn(Cap) -> bool) -> Result<(), VmmError> {
    match REQUIRED_CAPS.iter().find(|(cap, _)| !has(*cap)) {
        Some((_, name)) => Err(VmmError::MissingCap(name)),
        None => Ok(()),
    }
}

/// Opens KVM and runs the instruction probe alone (`skiff probe`), refreshing the cache.
pub fn probe_host() -> Result<(HostQuirks, ProbeOrigin), VmmError> {
    let kvm = open_kvm()?;
    check_caps(&kvm)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    probe::probe_host_cached(&kvm, &supported, ProbePolicy::Refresh).map_err(VmmError::Probe)
}

/// What a finished run reports.
pub struct RunReport {
    pub reason: StopReason,
    pub stats: ExitStats,
    pub quirks: HostQuirks,
    /// Whether the quirks came from the probe cache or a fresh probe.
    pub probe_origin: ProbeOrigin,
    pub boot: BootTimes,
    /// Port I/O and MMIO to addresses no device claims: reads, writes.
    pub unclaimed: (u64, u64),
    pub unclaimed_mmio: (u64, u64),
    /// Writes delivered from KVM's coalesced ring: port I/O, MMIO.
    pub coalesced: (u64, u64),
    /// Which zones KVM coalesces, or why none.
    pub coalescing: String,
    /// Doorbells (ioeventfd): how many guest writes rang one instead of exiting, and
    /// which ports are doorbells or why none.
    pub doorbells_rung: u64,
    pub doorbells: String,
    /// Whether KVM reports the bytes its emulator failed on (and which it is).
    pub failure_bytes: &'static str,
    pub rss: Option<RssReport>,
    pub cmdline: String,
    /// The in-place reboots: how many, and the first and latest in detail.
    pub reboots: RebootSummary,
    /// Registers and the instruction at CS:RIP when the run ended by a triple fault.
    pub diagnostic: Option<String>,
    /// Each virtio device: its name and what it did.
    pub virtio: Vec<String>,
    /// The hypercall paths' counts (`--stats` lines).
    pub hypercalls: String,
    /// TPR patching: engaged or not and why, its counts, each vCPU's final TPR.
    pub tpr: String,
    /// Each paravirtual feature: exposed, or hidden and why (`--stats` lines).
    pub pv_features: String,
    /// A restore's phases and their milliseconds.
    pub restore_phases: Vec<(&'static str, f64)>,
    /// Guest console output never written: the console failed (closed pipe) or took
    /// nothing for a while at the end (nobody reads it).
    pub console_unwritten: u64,
}

/// Boot timing, each from skiff's start.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTimes {
    /// When every vCPU was first told to run (after a restore: the guest running).
    pub running_ms: Option<f64>,
    pub first_console_byte_ms: Option<f64>,
    pub init_marker_ms: Option<f64>,
    pub exit_ms: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct RssReport {
    pub total_kib: u64,
    /// The anonymous part (heap, stacks, guest RAM): where a leak shows. The rest is
    /// file pages (skiff's and libc's code), which grow as rarely used code first runs.
    pub anon_kib: u64,
    pub guest_kib: u64,
}

impl RssReport {
    pub fn vmm_kib(&self) -> u64 {
        self.total_kib.saturating_sub(self.guest_kib)
    }

    /// skiff's anonymous memory without guest RAM (which is anonymous too).
    pub fn vmm_anon_kib(&self) -> u64 {
        self.anon_kib.saturating_sub(self.guest_kib)
    }
}

/// Test hooks for tests/process.rs, named in `SKIFF_TEST_HOOK` (comma-separated);
/// unset in normal use, and nothing else reads it:
/// - `slow-build`: the build sleeps 60 s after loading the kernel (as a slow load
///   would), so a test can signal skiff while the machine is built;
/// - `vcpu-return`: vCPU 0's thread returns at once instead of running (a vCPU thread
///   that ends early must stop the machine, not leave it waiting);
/// - `hide-pv-NAME` (tests/pvfeatures.rs): the guest's CPUID hides paravirtual
///   feature NAME even where the probe saw it work.
pub fn test_hook(name: &str) -> bool {
    std::env::var("SKIFF_TEST_HOOK").is_ok_and(|v| v.split(',').any(|h| h == name))
}

/// A built machine, ready to run.
pub struct Vmm {
    _kvm: Kvm,
    vm: VmFd,
    config: VmConfig,
    mem: GuestMemoryMmap,
    /// The vCPUs, until `run` hands each to its thread.
    vcpus: Vec<Vcpu>,
    control: Arc<Control>,
    devices: DeviceManager,
    /// The console's queue and writer thread (drained at the end of the run).
    console: Arc<Console>,
    /// Bytes the guest wrote to its console (a boot that wrote any showed life).
    console_bytes: Arc<std::sync::atomic::AtomicU64>,
    quirks: HostQuirks,
    probe_origin: ProbeOrigin,
    console_first_byte: Arc<OnceLock<Instant>>,
    /// The command line the guest got: the configured one plus host-quirk options.
    cmdline: String,
    /// The in-kernel PICs, I/O APIC and PIT as KVM created them: their power-up state.
    vm_pristine: VmState,
    coalescing: String,
    doorbells: String,
    failure_bytes: &'static str,
    /// The CPUID table every vCPU's is derived from (what a snapshot records).
    guest_cpuid: CpuId,
    /// Hold the vCPUs paused when the run starts (a restore without --resume: the
    /// API resumes them).
    start_paused: bool,
    /// The last snapshot taken of (or restored into) this machine since its memory
    /// was last cleared: what a diff snapshot applies on top of.
    diff_base: Option<std::path::PathBuf>,
    /// When the vCPUs were first resumed.
    first_resume: Option<Instant>,
    /// How long each phase of a restore took (for --stats).
    restore_phases: Vec<(&'static str, f64)>,
    /// The gdb stub's socket, and whether the guest waits for gdb before its first
    /// instruction (`--gdb`, `--gdb-wait`).
    gdb: Option<(crate::gdb::GdbListener, bool)>,
    /// TPR patching, when engaged (src/tpr/), and why it is or is not.
    tpr: Option<Arc<crate::tpr::Tpr>>,
    tpr_why: String,
}

impl Vmm {
    /// Builds the machine `config` describes.
    pub fn build(config: &VmConfig, console: Box<dyn std::io::Write + Send>) -> Result<Self, VmmError> {
        let kvm = open_kvm()?;
        check_caps(&kvm)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let probe = spawn_probe(&supported, config.reprobe)?;
        // Disks first: a wrong path or a locked image is reported before any work.
        let disks = open_disks(config)?;
        let nets = open_nets(config)?;
        let mem = memory::create_guest_memory(config.memory)?;
        // The VM is created on a thread of its own while this one loads the kernel
        // (the command line is written later) and the probe runs or is read from its
        // cache.
        let (vm, kernel) = std::thread::scope(|s| {
            let vm = s.spawn(|| create_vm(&kvm, &mem, probe));
            let kernel = loader::load_kernel_for(&mem, config);
            (vm.join(), kernel)
        });
        let (vm, vm_pristine, quirks, probe_origin) =
            vm.map_err(|_| VmmError::Device("the thread creating the VM panicked".into()))??;
        let kernel = kernel?;
        if test_hook("slow-build") {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        let base_cpuid = guest_cpuid(&supported, &quirks);
        let cmdline = match quirks.linux_cmdline_extras(config.guest_defaults) {
            Some(extra) => format!("{} {extra}", config.cmdline),
            None => config.cmdline.clone(),
        };

        let control = Arc::new(Control::new());
        let console = Console::start(console).map_err(VmmError::Thread)?;
        let out = ConsoleOut::new(console.clone());
        let console_bytes = out.bytes.clone();
        let console_first_byte = out.first_byte.clone();
        let mut devices = build_devices(&kvm, &vm, &mem, config, &control, out, disks, nets)?;
        let entry = write_guest_tables(&mem, &kernel, config, &cmdline, &devices.acpi_devices(), tpr_variant(config.cpus, &quirks))?;

        let failure_bytes = report_failed_instruction_bytes(&vm);
        let vcpus = create_vcpus(&kvm, &vm, config, &mem, &devices.buses, &control, &supported, &base_cpuid, quirks.user_syscall_broken, None)?;
        let (coalescing, doorbells) = setup_fast_paths(&kvm, &vm, config, &vcpus, &mut devices);
        let mut vcpus = vcpus;
        attach_hypercalls(&mut vcpus, &devices, &quirks);
        let (tpr, tpr_why) = decide_tpr(&kvm, config.tpr_patch, config.cpus, &quirks);
        for v in &mut vcpus {
            v.tpr = tpr.clone();
        }
        let mut vmm = Vmm {
            _kvm: kvm,
            vm,
            config: config.clone(),
            mem,
            vcpus,
            control,
            devices,
            console,
            console_bytes,
            quirks,
            probe_origin,
            console_first_byte,
            cmdline,
            vm_pristine,
            coalescing,
            doorbells,
            failure_bytes,
            guest_cpuid: base_cpuid,
            start_paused: false,
            diff_base: None,
            first_resume: None,
            restore_phases: Vec::new(),
            gdb: None,
            tpr,
            tpr_why,
        };
        for vcpu in &mut vmm.vcpus {
            vcpu.power_on(entry)?;
        }
        Ok(vmm)
    }

    /// The machine's configuration (for a restore: the snapshot's machine).
    /// Serves gdb on `listener` while the machine runs; with `wait`, the guest runs
    /// no instruction until gdb lets it.
    pub fn set_gdb(&mut self, listener: crate::gdb::GdbListener, wait: bool) {
        self.gdb = Some((listener, wait));
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The saved-MSR set this machine uses (what is state, and what is not and why).
    pub fn msr_set(&self) -> Option<&crate::vcpu::msr::MsrSet> {
        self.vcpus.first().map(|v| &v.spec.msrs)
    }
}

/// The machine's devices: the legacy PC set, then virtio-rng (unless --no-rng), a
/// virtio-blk per disk, a virtio-net per TAP and virtio-vsock, in the slots the guest
/// will see them in.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_devices(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    control: &Arc<Control>,
    console: ConsoleOut,
    disks: Vec<crate::devices::virtio::block::Block>,
    nets: Nets,
) -> Result<DeviceManager, VmmError> {
    let (nets, vsock) = nets;
    let pci = match config.transport {
        crate::config::Transport::Pci => Some(Arc::new(crate::devices::pci::routing::Kvm::new(Some(Arc::new(share_vm(kvm, vm)?))))),
        crate::config::Transport::Mmio => None,
    };
    let hypercall_out = console.handle();
    let mut devices = DeviceManager::new(vm, control, console, pci)?;
    devices.add_hypercalls(mem, control, hypercall_out);
    devices.add_kernel_test_devices(control, config)?;
    if config.rng {
        devices.add_virtio(vm, mem, "virtio-rng".into(), Box::new(crate::devices::virtio::rng::Rng::new()))?;
    }
    for (disk, block) in config.disks.iter().zip(disks) {
        devices.add_virtio(vm, mem, format!("disk {}", disk.path.display()), Box::new(block))?;
    }
    for net in nets {
        let name = format!("net tap={}", net.tap_name());
        devices.add_virtio(vm, mem, name, Box::new(net))?;
    }
    if let Some(v) = vsock {
        devices.add_virtio(vm, mem, "vsock".into(), Box::new(v))?;
    }
    devices.build_buses()?;
    Ok(devices)
}

/// A second handle on the VM (a duplicated fd), for devices that call KVM at run time.
fn share_vm(kvm: &Kvm, vm: &VmFd) -> Result<VmFd, VmmError> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup of a valid, open fd (the VM's); the result is checked before use.
    let fd = unsafe { libc::dup(vm.as_raw_fd()) };
    if fd < 0 {
        return Err(VmmError::Device(format!("duplicating the VM fd: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` is a fresh duplicate of a KVM VM fd that nothing else owns; the
    // VmFd takes ownership and closes it.
    unsafe { kvm.create_vmfd_from_rawfd(fd) }.map_err(|e| VmmError::Kvm("duplicating the VM fd", e))
}

/// Writes that need no exit to skiff: KVM's coalesced ring (port 0x80, the RTC
/// index), doorbells (the boot marker) and virtio queue notifications (ioeventfds).
/// Returns the `--stats` lines for the ring and for the ioeventfds.
fn setup_fast_paths(kvm: &Kvm, vm: &VmFd, config: &VmConfig, vcpus: &[Vcpu], devices: &mut DeviceManager) -> (String, String) {
    let off = || "off (--no-coalesce)".to_string();
    let (Some(first), true) = (vcpus.first(), config.coalesce) else { return (off(), off()) };
    let coalescing = devices::setup_coalescing(kvm, vm, &first.fd, &devices.buses);
    let bells = devices::setup_doorbells(kvm, vm, &devices.buses);
    let queues = devices.setup_queue_notifiers(vm);
    (coalescing, format!("{bells}; {queues}"))
}

/// Opens every `--disk` (checked and locked: vmm/devices.rs declares them later).
fn open_disks(config: &VmConfig) -> Result<Vec<crate::devices::virtio::block::Block>, VmmError> {
    config
        .disks
        .iter()
        .map(|d| crate::devices::virtio::block::Block::open(&d.path, d.read_only, d.id.clone(), d.direct).map_err(|e| VmmError::Disk(e.to_string())))
        .collect()
}

/// The network devices and the vsock device, opened before the machine is built.
pub(crate) type Nets = (Vec<crate::devices::virtio::net::Net>, Option<crate::devices::virtio::vsock::Vsock>);

/// Opens every `--net` TAP (one line for a missing, busy or forbidden one) and the
/// `--vsock` socket (one line for one in use).
pub(crate) fn open_nets(config: &VmConfig) -> Result<Nets, VmmError> {
    use crate::devices::virtio::net::{Net, Tap};
    let nets = config
        .nets
        .iter()
        .map(|n| {
            let tap = Tap::open(&n.tap).map_err(|e| VmmError::Disk(e.to_string()))?;
            Net::new(tap, n.mac).map_err(|e| VmmError::Disk(format!("--net tap={}: {e}", n.tap)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vsock = match &config.vsock {
        Some(v) => Some(crate::devices::virtio::vsock::Vsock::new(v.cid, &v.uds).map_err(|e| VmmError::Disk(e.to_string()))?),
        None => None,
    };
    Ok((nets, vsock))
}

/// The host probe on a thread of its own: it runs throw-away VMs (or reads its
/// cache), overlapping with the build, which needs its results only for CPUID, the
/// MSR filter and the command line.
fn spawn_probe(supported: &CpuId, reprobe: bool) -> Result<ProbeThread, VmmError> {
    let kvm_fd = open_kvm()?;
    let supported = supported.clone();
    let policy = if reprobe { ProbePolicy::Refresh } else { ProbePolicy::UseCache };
    std::thread::Builder::new()
        .name("skiff-probe".into())
        .spawn(move || probe::probe_host_cached(&kvm_fd, &supported, policy))
        .map_err(VmmError::Thread)
}

type ProbeThread = std::thread::JoinHandle<Result<(HostQuirks, ProbeOrigin), String>>;

/// The VM with its RAM, the probe's findings, the MSR filter they call for, and
/// the chipset (in that order: see `create_vm_with_ram`), with the chipset's
/// power-up state.
fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap, probe: ProbeThread) -> Result<(VmFd, VmState, HostQuirks, ProbeOrigin), VmmError> {
    let vm = create_vm_with_ram(kvm, mem)?;
    let (quirks, origin) = probe
        .join()
        .map_err(|_| VmmError::Probe("the probe thread panicked".into()))?
        .map_err(VmmError::Probe)?;
    if quirks.user_syscall_broken {
        filter_lstar_writes(&vm)?;
    }
    let pristine = add_chipset(&vm)?;
    Ok((vm, pristine, quirks, origin))
}

/// A new VM with its RAM registered.
///
/// RAM is registered before anything else changes the VM. Each KVM call that changes
/// what the VM's vCPUs may be reading (memory slots, I/O buses, the MSR filter) waits
/// for an SRCU grace period, and one that follows another closely waits a scheduler
/// tick or more for the next. Measured here: the memory slot took 4.5 to 10 ms after
/// the irqchip, 0.15 ms before it; the MSR filter 11 to 13 ms after the irqchip, 0.01
/// ms before it. So: RAM, then the MSR filter, then the chipset (`add_chipset`).
fn create_vm_with_ram(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
    memory::register_with_kvm(&vm, mem)?;
    Ok(vm)
}

/// The in-kernel chipset (PICs, I/O APIC, PIT), and its power-up state as KVM
/// created it.
fn add_chipset(vm: &VmFd) -> Result<VmState, VmmError> {
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| VmmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip().map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
    VmState::get(vm).map_err(|e| VmmError::Device(format!("reading the power-up chipset state: {e}")))
}

impl Vmm {
    /// The `--stats` lines on KVM's paravirtual features: what the guest's CPUID (a
    /// restore's: the snapshot's) gives it, and whether its vCPUs enforce that.
    fn pv_report(&self, enforced: bool) -> String {
        let guest = crate::vcpu::probe::pv::features_in(&self.guest_cpuid);
        self.quirks.pv.report(Some(guest), Some(enforced))
    }
}

/// KVM's supported CPUID less what the probe found the guest must not use.
fn guest_cpuid(supported: &CpuId, quirks: &HostQuirks) -> CpuId {
    let mut cpuid = supported.clone();
    for (feature, _) in &quirks.hidden {
        cpuid::hide(&mut cpuid, feature);
    }
    // KVM's paravirtual features: only those the probe saw work (probe/pv.rs).
    let mut exposed = quirks.pv.exposed();
    // tests/pvfeatures.rs hides a working feature (`hide-pv-NAME`) to see a guest
    // that uses it get #GP.
    for f in crate::vcpu::probe::pv::PV_FEATURES {
        if test_hook(&format!("hide-pv-{}", f.name)) {
            exposed &= !(1 << f.bit);
        }
    }
    for e in cpuid.as_mut_slice() {
        if e.function == crate::vcpu::probe::pv::PV_LEAF {
            e.eax &= exposed;
        }
    }
    // skiff's own leaves (the hypercall page); KVM takes leaves it does not know.
    if let Err(e) = crate::hypercall::add_cpuid_leaves(&mut cpuid, quirks.int3_traps) {
        crate::output::stderr(&format!("skiff: {e}\n"));
    }
    cpuid
}

/// Whether to patch TPR accesses (`--tpr-patch`), and the `--stats` reason.
fn decide_tpr(kvm: &Kvm, mode: crate::tpr::Mode, cpus: u8, quirks: &HostQuirks) -> (Option<Arc<crate::tpr::Tpr>>, String) {
    use crate::tpr::Mode;
    let measured = quirks.tpr_cost.as_ref().map(|c| c.describe());
    let measured_text = measured.clone().unwrap_or_else(|| "not measured on this host".into());
    if mode == Mode::Off {
        return (None, "off (--tpr-patch=off)".into());
    }
    if kvm.check_extension_raw(crate::tpr::KVM_CAP_VAPIC as libc::c_ulong) <= 0 {
        return (None, "off: KVM lacks KVM_CAP_VAPIC (TPR-access reports and the vAPIC page)".into());
    }
    // With several vCPUs the helper finds its vCPU's slot by CPUID's initial APIC ID:
    // where the guest sees the host's CPUID instead of skiff's, it would pick a
    // wrong slot (another vCPU's TPR), so nothing is patched, even when forced.
    if cpus > 1 && !quirks.cpuid_honoured {
        return (None, "off: the guest sees the host's CPUID here, so the helper could not tell the vCPUs apart".into());
    }
    let engaged = |why: String| {
        let t = Arc::new(crate::tpr::Tpr::new(why.clone()));
        (Some(t), why)
    };
    let helper = tpr_variant(cpus, quirks).describe();
    match mode {
        Mode::On => engaged(format!("on (--tpr-patch=on; probe: {measured_text}; {helper})")),
        _ => match &quirks.tpr_cost {
            // Where KVM takes the vAPIC TPR late every patched write exits: the
            // measured helper (no exit) would understate the patched path.
            Some(c) if !c.vapic_at_exit => (None, format!("off (auto: KVM takes the vAPIC TPR late here, so every patched write would exit: {measured_text})")),
            Some(c) if c.patched_ns < c.mmio_ns => engaged(format!("on (auto: the patched path is cheaper here: {measured_text}; {helper})")),
            Some(_) => (None, format!("off (auto: patching would cost more here: {measured_text})")),
            None => (None, format!("off (auto: {measured_text})")),
        },
    }
}

/// Gives every vCPU the hypercall handler, which learns whether raw sites trap here.
fn attach_hypercalls(vcpus: &mut [Vcpu], devices: &DeviceManager, quirks: &HostQuirks) {
    if let Some(h) = &devices.hypercalls {
        h.trap.store(quirks.int3_traps, std::sync::atomic::Ordering::Relaxed);
        for v in vcpus {
            v.hypercalls = Some(h.clone());
        }
    }
}

/// Creates every vCPU with its CPUID, finds the state layout on the first, and records
/// each one's creation state (the base RESET is applied to).
#[allow(clippy::too_many_arguments)]
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    buses: &Arc<Buses>,
    control: &Arc<Control>,
    supported: &CpuId,
    base_cpuid: &CpuId,
    syscall_fixup: bool,
    known_msrs: Option<&[u32]>,
) -> Result<Vec<Vcpu>, VmmError> {
    let xsave_layout = Arc::new(crate::vcpu::xsave::XsaveLayout::from_cpuid(supported));
    let mut vcpus: Vec<Vcpu> = Vec::with_capacity(config.cpus as usize);
    let mut spec: Option<Arc<StateSpec>> = None;
    for index in 0..config.cpus {
        let fd = vm.create_vcpu(index as u64).map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
        let cpuid: CpuId = cpuid::normalize(base_cpuid, index, config.cpus);
        fd.set_cpuid2(&cpuid).map_err(|e| VmmError::Kvm("KVM_SET_CPUID2", e))?;
        // The guest may use only the PV features its CPUID lists: a hidden one's MSR
        // raises #GP. Before anything reads the vCPU's MSRs, so the saved set and the
        // pristine state are those of an enforcing vCPU. It lasts for the vCPU's life
        // (resets included); a restore's CPUID is the snapshot's, and so is what is
        // enforced. A KVM without the capability leaves the guest unenforced (said
        // in --stats).
        let enforced = crate::vcpu::probe::pv::enforce(&fd).is_ok();
        // The state layout is found once, on the first vCPU (with its CPUID set).
        let spec = match &spec {
            Some(s) => s.clone(),
            None => spec.insert(Arc::new(discover_state_spec(kvm, vm, &fd, &cpuid, known_msrs)?)).clone(),
        };
        let mut vcpu = Vcpu::new(index, fd, mem.clone(), buses.clone(), control.clone(), xsave_layout.clone(), spec);
        vcpu.pv_enforced = enforced;
        // gdb's single step keeps interrupts out where KVM can (KVM_GUESTDBG_BLOCKIRQ):
        // else a step from a breakpoint lands in whatever interrupt was pending.
        let debug_flags = vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2));
        vcpu.debug.block_irq_on_step = u32::try_from(debug_flags).is_ok_and(|f| f & kvm_bindings::KVM_GUESTDBG_BLOCKIRQ != 0);
        if syscall_fixup {
            vcpu.syscall_fixup = Some(Default::default());
            // Its breakpoint's debug register, held for the machine's life, so a
            // debugger can never leave the guest's system calls broken.
            vcpu.debug.reserve(crate::vcpu::debug::Owner::SyscallFixup);
        }
        // A triple fault that ends the run is explained; one that reboots is not.
        vcpu.diagnose_shutdown = config.on_reboot == OnReboot::Exit;
        vcpu.capture_pristine()?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// The TPR helper this machine gets: by its vCPU count, and polling after every write
/// where the probe found KVM taking the vAPIC TPR late (or did not measure it).
fn tpr_variant(cpus: u8, quirks: &HostQuirks) -> crate::tpr::Variant {
    let at_exit = quirks.tpr_cost.is_some_and(|c| c.vapic_at_exit);
    crate::tpr::Variant { cpus, late: !at_exit }
}

/// Loads what the guest needs beside its kernel: ACPI tables and the boot information
/// (boot_params or PVH start info, command line, initrd), and the TPR helper. Returns
/// the boot entry.
fn write_guest_tables(
    mem: &GuestMemoryMmap,
    kernel: &loader::LoadedKernel,
    config: &VmConfig,
    cmdline: &str,
    acpi_devices: &[acpi::AcpiDevice],
    tpr: crate::tpr::Variant,
) -> Result<BootEntry, VmmError> {
    let rsdp = acpi::create_acpi_tables(mem, config.cpus, acpi_devices)?;
    crate::hypercall::write_page(mem).map_err(VmmError::Device)?;
    crate::tpr::write_helper(mem, tpr).map_err(VmmError::Device)?;
    Ok(loader::write_boot_info(mem, kernel, config, cmdline, rsdp.0)?)
}

/// Finds the machine's state layout on its first vCPU: the saved MSRs (a restore's
/// are the snapshot's, `known_msrs`), which state ioctls this KVM has, and the reset
/// table's inputs.
fn discover_state_spec(kvm: &Kvm, vm: &VmFd, fd: &kvm_ioctls::VcpuFd, cpuid: &CpuId, known_msrs: Option<&[u32]>) -> Result<StateSpec, VmmError> {
    let msrs = match known_msrs {
        Some(list) => MsrSet { saved: list.to_vec(), ..Default::default() },
        None => MsrSet::discover(kvm, fd, &crate::vcpu::probe::pv::hidden_msrs(cpuid)).map_err(|e| VmmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?,
    };
    let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    let sregs2 = vm.check_extension_raw(kvm_bindings::KVM_CAP_SREGS2 as libc::c_ulong) > 0;
    let tsc_khz = fd.get_tsc_khz().is_ok();
    let leaf0 = cpuid::find_entry(cpuid, 0, 0);
    let amd = leaf0.is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth") || e.ebx == u32::from_le_bytes(*b"Hygo"));
    let signature = cpuid::find_entry(cpuid, 1, 0).map_or(0, |e| e.eax);
    Ok(StateSpec { msrs, xsave_size, sregs2, tsc_khz, vendor: if amd { Vendor::Amd } else { Vendor::Intel }, signature })
}

/// skiff's thread count and open file descriptors.
/// skiff's threads and open fds. A vCPU thread that was just joined can still be
/// listed for a moment while the kernel finishes its exit (seen on a loaded host), so
/// a count above `expected` is read again, for at most 10 ms: a leaked thread stays,
/// an exiting one goes.
fn thread_and_fd_counts(expected: Option<u64>) -> (u64, u64) {
    let read = || -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    let mut threads = read();
    for _ in 0..10 {
        if expected.is_none_or(|e| threads <= e) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        threads = threads.min(read());
    }
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    (threads, fds)
}

/// Asks KVM to say which bytes its emulator failed on (KVM_CAP_EXIT_ON_EMULATION_FAILURE):
/// vcpu/emulate.rs then knows whether the text changed under KVM (another vCPU
/// patching it) instead of guessing. KVM then also hands over failures in guest user
/// mode, which it would otherwise answer with #UD itself; skiff does the same or
/// better. Optional: without it skiff guesses as before. Returns a line for `--stats`.
fn report_failed_instruction_bytes(vm: &VmFd) -> &'static str {
    let cap = kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE;
    if vm.check_extension_raw(cap as libc::c_ulong) <= 0 {
        return "no (KVM lacks KVM_CAP_EXIT_ON_EMULATION_FAILURE)";
    }
    let enable = kvm_bindings::kvm_enable_cap { cap, args: [1, 0, 0, 0], ..Default::default() };
    match vm.enable_cap(&enable) {
        Ok(()) => "yes (KVM_CAP_EXIT_ON_EMULATION_FAILURE)",
        Err(_) => "no (KVM refused KVM_CAP_EXIT_ON_EMULATION_FAILURE)",
    }
}

/// Makes guest writes of LSTAR exit to skiff (KVM_CAP_X86_USER_SPACE_MSR with an
/// MSR filter), so the SYSCALL fix-up (vcpu/syscall_fixup.rs) learns the entry point.
fn filter_lstar_writes(vm: &VmFd) -> Result<(), VmmError> {
    use kvm_ioctls::{MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [MsrExitReason::Filter.bits() as u64, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|e| VmmError::Kvm("KVM_ENABLE_CAP (X86_USER_SPACE_MSR)", e))?;
    // One MSR, its bit clear: writes are denied in the kernel and come to skiff.
    let bitmap = [0u8; 1];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::WRITE,
        base: crate::vcpu::syscall_fixup::MSR_LSTAR,
        msr_count: 1,
        bitmap: &bitmap,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range]).map_err(|e| VmmError::Kvm("KVM_X86_SET_MSR_FILTER", e))
}

/// skiff's resident memory, and how much of it is guest RAM (resident guest pages,
/// counted with mincore).
fn rss_report(mem: &GuestMemoryMmap) -> Option<RssReport> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some(RssReport { total_kib: kib("VmRSS:")?, anon_kib: kib("RssAnon:")?, guest_kib: memory::resident_kib(mem) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_capability_is_named() {
        assert!(first_missing_cap(|_| true).is_ok());
        for (missing, name) in REQUIRED_CAPS {
            let err = first_missing_cap(|cap| cap != *missing).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(name), "{name}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
}
