//! Every user-settable knob of a machine, validated once, with errors that say what
//! and where.

use std::path::{Path, PathBuf};

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

/// One `--module PATH[,STRING]`: a file loaded for a multiboot kernel, and the string
/// it gets with it (the path when none is given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleConfig {
    pub path: PathBuf,
    pub string: String,
}

impl std::str::FromStr for ModuleConfig {
    type Err = ConfigError;

    fn from_str(arg: &str) -> Result<Self, ConfigError> {
        let (path, string) = match arg.split_once(',') {
            Some((p, s)) => (p, s.to_string()),
            None => (arg, arg.to_string()),
        };
        if path.is_empty() {
            return Err(ConfigError::Module(arg.to_string(), "no path before the comma".into()));
        }
        if string.bytes().any(|b| b == 0) {
            return Err(ConfigError::Module(arg.to_string(), "the string contains a NUL byte".into()));
        }
        check_readable(Path::new(path)).map_err(|r| ConfigError::Module(arg.to_string(), r))?;
        Ok(ModuleConfig { path: PathBuf::from(path), string })
    }
}

/// `--exit-device [port=0xf4][,size=1|2|4]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitDeviceConfig {
    pub port: u16,
    pub size: u8,
}

/// QEMU's isa-debug-exit defaults.
pub const EXIT_DEVICE_PORT: u16 = 0xf4;

impl std::str::FromStr for ExitDeviceConfig {
    type Err = ConfigError;

    fn from_str(arg: &str) -> Result<Self, ConfigError> {
        let err = |why: &str| ConfigError::ExitDevice(arg.to_string(), why.to_string());
        let mut cfg = ExitDeviceConfig { port: EXIT_DEVICE_PORT, size: 1 };
        let (mut port_seen, mut size_seen) = (false, false);
        for opt in arg.split(',').filter(|o| !o.is_empty()) {
            match opt.split_once('=') {
                Some(("port", v)) if !port_seen => {
                    port_seen = true;
                    cfg.port = parse_u16(v).ok_or_else(|| err("port= must be a number from 0 to 0xffff (0x... for hex)"))?;
                }
                Some(("size", v)) if !size_seen => {
                    size_seen = true;
                    cfg.size = match v {
                        "1" => 1,
                        "2" => 2,
                        "4" => 4,
                        _ => return Err(err("size= must be 1, 2 or 4")),
                    };
                }
                Some(("port" | "size", _)) => return Err(err(&format!("`{opt}`: given twice"))),
                _ => return Err(err(&format!("unknown option `{opt}` (known: port=N, size=1|2|4)"))),
            }
        }
        if u32::from(cfg.port) + u32::from(cfg.size) > 0x1_0000 {
            return Err(err("the ports run past 0xffff"));
        }
        Ok(cfg)
    }
}

/// A decimal or 0x-prefixed hexadecimal u16.
fn parse_u16(v: &str) -> Option<u16> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// One `--fw-cfg name=opt/NAME,file=PATH` or `name=opt/NAME,string=TEXT`, with its
/// contents (read once, when the command line is checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwCfgItem {
    pub name: String,
    pub data: std::sync::Arc<[u8]>,
}

/// The longest fw_cfg file name: 56 bytes with its NUL.
pub const FW_CFG_MAX_NAME: usize = 55;
/// The largest fw_cfg file skiff takes (its contents are held in skiff's memory).
pub const FW_CFG_MAX_FILE: u64 = 64 << 20;

impl std::str::FromStr for FwCfgItem {
    type Err = ConfigError;

    /// `string=` takes the rest of the argument, commas included, so it comes last.
    fn from_str(arg: &str) -> Result<Self, ConfigError> {
        let err = |why: String| ConfigError::FwCfg(arg.to_string(), why);
        let (opts, string) = match arg.find("string=").filter(|&i| i == 0 || arg.as_bytes().get(i - 1) == Some(&b',')) {
            Some(i) => (arg.get(..i.saturating_sub(1)).unwrap_or(""), arg.get(i + 7..).map(str::to_string)),
            None => (arg, None),
        };
        let (mut name, mut file) = (None, None);
        for opt in opts.split(',').filter(|o| !o.is_empty()) {
            match opt.split_once('=') {
                Some(("name", v)) if name.is_none() => name = Some(v.to_string()),
                Some(("file", v)) if file.is_none() => file = Some(PathBuf::from(v)),
                Some(("name" | "file", _)) => return Err(err(format!("`{opt}`: given twice"))),
                _ => return Err(err(format!("unknown option `{opt}` (known: name=opt/NAME, file=PATH, string=TEXT)"))),
            }
        }
        let name = name.ok_or_else(|| err("no name=opt/NAME".into()))?;
        if !name.starts_with("opt/") || name.len() <= 4 {
            return Err(err(format!("name `{name}` must start with `opt/` (the names QEMU leaves to users)")));
        }
        if name.len() > FW_CFG_MAX_NAME || name.bytes().any(|b| b == 0) {
            return Err(err(format!("name `{name}` is longer than {FW_CFG_MAX_NAME} bytes or contains a NUL")));
        }
        let data: Vec<u8> = match (file, string) {
            (Some(_), Some(_)) => return Err(err("file= and string= both given: one of them".into())),
            (None, None) => return Err(err("neither file=PATH nor string=TEXT given".into())),
            (None, Some(s)) => s.into_bytes(),
            (Some(path), None) => read_bounded(&path, FW_CFG_MAX_FILE).map_err(|r| err(format!("file {}: {r}", path.display())))?,
        };
        Ok(FwCfgItem { name, data: data.into() })
    }
}

/// Reads a regular file of at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    check_readable(path)?;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    file.take(max + 1).read_to_end(&mut data).map_err(|e| e.to_string())?;
    if data.len() as u64 > max {
        return Err(format!("larger than the {} MiB skiff takes", max >> 20));
    }
    Ok(data)
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
    fn exit_device_arguments() {
        let d = |s: &str| s.parse::<ExitDeviceConfig>();
        assert_eq!(d("").unwrap(), ExitDeviceConfig { port: 0xf4, size: 1 });
        assert_eq!(d("port=0x501,size=2").unwrap(), ExitDeviceConfig { port: 0x501, size: 2 });
        assert_eq!(d("size=4,port=100").unwrap(), ExitDeviceConfig { port: 100, size: 4 });
        for (bad, why) in [
            ("port=0x10000", "port="),
            ("port=x", "port="),
            ("size=3", "size="),
            ("port=1,port=2", "twice"),
            ("iosize=1", "unknown option"),
            ("port=0xffff,size=2", "past 0xffff"),
        ] {
            let e = d(bad).unwrap_err().to_string();
            assert!(e.starts_with("--exit-device ") && e.contains(why) && e.lines().count() == 1, "{bad}: {e}");
        }
    }

    #[test]
    fn fw_cfg_arguments() {
        let f = |s: &str| s.parse::<FwCfgItem>();
        let s = f("name=opt/a,string=x, y=z").unwrap();
        assert_eq!((s.name.as_str(), &s.data[..]), ("opt/a", &b"x, y=z"[..]));
        let path = std::env::temp_dir().join(format!("skiff-fwcfg-{}", std::process::id()));
        std::fs::write(&path, b"contents").unwrap();
        let arg = format!("file={},name=opt/org.example/b", path.display());
        let s = f(&arg).unwrap();
        assert_eq!((s.name.as_str(), &s.data[..]), ("opt/org.example/b", &b"contents"[..]));
        let _ = std::fs::remove_file(&path);
        let long = format!("name=opt/{},string=", "n".repeat(52));
        for (bad, why) in [
            ("name=etc/a,string=x", "must start with `opt/`"),
            ("name=opt/,string=x", "must start with `opt/`"),
            (long.as_str(), "longer than 55"),
            ("name=opt/a", "neither"),
            ("string=x", "no name"),
            ("name=opt/a,file=/nonexistent/x", "file /nonexistent/x"),
            ("name=opt/a,file=/etc/hostname,string=x", "both"),
            ("name=opt/a,name=opt/b,string=x", "twice"),
            ("name=opt/a,size=1,string=x", "unknown option"),
        ] {
            let e = f(bad).unwrap_err().to_string();
            assert!(e.starts_with("--fw-cfg ") && e.contains(why) && e.lines().count() == 1, "{bad}: {e}");
        }
        assert!(f(&format!("name=opt/{},string=", "n".repeat(51))).is_ok(), "55 bytes fit");
    }

    #[test]
    fn module_arguments() {
        let m: ModuleConfig = "/etc/hostname,a string, with commas".parse().unwrap();
        assert_eq!(m, ModuleConfig { path: "/etc/hostname".into(), string: "a string, with commas".into() });
        let m: ModuleConfig = "/etc/hostname".parse().unwrap();
        assert_eq!(m.string, "/etc/hostname");
        for (bad, why) in [(",x", "no path"), ("/nonexistent/m", "No such file"), ("/tmp", "not a regular file")] {
            let e = bad.parse::<ModuleConfig>().unwrap_err().to_string();
            assert!(e.starts_with("--module ") && e.contains(why) && e.lines().count() == 1, "{bad}: {e}");
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
