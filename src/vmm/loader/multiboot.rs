//! Multiboot (version 1) kernels: the header in the first 8 KiB, the kernel image
//! (ELF32 or ELF64 program headers, or the header's address fields), modules, and the
//! boot information structure the kernel finds in EBX.
//!
//! Facts from the Multiboot Specification 0.6.96. The kernel file is untrusted: every
//! field read from it is bounds-checked, every address range checked against RAM
//! before anything is written, every loop bounded by the file or a constant.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::layout::{EBDA_START, HIMEM_START};
use crate::x86::boot::E820Entry;

/// The header's magic, and what the boot loader leaves in EAX.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies, 32-bit aligned, within the file's first 8 KiB.
pub const SEARCH_BYTES: usize = 8192;

/// Header flags: modules page-aligned (bit 0), memory information (bit 1), a video
/// mode (bit 2), the address fields are valid (bit 16).
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_ADDRESSES: u32 = 1 << 16;
/// Bits 0-15 are requirements: a loader that cannot meet one must refuse the kernel.
const REQUIRED_MASK: u32 = 0xffff;

/// Information-structure flags skiff sets: mem_lower/upper, cmdline, mods, mmap,
/// boot_loader_name.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
/// The information structure's size (up to its framebuffer fields).
const INFO_SIZE: usize = 116;
/// Where the structure, its strings and the memory map go: above the first 64 KiB
/// (real-mode trampolines live there) and below the EBDA; kernels load at 1 MiB or
/// above, so this is clear of them.
pub const INFO_AREA_START: u64 = 0x1_0000;
pub const INFO_AREA_END: u64 = EBDA_START;
pub const LOADER_NAME: &str = "skiff";
/// Program headers read at most.
const MAX_PHDRS: usize = 64;
const PAGE: u64 = 4096;

/// A multiboot header, and where it is in the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub offset: u64,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// What a scan of the first 8 KiB found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    None,
    Header(Header),
    /// The magic, at this offset, with a checksum that does not add up.
    BadChecksum(u64),
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let v = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    let v = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([v[0], v[1]]))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(8)?)?.try_into().ok().map(u64::from_le_bytes)
}

/// Looks for the header in `head` (the file's first bytes): the first magic whose
/// checksum adds up wins; a magic with a bad checksum is reported if none does.
pub fn find_header(head: &[u8]) -> Found {
    let end = head.len().min(SEARCH_BYTES);
    let mut bad = None;
    for off in (0..end.saturating_sub(11)).step_by(4) {
        let (Some(magic), Some(flags), Some(sum)) = (le32(head, off), le32(head, off + 4), le32(head, off + 8)) else { break };
        if magic != HEADER_MAGIC {
            continue;
        }
        if magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            bad.get_or_insert(off as u64);
            continue;
        }
        let field = |i: usize| le32(head, off + 12 + 4 * i).unwrap_or(0);
        return Found::Header(Header {
            offset: off as u64,
            flags,
            header_addr: field(0),
            load_addr: field(1),
            load_end_addr: field(2),
            bss_end_addr: field(3),
            entry_addr: field(4),
        });
    }
    bad.map_or(Found::None, Found::BadChecksum)
}

/// A loaded multiboot kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The 32-bit entry point (physical).
    pub entry: u32,
    /// Loaded ranges [start, end), physical.
    pub segments: Vec<(u64, u64)>,
    /// First byte after the highest segment.
    pub end: u64,
    /// Modules must start on a page boundary (they always do: skiff aligns them).
    pub page_align: bool,
}

/// Checks `h` and loads the kernel it heads into `mem`, below `ram_end` (the end of
/// RAM below the MMIO hole).
pub fn load(mem: &GuestMemoryMmap, file: &mut File, len: u64, h: &Header, ram_end: u64) -> Result<Image, String> {
    let unmet = h.flags & REQUIRED_MASK & !(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO);
    if unmet != 0 {
        return Err(format!(
            "multiboot header flags {:#x} require what skiff does not provide (bits {unmet:#x}: bit 2 is a video mode)",
            h.flags
        ));
    }
    let mut image = if h.flags & FLAG_ADDRESSES != 0 {
        if h.offset + 32 > SEARCH_BYTES as u64 {
            return Err("the multiboot header's address fields run past the first 8 KiB".into());
        }
        load_by_addresses(mem, file, len, h, ram_end)?
    } else {
        load_elf(mem, file, len, ram_end)?
    };
    image.page_align = h.flags & FLAG_PAGE_ALIGN != 0;
    Ok(image)
}

/// Checks that [start, start + size) lies in RAM at or above 1 MiB; returns its end.
fn check_ram(what: &str, start: u64, size: u64, ram_end: u64) -> Result<u64, String> {
    let end = start.checked_add(size).filter(|&e| e <= ram_end && start >= HIMEM_START);
    end.ok_or_else(|| {
        format!(
            "{what} at {start:#x}..{:#x} is outside guest RAM from 1 MiB to {ram_end:#x} (use a larger --memory if it is just big)",
            start.saturating_add(size)
        )
    })
}

/// Copies `size` bytes at `offset` in the file to `addr` (checked by the caller).
fn copy_in(mem: &GuestMemoryMmap, file: &mut File, offset: u64, addr: u64, size: u64) -> Result<(), String> {
    let n = usize::try_from(size).map_err(|_| "a segment too large for this host".to_string())?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, n).map_err(|e| format!("reading into guest memory at {addr:#x}: {e}"))
}

/// Zeroes [addr, addr + size) (checked by the caller), 64 KiB at a time.
fn zero(mem: &GuestMemoryMmap, addr: u64, size: u64) -> Result<(), String> {
    const CHUNK: u64 = 64 << 10;
    let zeros = [0u8; CHUNK as usize];
    let mut at = addr;
    let end = addr.saturating_add(size);
    while at < end {
        let n = (end - at).min(CHUNK);
        mem.write_slice(&zeros[..n as usize], GuestAddress(at)).map_err(|e| format!("zeroing guest memory at {at:#x}: {e}"))?;
        at += n;
    }
    Ok(())
}

/// The a.out kludge: the header says where the file's bytes go.
fn load_by_addresses(mem: &GuestMemoryMmap, file: &mut File, len: u64, h: &Header, ram_end: u64) -> Result<Image, String> {
    let load = u64::from(h.load_addr);
    let skew = h
        .header_addr
        .checked_sub(h.load_addr)
        .ok_or_else(|| format!("multiboot load_addr {:#x} is above header_addr {:#x}", h.load_addr, h.header_addr))?;
    let file_start = h
        .offset
        .checked_sub(u64::from(skew))
        .ok_or_else(|| format!("multiboot load_addr {:#x} lies before the start of the file", h.load_addr))?;
    let load_end = match h.load_end_addr {
        0 => load.saturating_add(len - file_start),
        e if u64::from(e) < load => return Err(format!("multiboot load_end_addr {e:#x} is below load_addr {load:#x}")),
        e => u64::from(e),
    };
    let size = load_end - load;
    if file_start.checked_add(size).is_none_or(|e| e > len) {
        return Err(format!("the file ({len} bytes) is shorter than multiboot load_end_addr {load_end:#x} says: truncated?"));
    }
    let bss_end = match h.bss_end_addr {
        0 => load_end,
        e if u64::from(e) < load_end => return Err(format!("multiboot bss_end_addr {e:#x} is below load_end_addr {load_end:#x}")),
        e => u64::from(e),
    };
    check_ram("the kernel image", load, bss_end - load, ram_end)?;
    copy_in(mem, file, file_start, load, size)?;
    zero(mem, load_end, bss_end - load_end)?;
    let entry = u64::from(h.entry_addr);
    if !(load..bss_end.max(load + 1)).contains(&entry) {
        return Err(format!("multiboot entry_addr {entry:#x} is outside the image ({load:#x}..{bss_end:#x})"));
    }
    Ok(Image { entry: h.entry_addr, segments: vec![(load, bss_end)], end: bss_end, page_align: false })
}

/// A PT_LOAD segment: file offset, virtual and physical address, sizes.
struct Segment {
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The ELF header's fields skiff needs: entry, program headers (32- or 64-bit).
fn elf_segments(file: &File, len: u64) -> Result<(u64, Vec<Segment>), String> {
    let mut ehdr = [0u8; 64];
    let n = file.read_at(&mut ehdr, 0).map_err(|e| e.to_string())?;
    let ehdr = ehdr.get(..n).unwrap_or(&[]);
    let wide = match (ehdr.get(4), ehdr.get(5)) {
        (Some(1), Some(1)) => false,
        (Some(2), Some(1)) => true,
        _ => return Err("not a little-endian ELF32 or ELF64 file (and no multiboot address fields)".into()),
    };
    let machine = le16(ehdr, 0x12).unwrap_or(0);
    if machine != 3 && machine != 62 {
        return Err(format!("ELF machine {machine}: not x86 (3) or x86-64 (62)"));
    }
    let cut = || "the ELF header is cut short".to_string();
    let (entry, phoff, phentsize, phnum, want) = if wide {
        (le64(ehdr, 0x18).ok_or_else(cut)?, le64(ehdr, 0x20).ok_or_else(cut)?, le16(ehdr, 0x36), le16(ehdr, 0x38), 56)
    } else {
        let e = le32(ehdr, 0x18).ok_or_else(cut)?;
        (u64::from(e), u64::from(le32(ehdr, 0x1c).ok_or_else(cut)?), le16(ehdr, 0x2a), le16(ehdr, 0x2c), 32)
    };
    let (phentsize, phnum) = (usize::from(phentsize.ok_or_else(cut)?), usize::from(phnum.ok_or_else(cut)?));
    if phentsize != want {
        return Err(format!("ELF program header size {phentsize}, expected {want}"));
    }
    if phnum > MAX_PHDRS {
        return Err(format!("{phnum} program headers: more than the {MAX_PHDRS} skiff reads"));
    }
    let table = (phnum * phentsize) as u64;
    if phoff.checked_add(table).is_none_or(|e| e > len) {
        return Err(format!("the program headers (offset {phoff:#x}) run past the end of the file ({len} bytes): truncated?"));
    }
    let mut raw = vec![0u8; phnum * phentsize];
    file.read_exact_at(&mut raw, phoff).map_err(|e| format!("reading the program headers: {e}"))?;
    let mut segments = Vec::new();
    for ph in raw.chunks_exact(phentsize) {
        if le32(ph, 0) != Some(1) {
            continue; // not PT_LOAD
        }
        let s = if wide {
            let f = |at| le64(ph, at).unwrap_or(0);
            Segment { offset: f(8), vaddr: f(0x10), paddr: f(0x18), filesz: f(0x20), memsz: f(0x28) }
        } else {
            let f = |at| u64::from(le32(ph, at).unwrap_or(0));
            Segment { offset: f(4), vaddr: f(8), paddr: f(12), filesz: f(16), memsz: f(20) }
        };
        segments.push(s);
    }
    Ok((entry, segments))
}

/// Loads every PT_LOAD segment at its physical address, BSS zeroed.
fn load_elf(mem: &GuestMemoryMmap, file: &mut File, len: u64, ram_end: u64) -> Result<Image, String> {
    let (entry, segments) = elf_segments(file, len)?;
    let mut loaded = Vec::new();
    for (i, s) in segments.iter().enumerate().filter(|(_, s)| s.memsz > 0) {
        if s.filesz > s.memsz {
            return Err(format!("PT_LOAD segment {i}: file size {:#x} above its memory size {:#x}", s.filesz, s.memsz));
        }
        if s.offset.checked_add(s.filesz).is_none_or(|e| e > len) {
            return Err(format!("PT_LOAD segment {i}: {:#x} bytes at offset {:#x} run past the end of the file ({len} bytes): truncated?", s.filesz, s.offset));
        }
        let end = check_ram(&format!("PT_LOAD segment {i}"), s.paddr, s.memsz, ram_end)?;
        loaded.push((s.paddr, end));
    }
    if loaded.is_empty() {
        return Err("the ELF file has no loadable segment".into());
    }
    for s in segments.iter().filter(|s| s.memsz > 0) {
        copy_in(mem, file, s.offset, s.paddr, s.filesz)?;
        zero(mem, s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    // e_entry may be virtual (a higher-half kernel): where a segment's virtual range
    // holds it, the physical address is the segment's.
    let phys = segments
        .iter()
        .find(|s| s.vaddr <= entry && entry - s.vaddr < s.memsz)
        .map_or(entry, |s| s.paddr + (entry - s.vaddr));
    let inside = loaded.iter().any(|&(a, b)| (a..b).contains(&phys));
    let entry32 = u32::try_from(phys).ok().filter(|_| inside);
    let entry = entry32.ok_or_else(|| format!("ELF entry point {entry:#x} is outside the loaded segments"))?;
    let end = loaded.iter().map(|&(_, e)| e).max().unwrap_or(HIMEM_START);
    Ok(Image { entry, segments: loaded, end, page_align: false })
}

/// Hands out bytes of the information area, in order.
struct Area {
    next: u64,
    end: u64,
}

impl Area {
    fn put(&mut self, mem: &GuestMemoryMmap, bytes: &[u8], align: u64) -> Result<u64, String> {
        let at = self.next.checked_next_multiple_of(align).unwrap_or(u64::MAX);
        let end = at.checked_add(bytes.len() as u64).filter(|&e| e <= self.end).ok_or_else(|| {
            format!(
                "the boot information (command line, module strings, memory map) does not fit in {:#x}..{:#x}",
                INFO_AREA_START, INFO_AREA_END
            )
        })?;
        mem.write_slice(bytes, GuestAddress(at)).map_err(|e| format!("writing the boot information: {e}"))?;
        self.next = end;
        Ok(at)
    }

    fn string(&mut self, mem: &GuestMemoryMmap, s: &str) -> Result<u32, String> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(mem, &b, 1).map(|a| a as u32)
    }
}

/// One module to load: its file and its string.
pub struct ModuleSource<'a> {
    pub path: &'a Path,
    pub string: &'a str,
}

/// A module's failure, naming its file.
#[derive(Debug)]
pub struct ModuleError {
    pub path: std::path::PathBuf,
    pub reason: String,
}

/// Loads the modules after the kernel, page-aligned, in order; returns (start, end)
/// of each.
pub fn load_modules(mem: &GuestMemoryMmap, image: &Image, modules: &[ModuleSource], ram_end: u64) -> Result<Vec<(u64, u64)>, ModuleError> {
    let mut next = image.end;
    let mut placed = Vec::with_capacity(modules.len());
    for m in modules {
        let err = |reason: String| ModuleError { path: m.path.to_path_buf(), reason };
        let mut file = File::open(m.path).map_err(|e| err(e.to_string()))?;
        let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
        let at = next.checked_next_multiple_of(PAGE).unwrap_or(u64::MAX);
        let end = at.checked_add(size).filter(|&e| e <= ram_end).ok_or_else(|| {
            err(format!("{size} bytes do not fit in guest memory between {at:#x} (after the kernel and earlier modules) and {ram_end:#x}: use a larger --memory"))
        })?;
        copy_in(mem, &mut file, 0, at, size).map_err(err)?;
        placed.push((at, end));
        next = end;
    }
    Ok(placed)
}

/// Writes the information structure with its command line, boot loader name, memory
/// map and module list; returns its address (for EBX).
pub fn write_info(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    modules: &[(u64, u64, &str)],
    e820: &[E820Entry],
) -> Result<u64, String> {
    let mut area = Area { next: INFO_AREA_START, end: INFO_AREA_END };
    let info_at = area.put(mem, &[0u8; INFO_SIZE], 8)?;
    let cmdline_at = area.string(mem, cmdline)?;
    let name_at = area.string(mem, LOADER_NAME)?;
    let mut mods = Vec::with_capacity(modules.len() * 16);
    for &(start, end, string) in modules {
        let s = area.string(mem, string)?;
        for v in [start as u32, end as u32, s, 0] {
            mods.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mods_at = area.put(mem, &mods, 16)?;
    let mut mmap = Vec::with_capacity(e820.len() * 24);
    for e in e820 {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&e.kind.to_le_bytes());
    }
    let mmap_at = area.put(mem, &mmap, 8)?;
    // mem_lower: KiB of RAM from 0; mem_upper: KiB from 1 MiB to the first hole.
    let ram_at = |start: u64| e820.iter().find(|e| e.addr == start && e.kind == crate::x86::boot::E820_RAM).map_or(0, |e| e.size);
    let mem_lower = (ram_at(0) >> 10).min(640) as u32;
    let mem_upper = u32::try_from(ram_at(HIMEM_START) >> 10).unwrap_or(u32::MAX);
    let mut info = [0u8; INFO_SIZE];
    let mut set = |at: usize, v: u32| {
        if let Some(d) = info.get_mut(at..at + 4) {
            d.copy_from_slice(&v.to_le_bytes());
        }
    };
    set(0, INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME);
    set(4, mem_lower);
    set(8, mem_upper);
    set(16, cmdline_at);
    set(20, modules.len() as u32);
    set(24, mods_at as u32);
    set(44, mmap.len() as u32);
    set(48, mmap_at as u32);
    set(64, name_at);
    mem.write_slice(&info, GuestAddress(info_at)).map_err(|e| format!("writing the boot information: {e}"))?;
    Ok(info_at)
}

#[cfg(test)]
mod tests;
