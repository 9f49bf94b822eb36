//! skiff's command line: parse, validate, run, and turn every error into one line and
//! a non-zero exit status. The terminal is restored on every path, and a stop signal
//! (SIGTERM, SIGHUP, SIGINT) is honoured in every phase: probe, build, run, stop.

// println!/eprintln! panic on a closed pipe: skiff::output writes instead.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use skiff::config::{self, OnReboot, VmConfig};
use skiff::output;
use skiff::control::{STOP_SIGNAL, StopReason};
use skiff::vmm::{EXIT_REBOOT, RunReport, Vmm};

mod terminal;

#[derive(Parser)]
#[command(name = "skiff", version, about = "A virtual machine monitor for Linux guests on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per process: the size of `run`'s arguments does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Boot a Linux guest with its console on this terminal. With no flags, boots the
    /// default guest that scripts/fetch-guest built (Debian's kernel and a busybox
    /// initramfs). `poweroff` in the guest ends skiff with status 0.
    Run(RunArgs),
    /// Restore a snapshot taken through the API (`PUT /snapshot/create`) and run it,
    /// with its console on this terminal. The machine (vCPUs, memory, disks, devices)
    /// is the snapshot's; its disks must be unchanged since.
    Restore(RestoreArgs),
    /// Probe this host's KVM: which instructions it cannot run in guest kernel mode
    /// (hidden from the guest's CPUID), and what a guest kernel instruction costs.
    /// Always probes afresh, and refreshes the results `skiff run` reuses.
    Probe,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel to boot: an ELF vmlinux (booted without decompression) or a bzImage.
    /// Default: the default guest's vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk. Default: the default guest's initrd when --kernel is not given.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line. Default: a serial console on ttyS0 and settings that keep
    /// the boot short (printed by `--stats`).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest memory: bytes with a K/M/G/T suffix, or a plain number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// On exit, print exit counts per reason, top ports and MMIO pages, the emulated
    /// instructions, the host quirks skiff detected and worked around, and boot times.
    #[arg(long)]
    stats: bool,
    /// On exit, print the time from skiff's start to the guest's first console byte,
    /// to its /init marker (port 0x440), and to exit.
    #[arg(long)]
    boot_time: bool,
    /// Boot protocol: the Linux 64-bit entry, PVH, or multiboot (version 1). Default:
    /// multiboot for a kernel with a multiboot header in its first 8 KiB, else the
    /// Linux 64-bit entry.
    #[arg(long, value_enum)]
    boot: Option<BootProtocol>,
    /// What a guest reboot (i8042 reset line, ACPI reset register, port 0xcf9, triple
    /// fault) does: `reset` resets the machine in place and boots again; `exit` stops
    /// skiff with status 3.
    #[arg(long, value_enum, default_value_t = RebootAction::Reset)]
    on_reboot: RebootAction,
    /// Make every write to port 0x80 and the RTC index port exit to skiff instead of
    /// waiting in KVM's coalesced ring, and doorbell ports (the boot marker) exit
    /// instead of signalling an ioeventfd (for measuring what both save).
    #[arg(long)]
    no_coalesce: bool,
    /// Keep the guest kernel's defaults: append only the options it needs to run
    /// correctly here (clearcpuid=), not those that make it boot faster where guest
    /// kernel mode is emulated at the cost of its security or features (rodata=off,
    /// retbleed=off, spec_rstack_overflow=off, initcall_blacklist=...).
    #[arg(long)]
    guest_defaults: bool,
    /// TPR access patching for 32-bit guests (src/tpr/): `auto` engages it where the
    /// host probe measured the patched path cheaper than a TPR MMIO access, `on`
    /// always (for testing), `off` never.
    #[arg(long, default_value = "auto", value_parser = parse_tpr_mode)]
    tpr_patch: skiff::tpr::Mode,
    /// A disk for the guest (virtio-blk): a raw image file or a block device, its
    /// size a multiple of 512 bytes; `ro` makes it read-only, `id=NAME` sets the serial
    /// the guest reads, `direct` moves data with O_DIRECT (past the host's page cache)
    /// where a request is aligned as the file needs. Repeatable: the first is /dev/vda,
    /// the next /dev/vdb, ...
    #[arg(long, value_name = "PATH[,ro][,id=NAME][,direct]")]
    disk: Vec<String>,
    /// A network device (virtio-net) on the existing TAP device NAME (skiff opens it
    /// with IFF_VNET_HDR and never creates one), with the guest's MAC (default: one
    /// derived from NAME). Repeatable: eth0, eth1, ... in the guest.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<String>,
    /// A virtio-vsock device with guest CID N; the host side is the Unix socket PATH
    /// (Firecracker's convention: connect and write `CONNECT <port>\n`; a guest
    /// connection to host port P goes to PATH_P).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<String>,
    /// No virtio entropy device (by default the guest gets one, fed from the host's
    /// getrandom).
    #[arg(long)]
    no_rng: bool,
    /// Probe the host's KVM afresh (and refresh the cached results) instead of reusing
    /// what an earlier run found on this host.
    #[arg(long)]
    reprobe: bool,
    /// How virtio devices reach the guest: `mmio` (virtio-mmio windows in the DSDT) or
    /// `pci` (virtio-pci functions with MSI-X: no exit per interrupt).
    #[arg(long, value_name = "pci|mmio", default_value = "mmio")]
    virtio_transport: String,
    /// A module for a multiboot kernel, with its string (default: the path); after
    /// --initrd, which is the first module. Repeatable.
    #[arg(long, value_name = "PATH[,STRING]")]
    module: Vec<String>,
    /// QEMU's isa-debug-exit: a guest write of V to the port ends skiff with status
    /// (V << 1) | 1. Default port 0xf4, size 1.
    #[arg(long, value_name = "[port=0xf4][,size=1|2|4]", num_args = 0..=1, default_missing_value = "")]
    exit_device: Option<String>,
    /// A file in fw_cfg's directory (QEMU's firmware configuration interface, ports
    /// 0x510-0x511), from a host file or a string (string= takes the rest of the
    /// argument). Names start with opt/ and are at most 55 bytes. Repeatable.
    #[arg(long, value_name = "name=opt/NAME,file=PATH|string=TEXT")]
    fw_cfg: Vec<String>,
    /// Serve the control API (HTTP over a Unix socket created here, mode 0600):
    /// Firecracker's paths for pause/resume, snapshots, instance and machine info, and
    /// `GET /stats`. The socket is removed at exit.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Serve gdb (the GDB remote protocol) on a Unix socket or a loopback TCP port:
    /// every vCPU a thread; breakpoints, watchpoints, single step, Ctrl-C.
    #[arg(long, value_name = "unix:PATH|tcp:127.0.0.1:PORT")]
    gdb: Option<String>,
    /// With --gdb: stop before the guest's first instruction and wait for gdb.
    #[arg(long, requires = "gdb")]
    gdb_wait: bool,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot file (`snapshot_path` of `PUT /snapshot/create`). Without it,
    /// skiff serves --api-sock and waits for `PUT /snapshot/load`, as a fresh
    /// Firecracker does.
    #[arg(long, value_name = "PATH")]
    snapshot: Option<PathBuf>,
    /// Its guest-memory file, where it is no longer where the snapshot says.
    #[arg(long, value_name = "PATH")]
    mem_file: Option<PathBuf>,
    /// A copy of a disk to use instead of the file the snapshot names: once for
    /// each of the machine's disks, in its order (a clone beside the original, which
    /// holds its disks locked). Only its size is checked: it must be the disk as it
    /// was when the snapshot was taken.
    #[arg(long = "disk", value_name = "PATH", requires = "snapshot")]
    disks: Vec<PathBuf>,
    /// The vsock device's host socket instead of the snapshot's (guest connections to
    /// host port P go to PATH_P).
    #[arg(long, value_name = "PATH", requires = "snapshot")]
    vsock_uds: Option<PathBuf>,
    /// Run the guest at once; otherwise it stays paused until `PATCH /vm` resumes
    /// it (which needs --api-sock).
    #[arg(long)]
    resume: bool,
    /// Serve the control API on this socket, as `skiff run --api-sock` does.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// On exit, print exit counts, the restore's timing and more (as `skiff run --stats`).
    #[arg(long)]
    stats: bool,
    /// On exit, print the time from skiff's start to the guest's first console byte
    /// and to exit.
    #[arg(long)]
    boot_time: bool,
    /// As `skiff run --no-coalesce`.
    #[arg(long)]
    no_coalesce: bool,
    /// What a guest reboot does (as `skiff run --on-reboot`); default: what the
    /// snapshotted machine was started with.
    #[arg(long, value_enum)]
    on_reboot: Option<RebootAction>,
    /// Serve gdb (the GDB remote protocol) on a Unix socket or a loopback TCP port:
    /// every vCPU a thread; breakpoints, watchpoints, single step, Ctrl-C.
    #[arg(long, value_name = "unix:PATH|tcp:127.0.0.1:PORT")]
    gdb: Option<String>,
    /// With --gdb: hold the restored guest until gdb lets it run.
    #[arg(long, requires = "gdb")]
    gdb_wait: bool,
}

impl From<RebootAction> for OnReboot {
    fn from(a: RebootAction) -> Self {
        match a {
            RebootAction::Reset => OnReboot::Reset,
            RebootAction::Exit => OnReboot::Exit,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BootProtocol {
    #[value(name = "linux64", alias = "linux")]
    Linux64,
    Pvh,
    Multiboot,
}

#[derive(Clone, Copy, ValueEnum)]
enum RebootAction {
    Reset,
    Exit,
}

fn main() -> ExitCode {
    let started = Instant::now();
    terminal::restore_on_panic();
    // Before anything takes time: a stop signal in any phase is a clean stop.
    terminal::install_stop_signals();
    let cli = parse_command_line();
    match cli.command {
        Command::Run(args) => finish(run(args, started)),
        Command::Restore(args) => finish(restore(args, started)),
        Command::Probe => finish(probe()),
    }
}

/// The command line, with `skiff --help` showing every subcommand's flags too.
fn parse_command_line() -> Cli {
    let mut cmd = Cli::command();
    let mut extra = String::new();
    for sub in cmd.get_subcommands_mut() {
        let name = sub.get_name().to_string();
        let help = sub.render_help().to_string();
        extra.push_str(&format!("\n`skiff {name}`:\n{help}"));
    }
    let matches = cmd.after_long_help(extra).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn finish(result: Result<ExitCode, String>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(msg) => {
            output::stderr(&format!("skiff: {msg}\n"));
            ExitCode::from(1)
        }
    }
}

/// Runs `work` on its own thread and waits for it while watching for a stop signal:
/// one that comes first ends the wait with "stopped by signal N while `phase`". The
/// thread is left to end with the process; it holds nothing that outlives it (KVM
/// file descriptors, memory), and the terminal is not in raw mode yet.
fn interruptible<T: Send + 'static>(
    phase: &'static str,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("skiff-build".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| format!("creating a thread: {e}"))?;
    loop {
        let sig = STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            return Err(format!("stopped by signal {sig} while {phase}"));
        }
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(result) => return result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("{phase}: the thread doing it ended without a result"));
            }
        }
    }
}

fn probe() -> Result<ExitCode, String> {
    let (quirks, origin) = interruptible("probing the host", || skiff::vmm::probe_host().map_err(|e| e.to_string()))?;
    match output::stdout(&format!("{}{}{}", quirks.report(), quirks.pv.report(None, None), origin.report_line())) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader closed the pipe (`skiff probe | head -3`): it has what it wanted.
        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(format!("writing the report to stdout: {e}")),
    }
}

fn build_config(args: RunArgs) -> Result<VmConfig, String> {
    let memory = config::parse_memory(&args.memory).map_err(|e| e.to_string())?;
    let cpus = config::validate_cpus(args.cpus).map_err(|e| e.to_string())?;
    let (kernel, initrd) = match args.kernel {
        Some(k) => (k, args.initrd),
        None => {
            let dir = config::default_guest_dir();
            let k = config::default_kernel(&dir).map_err(|e| e.to_string())?;
            let initrd = args.initrd.or_else(|| Some(dir.join("initrd.cpio")).filter(|p| p.is_file()));
            (k, initrd)
        }
    };
    config::check_readable(&kernel).map_err(|r| format!("kernel {}: {r}", kernel.display()))?;
    if let Some(i) = &initrd {
        config::check_readable(i).map_err(|r| format!("initrd {}: {r}", i.display()))?;
    }
    let transport: config::Transport = args.virtio_transport.parse().map_err(|e: config::ConfigError| e.to_string())?;
    let disks = args.disk.iter().map(|d| d.parse::<config::DiskConfig>().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    if disks.len() > config::MAX_DISKS {
        return Err(format!("--disk: {} disks given, at most {} are supported", disks.len(), config::MAX_DISKS));
    }
    let nets = args.net.iter().map(|n| n.parse::<config::NetConfig>().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    if nets.len() > config::MAX_NETS {
        return Err(format!("--net: {} given, at most {} are supported", nets.len(), config::MAX_NETS));
    }
    let vsock = args.vsock.as_deref().map(|v| v.parse::<config::VsockConfig>().map_err(|e| e.to_string())).transpose()?;
    let (modules, exit_device, fw_cfg) = config::parse_kernel_test_args(&args.module, args.exit_device.as_deref(), &args.fw_cfg)?;
    let boot = args.boot.map(|b| match b {
        BootProtocol::Linux64 => config::BootProtocol::Linux,
        BootProtocol::Pvh => config::BootProtocol::Pvh,
        BootProtocol::Multiboot => config::BootProtocol::Multiboot,
    });
    let kernel_args = args.cmdline.clone();
    Ok(VmConfig {
        kernel,
        initrd,
        cmdline: args.cmdline.unwrap_or_else(|| config::default_cmdline(transport)),
        cpus,
        memory,
        stats: args.stats,
        boot_time: args.boot_time,
        on_reboot: args.on_reboot.into(),
        pvh: matches!(args.boot, Some(BootProtocol::Pvh)),
        coalesce: !args.no_coalesce,
        guest_defaults: args.guest_defaults,
        disks,
        nets,
        vsock,
        rng: !args.no_rng,
        reprobe: args.reprobe,
        transport,
        boot,
        kernel_args,
        modules,
        exit_device,
        fw_cfg,
        tpr_patch: args.tpr_patch,
    })
}

fn run(args: RunArgs, started: Instant) -> Result<ExitCode, String> {
    let api = bind_api(args.api_sock.as_deref())?;
    let gdb = bind_gdb(args.gdb.as_deref())?;
    let gdb_wait = args.gdb_wait;
    let config = build_config(args)?;
    let mut vmm = {
        let config = config.clone();
        interruptible("building the machine", move || {
            Vmm::build(&config, Box::new(output::RawStdout)).map_err(|e| e.to_string())
        })?
    };
    if let Some(l) = gdb {
        vmm.set_gdb(l, gdb_wait);
    }
    run_machine(vmm, &config, api, started)
}

fn restore(args: RestoreArgs, started: Instant) -> Result<ExitCode, String> {
    if args.snapshot.is_none() && args.api_sock.is_none() {
        return Err("restore: give --snapshot PATH, or --api-sock PATH to wait for PUT /snapshot/load".into());
    }
    if !args.resume && args.api_sock.is_none() {
        return Err("restore: without --resume the guest stays paused until the API resumes it: give --resume or --api-sock".into());
    }
    let mut api = bind_api(args.api_sock.as_deref())?;
    let on_reboot = args.on_reboot.map(OnReboot::from);
    let gdb = bind_gdb(args.gdb.as_deref())?;
    // The restoring command's own choices; the machine's shape is the snapshot's.
    let like = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        memory: 0,
        stats: args.stats,
        boot_time: args.boot_time,
        on_reboot: OnReboot::Reset,
        pvh: false,
        coalesce: !args.no_coalesce,
        guest_defaults: false,
        disks: Vec::new(),
        nets: Vec::new(),
        vsock: None,
        rng: false,
        reprobe: false,
        transport: config::Transport::Mmio,
        boot: None,
        kernel_args: None,
        modules: Vec::new(),
        exit_device: None,
        fw_cfg: Vec::new(),
        // A restore engages TPR patching when its snapshot has patched sites.
        tpr_patch: skiff::tpr::Mode::Off,
    };
    let vmm = match (args.snapshot, api.as_mut()) {
        (Some(snapshot), _) => interruptible("restoring the snapshot", move || {
            let relocate = skiff::snapshot::Relocation { disks: &args.disks, vsock_uds: args.vsock_uds.as_deref() };
            let opts = skiff::vmm::RestoreOptions { snapshot: &snapshot, mem_file: args.mem_file.as_deref(), resume: args.resume, on_reboot, relocate };
            Vmm::restore(&opts, &like, Box::new(output::RawStdout)).map_err(|e| e.to_string())
        })?,
        (None, Some(server)) => skiff::vmm::wait_for_load(server, &like, on_reboot)?,
        (None, None) => return Err("restore: give --snapshot PATH or --api-sock PATH".into()),
    };
    let mut vmm = vmm;
    if let Some(l) = gdb {
        vmm.set_gdb(l, args.gdb_wait);
    }
    let config = vmm.config().clone();
    run_machine(vmm, &config, api, started)
}

/// The API socket, bound before the machine is built so that a bad path is one line
/// before any work.
fn bind_api(path: Option<&std::path::Path>) -> Result<Option<skiff::api::ApiServer>, String> {
    path.map(|p| skiff::api::ApiServer::bind(p).map_err(|e| e.to_string())).transpose()
}

/// The gdb stub's socket, bound before the machine is built (one line for a bad
/// address or an unusable path, before any work).
fn bind_gdb(addr: Option<&str>) -> Result<Option<skiff::gdb::GdbListener>, String> {
    addr.map(|a| a.parse::<skiff::gdb::GdbAddr>().and_then(|a| skiff::gdb::GdbListener::bind(&a))).transpose()
}

/// Runs a built or restored machine to its end and turns the end into an exit status.
fn run_machine(vmm: Vmm, config: &VmConfig, api: Option<skiff::api::ApiServer>, started: Instant) -> Result<ExitCode, String> {
    let report = {
        // Raw mode only while the guest runs; the guard restores it on every path out.
        let _raw = terminal::RawMode::enter_if_tty();
        vmm.run(started, api).map_err(|e| e.to_string())?
    };
    print_reports(config, &report);
    match &report.reason {
        StopReason::Poweroff => Ok(ExitCode::SUCCESS),
        StopReason::GuestExit(value) => Ok(ExitCode::from(StopReason::guest_exit_status(*value))),
        StopReason::Reboot(source) => {
            let mut text = String::new();
            if let Some(d) = &report.diagnostic {
                let _ = writeln!(text, "skiff: {d}");
            }
            let _ = writeln!(text, "skiff: guest rebooted ({source}); exiting with status {EXIT_REBOOT}");
            output::stderr(&text);
            Ok(ExitCode::from(EXIT_REBOOT as u8))
        }
        StopReason::Error(e) => {
            // Registers and the instruction at CS:RIP, where a vCPU recorded them (the
            // last triple fault of a reboot storm).
            if let Some(d) = &report.diagnostic {
                output::stderr(&format!("skiff: {d}\n"));
            }
            Err(e.clone())
        }
    }
}

fn print_reports(config: &VmConfig, r: &RunReport) {
    let mut out = String::new();
    if r.console_unwritten > 0 {
        let _ = writeln!(out, "skiff: {} bytes of guest console output not written (stdout closed or not read)", r.console_unwritten);
    }
    if config.boot_time || config.stats {
        let ms = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.1} ms"));
        if !r.restore_phases.is_empty() {
            let phases: Vec<String> = r.restore_phases.iter().map(|(p, t)| format!("{p} {t:.2} ms")).collect();
            let _ = writeln!(out, "restore: {}", phases.join(", "));
        }
        let _ = writeln!(
            out,
            "boot: first console byte {}, /init marker {}, exit {:.1} ms, vCPUs running {}",
            ms(r.boot.first_console_byte_ms),
            ms(r.boot.init_marker_ms),
            r.boot.exit_ms,
            ms(r.boot.running_ms),
        );
    }
    if (config.boot_time || config.stats) && !r.reboots.is_empty() {
        out.push_str(&r.reboots.report());
    }
    if config.stats {
        out.push_str(&r.stats.report());
        let _ = writeln!(out, "unclaimed port I/O: {} reads, {} writes", r.unclaimed.0, r.unclaimed.1);
        let _ = writeln!(out, "unclaimed MMIO: {} reads, {} writes", r.unclaimed_mmio.0, r.unclaimed_mmio.1);
        let _ = writeln!(
            out,
            "coalesced writes: {} port I/O, {} MMIO ({})",
            r.coalesced.0, r.coalesced.1, r.coalescing
        );
        let _ = writeln!(out, "doorbell writes (ioeventfd, no exit): {} ({})", r.doorbells_rung, r.doorbells);
        let _ = writeln!(out, "KVM reports the bytes of instructions it fails to emulate: {}", r.failure_bytes);
        out.push_str(&r.hypercalls);
        out.push_str(&r.tpr);
        for v in &r.virtio {
            let _ = writeln!(out, "virtio {v}");
        }
        out.push_str(&r.probe_origin.report_line());
        out.push_str(&r.quirks.report());
        out.push_str(&r.pv_features);
        if let Some(rss) = r.rss {
            let _ = writeln!(
            out,
                "memory: skiff RSS {} KiB excluding {} KiB of resident guest RAM (total {} KiB)",
                rss.vmm_kib(),
                rss.guest_kib,
                rss.total_kib
            );
        }
        out.push_str(&r.quirks.cmdline_report(config.guest_defaults));
        let _ = writeln!(out, "kernel command line: {}", r.cmdline);
    }
    output::stderr(&out);
}

fn parse_tpr_mode(s: &str) -> Result<skiff::tpr::Mode, String> {
    s.parse()
}
