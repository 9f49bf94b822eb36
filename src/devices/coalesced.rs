//! KVM's coalesced I/O ring (KVM_CAP_COALESCED_MMIO / KVM_CAP_COALESCED_PIO): writes
//! to a registered zone do not exit; KVM appends them to a ring page the VMM maps, and
//! the VMM delivers them to the device later. skiff drains the ring on every exit,
//! before dispatching it, so any device access that does exit sees every earlier
//! deferred write first (program order per vCPU), and once more at stop.
//!
//! The ring is the VM's, not a vCPU's: every vCPU fd maps the same page and every vCPU
//! thread drains it, so consumers are serialised here. The kernel writes an entry and
//! then `last`; skiff reads the entry and only then advances `first` (after the device
//! has it), so a vCPU that finds the ring empty knows every entry is delivered. (The
//! kvm-ioctls reader takes `&mut` of the shared page with plain loads and advances
//! `first` before delivery, which is fine for one vCPU but not for several.)

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{KVM_COALESCED_MMIO_PAGE_OFFSET, kvm_coalesced_mmio};

/// Ring header: `first` (consumer, us) then `last` (producer, the kernel).
const HEADER: usize = 8;
const ENTRY: usize = std::mem::size_of::<kvm_coalesced_mmio>();

/// One deferred write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalescedWrite {
    pub pio: bool,
    pub addr: u64,
    data: [u8; 8],
    len: u8,
}

impl CoalescedWrite {
    pub fn data(&self) -> &[u8] {
        self.data.get(..self.len as usize).unwrap_or(&self.data)
    }
}

pub struct CoalescedRing {
    page: NonNull<u8>,
    page_size: usize,
    /// Entries the ring holds (KVM_COALESCED_MMIO_MAX for this page size).
    max: u32,
    consumer: Mutex<()>,
}

// SAFETY: the page is shared memory owned by this struct until Drop; the header words
// are only touched through atomics and entries are read with volatile copies, and the
// one consumer at a time is enforced by `consumer`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the VM's ring page through a vCPU fd.
    pub fn map(vcpu: &impl AsRawFd) -> std::io::Result<Self> {
        let page_size = page_size()?;
        let offset = KVM_COALESCED_MMIO_PAGE_OFFSET as libc::off_t * page_size as libc::off_t;
        // SAFETY: a fresh shared mapping of one page of the vCPU fd at KVM's documented
        // offset; the kernel refuses it (and we return the error) without the capability.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Self::from_mapping(p, page_size)
    }

    /// An anonymous page laid out like KVM's, for tests that play the kernel's part.
    #[cfg(test)]
    pub(crate) fn anonymous() -> std::io::Result<Self> {
        let page_size = page_size()?;
        // SAFETY: a fresh private anonymous mapping, owned by the returned ring.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Self::from_mapping(p, page_size)
    }

    fn from_mapping(p: *mut libc::c_void, page_size: usize) -> std::io::Result<Self> {
        let page = NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        let max = u32::try_from(page_size.saturating_sub(HEADER) / ENTRY).unwrap_or(0);
        Ok(Self { page, page_size, max, consumer: Mutex::new(()) })
    }

    fn first(&self) -> &AtomicU32 {
        // SAFETY: offset 0 of a live, page-aligned mapping; u32 alignment holds and the
        // word is only accessed atomically (by us and the kernel).
        unsafe { &*self.page.as_ptr().cast::<AtomicU32>() }
    }

    fn last(&self) -> &AtomicU32 {
        // SAFETY: offset 4 of the same mapping, 4-aligned; see `first`.
        unsafe { &*self.page.as_ptr().add(4).cast::<AtomicU32>() }
    }

    /// Whether no write waits (one pair of loads: the exit path's common case).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.first().load(Ordering::Acquire) == self.last().load(Ordering::Acquire)
    }

    /// Delivers every waiting write, oldest first, to `deliver`; returns how many.
    /// When it returns, every write the kernel had appended before the call is
    /// delivered, by this call or by another vCPU's that held the ring first.
    #[inline]
    pub fn drain(&self, deliver: impl FnMut(CoalescedWrite)) -> u64 {
        if self.is_empty() {
            return 0;
        }
        self.drain_locked(deliver)
    }

    #[cold]
    fn drain_locked(&self, mut deliver: impl FnMut(CoalescedWrite)) -> u64 {
        let _one_consumer = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        let mut delivered = 0u64;
        // Bounded: other vCPUs may keep appending while we drain; a few rings' worth
        // is every entry that was there when we started, and then some.
        for _ in 0..self.max.saturating_mul(4) {
            let first = self.first().load(Ordering::Relaxed);
            // Acquire pairs with the kernel's write barrier between entry and `last`.
            let last = self.last().load(Ordering::Acquire);
            if first == last || first >= self.max || last >= self.max {
                // Empty, or indices no ring can have (never from a sane kernel): stop
                // rather than read outside the page.
                break;
            }
            // SAFETY: first < max, so the entry lies inside the page
            // (HEADER + max * ENTRY <= page_size); the kernel finished writing it
            // before publishing `last` (acquired above). A volatile copy, since the
            // page is shared with the kernel.
            let raw: kvm_coalesced_mmio = unsafe {
                std::ptr::read_volatile(
                    self.page.as_ptr().add(HEADER + first as usize * ENTRY).cast::<kvm_coalesced_mmio>(),
                )
            };
            // SAFETY: both union members are plain u32s.
            let pio = unsafe { raw.__bindgen_anon_1.pio } != 0;
            let len = raw.len.min(8) as u8;
            deliver(CoalescedWrite { pio, addr: raw.phys_addr, data: raw.data, len });
            // Advance only now: a vCPU that sees the ring empty must find the device
            // already updated.
            self.first().store((first + 1) % self.max, Ordering::Release);
            delivered += 1;
        }
        delivered
    }

    /// Plays the kernel's part in tests: appends a write; false when full.
    #[cfg(test)]
    pub(crate) fn push(&self, pio: bool, addr: u64, data: &[u8]) -> bool {
        let last = self.last().load(Ordering::Relaxed);
        let next = (last + 1) % self.max;
        if next == self.first().load(Ordering::Acquire) {
            return false;
        }
        let mut e = kvm_coalesced_mmio { phys_addr: addr, len: data.len() as u32, ..Default::default() };
        e.__bindgen_anon_1.pio = pio as u32;
        e.data[..data.len()].copy_from_slice(data);
        // SAFETY: last < max, inside the page; tests have a single producer.
        unsafe {
            std::ptr::write_volatile(
                self.page.as_ptr().add(HEADER + last as usize * ENTRY).cast::<kvm_coalesced_mmio>(),
                e,
            )
        };
        self.last().store(next, Ordering::Release);
        true
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `map`/`anonymous` with this size and nothing
        // borrows it past `self`.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}

fn page_size() -> std::io::Result<usize> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).map_err(|_| std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn drains_in_order_across_the_wrap() {
        let ring = CoalescedRing::anonymous().unwrap();
        assert_eq!(ring.max, 170, "4 KiB page: (4096 - 8) / 24 entries");
        let mut seen = Vec::new();
        let mut next = 0u32;
        // Several passes so `first` wraps around the end of the ring.
        for _ in 0..5 {
            for _ in 0..100 {
                assert!(ring.push(true, 0x80, &next.to_le_bytes()));
                next += 1;
            }
            assert_eq!(ring.drain(|w| seen.push(w)), 100);
            assert!(ring.is_empty());
        }
        let values: Vec<u32> = seen.iter().map(|w| u32::from_le_bytes(w.data().try_into().unwrap())).collect();
        assert_eq!(values, (0..500).collect::<Vec<_>>());
        assert!(seen.iter().all(|w| w.pio && w.addr == 0x80));
        assert_eq!(ring.drain(|_| panic!("empty ring delivered")), 0);
    }

    #[test]
    fn full_ring_refuses_and_drains_whole() {
        let ring = CoalescedRing::anonymous().unwrap();
        let mut n = 0;
        while ring.push(false, 0xd000_0000 + n, &[n as u8]) {
            n += 1;
        }
        assert_eq!(n, 169, "one slot stays free to tell full from empty");
        let mut addrs = Vec::new();
        assert_eq!(ring.drain(|w| addrs.push(w.addr)), 169);
        assert_eq!(addrs, (0..169).map(|i| 0xd000_0000 + i).collect::<Vec<_>>());
    }

    #[test]
    fn corrupt_indices_do_not_read_outside_the_page() {
        let ring = CoalescedRing::anonymous().unwrap();
        ring.last().store(100_000, Ordering::Release);
        assert_eq!(ring.drain(|_| panic!("delivered from a corrupt ring")), 0);
        ring.last().store(0, Ordering::Release);
        ring.first().store(u32::MAX, Ordering::Release);
        assert_eq!(ring.drain(|_| panic!("delivered from a corrupt ring")), 0);
    }

    #[test]
    fn oversized_length_is_clamped() {
        let ring = CoalescedRing::anonymous().unwrap();
        assert!(ring.push(true, 0x70, &[1, 2]));
        // SAFETY: entry 0 is inside the page; the test is the only user.
        unsafe { (*ring.page.as_ptr().add(HEADER).cast::<kvm_coalesced_mmio>()).len = 1000 };
        let mut got = None;
        ring.drain(|w| got = Some(w));
        assert_eq!(got.map(|w| w.data().len()), Some(8));
    }

    /// A vCPU that finds the ring empty must not overtake a delivery another vCPU has
    /// taken from the ring but not finished: `first` moves only after the device has
    /// the write.
    #[test]
    fn empty_means_delivered() {
        let ring = Arc::new(CoalescedRing::anonymous().unwrap());
        let device = Arc::new(AtomicBool::new(false));
        assert!(ring.push(true, 0x80, &[0x55]));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let slow = {
            let (ring, device) = (ring.clone(), device.clone());
            std::thread::spawn(move || {
                ring.drain(|_| {
                    started_tx.send(()).unwrap();
                    // Held mid-delivery until the other side has looked (no timing:
                    // a loaded host may stall either thread for any time).
                    go_rx.recv().unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    device.store(true, Ordering::SeqCst);
                })
            })
        };
        started_rx.recv().unwrap();
        // The other consumer is mid-delivery: the ring is not empty, and a drain
        // waits for it (when it gets there within the 50 ms; else it finds it done).
        assert!(!ring.is_empty());
        go_tx.send(()).unwrap();
        assert_eq!(ring.drain(|_| panic!("delivered twice")), 0);
        assert!(device.load(Ordering::SeqCst), "drain returned before the device had the write");
        assert_eq!(slow.join().unwrap(), 1);
    }

    #[test]
    fn concurrent_consumers_deliver_each_write_once_in_order() {
        let ring = Arc::new(CoalescedRing::anonymous().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let (ring, log, done) = (ring.clone(), log.clone(), done.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::SeqCst) || !ring.is_empty() {
                        ring.drain(|w| log.lock().unwrap().push(u32::from_le_bytes(w.data().try_into().unwrap())));
                    }
                })
            })
            .collect();
        for i in 0..20_000u32 {
            while !ring.push(true, 0x80, &i.to_le_bytes()) {
                std::thread::yield_now();
            }
        }
        done.store(true, Ordering::SeqCst);
        for c in consumers {
            c.join().unwrap();
        }
        assert_eq!(*log.lock().unwrap(), (0..20_000).collect::<Vec<_>>());
    }
}
