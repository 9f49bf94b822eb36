//! Guest RAM: anonymous host memory through vm-memory, split around the 32-bit MMIO
//! hole, and registered with KVM as one memory slot per region.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {size} bytes: {reason}")]
    Create { size: u64, reason: String },
    #[error("KVM_SET_USER_MEMORY_REGION for {base:#x}+{size:#x}: {err}")]
    Register { base: u64, size: u64, err: kvm_ioctls::Error },
}

/// The RAM regions for `size` bytes: below the hole, and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_HOLE_START {
        ranges.push((GuestAddress(MMIO_HOLE_END), (size - MMIO_HOLE_START) as usize));
    }
    ranges
}

pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|e| MemoryError::Create { size, reason: e.to_string() })?;
    for region in mem.iter() {
        if let Ok(host) = mem.get_host_address(region.start_addr()) {
            ask_for_huge_pages(host, region.len() as usize);
        }
    }
    Ok(mem)
}

/// Asks the host to back anonymous guest RAM with transparent huge pages
/// (MADV_HUGEPAGE; hosts whose THP setting is `madvise`, Debian's default, use them
/// only where asked): fewer page-table walks for KVM's mappings and cheaper pinning
/// of guest buffers for O_DIRECT disk I/O (bench/disk.py). Cloud Hypervisor does the
/// same by default. `SKIFF_THP=off` in the environment leaves the pages small (for
/// comparison). Advice only: a host without THP says EINVAL, and nothing changes.
fn ask_for_huge_pages(host: *mut u8, len: usize) {
    if std::env::var("SKIFF_THP").is_ok_and(|v| v == "off") {
        return;
    }
    // SAFETY: `host..host+len` is one anonymous mapping owned by guest memory;
    // MADV_HUGEPAGE changes only how the kernel backs it, never its contents.
    let _ = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
}

/// Adds guest RAM to the VM: one memory slot per region.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    set_slots(vm, mem, true)
}

/// Removes guest RAM from the VM (KVM_SET_USER_MEMORY_REGION with size 0 for each
/// slot). KVM then drops every mapping and shadow page derived from it, which a reset
/// needs: where KVM shadows the guest's page tables (shadow paging, PVM), it only sees
/// the guest's own writes to them, so page tables the host rewrites behind its back
/// (the cleared RAM, the reloaded kernel) would otherwise keep stale translations.
pub fn unregister_from_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    set_slots(vm, mem, false)
}

fn set_slots(vm: &VmFd, mem: &GuestMemoryMmap, present: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let base = region.start_addr().0;
        let size = region.len();
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| MemoryError::Create { size, reason: e.to_string() })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: base,
            memory_size: if present { size } else { 0 },
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the Vmm keeps
        // for as long as the VM exists; a slot is deleted only while no vCPU runs.
        unsafe { vm.set_user_memory_region(r) }.map_err(|err| MemoryError::Register { base, size, err })?;
    }
    Ok(())
}

/// Zeroes all guest RAM, as at power-up, by giving the pages back to the host
/// (MADV_DONTNEED on private anonymous memory reads back as zeroes): no copy, and the
/// resident size drops to what the next boot touches. RAM restored from a snapshot
/// is the memory file mapped private, where MADV_DONTNEED would bring the file's
/// pages back, so there fresh anonymous memory is mapped over it instead.
pub fn clear(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let size = region.len();
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| MemoryError::Create { size, reason: e.to_string() })?;
        let failed = |what: &str| MemoryError::Create { size, reason: format!("clearing at reset ({what}): {}", std::io::Error::last_os_error()) };
        if region.file_offset().is_some() {
            // SAFETY: replaces `host..host+size`, one mapping owned by `mem`, with
            // anonymous memory at the same address and protection (MAP_FIXED); no
            // vCPU runs during a reset and nothing in skiff holds a reference into
            // guest memory across one. The region keeps describing the address.
            let p = unsafe {
                libc::mmap(
                    host.cast(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(failed("mmap"));
            }
            ask_for_huge_pages(host, size as usize);
            continue;
        }
        // SAFETY: `host..host+size` is one private anonymous mapping owned by `mem`;
        // no vCPU runs while the machine is being reset, and nothing in skiff holds a
        // reference into guest memory across a reset.
        let rc = unsafe { libc::madvise(host.cast(), size as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(failed("madvise"));
        }
    }
    Ok(())
}

/// How much of guest RAM is resident in host memory, in KiB (mincore).
pub fn resident_kib(mem: &GuestMemoryMmap) -> u64 {
    const PAGE: usize = 4096;
    let mut pages = 0u64;
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else { continue };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: `host..host+len` is one mapping owned by `mem`; `vec` has one byte
        // per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            pages += vec.iter().filter(|b| *b & 1 != 0).count() as u64;
        }
    }
    pages * (PAGE as u64 / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(1 << 32), (1 << 30) as usize));
    }
}
