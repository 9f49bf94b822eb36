//! The command-line arguments for people who test kernels: `--module` (multiboot
//! modules), `--exit-device` (QEMU's isa-debug-exit) and `--fw-cfg` (fw_cfg files),
//! each parsed and checked once, with errors that say what and where.

use std::path::{Path, PathBuf};

use super::{ConfigError, check_readable};

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

/// `--module`s, `--exit-device` and `--fw-cfg`s from the command line, checked: each
/// parses, every file is there, no fw_cfg name twice, not too many files.
#[allow(clippy::type_complexity)]
pub fn parse_kernel_test_args(
    modules: &[String],
    exit_device: Option<&str>,
    fw_cfg: &[String],
) -> Result<(Vec<ModuleConfig>, Option<ExitDeviceConfig>, Vec<FwCfgItem>), String> {
    let modules = modules.iter().map(|m| m.parse::<ModuleConfig>().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    let exit_device = exit_device.map(str::parse::<ExitDeviceConfig>).transpose().map_err(|e| e.to_string())?;
    let max = crate::devices::fw_cfg::MAX_FILES;
    if fw_cfg.len() > max {
        return Err(format!("--fw-cfg: {} files given, at most {max}", fw_cfg.len()));
    }
    let files = fw_cfg.iter().map(|f| f.parse::<FwCfgItem>().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("--fw-cfg: the name {} is given twice", w[0]));
    }
    Ok((modules, exit_device, files))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
