//! The batched ring: calls the guest queues in its own memory and skiff runs in one
//! go, when the guest rings the doorbell (an ioeventfd: no exit; skiff's event loop
//! runs them) or calls HC_RING_FLUSH (a full ring).
//!
//! Layout, one page of guest RAM at a page-aligned guest-physical address:
//!
//! | offset | size      | who writes | what                                          |
//! |--------|-----------|------------|-----------------------------------------------|
//! | 0      | u32       | guest      | head: entries queued so far (free-running)    |
//! | 4      | u32       | skiff      | tail: entries consumed so far (free-running)  |
//! | 8      | u32       | skiff      | the last refusal (a KVM error number), or 0   |
//! | 64     | 64 x u8   | both       | status per slot: 0 free, 1 queued, 2 done     |
//! | 128    | 64 x 48 B | guest/skiff| entry: nr, RBX, RCX, RDX, RSI, result (u64)   |
//!
//! Everything the guest writes is hostile: skiff keeps its own tail (the guest's copy
//! is only for the guest to read), runs at most `head - tail` entries when that is at
//! most 64 (else nothing: a wrapped or runaway head), stops at the first slot not
//! marked queued, and copies each entry once before using it, so a guest changing the
//! ring while skiff reads it changes nothing skiff decides with. The ring page is
//! checked to be RAM once, at registration; every access is still a checked one.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{KVM_E2BIG, KVM_EFAULT, KVM_EINVAL};

pub const ENTRIES: usize = 64;
pub const HEAD: u64 = 0;
pub const TAIL: u64 = 4;
pub const ERROR: u64 = 8;
pub const STATUS: u64 = 64;
pub const ENTRY: u64 = 128;
pub const ENTRY_SIZE: u64 = 48;
pub const FREE: u8 = 0;
pub const QUEUED: u8 = 1;
pub const DONE: u8 = 2;
const PAGE: u64 = 4096;

/// The registered ring, as skiff knows it.
#[derive(Debug, Default)]
pub struct Ring {
    gpa: Option<u64>,
    /// Entries consumed: skiff's own count, never read back from the guest.
    tail: u32,
}

impl Ring {
    pub fn gpa(&self) -> Option<u64> {
        self.gpa
    }
    pub fn tail(&self) -> u32 {
        self.tail
    }

    /// From a snapshot: kept only if it is still a valid registration.
    pub fn restored(mem: &GuestMemoryMmap, gpa: u64, tail: u32) -> Self {
        let mut r = Ring::default();
        if gpa != 0 && r.register(mem, gpa) == 0 {
            r.tail = tail;
        }
        r
    }

    /// HC_RING_SET: `gpa` must be a page-aligned page of RAM (0 unregisters). The
    /// guest's head is taken as the start (tail = head), so a ring re-registered
    /// with entries in it does not run stale ones.
    pub fn register(&mut self, mem: &GuestMemoryMmap, gpa: u64) -> i64 {
        if gpa == 0 {
            *self = Ring::default();
            return 0;
        }
        let ram = gpa.checked_add(PAGE - 1).is_some_and(|last| mem.address_in_range(GuestAddress(gpa)) && mem.address_in_range(GuestAddress(last)));
        if !gpa.is_multiple_of(PAGE) || !ram || (super::PAGE_GPA..super::PAGE_GPA + PAGE).contains(&gpa) {
            return -KVM_EINVAL;
        }
        // A page across two memory regions would be two host mappings: refuse it too.
        if mem.get_slice(GuestAddress(gpa), PAGE as usize).is_err() {
            return -KVM_EFAULT;
        }
        let Ok(head) = mem.read_obj::<u32>(GuestAddress(gpa + HEAD)) else { return -KVM_EFAULT };
        self.gpa = Some(gpa);
        self.tail = head;
        let _ = mem.write_obj(self.tail, GuestAddress(gpa + TAIL));
        let _ = mem.write_obj(0u32, GuestAddress(gpa + ERROR));
        0
    }

    /// Runs the queued entries through `call`; returns how many ran, or a negated
    /// KVM error when the ring was refused (nothing unsafe was run).
    pub fn flush(&mut self, mem: &GuestMemoryMmap, mut call: impl FnMut(u64, [u64; 4]) -> u64) -> i64 {
        let Some(gpa) = self.gpa else { return -KVM_EINVAL };
        let refuse = |code: i64| {
            let _ = mem.write_obj(code as u32, GuestAddress(gpa + ERROR));
            -code
        };
        let Ok(head) = mem.read_obj::<u32>(GuestAddress(gpa + HEAD)) else { return refuse(KVM_EFAULT) };
        let pending = head.wrapping_sub(self.tail);
        if pending as usize > ENTRIES {
            return refuse(KVM_E2BIG);
        }
        let mut ran = 0i64;
        let mut error = 0;
        for _ in 0..pending {
            let slot = u64::from(self.tail % ENTRIES as u32);
            let status_at = GuestAddress(gpa + STATUS + slot);
            match mem.read_obj::<u8>(status_at) {
                Ok(QUEUED) => {}
                Ok(_) => {
                    error = KVM_EINVAL;
                    break;
                }
                Err(_) => {
                    error = KVM_EFAULT;
                    break;
                }
            }
            // The entry after its status (the guest wrote it before marking it queued).
            fence(Ordering::Acquire);
            let entry_at = gpa + ENTRY + slot * ENTRY_SIZE;
            let Ok(e) = mem.read_obj::<[u64; 5]>(GuestAddress(entry_at)) else {
                error = KVM_EFAULT;
                break;
            };
            let [nr, a, b, c, d] = e;
            let result = call(nr, [a, b, c, d]);
            let _ = mem.write_obj(result, GuestAddress(entry_at + 40));
            // The result before its status.
            fence(Ordering::Release);
            let _ = mem.write_obj(DONE, status_at);
            self.tail = self.tail.wrapping_add(1);
            ran += 1;
        }
        let _ = mem.write_obj(self.tail, GuestAddress(gpa + TAIL));
        if error != 0 {
            return refuse(error);
        }
        ran
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    const RAM: u64 = 1 << 20;
    const R: u64 = 0x8000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn queue(m: &GuestMemoryMmap, index: u32, nr: u64, arg: u64) {
        let slot = u64::from(index % ENTRIES as u32);
        m.write_obj([nr, arg, 0, 0, 0, 0], GuestAddress(R + ENTRY + slot * ENTRY_SIZE)).unwrap();
        m.write_obj(QUEUED, GuestAddress(R + STATUS + slot)).unwrap();
        m.write_obj(index.wrapping_add(1), GuestAddress(R + HEAD)).unwrap();
    }

    fn result(m: &GuestMemoryMmap, index: u32) -> (u8, u64) {
        let slot = u64::from(index % ENTRIES as u32);
        (m.read_obj(GuestAddress(R + STATUS + slot)).unwrap(), m.read_obj(GuestAddress(R + ENTRY + slot * ENTRY_SIZE + 40)).unwrap())
    }

    #[test]
    fn registration_is_checked() {
        let m = mem();
        let mut r = Ring::default();
        assert_eq!(r.register(&m, R + 8), -KVM_EINVAL, "unaligned");
        assert_eq!(r.register(&m, RAM), -KVM_EINVAL, "outside RAM");
        assert_eq!(r.register(&m, RAM - 4096 + 4096 * 16), -KVM_EINVAL);
        assert_eq!(r.register(&m, !0xfff), -KVM_EINVAL, "wraps");
        assert_eq!(r.register(&m, super::super::PAGE_GPA), -KVM_EINVAL, "the hypercall page");
        assert_eq!(r.flush(&m, |_, _| 0), -KVM_EINVAL, "nothing registered");
        assert_eq!(r.register(&m, R), 0);
        assert_eq!(r.gpa(), Some(R));
        assert_eq!(r.register(&m, 0), 0);
        assert_eq!(r.gpa(), None);
    }

    #[test]
    fn runs_what_is_queued_across_the_wrap() {
        let m = mem();
        let mut r = Ring::default();
        // Start near the u32 wrap: the indices are free-running.
        m.write_obj(u32::MAX - 2, GuestAddress(R + HEAD)).unwrap();
        assert_eq!(r.register(&m, R), 0);
        for i in 0..5u32 {
            queue(&m, (u32::MAX - 2).wrapping_add(i), 7, u64::from(i));
        }
        let mut seen = Vec::new();
        assert_eq!(r.flush(&m, |nr, a| { seen.push((nr, a[0])); a[0] * 10 }), 5);
        assert_eq!(seen, (0..5).map(|i| (7, i)).collect::<Vec<_>>());
        for i in 0..5u32 {
            assert_eq!(result(&m, (u32::MAX - 2).wrapping_add(i)), (DONE, u64::from(i) * 10));
        }
        assert_eq!(r.tail(), 2);
        assert_eq!(m.read_obj::<u32>(GuestAddress(R + TAIL)).unwrap(), 2);
        assert_eq!(r.flush(&m, |_, _| panic!("nothing is queued")), 0, "a second flush runs nothing again");
    }

    #[test]
    fn hostile_rings_are_refused() {
        let m = mem();
        let mut r = Ring::default();
        assert_eq!(r.register(&m, R), 0);
        // A head far past the tail (a count past the end): nothing runs.
        m.write_obj(65u32, GuestAddress(R + HEAD)).unwrap();
        assert_eq!(r.flush(&m, |_, _| panic!("must not run")), -KVM_E2BIG);
        assert_eq!(m.read_obj::<u32>(GuestAddress(R + ERROR)).unwrap(), KVM_E2BIG as u32);
        // A head behind the tail (wrapping backwards) is a huge count too.
        m.write_obj(u32::MAX, GuestAddress(R + HEAD)).unwrap();
        assert_eq!(r.flush(&m, |_, _| panic!("must not run")), -KVM_E2BIG);
        // Announced but not marked queued: stops there, what came before ran.
        queue(&m, 0, 1, 0);
        m.write_obj(2u32, GuestAddress(R + HEAD)).unwrap();
        let mut n = 0;
        assert_eq!(r.flush(&m, |_, _| { n += 1; 0 }), -KVM_EINVAL);
        assert_eq!((n, r.tail()), (1, 1));
        // Exactly 64 is fine.
        for i in 1..65u32 {
            queue(&m, i, 1, 0);
        }
        assert_eq!(r.flush(&m, |_, _| 0), 64);
    }

    #[test]
    fn an_entry_changing_while_read_is_used_as_first_read() {
        let m = mem();
        let mut r = Ring::default();
        assert_eq!(r.register(&m, R), 0);
        queue(&m, 0, 5, 1);
        queue(&m, 1, 5, 2);
        // The call for entry 0 rewrites entry 0 and un-queues entry 1, as a second
        // vCPU of the guest could while skiff reads: entry 0's copy is what ran, and
        // entry 1 is no longer queued, so it does not run.
        let mut args = Vec::new();
        let ret = r.flush(&m, |_, a| {
            args.push(a[0]);
            m.write_obj([9u64, 9, 9, 9, 9], GuestAddress(R + ENTRY)).unwrap();
            m.write_obj(FREE, GuestAddress(R + STATUS + 1)).unwrap();
            0
        });
        assert_eq!(args, vec![1]);
        assert_eq!(ret, -KVM_EINVAL);
    }

    #[test]
    fn a_restored_ring_must_still_be_valid() {
        let m = mem();
        assert_eq!(Ring::restored(&m, R, 7).tail(), 7);
        assert_eq!(Ring::restored(&m, RAM + 4096, 7).gpa(), None);
        assert_eq!(Ring::restored(&m, 0, 7).gpa(), None);
    }
}
