//! The machine as a whole: build it (KVM VM, memory, irqchip, devices, vCPUs), run it,
//! reset it, and stop it. The lifecycle is: build -> power on -> run (one thread per
//! vCPU) -> a stop request (poweroff, reboot, error) kicks every vCPU -> join -> on a
//! reboot, reset in place and run again; otherwise report.

pub mod acpi;
pub mod control;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod reboot;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use std::os::unix::thread::JoinHandleExt;

use crate::config::VmConfig;
use crate::devices::legacy::{BootMarker, I8042, PostPort, ResetControl};
use crate::devices::pm::{PM_BLOCK_LEN, PmBlock};
use crate::devices::rtc::Cmos;
use crate::devices::serial::{Console, ConsoleOut, SerialDevice, spawn_stdin_pump};
use crate::devices::{BusDevice, Buses};
use crate::stats::ExitStats;
use crate::config::OnReboot;
use crate::vcpu::msr::MsrSet;
use crate::vcpu::probe::HostQuirks;
use crate::vcpu::reset::{ResetKind, Vendor};
use crate::vcpu::state::VmState;
use crate::vcpu::{BootEntry, StateSpec, Vcpu, cpuid, kick, probe};
use control::{Control, StopReason};
pub use reboot::{RebootRecord, RebootSummary};
use reboot::StormWatch;
use layout::*;

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
    #[error("creating a thread: {0}")]
    Thread(std::io::Error),
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

/// Opens KVM and runs the instruction probe alone (`skiff probe`).
pub fn probe_host() -> Result<HostQuirks, VmmError> {
    let kvm = open_kvm()?;
    check_caps(&kvm)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    probe::probe_host(&kvm, &supported).map_err(VmmError::Probe)
}

/// What a finished run reports.
pub struct RunReport {
    pub reason: StopReason,
    pub stats: ExitStats,
    pub quirks: HostQuirks,
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
    /// Guest console output never written: the console failed (closed pipe) or took
    /// nothing for a while at the end (nobody reads it).
    pub console_unwritten: u64,
}

/// Boot timing, each from skiff's start.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTimes {
    pub first_console_byte_ms: Option<f64>,
    pub init_marker_ms: Option<f64>,
    pub exit_ms: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct RssReport {
    pub total_kib: u64,
    pub guest_kib: u64,
}

impl RssReport {
    pub fn vmm_kib(&self) -> u64 {
        self.total_kib.saturating_sub(self.guest_kib)
    }
}

/// Test hooks for tests/process.rs, named in `SKIFF_TEST_HOOK` (comma-separated);
/// unset in normal use, and nothing else reads it:
/// - `slow-build`: the build sleeps 60 s after loading the kernel (as a slow load
///   would), so a test can signal skiff while the machine is built;
/// - `vcpu-return`: vCPU 0's thread returns at once instead of running (a vCPU thread
///   that ends early must stop the machine, not leave it waiting).
pub fn test_hook(name: &str) -> bool {
    std::env::var("SKIFF_TEST_HOOK").is_ok_and(|v| v.split(',').any(|h| h == name))
}

/// A built machine, ready to run.
pub struct Vmm {
    _kvm: Kvm,
    vm: VmFd,
    config: VmConfig,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    control: Arc<Control>,
    buses: Arc<Buses>,
    serial: Arc<SerialDevice>,
    /// The console's queue and writer thread (drained at the end of the run).
    console: Arc<Console>,
    /// Bytes the guest wrote to its console (a boot that wrote any showed life).
    console_bytes: Arc<std::sync::atomic::AtomicU64>,
    marker: Arc<BootMarker>,
    quirks: HostQuirks,
    console_first_byte: Arc<OnceLock<Instant>>,
    init_marker: Arc<OnceLock<Instant>>,
    /// The command line the guest got: the configured one plus host-quirk options.
    cmdline: String,
    /// The in-kernel PICs, I/O APIC and PIT as KVM created them: their power-up state.
    vm_pristine: VmState,
    coalescing: String,
    doorbells: String,
    failure_bytes: &'static str,
}

impl Vmm {
    /// Builds the machine `config` describes.
    pub fn build(config: &VmConfig, console: Box<dyn std::io::Write + Send>) -> Result<Self, VmmError> {
        let kvm = open_kvm()?;
        check_caps(&kvm)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        // The probe runs its own throw-away VMs; let it overlap with building this one
        // (memory, kernel loading), which needs its results only for CPUID and the
        // command line.
        let probe = {
            let kvm_fd = open_kvm()?;
            let supported = supported.clone();
            std::thread::Builder::new()
                .name("skiff-probe".into())
                .spawn(move || probe::probe_host(&kvm_fd, &supported))
                .map_err(VmmError::Thread)?
        };

        let vm = kvm.create_vm().map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
        vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
        let vm_pristine = VmState::get(&vm).map_err(|e| VmmError::Device(format!("reading the power-up chipset state: {e}")))?;

        let mem = memory::create_guest_memory(config.memory)?;
        memory::register_with_kvm(&vm, &mem)?;
        // Load the kernel while the probe runs (the command line is written later).
        let kernel = loader::load_kernel(&mem, &config.kernel)?;
        if test_hook("slow-build") {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        let quirks = probe
            .join()
            .map_err(|_| VmmError::Probe("the probe thread panicked".into()))?
            .map_err(VmmError::Probe)?;
        let mut base_cpuid = supported.clone();
        for (feature, _) in &quirks.hidden {
            cpuid::hide(&mut base_cpuid, feature);
        }
        if quirks.hypercall_hangs {
            for bit in crate::vcpu::probe::HYPERCALL_FEATURES {
                cpuid::clear(&mut base_cpuid, cpuid::FeatureBit { leaf: 0x4000_0001, subleaf: 0, reg: cpuid::Reg::Eax, bit });
            }
        }
        let cmdline = match quirks.linux_cmdline_extras(config.guest_defaults) {
            Some(extra) => format!("{} {extra}", config.cmdline),
            None => config.cmdline.clone(),
        };
        let entry = write_guest_tables(&mem, &kernel, config, &cmdline)?;

        let control = Arc::new(Control::new());
        let console = Console::start(console).map_err(VmmError::Thread)?;
        let out = ConsoleOut::new(console.clone());
        let console_bytes = out.bytes.clone();
        let console_first_byte = out.first_byte.clone();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Device(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| VmmError::Kvm("KVM_IRQFD (COM1)", e))?;
        let serial = Arc::new(SerialDevice::new(serial_irq, out, control.clone()).map_err(|e| VmmError::Device(format!("eventfd: {e}")))?);
        let marker = Arc::new(BootMarker::default());
        let init_marker = marker.reached.clone();

        let mut buses = Buses::default();
        let pio: [(Arc<dyn BusDevice>, u16, u64); 7] = [
            (serial.clone(), COM1_PORT, 8),
            (Arc::new(I8042::new(control.clone())), I8042_PORT, 5),
            (Arc::new(Cmos::default()), RTC_PORT, 2),
            (Arc::new(PostPort::default()), POST_PORT, 1),
            (Arc::new(ResetControl::new(control.clone(), "0xcf9 reset control")), RESET_CF9_PORT, 1),
            (Arc::new(PmBlock::new(control.clone())), PM1A_EVT_PORT, PM_BLOCK_LEN),
            (marker.clone(), BOOT_MARKER_PORT, 1),
        ];
        for (dev, port, len) in pio {
            buses
                .pio
                .insert(dev, port as u64, len)
                .map_err(|e| VmmError::Device(e.to_string()))?;
        }
        // Write-only side effects that can wait for the next exit: POST codes, and the
        // RTC index (the data port's exit delivers it first).
        for port in [POST_PORT, RTC_PORT] {
            buses.pio.mark_coalescable(port as u64, 1).map_err(|e| VmmError::Device(e.to_string()))?;
        }
        // Writes whose value no device needs: a signal from KVM instead of an exit.
        buses.pio.mark_doorbell(BOOT_MARKER_PORT as u64, 1).map_err(|e| VmmError::Device(e.to_string()))?;
        let buses = Arc::new(buses);

        if quirks.user_syscall_broken {
            filter_lstar_writes(&vm)?;
        }
        let failure_bytes = report_failed_instruction_bytes(&vm);
        let xsave_layout = Arc::new(crate::vcpu::xsave::XsaveLayout::from_cpuid(&supported));
        let mut vcpus: Vec<Vcpu> = Vec::with_capacity(config.cpus as usize);
        let mut spec: Option<Arc<StateSpec>> = None;
        for index in 0..config.cpus {
            let fd = vm.create_vcpu(index as u64).map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            let cpuid: CpuId = cpuid::normalize(&base_cpuid, index, config.cpus);
            fd.set_cpuid2(&cpuid).map_err(|e| VmmError::Kvm("KVM_SET_CPUID2", e))?;
            // The state layout is found once, on the first vCPU (with its CPUID set).
            let spec = match &spec {
                Some(s) => s.clone(),
                None => spec.insert(Arc::new(discover_state_spec(&kvm, &vm, &fd, &cpuid)?)).clone(),
            };
            let mut vcpu = Vcpu::new(index, fd, mem.clone(), buses.clone(), control.clone(), xsave_layout.clone(), spec);
            if quirks.user_syscall_broken {
                vcpu.syscall_fixup = Some(Default::default());
            }
            // A triple fault that ends the run is explained; one that reboots is not.
            vcpu.diagnose_shutdown = config.on_reboot == OnReboot::Exit;
            vcpu.capture_pristine()?;
            vcpus.push(vcpu);
        }
        let coalescing = match vcpus.first() {
            Some(v) if config.coalesce => setup_coalescing(&kvm, &vm, &v.fd, &buses),
            _ => "off (--no-coalesce)".to_string(),
        };
        let doorbells = if config.coalesce { setup_doorbells(&kvm, &vm, &buses) } else { "off (--no-coalesce)".to_string() };
        for vcpu in &mut vcpus {
            power_on(vcpu, entry)?;
        }

        Ok(Vmm {
            _kvm: kvm,
            vm,
            config: config.clone(),
            mem,
            vcpus,
            control,
            buses,
            serial,
            console,
            console_bytes,
            marker,
            quirks,
            console_first_byte,
            init_marker,
            cmdline,
            vm_pristine,
            coalescing,
            doorbells,
            failure_bytes,
        })
    }

    /// The saved-MSR set this machine uses (what is state, and what is not and why).
    pub fn msr_set(&self) -> Option<&crate::vcpu::msr::MsrSet> {
        self.vcpus.first().map(|v| &v.spec.msrs)
    }

    /// Resets the whole machine in place, as a PC's reset line does, and loads the
    /// guest again: RAM cleared, chipset and devices to power-up state, every vCPU to
    /// RESET and then to its boot entry state. Runs with every vCPU thread joined.
    fn reset_machine(&mut self) -> Result<(), VmmError> {
        // RAM leaves the VM while it is cleared and reloaded, so KVM forgets every
        // translation of the old contents (see memory::unregister_from_kvm).
        memory::unregister_from_kvm(&self.vm, &self.mem)?;
        memory::clear(&self.mem)?;
        self.vm_pristine
            .put(&self.vm)
            .map_err(|e| VmmError::Device(format!("resetting the chipset: {e}")))?;
        self.buses.pio.reset_devices();
        self.buses.mmio.reset_devices();
        let kernel = loader::load_kernel(&self.mem, &self.config.kernel)?;
        let entry = write_guest_tables(&self.mem, &kernel, &self.config, &self.cmdline)?;
        memory::register_with_kvm(&self.vm, &self.mem)?;
        for vcpu in &mut self.vcpus {
            power_on(vcpu, entry)?;
        }
        Ok(())
    }

    /// Runs the machine until it stops for good; an in-place reboot runs it again.
    /// Returns why it stopped, with the statistics.
    pub fn run(mut self, started: Instant) -> Result<RunReport, VmmError> {
        kick::install_handler().map_err(|e| VmmError::Device(format!("signal handler: {e}")))?;
        let _stdin = spawn_stdin_pump(self.serial.clone()).map_err(VmmError::Thread)?;

        // A sampling profiler for diagnosing slow guests: SKIFF_PROFILE=FILE kicks every
        // vCPU 100 times a second and writes "ms vcpu rip" lines to FILE at exit
        // (scripts/symbolize-profile turns them into guest functions).
        let profile = std::env::var_os("SKIFF_PROFILE").map(std::path::PathBuf::from);

        // The watcher: turns a stop signal into a clean stop, and drives the profiler.
        // It lives for the whole run, across reboots.
        struct Finish(Arc<Control>);
        impl Drop for Finish {
            fn drop(&mut self) {
                self.0.finish();
            }
        }
        let _finish = Finish(self.control.clone());
        // On an error path out of here the guest's last output still reaches the
        // console (as long as it takes it); the normal path drains it below.
        struct Drain(Arc<Console>);
        impl Drop for Drain {
            fn drop(&mut self) {
                self.0.drain(crate::output::STALL);
                self.0.close();
            }
        }
        let _drain = Drain(self.console.clone());
        {
            let control = self.control.clone();
            let buses = self.buses.clone();
            let profiling = profile.is_some();
            std::thread::Builder::new()
                .name("skiff-watch".into())
                .spawn(move || {
                    while !control.finished() {
                        // Rings doorbells as they come; otherwise a 10 ms tick.
                        buses.wait_for_doorbells(10);
                        let sig = control::STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst);
                        if control::CHECK_TRANSLATE_SIGNAL.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            control.request_translate_check();
                        }
                        if sig != 0 {
                            control.request_stop(StopReason::Error(format!("stopped by signal {sig}")));
                        } else if profiling {
                            control.kick();
                        }
                    }
                })
                .map_err(VmmError::Thread)?;
        }

        // skiff's threads while no vCPU runs (as after every reset): the count a
        // reboot's report should find.
        let idle_threads = thread_and_fd_counts(None).0;
        let mut stats = ExitStats::default();
        let mut samples: Vec<(u32, u8, u64)> = Vec::new();
        let mut reboots = RebootSummary::default();
        let mut storm = StormWatch::default();
        // When the latest reboot was requested, until its next boot is looked at.
        let mut pending: Option<Instant> = None;
        loop {
            let vcpus = std::mem::take(&mut self.vcpus);
            let boot_started = Instant::now();
            let console_before = self.console_bytes.load(std::sync::atomic::Ordering::Relaxed);
            let (back, gen_stats, gen_samples) = run_vcpus(vcpus, &self.control, profile.is_some().then_some(started))?;
            self.vcpus = back;
            stats.merge(&gen_stats);
            samples.extend(gen_samples);
            // Every vCPU is stopped: nothing deferred may be lost to a reset or the end.
            self.buses.flush_coalesced();
            self.buses.drain_doorbells();
            let reached_marker = self.marker.this_boot();
            if let Some(t) = pending.take()
                && let Some(m) = reached_marker
            {
                reboots.set_latest_marker(m.saturating_duration_since(t).as_secs_f64() * 1e3);
            }
            let source = match self.control.reason() {
                Some(StopReason::Reboot(source)) if self.config.on_reboot == OnReboot::Reset => source,
                _ => break,
            };
            if self.vcpus.len() != self.config.cpus as usize {
                // A vCPU thread died; there is nothing sound to reset.
                break;
            }
            let printed = self.console_bytes.load(std::sync::atomic::Ordering::Relaxed) != console_before;
            if storm.reboot(boot_started.elapsed(), printed || reached_marker.is_some()) {
                self.control.request_fatal(storm.describe(source));
                break;
            }
            // Registers at the triple fault that would complete a storm, for its report
            // (none kept from a boot that did not).
            self.control.take_diagnostic();
            for vcpu in &mut self.vcpus {
                vcpu.diagnose_shutdown = self.config.on_reboot == OnReboot::Exit || storm.next_completes();
            }
            let t = Instant::now();
            self.reset_machine()?;
            let reset_ms = t.elapsed().as_secs_f64() * 1e3;
            let (threads, fds) = thread_and_fd_counts(Some(idle_threads));
            reboots.push(source, reset_ms, threads, fds, rss_report(&self.mem).map(|r| r.vmm_kib()));
            pending = Some(t);
            if self.config.stats || self.config.boot_time {
                let r = reboots.latest().map(|r| r.describe()).unwrap_or_default();
                crate::output::stderr(&format!("\r\nskiff: {r}\r\n"));
            }
            if !self.control.rearm_after_reboot() {
                break;
            }
        }
        if let Some(path) = profile {
            samples.sort_unstable();
            let text: String = samples.iter().map(|(ms, cpu, rip)| format!("{ms} {cpu} {rip:#x}\n")).collect();
            if let Err(e) = std::fs::write(&path, text) {
                crate::output::stderr(&format!("skiff: writing the profile to {}: {e}\n", path.display()));
            }
        }
        // What the guest wrote reaches the console before skiff reports and exits, as
        // long as the console takes it (a console nobody reads does not hold the stop).
        let console_unwritten = self.console.drain(crate::output::STALL);
        self.console.close();
        let rss = rss_report(&self.mem);
        let since = |t: &OnceLock<Instant>| t.get().map(|t| t.duration_since(started).as_secs_f64() * 1e3);
        let boot = BootTimes {
            first_console_byte_ms: since(&self.console_first_byte),
            init_marker_ms: since(&self.init_marker),
            exit_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        let reason = self.control.reason().unwrap_or(StopReason::Error("stopped without a reason".into()));
        Ok(RunReport {
            reason,
            stats,
            quirks: self.quirks,
            boot,
            unclaimed: self.buses.pio.unclaimed(),
            unclaimed_mmio: self.buses.mmio.unclaimed(),
            coalesced: (self.buses.pio.coalesced_writes(), self.buses.mmio.coalesced_writes()),
            coalescing: self.coalescing,
            doorbells_rung: self.buses.doorbells_rung(),
            doorbells: self.doorbells,
            failure_bytes: self.failure_bytes,
            rss,
            cmdline: self.cmdline,
            reboots,
            diagnostic: self.control.take_diagnostic(),
            console_unwritten,
        })
    }
}

/// Runs every vCPU on its own thread until the machine stops; returns the vCPUs (for
/// a reset or the report), their summed statistics and profile samples.
type Samples = Vec<(u32, u8, u64)>;
fn run_vcpus(vcpus: Vec<Vcpu>, control: &Arc<Control>, profile: Option<Instant>) -> Result<(Vec<Vcpu>, ExitStats, Samples), VmmError> {
    let mut handles = Vec::with_capacity(vcpus.len());
    for mut vcpu in vcpus {
        if let Some(started) = profile {
            vcpu.rip_samples = Some((started, Vec::new()));
        }
        let h = std::thread::Builder::new()
            .name(format!("skiff-vcpu{}", vcpu.index))
            .spawn({
                let control = control.clone();
                let returns_at_once = test_hook("vcpu-return") && vcpu.index == 0;
                move || {
                    // However this thread ends, the machine does not wait for it.
                    let _exit = crate::vcpu::ThreadExit::new(control, vcpu.index);
                    if !returns_at_once {
                        vcpu.run();
                    }
                    vcpu
                }
            })
            .map_err(VmmError::Thread);
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                // Stop the ones already running before reporting.
                control.request_stop(StopReason::Error(e.to_string()));
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    }
    let pthreads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
    control.set_kicker(Box::new(move || {
        for t in &pthreads {
            // SAFETY: the kicker is retired (under its lock) before any of these
            // threads is joined, so every id here names a live or unjoined thread.
            unsafe {
                libc::pthread_kill(*t, kick::kick_signal());
            }
        }
    }));
    control.wait_stopping();
    control.retire_kicker();

    let mut stats = ExitStats::default();
    let mut samples = Vec::new();
    let mut back = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(mut vcpu) => {
                stats.merge(&vcpu.stats);
                vcpu.stats = ExitStats::default();
                if let Some((_, rips)) = vcpu.rip_samples.take() {
                    samples.extend(rips.into_iter().map(|(ms, rip)| (ms, vcpu.index, rip)));
                }
                back.push(vcpu);
            }
            // The thread asked for the stop as it unwound; this overrides a reboot
            // that raced with it.
            Err(_) => control.request_fatal("a vCPU thread panicked".into()),
        }
    }
    Ok((back, stats, samples))
}

/// Loads what the guest needs beside its kernel: ACPI tables and the boot information
/// (boot_params or PVH start info, command line, initrd). Returns the boot entry.
fn write_guest_tables(
    mem: &GuestMemoryMmap,
    kernel: &loader::LoadedKernel,
    config: &VmConfig,
    cmdline: &str,
) -> Result<BootEntry, VmmError> {
    let rsdp = acpi::create_acpi_tables(mem, config.cpus)?;
    Ok(loader::write_boot_info(mem, kernel, config, cmdline, rsdp.0)?)
}

/// Power-on for one vCPU: RESET (vcpu/reset.rs), then what firmware would set up,
/// then, on the bootstrap processor, the kernel's entry state. The same at a cold
/// start and at every in-place reboot.
fn power_on(vcpu: &mut Vcpu, entry: BootEntry) -> Result<(), VmmError> {
    vcpu.reset(ResetKind::Power)?;
    vcpu.set_firmware_state()?;
    if vcpu.index == 0 {
        vcpu.set_boot_state(entry)?;
    }
    Ok(())
}

/// Finds the machine's state layout on its first vCPU: the saved MSRs, which state
/// ioctls this KVM has, and the reset table's inputs.
fn discover_state_spec(kvm: &Kvm, vm: &VmFd, fd: &kvm_ioctls::VcpuFd, cpuid: &CpuId) -> Result<StateSpec, VmmError> {
    let msrs = MsrSet::discover(kvm, fd).map_err(|e| VmmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let xsave_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    let sregs2 = vm.check_extension_raw(kvm_bindings::KVM_CAP_SREGS2 as libc::c_ulong) > 0;
    let tsc_khz = fd.get_tsc_khz().is_ok();
    let leaf0 = cpuid::find_entry(cpuid, 0, 0);
    let amd = leaf0.is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth") || e.ebx == u32::from_le_bytes(*b"Hygo"));
    let signature = cpuid::find_entry(cpuid, 1, 0).map_or(0, |e| e.eax);
    Ok(StateSpec { msrs, xsave_size, sregs2, tsc_khz, vendor: if amd { Vendor::Amd } else { Vendor::Intel }, signature })
}

/// Registers every coalescable range of both buses with KVM and attaches the ring to
/// the buses. Capabilities are checked at run time; whatever KVM refuses simply keeps
/// exiting as before. Returns a line for `--stats`.
fn setup_coalescing(kvm: &Kvm, vm: &VmFd, vcpu: &kvm_ioctls::VcpuFd, buses: &Buses) -> String {
    use kvm_ioctls::IoEventAddress;
    if !kvm.check_extension(Cap::CoalescedMmio) {
        return "off: KVM lacks KVM_CAP_COALESCED_MMIO (no ring)".into();
    }
    let pio_ok = kvm.check_extension(Cap::CoalescedPio);
    let ring = match crate::devices::coalesced::CoalescedRing::map(vcpu) {
        Ok(r) => r,
        Err(e) => return format!("off: mapping the coalesced ring failed: {e}"),
    };
    // Attached before any zone exists, so no deferred write can go unread.
    if buses.attach_ring(ring).is_err() {
        return "off: a ring was already attached".into();
    }
    let mut zones = Vec::new();
    let mut refused = Vec::new();
    let pio = buses.pio.coalescable().iter().map(|&(b, l)| (true, b, l));
    let mmio = buses.mmio.coalescable().iter().map(|&(b, l)| (false, b, l));
    for (is_pio, base, len) in pio.chain(mmio) {
        let name = if is_pio { format!("port {base:#x}") } else { format!("MMIO {base:#x}") };
        let Ok(size) = u32::try_from(len) else {
            refused.push(format!("{name} (too long)"));
            continue;
        };
        if is_pio && !pio_ok {
            refused.push(format!("{name} (no KVM_CAP_COALESCED_PIO)"));
            continue;
        }
        let addr = if is_pio { IoEventAddress::Pio(base) } else { IoEventAddress::Mmio(base) };
        match vm.register_coalesced_mmio(addr, size) {
            Ok(()) => zones.push(format!("{name}+{len}")),
            Err(e) => refused.push(format!("{name} ({e})")),
        }
    }
    let mut line = if zones.is_empty() { "no zones".to_string() } else { format!("zones {}", zones.join(", ")) };
    if !refused.is_empty() {
        line.push_str(&format!("; not coalesced: {}", refused.join(", ")));
    }
    line
}

/// Registers every doorbell range of the port bus with KVM (KVM_IOEVENTFD, any access
/// size, any value) and attaches them to the buses. What KVM refuses keeps exiting, as
/// before. Returns a line for `--stats`.
fn setup_doorbells(kvm: &Kvm, vm: &VmFd, buses: &Buses) -> String {
    use crate::devices::doorbell::{Doorbell, Doorbells};
    use kvm_ioctls::{IoEventAddress, NoDatamatch};
    if !kvm.check_extension(Cap::Ioeventfd) {
        return "off: KVM lacks KVM_CAP_IOEVENTFD".into();
    }
    let mut bells = Vec::new();
    let mut names = Vec::new();
    let mut refused = Vec::new();
    for (port, device, offset) in buses.pio.doorbells() {
        let event = match Doorbells::eventfd() {
            Ok(e) => e,
            Err(e) => {
                refused.push(format!("port {port:#x} (eventfd: {e})"));
                continue;
            }
        };
        match vm.register_ioevent(&event, &IoEventAddress::Pio(port), NoDatamatch) {
            Ok(()) => {
                names.push(format!("port {port:#x}"));
                bells.push(Doorbell { event, device, offset });
            }
            Err(e) => refused.push(format!("port {port:#x} ({e})")),
        }
    }
    if !bells.is_empty() && buses.attach_doorbells(Doorbells::new(bells)).is_err() {
        return "off: doorbells were already attached".into();
    }
    let mut line = if names.is_empty() { "none".to_string() } else { names.join(", ") };
    if !refused.is_empty() {
        line.push_str(&format!("; not doorbells: {}", refused.join(", ")));
    }
    line
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
    let total_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(RssReport { total_kib, guest_kib: memory::resident_kib(mem) })
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
