//! Which guest pages can hold something new, from the host's page tables
//! (/proc/self/pagemap), and which differ from a parent snapshot.
//!
//! A diff snapshot holds the pages that differ from its parent, found by comparing
//! them, rather than from KVM's dirty log: the log sees only what the guest wrote,
//! not what skiff itself writes into guest memory (virtio data and rings, emulated
//! instructions), and comparing needs nothing switched on while the guest runs.
//! Only pages the host page tables show as possibly changed are compared: in fresh
//! anonymous RAM a page never touched is zero now and was zero then; in RAM restored
//! from a memory file (mapped private) a page not copied on write is still the file's.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::memory::{PAGE_SIZE, layout, map_memory};
use super::{MemoryRange, SnapshotError, format};

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// A file page (or shared anonymous memory): not copied on write.
const FILE_PAGE: u64 = 1 << 61;

/// The pagemap entries of a region of guest RAM; None when unreadable.
fn pagemap(mem: &GuestMemoryMmap, range: &MemoryRange) -> Option<Vec<u64>> {
    let host = mem.get_host_address(GuestAddress(range.guest_addr)).ok()? as u64;
    let pages = usize::try_from(range.len / PAGE_SIZE).ok()?;
    let mut raw = vec![0u8; pages.checked_mul(8)?];
    let f = File::open("/proc/self/pagemap").ok()?;
    f.read_exact_at(&mut raw, (host / PAGE_SIZE).checked_mul(8)?).ok()?;
    Some(raw.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default())).collect())
}

/// Which pages of a region of anonymous guest RAM were ever touched (present or
/// swapped out): the others read as zero. None where that cannot be told: RAM
/// mapped from a file (whose untouched pages hold the file's data), or pagemap
/// unreadable.
pub(super) fn touched(mem: &GuestMemoryMmap, range: &MemoryRange) -> Option<Vec<bool>> {
    let region = mem.find_region(GuestAddress(range.guest_addr))?;
    if region.file_offset().is_some() || region.len() != range.len {
        return None;
    }
    Some(pagemap(mem, range)?.into_iter().map(|e| e & (PRESENT | SWAPPED) != 0).collect())
}

/// Pages that may differ from what they held when this RAM was last a snapshot's
/// (or was mapped from one): touched anonymous pages, or file pages copied on
/// write. Every page where the page tables cannot tell.
fn may_have_changed(mem: &GuestMemoryMmap, range: &MemoryRange) -> Vec<bool> {
    let pages = (range.len / PAGE_SIZE) as usize;
    let file_backed = mem.find_region(GuestAddress(range.guest_addr)).is_some_and(|r| r.file_offset().is_some());
    match pagemap(mem, range) {
        Some(map) if file_backed => map.into_iter().map(|e| e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE_PAGE == 0)).collect(),
        Some(map) => map.into_iter().map(|e| e & (PRESENT | SWAPPED) != 0).collect(),
        None => vec![true; pages],
    }
}

/// The pages of `mem` that differ from the snapshot at `parent` (its memory file
/// and the diffs under it), as one bitmap per RAM region (bit n of word n/64 = page
/// n), the form `write_memory_diff` takes.
pub fn changed_since(mem: &GuestMemoryMmap, parent: &Path) -> Result<Vec<Vec<u64>>, SnapshotError> {
    let snap = format::read_snapshot(parent)?;
    let map = layout(mem)?;
    if snap.memory_map != map {
        return Err(SnapshotError::Memory(format!("{}: its guest memory layout differs from this machine's", parent.display())));
    }
    let then = map_memory(parent, &snap)?;
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
    let mut bitmaps = Vec::with_capacity(map.len());
    for range in &map {
        let pages = range.len / PAGE_SIZE;
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        for (p, maybe) in may_have_changed(mem, range).into_iter().enumerate() {
            let addr = GuestAddress(range.guest_addr + p as u64 * PAGE_SIZE);
            let read = |m: &GuestMemoryMmap, buf: &mut [u8]| m.read_slice(buf, addr).map_err(|e| SnapshotError::Memory(format!("reading guest page {:#x}: {e}", addr.0)));
            if !maybe {
                continue;
            }
            read(mem, &mut a)?;
            read(&then, &mut b)?;
            if a != b
                && let Some(w) = bits.get_mut(p / 64)
            {
                *w |= 1 << (p % 64);
            }
        }
        bitmaps.push(bits);
    }
    Ok(bitmaps)
}
