//! Reads and writes through io_uring, submitted and completed on the event loop: no
//! I/O thread and no hand-off between threads per request. The ring's completion
//! eventfd is one of the device's backend fds; an O_DIRECT request is issued by the
//! submitting call itself (as `dd iflag=direct`'s pread is) and completed from the
//! disk's interrupt, so a request costs the event loop one `io_uring_enter` and one
//! wake-up for its completion. What the kernel cannot do without blocking (a buffered
//! read that misses the page cache) it hands to its own io-wq threads.
//!
//! Flush, discard and write-zeroes stay on the worker pool ([`super::worker`]): they
//! are rare, and fdatasync or fallocate block anyway.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::worker::{Job, Op, settle};
use crate::devices::virtio::Completion;
use crate::devices::virtio::chain::HostSlice;

/// iovecs one request takes at most (IOV_MAX on Linux); a longer one is continued.
const IOV_MAX: usize = 1024;
/// Times one request is submitted again after EINTR or EAGAIN before it fails.
const MAX_RETRIES: u32 = 16;

/// One request in flight: the job (which keeps guest RAM mapped), and the iovecs of
/// what is left to move, which the kernel reads until the request completes.
struct Flight {
    job: Job,
    fd: RawFd,
    write: bool,
    offset: u64,
    /// Buffers not yet moved, in order.
    rest: Vec<HostSlice>,
    /// The iovecs of the submission in the ring (a prefix of `rest`).
    iovecs: Iovecs,
    retries: u32,
}

/// iovecs addressing guest RAM, handed to the kernel.
#[derive(Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs are only address ranges in guest RAM, as `HostSlice`s are (see
// its Send); the flight that holds them also holds the GuestMemoryMmap that maps them.
unsafe impl Send for Iovecs {}

pub(super) struct Ring {
    ring: IoUring,
    event: EventFd,
    /// Indexed by user_data; at most `capacity` requests are in flight.
    slots: Vec<Option<Flight>>,
    free: Vec<usize>,
    in_flight: usize,
    done: Vec<Completion>,
}

impl Ring {
    /// A ring for up to `capacity` requests in flight, its completions signalled on an
    /// eventfd. Fails where the kernel has no io_uring (or it is disabled).
    pub fn new(capacity: u32) -> io::Result<Ring> {
        let ring = IoUring::builder().setup_clamp().build(capacity)?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let n = ring.params().sq_entries() as usize;
        Ok(Ring { ring, event, slots: (0..n).map(|_| None).collect(), free: (0..n).rev().collect(), in_flight: 0, done: Vec::new() })
    }

    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the ring takes `op` (reads and writes).
    pub fn takes(op: &Op) -> bool {
        matches!(op, Op::Read { .. } | Op::Write { .. })
    }

    /// Starts a read or write on `fd`. Returns the job back if the ring cannot take it
    /// (another operation, or no free slot), for the worker pool.
    pub fn submit(&mut self, job: Job, fd: RawFd) -> Result<(), Job> {
        let (rest, offset, write) = match &job.op {
            Op::Read { iov, offset, .. } => (iov.clone(), *offset, false),
            Op::Write { iov, offset, .. } => (iov.clone(), *offset, true),
            _ => return Err(job),
        };
        let Some(slot) = self.free.pop() else { return Err(job) };
        let rest = rest.into_iter().filter(|s| s.len > 0).collect();
        let flight = Flight { job, fd, write, offset, rest, iovecs: Iovecs::default(), retries: 0 };
        self.in_flight += 1;
        self.start(slot, flight);
        let _ = self.enter(0);
        Ok(())
    }

    /// Puts `flight` in `slot` and its next piece in the submission queue, or
    /// completes it if nothing is left to move.
    fn start(&mut self, slot: usize, mut flight: Flight) {
        if flight.rest.is_empty() {
            return self.finish(slot, flight, true);
        }
        let Ok(offset) = i64::try_from(flight.offset) else { return self.finish(slot, flight, false) };
        flight.iovecs.0.clear();
        flight.iovecs.0.extend(flight.rest.iter().take(IOV_MAX).map(|s| libc::iovec { iov_base: s.ptr.cast(), iov_len: s.len }));
        let (iov, count) = (flight.iovecs.0.as_ptr(), flight.iovecs.0.len() as u32); // at most IOV_MAX
        let fd = types::Fd(flight.fd);
        let entry = if flight.write {
            opcode::Writev::new(fd, iov, count).offset(offset as u64).build()
        } else {
            opcode::Readv::new(fd, iov, count).offset(offset as u64).build()
        }
        .user_data(slot as u64);
        let Some(place) = self.slots.get_mut(slot) else { return self.finish(slot, flight, false) };
        *place = Some(flight);
        // SAFETY: the entry's iovecs live in the flight's Vec, whose buffer stays put
        // (the flight is only moved, never its Vec's heap allocation) and is kept in
        // `slots` until the completion for this slot is reaped; each iovec addresses
        // guest RAM that the flight's job keeps mapped (it holds the GuestMemoryMmap).
        // The kernel writes only into the buffers of a read and only reads a write's.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // Cannot happen: a slot per submission entry. Fail the request, never leak it.
            if let Some(flight) = self.slots.get_mut(slot).and_then(Option::take) {
                self.finish(slot, flight, false);
            }
        }
    }

    /// Submits what is queued; with `wait`, also waits for that many completions.
    /// Errors are left for the next call (the entries stay queued), except EINTR;
    /// returns whether the kernel took the call.
    fn enter(&mut self, wait: usize) -> bool {
        for _ in 0..MAX_RETRIES {
            match self.ring.submit_and_wait(wait) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r.is_ok(),
            }
        }
        false
    }

    /// Finishes a request: status byte, completion, slot freed.
    fn finish(&mut self, slot: usize, flight: Flight, ok: bool) {
        let outcome = settle(&flight.job, ok);
        let head = flight.job.head;
        drop(flight); // guest memory is no longer touched past this point
        self.done.push(Completion { queue: 0, head, outcome });
        self.in_flight = self.in_flight.saturating_sub(1);
        self.free.push(slot);
    }

    /// Handles the completions the kernel posted; short transfers and EINTR/EAGAIN are
    /// submitted again for the rest (each round moves bytes or counts a retry).
    fn reap(&mut self) {
        // At most a ring's worth of entries is posted at once: collect, then handle.
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (data, result) in cqes {
            let slot = usize::try_from(data).unwrap_or(usize::MAX);
            let Some(mut flight) = self.slots.get_mut(slot).and_then(Option::take) else { continue };
            match result {
                n if n > 0 => {
                    advance(&mut flight.rest, n as usize);
                    flight.offset += n as u64;
                    self.start(slot, flight);
                }
                0 => self.finish(slot, flight, false), // the file shrank under us
                e if (e == -libc::EINTR || e == -libc::EAGAIN) && flight.retries < MAX_RETRIES => {
                    flight.retries += 1;
                    self.start(slot, flight);
                }
                _ => self.finish(slot, flight, false),
            }
        }
        let _ = self.enter(0);
    }

    /// The completions posted so far (the eventfd said so).
    pub fn take_done(&mut self) -> Vec<Completion> {
        let _ = self.event.read();
        self.reap();
        std::mem::take(&mut self.done)
    }

    /// Waits until nothing is in flight, then returns every completion. After this the
    /// kernel touches no guest memory for this ring until the next submit.
    pub fn quiesce(&mut self) -> Vec<Completion> {
        // Each round reaps at least one completion or waits for one: requests end.
        while self.in_flight > 0 {
            self.reap();
            if self.in_flight > 0 && !self.enter(1) {
                // Out of kernel resources for a moment (EAGAIN): no busy loop meanwhile.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let _ = self.event.read();
        std::mem::take(&mut self.done)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel must be done with guest memory before the mapping can go.
        drop(self.quiesce());
    }
}

/// Drops the first `n` bytes of `rest`.
fn advance(rest: &mut Vec<HostSlice>, mut n: usize) {
    let mut whole = 0;
    for s in rest.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= s.len {
            n -= s.len;
            whole += 1;
        } else {
            // SAFETY: `n < s.len`, so the pointer stays inside the same buffer.
            s.ptr = unsafe { s.ptr.add(n) };
            s.len -= n;
            n = 0;
        }
    }
    rest.drain(..whole);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    const STATUS: u64 = 0x8000;

    fn job(mem: &GuestMemoryMmap, head: u16, write: bool, bufs: &[(u64, usize)], offset: u64) -> Job {
        let iov = bufs.iter().map(|&(a, len)| {
            let (region, at) = mem.to_region_addr(GuestAddress(a)).unwrap();
            HostSlice { ptr: region.get_host_address(at).unwrap(), len }
        }).collect();
        let op = if write { Op::Write { iov, offset, direct: false } } else { Op::Read { iov, offset, direct: false } };
        let bytes = bufs.iter().map(|b| b.1 as u64).sum();
        Job { op, head, status: GuestAddress(STATUS + u64::from(head)), used_len: 1, bytes, mem: mem.clone() }
    }

    #[test]
    fn reads_and_writes_across_buffers_and_a_read_past_the_end_fails() {
        let Ok(mut ring) = Ring::new(8) else { return }; // no io_uring here: the pool serves
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().write_all(&[0u8; 16384]).unwrap();
        let fd = t.as_file().as_raw_fd();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let pattern: Vec<u8> = (0..6000u32).map(|i| (i % 241) as u8 + 1).collect();
        mem.write_slice(&pattern, GuestAddress(0x1000)).unwrap();
        ring.submit(job(&mem, 0, true, &[(0x1000, 1000), (0x1000 + 1000, 5000)], 512), fd).ok().unwrap();
        assert_eq!(ring.quiesce().len(), 1);
        assert_eq!(ring.in_flight(), 0);
        // Read back into other buffers, and a read that runs past the file's end.
        ring.submit(job(&mem, 1, false, &[(0x4000, 3000), (0x6000, 3000)], 512), fd).ok().unwrap();
        ring.submit(job(&mem, 2, false, &[(0x9000, 8192)], 12288), fd).ok().unwrap();
        let mut done = ring.quiesce();
        done.sort_by_key(|c| c.head);
        assert_eq!(done.iter().map(|c| c.head).collect::<Vec<_>>(), [1, 2]);
        let mut back = vec![0u8; 6000];
        mem.read_slice(&mut back[..3000], GuestAddress(0x4000)).unwrap();
        mem.read_slice(&mut back[3000..], GuestAddress(0x6000)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 2)).unwrap(), VIRTIO_BLK_S_IOERR as u8, "EOF is an error");
    }

    #[test]
    fn a_full_ring_hands_the_job_back_and_other_ops_are_not_taken() {
        let Ok(mut ring) = Ring::new(1) else { return };
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().write_all(&[7u8; 8192]).unwrap();
        let fd = t.as_file().as_raw_fd();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let slots = ring.slots.len();
        for head in 0..slots as u16 {
            assert!(ring.submit(job(&mem, head, false, &[(0x1000, 512)], 0), fd).is_ok());
        }
        assert!(ring.submit(job(&mem, 99, false, &[(0x1000, 512)], 0), fd).is_err(), "no free slot");
        let flush = Job { op: Op::Flush, ..job(&mem, 100, false, &[], 0) };
        assert!(!Ring::takes(&flush.op));
        assert!(ring.submit(flush, fd).is_err());
        assert_eq!(ring.quiesce().len(), slots);
    }

    #[test]
    fn advance_drops_whole_and_partial_buffers() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut rest = vec![HostSlice { ptr: a.as_mut_ptr(), len: 8 }, HostSlice { ptr: b.as_mut_ptr(), len: 8 }];
        advance(&mut rest, 11);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].len, 5);
        assert_eq!(rest[0].ptr, b[3..].as_mut_ptr());
        advance(&mut rest, 5);
        assert!(rest.is_empty());
        advance(&mut rest, 3); // more than is left: nothing to drop
        assert!(rest.is_empty());
    }
}
