//! Putting a kernel, its command line and its initrd into guest memory, and choosing
//! the entry point: an ELF vmlinux boots through the 64-bit boot protocol (or PVH when
//! asked), a bzImage through the 64-bit entry of its compressed kernel, a kernel with a
//! multiboot header through its 32-bit entry (loader/multiboot.rs).

pub mod multiboot;

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
    #[error("module {path}: {reason}")]
    Module { path: PathBuf, reason: String },
    #[error("multiboot boot information: {0}")]
    MultibootInfo(String),
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
    /// A multiboot kernel's image (its entry, segments and end).
    pub multiboot: Option<multiboot::Image>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
    Multiboot,
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
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if head.starts_with(&ELF_MAGIC) {
        check_elf(&mut file, len, mem.last_addr().0 + 1).map_err(err)?;
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| load_err("x86-64 vmlinux", e))?;
        let pvh_entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
            _ => None,
        };
        Ok(LoadedKernel { format: KernelFormat::Elf, entry: r.kernel_load.0, pvh_entry, end: r.kernel_end, header: None, multiboot: None })
    } else if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(&BZIMAGE_MAGIC[..]) {
        check_bzimage(head, len).map_err(err)?;
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
            multiboot: None,
        })
    } else {
        Err(err("not a kernel: neither an ELF vmlinux nor a bzImage".into()))
    }
}

/// Loads the kernel as `config` says: by the protocol `--boot` names, or, without
/// one, as a multiboot kernel when its first 8 KiB hold a multiboot header, else as
/// [`load_kernel`] does.
pub fn load_kernel_for(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<LoadedKernel, LoadError> {
    use crate::config::BootProtocol;
    use multiboot::Found;
    let path = &config.kernel;
    if matches!(config.boot, Some(BootProtocol::Linux | BootProtocol::Pvh)) {
        return load_kernel(mem, path);
    }
    let err = |reason: String| LoadError::Kernel { path: path.to_path_buf(), reason };
    let mut file = File::open(path).map_err(|e| err(e.to_string()))?;
    let mut head = vec![0u8; multiboot::SEARCH_BYTES];
    let n = read_up_to(&mut file, &mut head).map_err(|e| err(e.to_string()))?;
    head.truncate(n);
    let header = match (multiboot::find_header(&head), config.boot) {
        (Found::Header(h), _) => h,
        (Found::BadChecksum(at), _) => {
            return Err(err(format!(
                "the multiboot header at offset {at:#x} has a wrong checksum (--boot linux boots the file as a Linux kernel)"
            )));
        }
        (Found::None, Some(BootProtocol::Multiboot)) => {
            return Err(err("--boot multiboot asked for, but there is no multiboot header in the first 8 KiB".into()));
        }
        (Found::None, _) => return load_kernel(mem, path),
    };
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let ram_end = mem.last_addr().0.min(MMIO_HOLE_START - 1) + 1;
    let image = multiboot::load(mem, &mut file, len, &header, ram_end).map_err(err)?;
    Ok(LoadedKernel { format: KernelFormat::Multiboot, entry: u64::from(image.entry), pvh_entry: None, end: image.end, header: None, multiboot: Some(image) })
}

/// A multiboot kernel's modules (`--initrd` first, then each `--module`) and boot
/// information; returns its entry state.
fn write_multiboot_info(mem: &GuestMemoryMmap, image: &multiboot::Image, config: &VmConfig) -> Result<BootEntry, LoadError> {
    let ram_end = mem.last_addr().0.min(MMIO_HOLE_START - 1) + 1;
    let initrd = config.initrd.as_ref().map(|p| (p, p.to_string_lossy().into_owned()));
    let mut sources: Vec<multiboot::ModuleSource> = Vec::with_capacity(config.modules.len() + 1);
    if let Some((path, string)) = &initrd {
        sources.push(multiboot::ModuleSource { path, string });
    }
    sources.extend(config.modules.iter().map(|m| multiboot::ModuleSource { path: &m.path, string: &m.string }));
    let placed = multiboot::load_modules(mem, image, &sources, ram_end).map_err(|e| LoadError::Module { path: e.path, reason: e.reason })?;
    let modules: Vec<(u64, u64, &str)> = placed.iter().zip(&sources).map(|(&(a, b), s)| (a, b, s.string)).collect();
    let mut cmdline = config.kernel.to_string_lossy().into_owned();
    if let Some(args) = &config.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(args);
    }
    let e820 = e820_map(config.memory, EBDA_START, HIMEM_START, MMIO_HOLE_START, MMIO_HOLE_END);
    let info = multiboot::write_info(mem, &cmdline, &modules, &e820).map_err(LoadError::MultibootInfo)?;
    Ok(BootEntry::Multiboot { entry: image.entry, info: info as u32 })
}

/// The most the PT_NOTE segments of a kernel may hold: Linux's take a few hundred
/// bytes. linux-loader reads notes 12 bytes at a time, so a huge (sparse) note segment
/// would otherwise keep it reading for hours.
pub const MAX_NOTE_BYTES: u64 = 64 << 10;
/// Program headers a kernel may have (Linux has a handful).
pub const MAX_PHDRS: u16 = 64;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PHDR_SIZE: u64 = 56;

fn le_u16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |v| u16::from_le_bytes([v[0], v[1]]))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|v| v.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// Checks an ELF kernel's program headers before linux-loader reads it, so that what
/// it reads is bounded by the file and by guest memory: every segment lies inside the
/// file, every loaded one inside guest memory (`mem_end` bytes), notes are small.
fn check_elf(file: &mut File, len: u64, mem_end: u64) -> Result<(), String> {
    use std::io::{Seek, SeekFrom};
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    if read_up_to(file, &mut ehdr).map_err(|e| e.to_string())? < ehdr.len() {
        return Err("not a loadable x86-64 vmlinux: the ELF header is cut short".into());
    }
    let (phoff, phentsize, phnum) = (le_u64(&ehdr, 0x20), le_u16(&ehdr, 0x36), le_u16(&ehdr, 0x38));
    if ehdr[4] != 2 || ehdr[5] != 1 || phentsize as u64 != PHDR_SIZE {
        return Err("not a loadable x86-64 vmlinux: not a 64-bit little-endian ELF".into());
    }
    if phnum > MAX_PHDRS {
        return Err(format!("{phnum} program headers: more than the {MAX_PHDRS} skiff reads"));
    }
    let table = phnum as u64 * PHDR_SIZE;
    if phoff.checked_add(table).is_none_or(|end| end > len) {
        return Err(format!("the program headers (offset {phoff:#x}) run past the end of the file ({len} bytes): truncated?"));
    }
    let mut phdrs = vec![0u8; table as usize];
    file.seek(SeekFrom::Start(phoff)).map_err(|e| e.to_string())?;
    if read_up_to(file, &mut phdrs).map_err(|e| e.to_string())? < phdrs.len() {
        return Err("the program headers are cut short: truncated?".into());
    }
    let mut notes = 0u64;
    for (i, ph) in phdrs.chunks_exact(PHDR_SIZE as usize).enumerate() {
        let (kind, offset, paddr, filesz, memsz) = (le_u32(ph, 0), le_u64(ph, 8), le_u64(ph, 0x18), le_u64(ph, 0x20), le_u64(ph, 0x28));
        let what = match kind {
            PT_LOAD => "PT_LOAD",
            PT_NOTE => "PT_NOTE",
            _ => continue,
        };
        if offset.checked_add(filesz).is_none_or(|end| end > len) {
            return Err(format!(
                "program header {i} ({what}): {filesz} bytes at offset {offset:#x} run past the end of the file ({len} bytes): truncated?"
            ));
        }
        if kind == PT_NOTE {
            notes = notes.saturating_add(filesz);
            if notes > MAX_NOTE_BYTES {
                return Err(format!(
                    "program header {i} (PT_NOTE): {filesz} bytes of notes, more than the {} KiB skiff reads",
                    MAX_NOTE_BYTES >> 10
                ));
            }
        } else if filesz > 0 && paddr.checked_add(memsz.max(filesz)).is_none_or(|end| end > mem_end) {
            return Err(format!(
                "does not fit in {} MiB of guest memory: program header {i} (PT_LOAD) needs {:#x}..{:#x}",
                mem_end >> 20,
                paddr,
                paddr.saturating_add(memsz.max(filesz))
            ));
        }
    }
    Ok(())
}

/// Checks a bzImage's length against its setup header: the setup sectors and the
/// protected-mode code (`syssize` paragraphs, boot protocol 2.04+) must all be there.
/// A cut-off bzImage would otherwise boot into its missing half.
fn check_bzimage(head: &[u8], len: u64) -> Result<(), String> {
    let version = le_u16(head, 0x206);
    let sects = head.get(0x1f1).copied().unwrap_or(0);
    let setup = (if sects == 0 { 4 } else { sects as u64 } + 1) * 512;
    let needed = setup + le_u32(head, 0x1f4) as u64 * 16;
    if version >= 0x0204 && len < needed {
        return Err(format!("bzImage is truncated: its header says {needed} bytes, the file has {len}"));
    }
    Ok(())
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
    if let Some(image) = &kernel.multiboot {
        return write_multiboot_info(mem, image, config);
    }
    if let Some(m) = config.modules.first() {
        return Err(LoadError::Module { path: m.path.clone(), reason: "only a multiboot kernel takes modules (this one boots as Linux)".into() });
    }
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

    /// An ELF64 header and program headers: (type, offset, paddr, filesz, memsz).
    fn elf(phdrs: &[(u32, u64, u64, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(&ELF_MAGIC);
        (b[4], b[5], b[6]) = (2, 1, 1);
        b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        b[0x18..0x20].copy_from_slice(&0x100000u64.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(kind, offset, paddr, filesz, memsz) in phdrs {
            let mut p = [0u8; 56];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            p[0x10..0x18].copy_from_slice(&paddr.to_le_bytes());
            p[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
            p[0x20..0x28].copy_from_slice(&filesz.to_le_bytes());
            p[0x28..0x30].copy_from_slice(&memsz.to_le_bytes());
            b.extend_from_slice(&p);
        }
        b
    }

    fn check(bytes: &[u8], len: u64) -> Result<(), String> {
        let path = std::env::temp_dir().join(format!("skiff-loader-{}-{}", std::process::id(), len));
        std::fs::write(&path, bytes).unwrap();
        let mut f = File::open(&path).unwrap();
        let r = check_elf(&mut f, len, 256 << 20);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn elf_reads_are_bounded() {
        let good = elf(&[(PT_LOAD, 0x1000, 0x100000, 0x1000, 0x2000), (PT_NOTE, 0x200, 0, 0x18, 0x18)]);
        assert_eq!(check(&good, 0x2000), Ok(()));
        // 64 GiB of notes (sparse on disk): refused before anything reads them.
        let e = check(&elf(&[(PT_NOTE, 0x1000, 0, 64 << 30, 64 << 30)]), (64 << 30) + 0x1000).unwrap_err();
        assert!(e.contains("PT_NOTE") && e.contains("64 KiB"), "{e}");
        // Segments past the end of the file, or past guest memory.
        let e = check(&elf(&[(PT_LOAD, 0x1000, 0x100000, 0x10000, 0x10000)]), 0x2000).unwrap_err();
        assert!(e.contains("past the end of the file"), "{e}");
        let e = check(&elf(&[(PT_LOAD, 0x1000, 0x100000, 0x1000, 1 << 30)]), 0x2000).unwrap_err();
        assert!(e.contains("does not fit in 256 MiB"), "{e}");
        let e = check(&elf(&[(PT_LOAD, 0x1000, u64::MAX - 10, 0x1000, 0x1000)]), 0x2000).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = check(&elf(&[(PT_LOAD, u64::MAX, 0, 2, 2)]), 0x2000).unwrap_err();
        assert!(e.contains("past the end"), "{e}");
        // Too many program headers, or a table past the end.
        let many = elf(&vec![(PT_NOTE, 0, 0, 0, 0); MAX_PHDRS as usize + 1]);
        assert!(check(&many, many.len() as u64).unwrap_err().contains("program headers"));
        let mut cut = elf(&[(PT_LOAD, 0x1000, 0x100000, 0x10, 0x10)]);
        cut.truncate(80);
        assert!(check(&cut, 80).unwrap_err().contains("truncated"));
    }

    #[test]
    fn a_cut_bzimage_is_refused() {
        let mut head = vec![0u8; 0x210];
        head[0x1f1] = 39;
        head[0x1f4..0x1f8].copy_from_slice(&512_544u32.to_le_bytes());
        head[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let whole = 40 * 512 + 512_544 * 16;
        assert_eq!(check_bzimage(&head, whole), Ok(()));
        assert_eq!(check_bzimage(&head, whole + 1472), Ok(()));
        let e = check_bzimage(&head, whole / 2).unwrap_err();
        assert!(e.contains("truncated") && e.contains(&whole.to_string()), "{e}");
    }

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
