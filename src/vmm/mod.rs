//! The machine as a whole: build it (KVM VM, memory, irqchip, devices, vCPUs), run it,
//! and stop it. The lifecycle is: build -> run (one thread per vCPU) -> a stop request
//! (poweroff, reboot, error) kicks every vCPU -> join -> report.

pub mod acpi;
pub mod control;
pub mod layout;
pub mod loader;
pub mod memory;

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
use crate::devices::serial::{ConsoleOut, SerialDevice, spawn_stdin_pump};
use crate::devices::{BusDevice, Buses};
use crate::stats::ExitStats;
use crate::vcpu::probe::HostQuirks;
use crate::vcpu::{Vcpu, cpuid, kick, probe};
use control::{Control, StopReason};
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
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmmError::MissingCap(name));
        }
    }
    Ok(())
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
    pub unclaimed: (u64, u64),
    pub rss: Option<RssReport>,
    pub cmdline: String,
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

/// A built machine, ready to run.
pub struct Vmm {
    _kvm: Kvm,
    _vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    control: Arc<Control>,
    buses: Arc<Buses>,
    serial: Arc<SerialDevice>,
    quirks: HostQuirks,
    console_first_byte: Arc<OnceLock<Instant>>,
    init_marker: Arc<OnceLock<Instant>>,
    /// The command line the guest got: the configured one plus host-quirk options.
    cmdline: String,
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

        let mem = memory::create_guest_memory(config.memory)?;
        memory::register_with_kvm(&vm, &mem)?;

        let kernel = loader::load_kernel(&mem, &config.kernel)?;
        let rsdp = acpi::create_acpi_tables(&mem, config.cpus)?;
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
        let cmdline = match quirks.linux_cmdline_extras() {
            Some(extra) => format!("{} {extra}", config.cmdline),
            None => config.cmdline.clone(),
        };
        let entry = loader::write_boot_info(&mem, &kernel, config, &cmdline, rsdp.0)?;

        let control = Arc::new(Control::new());
        let out = ConsoleOut::new(console);
        let console_first_byte = out.first_byte.clone();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Device(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| VmmError::Kvm("KVM_IRQFD (COM1)", e))?;
        let serial = Arc::new(SerialDevice::new(serial_irq, out));
        let marker = BootMarker::default();
        let init_marker = marker.reached.clone();

        let mut buses = Buses::default();
        let pio: [(Arc<dyn BusDevice>, u16, u64); 7] = [
            (serial.clone(), COM1_PORT, 8),
            (Arc::new(I8042::new(control.clone())), I8042_PORT, 5),
            (Arc::new(Cmos::default()), RTC_PORT, 2),
            (Arc::new(PostPort::default()), POST_PORT, 1),
            (Arc::new(ResetControl::new(control.clone(), "0xcf9 reset control")), RESET_CF9_PORT, 1),
            (Arc::new(PmBlock::new(control.clone())), PM1A_EVT_PORT, PM_BLOCK_LEN),
            (Arc::new(marker), BOOT_MARKER_PORT, 1),
        ];
        for (dev, port, len) in pio {
            buses
                .pio
                .insert(dev, port as u64, len)
                .map_err(|e| VmmError::Device(e.to_string()))?;
        }
        let buses = Arc::new(buses);

        if quirks.user_syscall_broken {
            filter_lstar_writes(&vm)?;
        }
        let xsave_layout = Arc::new(crate::vcpu::xsave::XsaveLayout::from_cpuid(&supported));
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for index in 0..config.cpus {
            let fd = vm.create_vcpu(index as u64).map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            let cpuid: CpuId = cpuid::normalize(&base_cpuid, index, config.cpus);
            fd.set_cpuid2(&cpuid).map_err(|e| VmmError::Kvm("KVM_SET_CPUID2", e))?;
            let mut vcpu = Vcpu::new(index, fd, mem.clone(), buses.clone(), control.clone(), xsave_layout.clone());
            if quirks.user_syscall_broken {
                vcpu.syscall_fixup = Some(Default::default());
            }
            vcpu.set_initial_state()?;
            if index == 0 {
                vcpu.set_boot_state(entry)?;
            }
            vcpus.push(vcpu);
        }

        Ok(Vmm {
            _kvm: kvm,
            _vm: vm,
            mem,
            vcpus,
            control,
            buses,
            serial,
            quirks,
            console_first_byte,
            init_marker,
            cmdline,
        })
    }

    /// Runs the machine until it stops; returns why, with the statistics.
    pub fn run(self, started: Instant) -> Result<RunReport, VmmError> {
        kick::install_handler().map_err(|e| VmmError::Device(format!("signal handler: {e}")))?;
        let _stdin = spawn_stdin_pump(self.serial.clone()).map_err(VmmError::Thread)?;

        // A sampling profiler for diagnosing slow guests: SKIFF_PROFILE=FILE kicks every
        // vCPU 100 times a second and writes "ms vcpu rip" lines to FILE at exit
        // (scripts/symbolize-profile turns them into guest functions).
        let profile = std::env::var_os("SKIFF_PROFILE").map(std::path::PathBuf::from);
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for mut vcpu in self.vcpus {
            if profile.is_some() {
                vcpu.rip_samples = Some((started, Vec::new()));
            }
            let h = std::thread::Builder::new()
                .name(format!("skiff-vcpu{}", vcpu.index))
                .spawn(move || {
                    vcpu.run();
                    (vcpu.index, vcpu.stats, vcpu.rip_samples)
                })
                .map_err(VmmError::Thread)?;
            handles.push(h);
        }
        let pthreads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
        self.control.set_kicker(Box::new(move || {
            for t in &pthreads {
                // SAFETY: the threads are joined only after this kicker's last use
                // (joining happens after the stop request that calls it, and the kicker
                // is not called again once every vCPU has stopped running).
                unsafe {
                    libc::pthread_kill(*t, kick::kick_signal());
                }
            }
        }));

        // The watcher: turns a stop signal into a clean stop, and drives the profiler.
        {
            let control = self.control.clone();
            let profiling = profile.is_some();
            std::thread::Builder::new()
                .name("skiff-watch".into())
                .spawn(move || {
                    while !control.stopping() {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        let sig = control::STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst);
                        if sig != 0 {
                            control.request_stop(StopReason::Error(format!("stopped by signal {sig}")));
                        } else if profiling {
                            control.kick();
                        }
                    }
                })
                .map_err(VmmError::Thread)?;
        }

        let mut stats = ExitStats::default();
        let mut samples: Vec<(u32, u8, u64)> = Vec::new();
        for h in handles {
            match h.join() {
                Ok((index, s, rips)) => {
                    stats.merge(&s);
                    samples.extend(rips.into_iter().flat_map(|(_, v)| v).map(|(ms, rip)| (ms, index, rip)));
                }
                Err(_) => self.control.request_stop(StopReason::Error("a vCPU thread panicked".into())),
            }
        }
        if let Some(path) = profile {
            samples.sort_unstable();
            let text: String = samples.iter().map(|(ms, cpu, rip)| format!("{ms} {cpu} {rip:#x}\n")).collect();
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("skiff: writing the profile to {}: {e}", path.display());
            }
        }
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
            rss,
            cmdline: self.cmdline,
        })
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
