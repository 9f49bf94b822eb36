//! Every user-settable knob of a machine, validated once, with errors that say what
//! and where.

use std::path::{Path, PathBuf};

mod test_kernels;
pub use test_kernels::{
    EXIT_DEVICE_PORT, ExitDeviceConfig, FW_CFG_MAX_FILE, FW_CFG_MAX_NAME, FwCfgItem, ModuleConfig, parse_kernel_test_args,
};

/// Smallest and largest guest memory skiff accepts.
pub const MIN_MEMORY: u64 = 64 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;
/// vCPU count limit: APIC IDs are 8-bit in the MADT entries skiff writes (xAPIC).
pub const MAX_CPUS: u8 = 254;
/// Guest memory when the user does not say.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// The kernel command line skiff passes when the user gives none.
///
/// Why each item: the console is the 16550 at COM1 (earlyprintk too, so the first
/// line comes early); `reboot=k` makes Linux reboot through the i8042 reset line;
/// `panic=-1` turns a guest panic into a reboot skiff sees instead of a hang;
/// `tsc=reliable`/`no_timer_check` skip checks that are slow when guest kernel mode is
/// emulated; `acpi_pm_good` skips Linux's PM-timer sanity loop (100,000 port reads;
/// skiff's PM timer is monotonic by construction); `pci=off`: the machine has no PCI bus
/// (dropped with `--virtio-transport pci`, see [`default_cmdline`]); `8250.nr_uarts=1`:
/// there is one UART, so do not probe for three more; `cryptomgr.notests` skips the
/// crypto self-tests; `loglevel=4` keeps the serial console (an exit a byte) short.
/// Where the probe finds host quirks, skiff appends what they need (`clearcpuid=`,
/// and `initcall_blacklist=` where guest kernel mode is emulated: see
/// vcpu/probe.rs, `SLOW_WHEN_EMULATED`).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 \
     tsc=reliable no_timer_check acpi_pm_good pci=off \
     8250.nr_uarts=1 cryptomgr.notests random.trust_cpu=on loglevel=4";

/// How virtio devices reach the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio windows declared in the DSDT (an exit per interrupt for its status).
    #[default]
    Mmio,
    /// virtio-pci functions on a PCI bus, with MSI-X (no exit per interrupt).
    Pci,
}

impl std::str::FromStr for Transport {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "mmio" => Ok(Transport::Mmio),
            "pci" => Ok(Transport::Pci),
            _ => Err(ConfigError::Transport(s.to_string())),
        }
    }
}

/// skiff's default command line for a transport: `pci=off` goes when there is a PCI bus.
pub fn default_cmdline(transport: Transport) -> String {
    match transport {
        Transport::Mmio => DEFAULT_CMDLINE.to_string(),
        Transport::Pci => DEFAULT_CMDLINE.replace(" pci=off", ""),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--virtio-transport {0}: must be `pci` or `mmio`")]
    Transport(String),
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("--memory {0}: {1}")]
    Memory(String, String),
    #[error("--cpus {0}: must be between 1 and {MAX_CPUS}")]
    Cpus(u32),
    #[error(
        "no default guest in {0}: run scripts/fetch-guest first, or pass --kernel \
         (and --initrd), or set SKIFF_GUEST_DIR"
    )]
    NoDefaultGuest(PathBuf),
    #[error("--disk {0}: {1}")]
    Disk(String, String),
    #[error("--net {0}: {1}")]
    Net(String, String),
    #[error("--vsock {0}: {1}")]
    Vsock(String, String),
    #[error("--module {0}: {1}")]
    Module(String, String),
    #[error("--exit-device {0}: {1}")]
    ExitDevice(String, String),
    #[error("--fw-cfg {0}: {1}")]
    FwCfg(String, String),
}

/// Most disks one machine takes (each a virtio-mmio slot with its own GSI).
pub const MAX_DISKS: usize = 7;

/// One `--disk PATH[,ro][,id=NAME][,direct]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads as the disk's serial (VIRTIO_BLK_T_GET_ID): at most 20 bytes.
    pub id: Option<String>,
    /// Data goes between guest memory and the disk with O_DIRECT, past the host's page
    /// cache, wherever a request's buffers and offset are aligned as the file needs.
    pub direct: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// `PATH[,ro][,id=NAME][,direct]`; options after the first comma, each once.
    fn from_str(arg: &str) -> Result<Self, ConfigError> {
        let err = |why: &str| ConfigError::Disk(arg.to_string(), why.to_string());
        let mut parts = arg.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| err("no path before the options"))?;
        let mut disk = DiskConfig { path: PathBuf::from(path), read_only: false, id: None, direct: false };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" && !disk.read_only => disk.read_only = true,
                None if opt == "direct" && !disk.direct => disk.direct = true,
                None if opt == "ro" || opt == "direct" => return Err(err(&format!("`{opt}` given twice"))),
                Some(("id", name)) if disk.id.is_none() => {
                    if name.is_empty() || name.len() > 20 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(err("id= must be 1 to 20 printable ASCII characters"));
                    }
                    disk.id = Some(name.to_string());
                }
                Some(("id", _)) => return Err(err("id= given twice")),
                _ => return Err(err(&format!("unknown option `{opt}` (known: ro, id=NAME, direct)"))),
            }
        }
        Ok(disk)
    }
}

/// Most network devices one machine takes.
pub const MAX_NETS: usize = 4;

/// One `--net tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// An existing TAP device (skiff attaches to it; it never creates one).
    pub tap: String,
    /// The guest's MAC; default: one derived from the TAP's name (stable across runs).
    pub mac: [u8; 6],
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(arg: &str) -> Result<Self, ConfigError> {
        let err = |why: &str| ConfigError::Net(arg.to_string(), why.to_string());
        let (mut tap, mut mac) = (None, None);
        for opt in arg.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) if tap.is_none() => {
                    if !crate::devices::virtio::net::tap::valid_name(name) {
                        return Err(err("tap= must be 1 to 15 letters, digits, '-', '_' or '.'"));
                    }
                    tap = Some(name.to_string());
                }
                Some(("mac", m)) if mac.is_none() => {
                    mac = Some(crate::devices::virtio::net::parse_mac(m).ok_or_else(|| {
                        err(&format!("mac={m}: not a unicast MAC address (six hex pairs like 06:00:ac:10:00:02, first octet even, not all zero)"))
                    })?);
                }
                Some(("tap" | "mac", _)) => return Err(err(&format!("`{opt}`: given twice"))),
                _ => return Err(err(&format!("unknown option `{opt}` (known: tap=NAME, mac=MAC)"))),
            }
        }
        let tap = tap.ok_or_else(|| err("tap=NAME is required"))?;
        let mac = mac.unwrap_or_else(|| crate::devices::virtio::net::default_mac(&tap));
        Ok(NetConfig { tap, mac })
    }
}

/// `--vsock cid=N,uds=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 and up: 0-2 are reserved, 2 is the host).
    pub cid: u32,
    /// The Unix socket the host connects to (skiff creates it); a guest connection to
    /// host port P goes to `PATH_P`.
    pub uds: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(arg: &str) -> Result<Self, ConfigError> {
        let err = |why: &str| ConfigError::Vsock(arg.to_string(), why.to_string());
        let (mut cid, mut uds) = (None, None);
        // uds= takes the rest of the argument: a path may hold commas.
        let mut rest = arg;
        while !rest.is_empty() {
            if let Some(path) = rest.strip_prefix("uds=") {
                if path.is_empty() || uds.is_some() {
                    return Err(err("uds=PATH: empty or given twice"));
                }
                uds = Some(PathBuf::from(path));
                break;
            }
            let (opt, next) = rest.split_once(',').unwrap_or((rest, ""));
            rest = next;
            match opt.split_once('=') {
                Some(("cid", n)) if cid.is_none() => {
                    let v: u32 = n.parse().map_err(|_| err(&format!("cid={n}: not a number")))?;
                    if v < 3 || v == u32::MAX {
                        return Err(err(&format!("cid={v}: must be 3 to 4294967294 (0-2 are reserved, 2 is the host)")));
                    }
                    cid = Some(v);
                }
                Some(("cid", _)) => return Err(err("cid= given twice")),
                _ => return Err(err(&format!("unknown option `{opt}` (known: cid=N, uds=PATH)"))),
            }
        }
        Ok(VsockConfig { cid: cid.ok_or_else(|| err("cid=N is required"))?, uds: uds.ok_or_else(|| err("uds=PATH is required"))? })
    }
}

/// What to do when the guest asks for a reboot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnReboot {
    /// Reset the machine in place (vCPUs to their RESET state, devices reset, RAM
    /// cleared, the kernel loaded again) and boot again, in the same process.
    #[default]
    Reset,
    /// Stop the machine and exit with [`crate::vmm::EXIT_REBOOT`].
    Exit,
}

/// A validated machine description.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    pub stats: bool,
    pub boot_time: bool,
    pub on_reboot: OnReboot,
    /// Boot an ELF kernel through its PVH entry instead of the 64-bit boot protocol.
    pub pvh: bool,
    /// Let KVM defer writes to coalescable ranges (port 0x80, the RTC index) and
    /// signal doorbells (the boot marker) without an exit, where it can; off only to
    /// measure what that saves.
    pub coalesce: bool,
    /// Keep the guest kernel's own defaults: append only the options it needs to run
    /// correctly on this host (`clearcpuid=`), none that trade security or features
    /// for boot time where guest kernel mode is emulated (vcpu/probe.rs).
    pub guest_defaults: bool,
    /// Block devices (virtio-blk), in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// A virtio entropy device fed from the host's getrandom (on unless --no-rng).
    pub rng: bool,
    /// Network devices (virtio-net on TAPs), in the order the guest sees them.
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// Probe the host afresh instead of reusing the cached probe (vcpu/probe/cache.rs).
    pub reprobe: bool,
    /// virtio over MMIO or PCI.
    pub transport: Transport,
    /// `--boot`: the protocol the user asked for; None: detect it (a multiboot header
    /// in the first 8 KiB, else the ELF vmlinux's or bzImage's own protocol).
    pub boot: Option<BootProtocol>,
    /// `--cmdline` exactly as given (a multiboot kernel gets its path, then this).
    pub kernel_args: Option<String>,
    /// `--module PATH[,STRING]`s for a multiboot kernel, after `--initrd`.
    pub modules: Vec<ModuleConfig>,
    /// `--exit-device`: QEMU's isa-debug-exit (a guest write of V ends skiff with
    /// status (V << 1) | 1).
    pub exit_device: Option<ExitDeviceConfig>,
    /// `--fw-cfg` files the guest finds in fw_cfg's directory.
    pub fw_cfg: Vec<FwCfgItem>,
    /// `--tpr-patch`: rewrite 32-bit TPR MMIO accesses into calls of skiff's helper
    /// (src/tpr/): where measured to pay, always, or never.
    pub tpr_patch: crate::tpr::Mode,
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux's 64-bit boot protocol (ELF vmlinux or bzImage).
    Linux,
    /// PVH (an ELF with the PHYS32_ENTRY note).
    Pvh,
    /// Multiboot version 1 (a header in the first 8 KiB).
    Multiboot,
}

/// Where the default guest lives: `$SKIFF_GUEST_DIR`, else `guest/out` in the source
/// tree skiff was built from (scripts/fetch-guest writes it there).
pub fn default_guest_dir() -> PathBuf {
    match std::env::var_os("SKIFF_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/out"),
    }
}

/// Parses a memory size: a number of bytes with an optional K, M, G or T suffix
/// (powers of 1024; a trailing "iB" or "B" is accepted). A bare number means MiB, as
/// in QEMU and Firecracker.
pub fn parse_memory(text: &str) -> Result<u64, ConfigError> {
    let bad = |why: &str| ConfigError::Memory(text.to_string(), why.to_string());
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (t, 20),
        _ => return Err(bad("expected a size such as 512M or 2G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("expected a size such as 512M or 2G"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("too large"))?;
    if bytes < MIN_MEMORY {
        return Err(bad("must be at least 64M"));
    }
    if bytes > MAX_MEMORY {
        return Err(bad("must be at most 1T"));
    }
    if bytes % 4096 != 0 {
        return Err(bad("must be a multiple of 4K"));
    }
    Ok(bytes)
}

pub fn validate_cpus(n: u32) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        Ok(c) if (1..=MAX_CPUS).contains(&c) => Ok(c),
        _ => Err(ConfigError::Cpus(n)),
    }
}

/// Checks that a file exists, is a regular file and can be opened for reading.
pub fn check_readable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    std::fs::File::open(path).map_err(|e| e.to_string())?;
    Ok(())
}

/// Picks the default kernel from a guest directory: the uncompressed `vmlinux` (boots
/// without a decompression pass, which matters where guest kernel mode is slow), else
/// the `bzImage`.
pub fn default_kernel(dir: &Path) -> Result<PathBuf, ConfigError> {
    ["vmlinux", "bzImage"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ConfigError::NoDefaultGuest(dir.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_arguments_parse_or_say_what_is_wrong() {
        let d: DiskConfig = "a.img".parse().unwrap();
        assert_eq!(d, DiskConfig { path: "a.img".into(), read_only: false, id: None, direct: false });
        let d: DiskConfig = "/x/b.img,ro,id=data1,direct".parse().unwrap();
        assert_eq!(d, DiskConfig { path: "/x/b.img".into(), read_only: true, id: Some("data1".into()), direct: true });
        for (bad, why) in [
            ("", "no path"),
            (",ro", "no path"),
            ("a,rw", "unknown option `rw`"),
            ("a,ro,ro", "twice"),
            ("a,direct,direct", "twice"),
            ("a,id=", "id="),
            ("a,id=123456789012345678901", "id="),
            ("a,id=x,id=y", "twice"),
            ("a,id=a b", "id="),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.contains(why) && e.starts_with("--disk "), "{bad}: {e}");
            assert_eq!(e.lines().count(), 1);
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("256M").unwrap(), 256 << 20);
        assert_eq!(parse_memory("256").unwrap(), 256 << 20);
        assert_eq!(parse_memory("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory("131072K").unwrap(), 128 << 20);
        assert!(parse_memory("1M").is_err());
        assert!(parse_memory("2X").is_err());
        assert!(parse_memory("").is_err());
        assert!(parse_memory("99999999999999999999G").is_err());
        assert!(parse_memory("2T").is_err());
    }

    #[test]
    fn transports() {
        assert_eq!("pci".parse::<Transport>().unwrap(), Transport::Pci);
        assert_eq!("mmio".parse::<Transport>().unwrap(), Transport::Mmio);
        let e = "PCI".parse::<Transport>().unwrap_err().to_string();
        assert_eq!(e, "--virtio-transport PCI: must be `pci` or `mmio`");
        assert!(default_cmdline(Transport::Mmio).contains(" pci=off "));
        let pci = default_cmdline(Transport::Pci);
        assert!(!pci.contains("pci=off") && pci.contains("acpi_pm_good 8250.nr_uarts=1"), "{pci}");
    }

    #[test]
    fn cpus() {
        assert_eq!(validate_cpus(1).unwrap(), 1);
        assert_eq!(validate_cpus(254).unwrap(), 254);
        assert!(validate_cpus(0).is_err());
        assert!(validate_cpus(255).is_err());
        assert!(validate_cpus(100000).is_err());
    }
}
