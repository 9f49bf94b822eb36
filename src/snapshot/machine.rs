//! The machine a snapshot was taken of: what restore must build again before any
//! state can be put (vCPU count, RAM, the devices and the files behind them, the
//! kernel a later reboot loads), and how to tell that a disk changed since.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{BootProtocol, DiskConfig, ExitDeviceConfig, FwCfgItem, ModuleConfig, NetConfig, OnReboot, Transport, VmConfig, VsockConfig};

/// Most disks a snapshot may name (a hostile file cannot make restore open many).
const MAX_DISKS: usize = crate::config::MAX_DISKS;

/// The machine's shape, as `skiff run` was told it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: u8,
    pub memory: u64,
    /// The kernel and initrd a reboot of the restored machine loads again.
    pub kernel: String,
    pub initrd: Option<String>,
    /// The command line as configured, and as the guest got it (with what the
    /// host's quirks added).
    pub cmdline: String,
    pub guest_cmdline: String,
    pub pvh: bool,
    pub on_reboot_exit: bool,
    pub guest_defaults: bool,
    pub rng: bool,
    pub pci: bool,
    pub disks: Vec<DiskRecord>,
    /// `--boot` as given (None: detected), `--cmdline` as given, multiboot modules
    /// (path, string), the exit device (port, size) and fw_cfg's files (name, data).
    pub boot: Option<Boot>,
    pub kernel_args: Option<String>,
    pub modules: Vec<(String, String)>,
    pub exit_device: Option<(u16, u8)>,
    pub fw_cfg: Vec<(String, Vec<u8>)>,
    /// Network and vsock devices: a section of their own (format.rs `Network`), written
    /// only when there are any, so this record's encoding is what it was before them.
    #[serde(skip)]
    pub network: NetworkRecord,
}

/// `--net` and `--vsock` as the machine was built with them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// (TAP name, MAC) per network device, in slot order.
    pub nets: Vec<(String, [u8; 6])>,
    /// (guest CID, the host's Unix socket path).
    pub vsock: Option<(u32, String)>,
}

impl NetworkRecord {
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.vsock.is_none()
    }
}

/// The boot protocol asked for (config::BootProtocol, in the file's own stable shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    Linux,
    Pvh,
    Multiboot,
}

/// One disk and the file behind it when the snapshot was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub path: String,
    pub read_only: bool,
    pub id: Option<String>,
    pub direct: bool,
    /// The file's identity and size, and its last change (nanoseconds since the
    /// epoch; 0 for a block device, whose writes do not move it).
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: u64,
}

impl DiskRecord {
    /// The disk as it is now (taken after every request in flight finished).
    pub fn of(d: &DiskConfig) -> Result<Self, String> {
        let path = absolute(&d.path)?;
        let (dev, ino, size, mtime_ns) = identity(&d.path)?;
        Ok(DiskRecord { path, read_only: d.read_only, id: d.id.clone(), direct: d.direct, dev, ino, size, mtime_ns })
    }

    /// Refuses a disk that is not the file the snapshot was taken with, or that was
    /// written since: the guest's page cache and filesystem state would not match it.
    pub fn check_unchanged(&self) -> Result<(), String> {
        let now = identity(Path::new(&self.path))?;
        let was = (self.dev, self.ino, self.size, self.mtime_ns);
        if (now.0, now.1) != (was.0, was.1) {
            return Err(format!("disk {}: not the file the snapshot was taken with (replaced since)", self.path));
        }
        if now.2 != was.2 {
            return Err(format!("disk {}: {} bytes, {} when the snapshot was taken", self.path, now.2, was.2));
        }
        if now.3 != was.3 {
            return Err(format!("disk {}: written since the snapshot was taken (its modification time changed)", self.path));
        }
        Ok(())
    }

    pub fn config(&self) -> DiskConfig {
        DiskConfig { path: self.path.clone().into(), read_only: self.read_only, id: self.id.clone(), direct: self.direct }
    }
}

/// Host files a restore puts in place of the ones the snapshot names, so that a clone
/// can run beside the machine it was taken of (which keeps its disks locked and its
/// vsock socket bound): a copy of each disk, in the snapshotted machine's order, and
/// the vsock device's socket.
#[derive(Clone, Copy, Default)]
pub struct Relocation<'a> {
    pub disks: &'a [PathBuf],
    pub vsock_uds: Option<&'a Path>,
}

impl Machine {
    /// Applies `r` and checks every disk: one the snapshot names must be unchanged
    /// since; a copy given instead must have the recorded size (its content is the
    /// user's word: as the disk was when the snapshot was taken).
    pub fn relocate_and_check(&mut self, r: &Relocation) -> Result<(), String> {
        if !r.disks.is_empty() && r.disks.len() != self.disks.len() {
            return Err(format!("--disk given {} times; the snapshotted machine has {} disks (give one copy for each, in order)", r.disks.len(), self.disks.len()));
        }
        for (i, d) in self.disks.iter_mut().enumerate() {
            match r.disks.get(i) {
                Some(copy) => d.take_copy(copy)?,
                None => d.check_unchanged()?,
            }
        }
        if let Some(uds) = r.vsock_uds {
            let Some((_, path)) = self.network.vsock.as_mut() else {
                return Err("--vsock-uds: the snapshotted machine has no vsock device".into());
            };
            *path = uds.to_str().ok_or_else(|| format!("--vsock-uds {}: not a UTF-8 path", uds.display()))?.to_string();
        }
        Ok(())
    }
}

impl DiskRecord {
    /// The serial the original disk had without `id=`: from the recorded identity of
    /// a file, from the node itself for a block device (whose record holds its device
    /// number instead).
    fn original_serial(&self) -> Result<String, String> {
        if self.ino != 0 {
            return Ok(crate::devices::virtio::block::default_serial(self.dev, self.ino));
        }
        let m = std::fs::metadata(&self.path).map_err(|e| format!("disk {}: {e} (its serial comes from it; or start it with id=)", self.path))?;
        Ok(crate::devices::virtio::block::default_serial(m.dev(), m.ino()))
    }

    /// Uses `copy` for this disk: the recorded file itself is checked as unchanged,
    /// any other must be as long as the disk was.
    fn take_copy(&mut self, copy: &Path) -> Result<(), String> {
        let now = identity(copy)?;
        if (now.0, now.1) == (self.dev, self.ino) {
            return self.check_unchanged();
        }
        if now.2 != self.size {
            return Err(format!("disk {}: {} bytes; the disk it stands for ({}) was {} bytes at the snapshot", copy.display(), now.2, self.path, self.size));
        }
        // The guest read the original's serial: the copy answers with it.
        if self.id.is_none() {
            self.id = Some(self.original_serial()?);
        }
        self.path = absolute(copy)?;
        (self.dev, self.ino, self.mtime_ns) = (now.0, now.1, now.3);
        Ok(())
    }
}

/// A file's absolute name (a restore may run in another directory), as UTF-8.
fn absolute(p: &Path) -> Result<String, String> {
    let abs = std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()))?;
    abs.to_str().map(str::to_string).ok_or_else(|| format!("{}: not a UTF-8 path", abs.display()))
}

/// (device, inode, size, modification time in ns) of a disk; the size of a block
/// device is its length, and its time 0.
fn identity(path: &Path) -> Result<(u64, u64, u64, u64), String> {
    let m = std::fs::metadata(path).map_err(|e| format!("disk {}: {e}", path.display()))?;
    if m.file_type().is_file() {
        let ns = u64::try_from(m.mtime()).unwrap_or(0).saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec().max(0) as u64);
        return Ok((m.dev(), m.ino(), m.len(), ns));
    }
    // A block device: its length from seeking to the end.
    use std::io::{Seek, SeekFrom};
    let size = std::fs::File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| format!("disk {}: {e}", path.display()))?;
    Ok((m.rdev(), 0, size, 0))
}

impl Machine {
    /// The record of a running machine's configuration.
    pub fn of(config: &VmConfig, guest_cmdline: &str) -> Result<Self, String> {
        let utf8 = |p: &Path| absolute(p);
        Ok(Machine {
            cpus: config.cpus,
            memory: config.memory,
            kernel: utf8(&config.kernel)?,
            initrd: config.initrd.as_deref().map(utf8).transpose()?,
            cmdline: config.cmdline.clone(),
            guest_cmdline: guest_cmdline.to_string(),
            pvh: config.pvh,
            on_reboot_exit: config.on_reboot == OnReboot::Exit,
            guest_defaults: config.guest_defaults,
            rng: config.rng,
            pci: config.transport == Transport::Pci,
            disks: config.disks.iter().map(DiskRecord::of).collect::<Result<_, _>>()?,
            boot: config.boot.map(|b| match b {
                BootProtocol::Linux => Boot::Linux,
                BootProtocol::Pvh => Boot::Pvh,
                BootProtocol::Multiboot => Boot::Multiboot,
            }),
            kernel_args: config.kernel_args.clone(),
            modules: config.modules.iter().map(|m| Ok((utf8(&m.path)?, m.string.clone()))).collect::<Result<_, String>>()?,
            exit_device: config.exit_device.as_ref().map(|e| (e.port, e.size)),
            fw_cfg: config.fw_cfg.iter().map(|f| (f.name.clone(), f.data.to_vec())).collect(),
            network: NetworkRecord {
                nets: config.nets.iter().map(|n| (n.tap.clone(), n.mac)).collect(),
                vsock: config.vsock.as_ref().map(|v| Ok::<_, String>((v.cid, v.uds.to_str().ok_or("--vsock uds=: not a UTF-8 path")?.to_string()))).transpose()?,
            },
        })
    }

    /// The configuration to build the machine again with; `like` gives what is the
    /// restoring command's to choose (statistics, probing, coalescing).
    pub fn config(&self, like: &VmConfig) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone().into(),
            initrd: self.initrd.clone().map(Into::into),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory,
            on_reboot: if self.on_reboot_exit { OnReboot::Exit } else { OnReboot::Reset },
            pvh: self.pvh,
            guest_defaults: self.guest_defaults,
            disks: self.disks.iter().map(DiskRecord::config).collect(),
            rng: self.rng,
            transport: if self.pci { Transport::Pci } else { Transport::Mmio },
            boot: self.boot.map(|b| match b {
                Boot::Linux => BootProtocol::Linux,
                Boot::Pvh => BootProtocol::Pvh,
                Boot::Multiboot => BootProtocol::Multiboot,
            }),
            kernel_args: self.kernel_args.clone(),
            modules: self.modules.iter().map(|(p, s)| ModuleConfig { path: p.into(), string: s.clone() }).collect(),
            exit_device: self.exit_device.map(|(port, size)| ExitDeviceConfig { port, size }),
            fw_cfg: self.fw_cfg.iter().map(|(n, d)| FwCfgItem { name: n.clone(), data: d.clone().into() }).collect(),
            nets: self.network.nets.iter().map(|(tap, mac)| NetConfig { tap: tap.clone(), mac: *mac }).collect(),
            vsock: self.network.vsock.as_ref().map(|(cid, uds)| VsockConfig { cid: *cid, uds: uds.into() }),
            ..like.clone()
        }
    }

    /// What a reader checks before trusting the record.
    pub fn check(&self, vcpus: usize, ram: u64) -> Result<(), String> {
        if usize::from(self.cpus) != vcpus {
            return Err(format!("{} vCPUs, and {vcpus} vCPU sections", self.cpus));
        }
        if self.memory != ram {
            return Err(format!("{} bytes of RAM, and {ram} in the memory map", self.memory));
        }
        if self.network.nets.len() > crate::config::MAX_NETS {
            return Err(format!("{} network devices (at most {})", self.network.nets.len(), crate::config::MAX_NETS));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(format!("{} disks (at most {MAX_DISKS})", self.disks.len()));
        }
        Ok(())
    }
}
