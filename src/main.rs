//! skiff's command line: parse, validate, run, and turn every error into one line and
//! a non-zero exit status. The terminal is restored on every path.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use skiff::config::{self, OnReboot, VmConfig};
use skiff::vmm::control::StopReason;
use skiff::vmm::{EXIT_REBOOT, RunReport, Vmm};

mod terminal;

#[derive(Parser)]
#[command(name = "skiff", version, about = "A virtual machine monitor for Linux guests on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest with its console on this terminal. With no flags, boots the
    /// default guest that scripts/fetch-guest built (Debian's kernel and a busybox
    /// initramfs). `poweroff` in the guest ends skiff with status 0.
    Run(RunArgs),
    /// Probe this host's KVM: which instructions it cannot run in guest kernel mode
    /// (hidden from the guest's CPUID), and what a guest kernel instruction costs.
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
    /// Boot protocol for an ELF kernel: the Linux 64-bit entry, or PVH.
    #[arg(long, value_enum, default_value_t = BootProtocol::Linux64)]
    boot: BootProtocol,
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
}

#[derive(Clone, Copy, ValueEnum)]
enum BootProtocol {
    #[value(name = "linux64")]
    Linux64,
    Pvh,
}

#[derive(Clone, Copy, ValueEnum)]
enum RebootAction {
    Reset,
    Exit,
}

fn main() -> ExitCode {
    let started = Instant::now();
    terminal::restore_on_panic();
    let cli = parse_command_line();
    match cli.command {
        Command::Run(args) => finish(run(args, started)),
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
            eprintln!("skiff: {msg}");
            ExitCode::from(1)
        }
    }
}

fn probe() -> Result<ExitCode, String> {
    let quirks = skiff::vmm::probe_host().map_err(|e| e.to_string())?;
    print!("{}", quirks.report());
    Ok(ExitCode::SUCCESS)
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
    Ok(VmConfig {
        kernel,
        initrd,
        cmdline: args.cmdline.unwrap_or_else(|| config::DEFAULT_CMDLINE.to_string()),
        cpus,
        memory,
        stats: args.stats,
        boot_time: args.boot_time,
        on_reboot: match args.on_reboot {
            RebootAction::Reset => OnReboot::Reset,
            RebootAction::Exit => OnReboot::Exit,
        },
        pvh: matches!(args.boot, BootProtocol::Pvh),
        coalesce: !args.no_coalesce,
        guest_defaults: args.guest_defaults,
    })
}

fn run(args: RunArgs, started: Instant) -> Result<ExitCode, String> {
    let config = build_config(args)?;
    terminal::install_stop_signals();
    let vmm = Vmm::build(&config, Box::new(std::io::stdout())).map_err(|e| e.to_string())?;
    let report = {
        // Raw mode only while the guest runs; the guard restores it on every path out.
        let _raw = terminal::RawMode::enter_if_tty();
        vmm.run(started).map_err(|e| e.to_string())?
    };
    print_reports(&config, &report);
    match &report.reason {
        StopReason::Poweroff => Ok(ExitCode::SUCCESS),
        StopReason::Reboot(source) => {
            if let Some(d) = &report.diagnostic {
                eprintln!("skiff: {d}");
            }
            eprintln!("skiff: guest rebooted ({source}); exiting with status {EXIT_REBOOT}");
            Ok(ExitCode::from(EXIT_REBOOT as u8))
        }
        StopReason::Error(e) => Err(e.clone()),
    }
}

fn print_reports(config: &VmConfig, r: &RunReport) {
    if config.boot_time || config.stats {
        let ms = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.1} ms"));
        eprintln!(
            "boot: first console byte {}, /init marker {}, exit {:.1} ms",
            ms(r.boot.first_console_byte_ms),
            ms(r.boot.init_marker_ms),
            r.boot.exit_ms
        );
    }
    if (config.boot_time || config.stats) && !r.reboots.is_empty() {
        for (i, rb) in r.reboots.iter().enumerate() {
            eprintln!("{}", rb.describe(i + 1));
        }
        let mut reset: Vec<f64> = r.reboots.iter().map(|x| x.reset_ms).collect();
        let mut marker: Vec<f64> = r.reboots.iter().filter_map(|x| x.marker_ms).collect();
        eprintln!(
            "reboots: {} in place; reset median {}, reboot request to /init marker median {}",
            r.reboots.len(),
            median_ms(&mut reset),
            median_ms(&mut marker)
        );
    }
    if config.stats {
        eprint!("{}", r.stats.report());
        eprintln!("unclaimed port I/O: {} reads, {} writes", r.unclaimed.0, r.unclaimed.1);
        eprintln!("unclaimed MMIO: {} reads, {} writes", r.unclaimed_mmio.0, r.unclaimed_mmio.1);
        eprintln!(
            "coalesced writes: {} port I/O, {} MMIO ({})",
            r.coalesced.0, r.coalesced.1, r.coalescing
        );
        eprintln!("doorbell writes (ioeventfd, no exit): {} ({})", r.doorbells_rung, r.doorbells);
        eprintln!("KVM reports the bytes of instructions it fails to emulate: {}", r.failure_bytes);
        eprint!("{}", r.quirks.report());
        if let Some(rss) = r.rss {
            eprintln!(
                "memory: skiff RSS {} KiB excluding {} KiB of resident guest RAM (total {} KiB)",
                rss.vmm_kib(),
                rss.guest_kib,
                rss.total_kib
            );
        }
        eprint!("{}", r.quirks.cmdline_report(config.guest_defaults));
        eprintln!("kernel command line: {}", r.cmdline);
    }
}

/// The median of `v` as "N.N ms", or "n/a" when empty.
fn median_ms(v: &mut [f64]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let m = if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] };
    format!("{m:.1} ms")
}
