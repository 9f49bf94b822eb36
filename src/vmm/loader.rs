//! Putting a kernel, its command line and its initrd into guest memory, and choosing
//! the entry point: an ELF vmlinux boots through the 64-bit boot protocol (or PVH when
//! asked), a bzImage through the 64-bit entry of its compressed kernel.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout::*;
use crate::config::VmConfig;
use crate::vcpu::BootEntry;
use crate::x86::boot::{self, BootInfo, e820_map};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("boot information: {0}")]
    Boot(#[from] boot::BootError),
}

/// A loaded kernel.
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// 64-bit entry point.
    pub entry: u64,
    /// PVH 32-bit entry point, if the ELF note offers one.
    pub pvh_entry: Option<u64>,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, handed back in boot_params.
    pub header: Option<setup_header>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// "HdrS" at offset 0x202 of a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
/// The 64-bit entry of a bzImage's protected-mode code is 0x200 past its start.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoadError> {
    let err = |reason: String| LoadError::Kernel { path: path.to_path_buf(), reason };
    let mib = (mem.last_addr().0 + 1) >> 20;
    // linux-loader reports a segment that does not fit in guest memory as a read
    // failure; say what it most likely is.
    let load_err = |kind: &str, e: linux_loader::loader::Error| {
        let text = e.to_string();
        if text.contains("Unable to read kernel image") {
            err(format!("does not fit in {mib} MiB of guest memory, or the file is truncated ({kind})"))
        } else {
            err(format!("not a loadable {kind}: {text}"))
        }
    };
    let mut file = File::open(path).map_err(|e| err(e.to_string()))?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut file, &mut head).map_err(|e| err(e.to_string()))?;
    let head = &head[..n];
    if head.starts_with(&ELF_MAGIC) {
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| load_err("x86-64 vmlinux", e))?;
        let pvh_entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
            _ => None,
        };
        Ok(LoadedKernel { format: KernelFormat::Elf, entry: r.kernel_load.0, pvh_entry, end: r.kernel_end, header: None })
    } else if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(&BZIMAGE_MAGIC[..]) {
        let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| load_err("bzImage", e))?;
        let hdr = r.setup_header.ok_or_else(|| err("bzImage without a setup header".into()))?;
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(err("bzImage has no 64-bit entry point (boot protocol 2.12+ needed)".into()));
        }
        Ok(LoadedKernel {
            format: KernelFormat::BzImage,
            entry: r.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET,
            pvh_entry: None,
            end: r.kernel_end,
            header: Some(hdr),
        })
    } else {
        Err(err("not a kernel: neither an ELF vmlinux nor a bzImage".into()))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// The highest address an initrd of `size` bytes may start at: page aligned, ending
/// below both the top of low RAM and the kernel's limit, and above the kernel.
pub fn initrd_placement(size: u64, kernel_end: u64, low_ram_end: u64, addr_max: u64) -> Option<u64> {
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end.max(HIMEM_START)).then_some(start)
}

/// Writes the command line, the initrd, the e820 map and the boot structure of the
/// chosen protocol; returns how the boot vCPU must start.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    config: &VmConfig,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootEntry, LoadError> {
    // Command line.
    let max = kernel
        .header
        .map(|h| h.cmdline_size as usize)
        .filter(|&n| n > 0)
        .unwrap_or(CMDLINE_MAX_SIZE - 1)
        .min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(LoadError::Cmdline(format!("{} bytes, the kernel takes at most {max}", cmdline.len())));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(LoadError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;

    // Initrd, as high in low RAM as allowed.
    let low_ram_end = mem.last_addr().0.min(MMIO_HOLE_START - 1) + 1;
    let initrd = match &config.initrd {
        None => None,
        Some(path) => {
            let err = |reason: String| LoadError::Initrd { path: path.clone(), reason };
            let mut file = File::open(path).map_err(|e| err(e.to_string()))?;
            let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
            if size == 0 {
                return Err(err("is empty".into()));
            }
            let addr_max = kernel.header.map(|h| h.initrd_addr_max as u64).filter(|&a| a != 0).unwrap_or(MMIO_HOLE_START - 1);
            let addr = initrd_placement(size, kernel.end, low_ram_end, addr_max).ok_or_else(|| {
                err(format!(
                    "{size} bytes do not fit in guest memory above the kernel (ends at {:#x}) and below {:#x}: use a larger --memory",
                    kernel.end,
                    low_ram_end.min(addr_max)
                ))
            })?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
                .map_err(|e| err(format!("reading into guest memory: {e}")))?;
            Some((addr, size as u32))
        }
    };

    let e820 = e820_map(config.memory, EBDA_START, HIMEM_START, MMIO_HOLE_START, MMIO_HOLE_END);
    let info = BootInfo { cmdline_addr: CMDLINE_START, cmdline_len: cmdline.len() as u32, initrd, rsdp_addr: rsdp };
    match (config.pvh, kernel.pvh_entry) {
        (true, Some(entry)) => {
            let start_info = boot::write_pvh_start_info(mem, PVH_INFO_START, &info, &e820)?;
            Ok(BootEntry::Pvh { entry, start_info })
        }
        (true, None) => Err(LoadError::Kernel {
            path: config.kernel.clone(),
            reason: "--boot pvh asked for, but the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)".into(),
        }),
        (false, _) => {
            boot::write_boot_params(mem, ZERO_PAGE_START, kernel.header, &info, &e820)?;
            let pml4 = boot::write_identity_page_tables(mem, PML4_START, PDPTE_START, PDE_START)?;
            Ok(BootEntry::Linux64 { entry: kernel.entry, boot_params: ZERO_PAGE_START, pml4 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let mib = 1u64 << 20;
        assert_eq!(initrd_placement(10 * mib, 32 * mib, 256 * mib, u64::MAX), Some(246 * mib));
        // Unaligned sizes round the start down to a page.
        assert_eq!(initrd_placement(4097, 32 * mib, 256 * mib, u64::MAX), Some(256 * mib - 8192));
        // The kernel's limit wins when lower.
        assert_eq!(initrd_placement(mib, 32 * mib, 256 * mib, 128 * mib - 1), Some(127 * mib));
        // Too big: would overlap the kernel.
        assert_eq!(initrd_placement(250 * mib, 32 * mib, 256 * mib, u64::MAX), None);
        assert_eq!(initrd_placement(u64::MAX, 0, 256 * mib, u64::MAX), None);
    }
}
