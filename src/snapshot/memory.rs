//! The guest-memory file.
//!
//! Guest RAM regions lie one after another at page-aligned offsets (the memory map
//! says where each is), followed by one trailer page:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8  | magic `SKIFFMEM` |
//! | 8  | 4  | trailer version (1) |
//! | 12 | 4  | kind: 0 full, 1 diff |
//! | 16 | 8  | guest RAM bytes (the trailer's own offset) |
//! | 24 | 16 | this file's random identity (also in the snapshot) |
//! | 40 | 16 | the parent memory file's identity (zeroes for a full file) |
//! | 56 | 4  | CRC-32 of bytes 0..56 |
//!
//! Only non-zero pages are written; zero pages stay holes, so the file takes the room
//! of what the guest used, and restore maps it MAP_PRIVATE: pages load on first touch
//! and the file is never written. A diff file has the same layout but holds only the
//! pages a dirty bitmap named (its snapshot lists them: a listed page that is a hole
//! is one the guest zeroed). Restoring a diff maps its parent chain's full file and
//! copies the diff's pages over it, oldest diff first.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::{DiffOf, MemoryFileRef, MemoryRange, Snapshot, SnapshotError, atomic, format};

pub const PAGE_SIZE: u64 = 4096;
pub const MEMORY_TRAILER_SIZE: u64 = PAGE_SIZE;
const MEM_MAGIC: [u8; 8] = *b"SKIFFMEM";
const TRAILER_VERSION: u32 = 1;
const TRAILER_USED: usize = 60;
/// Bytes gathered before one write: long runs of data go out in few system calls.
const RUN_BYTES: usize = 1 << 20;
/// A diff applies on top of at most this many ancestors (a loop of names ends here).
const MAX_CHAIN: usize = 16;

/// What a memory file write produced: the snapshot's memory-map and memory-file
/// sections, and how many pages went to disk.
#[derive(Clone, Debug)]
pub struct MemoryWritten {
    pub map: Vec<MemoryRange>,
    pub file: MemoryFileRef,
    pub pages_written: u64,
}

/// Where each guest RAM region goes in the memory file: one after another.
pub(super) fn layout(mem: &GuestMemoryMmap) -> Result<Vec<MemoryRange>, SnapshotError> {
    let mut offset = 0u64;
    let mut map = Vec::new();
    for r in mem.iter() {
        let (guest_addr, len) = (r.start_addr().0, r.len());
        if guest_addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(SnapshotError::Memory(format!("guest RAM region {guest_addr:#x}+{len:#x} is not whole pages")));
        }
        map.push(MemoryRange { guest_addr, len, file_offset: offset });
        offset += len;
    }
    Ok(map)
}

/// Checks a memory map read from a file against its memory file's size: page-aligned,
/// non-empty, no overflow, no overlap in guest or file space, inside the RAM part.
pub(super) fn check_layout(map: &[MemoryRange], file: &MemoryFileRef) -> Result<(), String> {
    if !file.size.is_multiple_of(PAGE_SIZE) || file.size < MEMORY_TRAILER_SIZE {
        return Err(format!("a memory file of {} bytes is not whole pages plus a trailer", file.size));
    }
    let ram = file.size - MEMORY_TRAILER_SIZE;
    let mut spans = Vec::new();
    for r in map {
        let aligned = r.guest_addr % PAGE_SIZE == 0 && r.len % PAGE_SIZE == 0 && r.file_offset % PAGE_SIZE == 0;
        let g_end = r.guest_addr.checked_add(r.len);
        let f_end = r.file_offset.checked_add(r.len).filter(|e| *e <= ram);
        let (Some(g_end), Some(f_end), true, true) = (g_end, f_end, aligned, r.len > 0) else {
            return Err(format!("range {:#x}+{:#x} at file offset {:#x} is not page-aligned inside {ram:#x} bytes of RAM", r.guest_addr, r.len, r.file_offset));
        };
        // usize is 64 bits here: a region must fit an mmap.
        if usize::try_from(r.len).is_err() {
            return Err(format!("range of {:#x} bytes", r.len));
        }
        spans.push(((r.guest_addr, g_end), (r.file_offset, f_end)));
    }
    for (i, a) in spans.iter().enumerate() {
        for b in spans.iter().skip(i + 1) {
            if a.0.0 < b.0.1 && b.0.0 < a.0.1 || a.1.0 < b.1.1 && b.1.0 < a.1.1 {
                return Err("ranges overlap".into());
            }
        }
    }
    Ok(())
}

/// Checks a diff's page runs: sorted, not overlapping, inside the RAM part.
pub(super) fn check_runs(runs: &[(u64, u64)], file: &MemoryFileRef) -> Result<(), String> {
    let pages = file.size.saturating_sub(MEMORY_TRAILER_SIZE) / PAGE_SIZE;
    let mut next = 0u64;
    for &(first, count) in runs {
        let end = first.checked_add(count).filter(|e| count > 0 && first >= next && *e <= pages);
        next = end.ok_or_else(|| format!("page run {first}+{count} is out of order or outside {pages} pages"))?;
    }
    Ok(())
}

fn random_id() -> Result<[u8; 16], SnapshotError> {
    let mut id = [0u8; 16];
    let mut got = 0;
    while got < id.len() {
        let rest = id.get_mut(got..).unwrap_or_default();
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, a live buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(SnapshotError::Memory(format!("getrandom: {err}")));
            }
            continue;
        }
        got += n as usize;
    }
    Ok(id)
}

fn trailer(diff: bool, ram: u64, id: &[u8; 16], parent: &[u8; 16]) -> Vec<u8> {
    let mut t = Vec::with_capacity(MEMORY_TRAILER_SIZE as usize);
    t.extend(MEM_MAGIC);
    t.extend(TRAILER_VERSION.to_le_bytes());
    t.extend(u32::from(diff).to_le_bytes());
    t.extend(ram.to_le_bytes());
    t.extend(id);
    t.extend(parent);
    t.extend(crc32fast::hash(&t).to_le_bytes());
    t.resize(MEMORY_TRAILER_SIZE as usize, 0);
    t
}

/// Whether every byte is zero (64 at a time, which the compiler vectorizes).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, x| a | x) == 0)
}

/// Writes one region's selected pages at their file offsets, skipping zero pages
/// (holes), and adds the selected pages to `runs` (as memory-file page runs).
/// Returns how many pages were written.
fn copy_region(
    f: &File,
    mem: &GuestMemoryMmap,
    range: &MemoryRange,
    dirty: Option<&[u64]>,
    runs: &mut Vec<(u64, u64)>,
    buf: &mut [u8],
    path: &Path,
) -> Result<u64, SnapshotError> {
    let mut fill = 0usize;
    let mut run_off = 0u64;
    let mut written = 0u64;
    let mut flush = |fill: &mut usize, run_off: u64, buf: &[u8]| -> Result<(), SnapshotError> {
        if *fill > 0 {
            f.write_all_at(buf.get(..*fill).unwrap_or_default(), run_off).map_err(SnapshotError::io(path, "writing"))?;
            written += (*fill as u64) / PAGE_SIZE;
            *fill = 0;
        }
        Ok(())
    };
    let first_page = range.file_offset / PAGE_SIZE;
    let touched = super::pages::touched(mem, range);
    for p in 0..range.len / PAGE_SIZE {
        let selected = dirty.is_none_or(|bm| bm.get((p / 64) as usize).is_some_and(|w| w >> (p % 64) & 1 != 0));
        if !selected {
            flush(&mut fill, run_off, buf)?;
            continue;
        }
        match runs.last_mut() {
            Some((first, count)) if *first + *count == first_page + p => *count += 1,
            _ => runs.push((first_page + p, 1)),
        }
        // A page the guest never touched reads as zero: a hole, without reading it.
        if touched.as_ref().is_some_and(|t| t.get(p as usize) == Some(&false)) {
            flush(&mut fill, run_off, buf)?;
            continue;
        }
        if fill == buf.len() {
            flush(&mut fill, run_off, buf)?;
        }
        if fill == 0 {
            run_off = range.file_offset + p * PAGE_SIZE;
        }
        let page = buf.get_mut(fill..fill + PAGE_SIZE as usize).unwrap_or_default();
        mem.read_slice(page, GuestAddress(range.guest_addr + p * PAGE_SIZE))
            .map_err(|e| SnapshotError::Memory(format!("reading guest page {:#x}: {e}", range.guest_addr + p * PAGE_SIZE)))?;
        if is_zero(page) {
            flush(&mut fill, run_off, buf)?;
        } else {
            fill += PAGE_SIZE as usize;
        }
    }
    flush(&mut fill, run_off, buf)?;
    Ok(written)
}

/// What `write_memory` wrote: layout, identity, size, data pages, and the selected
/// pages as runs.
struct Written {
    map: Vec<MemoryRange>,
    id: [u8; 16],
    size: u64,
    pages_written: u64,
    runs: Vec<(u64, u64)>,
}

fn write_memory(path: &Path, mem: &GuestMemoryMmap, dirty: Option<&[Vec<u64>]>, parent_id: [u8; 16]) -> Result<Written, SnapshotError> {
    let map = layout(mem)?;
    if let Some(d) = dirty {
        let want: Vec<usize> = map.iter().map(|r| (r.len / PAGE_SIZE).div_ceil(64) as usize).collect();
        let got: Vec<usize> = d.iter().map(Vec::len).collect();
        if want != got {
            return Err(SnapshotError::Memory(format!("dirty bitmaps of {got:?} words for regions that need {want:?}")));
        }
    }
    let ram: u64 = map.iter().map(|r| r.len).sum();
    let id = random_id()?;
    let mut written = 0;
    let mut runs = Vec::new();
    atomic::write_atomic(path, |f| {
        // Holes first: the file's size is set once, and only data pages are written.
        f.set_len(ram + MEMORY_TRAILER_SIZE).map_err(SnapshotError::io(path, "setting the size"))?;
        let mut buf = vec![0u8; RUN_BYTES];
        for (i, range) in map.iter().enumerate() {
            let bm = dirty.and_then(|d| d.get(i)).map(Vec::as_slice);
            written += copy_region(f, mem, range, bm, &mut runs, &mut buf, path)?;
        }
        f.write_all_at(&trailer(dirty.is_some(), ram, &id, &parent_id), ram).map_err(SnapshotError::io(path, "writing the trailer"))
    })?;
    Ok(Written { map, id, size: ram + MEMORY_TRAILER_SIZE, pages_written: written, runs })
}

/// Writes all guest RAM to a new full memory file at `path` (atomically, zero pages as
/// holes). Guest memory must not change meanwhile: the vCPUs and device I/O are paused.
pub fn write_memory_full(path: &Path, mem: &GuestMemoryMmap) -> Result<MemoryWritten, SnapshotError> {
    let w = write_memory(path, mem, None, [0; 16])?;
    let file = MemoryFileRef { path: absolute(path)?, size: w.size, id: w.id, diff: None };
    Ok(MemoryWritten { map: w.map, file, pages_written: w.pages_written })
}

/// Writes a diff memory file: only the pages `dirty` names (one bitmap per guest RAM
/// region, in order, bit n of word n/64 = page n of the region, as KVM's dirty log
/// gives them), on top of the snapshot at `parent` (whose memory layout must match).
pub fn write_memory_diff(path: &Path, mem: &GuestMemoryMmap, dirty: &[Vec<u64>], parent: &Path) -> Result<MemoryWritten, SnapshotError> {
    let p = format::read_snapshot(parent)?;
    let parent_size = std::fs::metadata(parent).map_err(SnapshotError::io(parent, "stat"))?.len();
    if p.memory_map != layout(mem)? {
        return Err(SnapshotError::Memory(format!("{}: its guest memory layout differs from this machine's", parent.display())));
    }
    let w = write_memory(path, mem, Some(dirty), p.memory_file.id)?;
    let diff = DiffOf { parent_snapshot: absolute(parent)?, parent_size, parent_memory_id: p.memory_file.id, pages: w.runs };
    let file = MemoryFileRef { path: absolute(path)?, size: w.size, id: w.id, diff: Some(diff) };
    Ok(MemoryWritten { map: w.map, file, pages_written: w.pages_written })
}

/// The absolute name of a file just written: the snapshot file may be written
/// elsewhere, or the process's directory change, before it is read.
fn absolute(path: &Path) -> Result<String, SnapshotError> {
    let p = std::fs::canonicalize(path).map_err(SnapshotError::io(path, "resolving"))?;
    p.into_os_string().into_string().map_err(|p| SnapshotError::Memory(format!("{}: not a UTF-8 path", p.display())))
}

/// A path from a snapshot: a relative one (written by hand, or by a tool that moves
/// snapshots with their memory files) is relative to the snapshot's directory.
fn resolve(snapshot_path: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    match snapshot_path.parent() {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Opens a memory file and checks it is the one `r` names: size, trailer, identity.
fn open_checked(path: &Path, r: &MemoryFileRef, parent_id: [u8; 16]) -> Result<File, SnapshotError> {
    let bad = |reason: String| SnapshotError::MemoryFile { path: path.to_path_buf(), reason };
    let f = File::open(path).map_err(SnapshotError::io(path, "opening"))?;
    let size = f.metadata().map_err(SnapshotError::io(path, "stat"))?.len();
    if size != r.size {
        return Err(bad(format!("{size} bytes, the snapshot says {}", r.size)));
    }
    let ram = size.saturating_sub(MEMORY_TRAILER_SIZE);
    let mut t = [0u8; TRAILER_USED];
    f.read_exact_at(&mut t, ram).map_err(SnapshotError::io(path, "reading the trailer"))?;
    let want = trailer(r.diff.is_some(), ram, &r.id, &parent_id);
    if want.get(..TRAILER_USED) != Some(&t[..]) {
        let reason = if t.starts_with(&MEM_MAGIC) { "not the memory file of this snapshot (identity differs)" } else { "not a skiff memory file" };
        return Err(bad(reason.into()));
    }
    Ok(f)
}

/// Maps the snapshot's guest memory: the full memory file at the root of its chain
/// MAP_PRIVATE (pages come in on first touch; guest writes never reach the file),
/// then each diff's pages copied over it, oldest first. Every file in the chain is
/// checked (sizes, identities, layouts) before anything is mapped. To restore from
/// a memory file that was moved, set `snap.memory_file.path` first.
pub fn map_memory(snapshot_path: &Path, snap: &Snapshot) -> Result<GuestMemoryMmap, SnapshotError> {
    // From this snapshot back to the full one: (memory file path, its reference).
    let mut chain: Vec<(PathBuf, MemoryFileRef)> = vec![(resolve(snapshot_path, &snap.memory_file.path), snap.memory_file.clone())];
    let mut at = snapshot_path.to_path_buf();
    let mut diff = snap.memory_file.diff.clone();
    while let Some(d) = diff {
        if chain.len() > MAX_CHAIN {
            return Err(SnapshotError::Memory(format!("{}: more than {MAX_CHAIN} diffs in a chain", snapshot_path.display())));
        }
        let parent_path = resolve(&at, &d.parent_snapshot);
        let size = std::fs::metadata(&parent_path).map_err(SnapshotError::io(&parent_path, "stat"))?.len();
        let parent = format::read_snapshot(&parent_path)?;
        if size != d.parent_size || parent.memory_file.id != d.parent_memory_id {
            return Err(SnapshotError::Memory(format!("{}: not the snapshot this diff applies on top of (it changed)", parent_path.display())));
        }
        if parent.memory_map != snap.memory_map {
            return Err(SnapshotError::Memory(format!("{}: its guest memory layout differs from the diff's", parent_path.display())));
        }
        chain.push((resolve(&parent_path, &parent.memory_file.path), parent.memory_file.clone()));
        diff = parent.memory_file.diff;
        at = parent_path;
    }
    chain.reverse();
    let mut files = Vec::new();
    let mut parent_id = [0u8; 16];
    for (path, r) in &chain {
        files.push(open_checked(path, r, parent_id)?);
        parent_id = r.id;
    }
    let mut files = files.into_iter();
    let base = Arc::new(files.next().ok_or_else(|| SnapshotError::Memory("no memory file".into()))?);
    let base_path = chain.first().map(|c| c.0.clone()).unwrap_or_default();
    let mut regions = Vec::new();
    for r in &snap.memory_map {
        let region = MmapRegionBuilder::new(r.len as usize)
            .with_file_offset(FileOffset::from_arc(base.clone(), r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::MemoryFile { path: base_path.clone(), reason: format!("mapping {:#x}+{:#x}: {e}", r.guest_addr, r.len) })?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| SnapshotError::Memory(format!("guest range {:#x}+{:#x} overflows", r.guest_addr, r.len)))?,
        );
    }
    regions.sort_by_key(|r| r.start_addr());
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Memory(format!("guest memory from {}: {e}", base_path.display())))?;
    for (f, (path, r)) in files.zip(chain.iter().skip(1)) {
        apply_diff(&mem, &snap.memory_map, f, path, r)?;
    }
    Ok(mem)
}

/// Copies a diff's pages into guest memory (into the private mapping: the parent's
/// file stays as it is).
fn apply_diff(mem: &GuestMemoryMmap, map: &[MemoryRange], f: File, path: &Path, r: &MemoryFileRef) -> Result<(), SnapshotError> {
    use std::io::{Seek, SeekFrom};
    let runs = r.diff.as_ref().map(|d| d.pages.as_slice()).unwrap_or_default();
    let mut f = f;
    for &(first, count) in runs {
        let outside = || SnapshotError::MemoryFile { path: path.into(), reason: format!("page run {first}+{count} is in no guest range") };
        let off = first.checked_mul(PAGE_SIZE).ok_or_else(outside)?;
        let len = count.checked_mul(PAGE_SIZE).ok_or_else(outside)?;
        let end = off.checked_add(len).ok_or_else(outside)?;
        // A run lies in one range: the writer makes runs per region.
        let range = map
            .iter()
            .find(|m| m.file_offset <= off && m.file_offset.checked_add(m.len).is_some_and(|e| end <= e))
            .ok_or_else(outside)?;
        f.seek(SeekFrom::Start(off)).map_err(SnapshotError::io(path, "seeking"))?;
        let gpa = GuestAddress(range.guest_addr + (off - range.file_offset));
        mem.read_exact_volatile_from(gpa, &mut f, len as usize)
            .map_err(|e| SnapshotError::MemoryFile { path: path.into(), reason: format!("reading page run {first}+{count}: {e}") })?;
    }
    Ok(())
}
