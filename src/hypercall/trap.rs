//! Paths (a) and (c): the raw hypercall site, trapped and emulated, and patched.
//!
//! The raw site is `int3` followed by `nopl DISP(%rax)`: cc 0f 1f 40 DISP, five
//! bytes, with DISP = [`MARK_PATCH`] ('S': skiff may rewrite this site) or
//! [`MARK_KEEP`] ('U': always trap, for code skiff must not write, and to measure).
//! Why this instruction: on this host `vmcall`/`vmmcall` at CPL 0 never come back
//! from KVM_RUN (and with KVM's FIX_HYPERCALL_INSN quirk off they raise #UD inside
//! the guest without an exit), while `int3` at CPL 0 fails KVM's emulator and reaches
//! skiff as an emulation failure, which skiff already fetches through the guest's
//! page tables and decodes. The nop makes the site five bytes: room for a `call
//! rel32`, as lguest and KVM pad theirs. The pair is one no compiler emits, so a
//! guest's own `int3` (a debugger, kprobes) is still delivered as #BP.
//!
//! The patch is made with every vCPU paused: the vCPU that trapped queues it and
//! wakes the event loop, which pauses all vCPUs, checks the site still holds the raw
//! bytes, writes the new five bytes, and resumes. A paused vCPU is never inside the
//! site (a trapped one has already moved RIP past it), so no fetch sees half a patch.

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Hypercalls, PAGE_GPA, PORT_PATCHED, PORT_PATCHED32, Path, STUB_PATCHED, STUB_PATCHED32, Width};
use crate::x86::paging::{self, Access, PagingContext, Translation};

pub const SITE_LEN: usize = 5;
pub const MARK_PATCH: u8 = b'S';
pub const MARK_KEEP: u8 = b'U';
/// At most this many patches wait for the event loop; more are dropped (the site
/// traps again and asks again).
const MAX_PENDING: usize = 64;

/// Whether `bytes` start with a raw site; Some(may patch).
pub fn raw_site(bytes: &[u8]) -> Option<bool> {
    match bytes.get(..SITE_LEN)? {
        [0xcc, 0x0f, 0x1f, 0x40, m] if *m == MARK_PATCH => Some(true),
        [0xcc, 0x0f, 0x1f, 0x40, m] if *m == MARK_KEEP => Some(false),
        _ => None,
    }
}

/// The patched stub's offset in the page and its port, for a site in `width`'s code.
pub fn patched_stub(width: Width) -> (u64, u16) {
    match width {
        Width::Bits64 => (STUB_PATCHED, PORT_PATCHED),
        Width::Bits32 => (STUB_PATCHED32, PORT_PATCHED32),
    }
}

/// The bytes a patched site gets: `call rel32` to the patched stub (`stub_va`, that
/// of `width`) where the guest said where it mapped the page and that is in reach,
/// else the stub's `out` inline followed by a 3-byte nop. In 32-bit code EIP wraps
/// at 4 GiB, so every target is in reach.
pub fn patched_bytes(site_va: u64, stub_va: Option<u64>, width: Width) -> [u8; SITE_LEN] {
    if let Some(stub) = stub_va {
        let rel = stub.wrapping_sub(site_va.wrapping_add(SITE_LEN as u64));
        let rel = match width {
            Width::Bits64 => i32::try_from(rel as i64).ok(),
            Width::Bits32 => Some(rel as u32 as i32),
        };
        if let Some(rel) = rel {
            let r = rel.to_le_bytes();
            return [0xe8, r[0], r[1], r[2], r[3]];
        }
    }
    [0xe6, patched_stub(width).1 as u8, 0x0f, 0x1f, 0x00]
}

/// One site rewrite waiting for the event loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patch {
    pub gpa: u64,
    pub old: [u8; SITE_LEN],
    pub new: [u8; SITE_LEN],
}

#[derive(Default)]
pub struct PatchQueue(Mutex<Vec<Patch>>);

impl PatchQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Patch>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Queues a patch (once per site); false when the queue is full.
    pub fn push(&self, p: Patch) -> bool {
        let mut q = self.lock();
        if q.iter().any(|x| x.gpa == p.gpa) {
            return true;
        }
        if q.len() >= MAX_PENDING {
            return false;
        }
        q.push(p);
        true
    }
    pub fn take(&self) -> Vec<Patch> {
        std::mem::take(&mut *self.lock())
    }
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// Writes each patch whose site still holds its old bytes. Call with every vCPU
/// paused. Returns (written, refused).
pub fn apply(mem: &GuestMemoryMmap, patches: &[Patch]) -> (u64, u64) {
    let (mut done, mut refused) = (0, 0);
    for p in patches {
        let mut now = [0u8; SITE_LEN];
        if mem.read_slice(&mut now, GuestAddress(p.gpa)).is_ok() && now == p.old && mem.write_slice(&p.new, GuestAddress(p.gpa)).is_ok() {
            done += 1;
        } else {
            refused += 1;
        }
    }
    (done, refused)
}

/// A raw site trapped on a vCPU (an emulation failure at CPL 0 with the site's bytes at
/// RIP, `site_va` its linear address, `width` the vCPU's mode): runs the call, moves
/// RIP past the site (EIP wraps at 4 GiB in 32-bit code), and queues the site's
/// patch if it asks for one. Returns the registers to set.
pub fn on_trap(h: &Hypercalls, mem: &GuestMemoryMmap, regs: &kvm_regs, ctx: &PagingContext, site_va: u64, patch: bool, width: Width) -> kvm_regs {
    let mut out = *regs;
    out.rax = h.call_regs(Path::Trapped, width, regs);
    out.rip = width.mask(regs.rip.wrapping_add(SITE_LEN as u64));
    if patch {
        queue_patch(h, mem, ctx, site_va, width);
    }
    out
}

fn queue_patch(h: &Hypercalls, mem: &GuestMemoryMmap, ctx: &PagingContext, site_va: u64, width: Width) {
    let refuse = || {
        h.counters.patches_refused.fetch_add(1, Ordering::Relaxed);
    };
    // The site must be on one page (one physical run to rewrite).
    if site_va & 0xfff > 0x1000 - SITE_LEN as u64 {
        return refuse();
    }
    let Translation::Ok(gpa) = paging::translate(mem, ctx, site_va, Access::Execute) else { return refuse() };
    // The stub's address, where the guest registered the page's and it really maps
    // the page there (this vCPU's page tables), executable.
    let (stub_off, _) = patched_stub(width);
    let stub = h.page_va().map(|va| width.mask(va.wrapping_add(stub_off))).filter(|&va| {
        matches!(paging::translate(mem, ctx, va, Access::Execute), Translation::Ok(g) if g == PAGE_GPA + stub_off)
    });
    let mut old = [0u8; SITE_LEN];
    if mem.read_slice(&mut old, GuestAddress(gpa)).is_err() || raw_site(&old) != Some(true) {
        return refuse();
    }
    let p = Patch { gpa, old, new: patched_bytes(site_va, stub, width) };
    if h.patches.push(p) {
        crate::control::wake_event_loop();
    } else {
        refuse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_are_recognised_exactly() {
        assert_eq!(raw_site(&[0xcc, 0x0f, 0x1f, 0x40, b'S', 0x90]), Some(true));
        assert_eq!(raw_site(&[0xcc, 0x0f, 0x1f, 0x40, b'U']), Some(false));
        assert_eq!(raw_site(&[0xcc, 0x0f, 0x1f, 0x40, 0x00]), None, "another nop after int3");
        assert_eq!(raw_site(&[0xcc, 0xcc, 0xcc, 0xcc, 0xcc]), None, "int3 padding");
        assert_eq!(raw_site(&[0xcc, 0x0f, 0x1f, 0x40]), None, "too short");
    }

    #[test]
    fn patches_call_the_stub_or_inline_it() {
        // A call forward and backward, rel32 from the end of the site.
        assert_eq!(patched_bytes(0x10_0000, Some(0xdf010), Width::Bits64), {
            let r = (0xdf010i64 - 0x10_0005) as i32;
            let b = r.to_le_bytes();
            [0xe8, b[0], b[1], b[2], b[3]]
        });
        // RIP-relative targets wrap at 64 bits: the top 2 GiB reach the bottom 2 GiB.
        assert_eq!(patched_bytes(0xffff_ffff_8100_0000, Some(0x1000), Width::Bits64)[0], 0xe8);
        // Out of reach (the direct map, the page mapped low): inline.
        assert_eq!(patched_bytes(0xffff_8880_0000_0000, Some(0x1000), Width::Bits64), [0xe6, PORT_PATCHED as u8, 0x0f, 0x1f, 0x00]);
        assert_eq!(patched_bytes(0x1000, None, Width::Bits64), [0xe6, PORT_PATCHED as u8, 0x0f, 0x1f, 0x00]);
    }

    #[test]
    fn a_32_bit_site_gets_the_32_bit_stub() {
        // The 32-bit patched stub, rel32 from the end of the site.
        let b = ((0xdf030i64 - 0x10_0005) as i32).to_le_bytes();
        assert_eq!(patched_bytes(0x10_0000, Some(0xdf030), Width::Bits32), [0xe8, b[0], b[1], b[2], b[3]]);
        // EIP wraps at 4 GiB: a site near the top reaches a stub near the bottom, and
        // one 3 GiB below its stub reaches it (the 64-bit rule would inline both).
        let b = (0x1030u32.wrapping_sub(0xffff_f005) as i32).to_le_bytes();
        assert_eq!(patched_bytes(0xffff_f000, Some(0x1030), Width::Bits32), [0xe8, b[0], b[1], b[2], b[3]]);
        assert_eq!(patched_bytes(0xc000_0000, Some(0x1030), Width::Bits64)[0], 0xe6);
        assert_eq!(patched_bytes(0xc000_0000, Some(0x1030), Width::Bits32)[0], 0xe8);
        // Inline: the 32-bit patched port.
        assert_eq!(patched_bytes(0x1000, None, Width::Bits32), [0xe6, PORT_PATCHED32 as u8, 0x0f, 0x1f, 0x00]);
        assert_eq!(patched_stub(Width::Bits32), (STUB_PATCHED32, PORT_PATCHED32));
        assert_eq!(patched_stub(Width::Bits64), (STUB_PATCHED, PORT_PATCHED));
    }

    #[test]
    fn the_queue_is_bounded_and_apply_checks_the_old_bytes() {
        let q = PatchQueue::default();
        let p = |gpa| Patch { gpa, old: [0xcc, 0x0f, 0x1f, 0x40, b'S'], new: [0xe6, 0x9b, 0x0f, 0x1f, 0x00] };
        assert!(q.push(p(0x1000)));
        assert!(q.push(p(0x1000)), "a second request for the same site is one patch");
        for i in 1..MAX_PENDING as u64 {
            assert!(q.push(p(0x1000 + i * 8)));
        }
        assert!(!q.push(p(0x9000)), "full");
        let all = q.take();
        assert_eq!(all.len(), MAX_PENDING);
        assert!(q.is_empty());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        mem.write_slice(&p(0).old, GuestAddress(0x1000)).unwrap();
        // 0x1008 holds zeroes (the guest changed it since): refused, left alone.
        assert_eq!(apply(&mem, &[p(0x1000), p(0x1008), p(1 << 20)]), (1, 2));
        let mut now = [0u8; 5];
        mem.read_slice(&mut now, GuestAddress(0x1000)).unwrap();
        assert_eq!(now, p(0).new);
        mem.read_slice(&mut now, GuestAddress(0x1008)).unwrap();
        assert_eq!(now, [0; 5]);
    }
}
