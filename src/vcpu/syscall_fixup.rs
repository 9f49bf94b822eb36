//! Completing SYSCALL where KVM leaves it half done.
//!
//! On some KVMs (PVM, where guest kernel mode is emulated and guest user mode runs
//! natively), a guest user-mode `syscall` sets RIP = LSTAR, RCX and R11 but does not
//! switch to kernel mode when LSTAR is in the upper half, as Linux's entry point is:
//! the fetch at LSTAR then faults as a user access, the guest kernel gets a #PF
//! from "user mode" at its own syscall entry, and every process dies of SIGSEGV on
//! its first system call. The instruction probe (vcpu/probe.rs) detects this at run
//! time; only then does skiff arm this fix-up.
//!
//! How: exceptions from user mode are delivered correctly, so skiff puts a hardware
//! breakpoint (KVM_SET_GUEST_DEBUG) on the guest's #PF handler, read from the IDT
//! when the guest writes LSTAR (an MSR-filter exit). When the breakpoint hits, the
//! exception frame says whether this #PF is a syscall gone wrong. If so, skiff
//! discards the frame and gives the vCPU the state SYSCALL should have produced: CS
//! and SS from STAR, RIP = LSTAR, RSP unchanged, RFLAGS = R11 & ~SFMASK (RCX and R11
//! are already right). Any other #PF continues into the handler: skiff steps over
//! the handler's first instruction (emulating it when it is a no-op, else with one
//! single step) and re-arms the breakpoint.
//!
//! A guest user can make a fault that looks like one: jump to LSTAR with RCX and R11
//! of its choosing. Completing that would enter the kernel with flags the user chose
//! (IOPL 3 in R11 comes back to user mode through SYSRET). So a fault counts as a
//! half-done SYSCALL only when everything a real one leaves agrees ([`is_half_done_syscall`]):
//! an instruction fetch from CPL 3 at CR2 = LSTAR, the bytes before RCX are `0f 05`
//! in user-executable memory, and R11 is the user's own RFLAGS (as pushed in the
//! frame). What passes all of these is exactly a SYSCALL the user could have executed
//! at RCX - 2; anything else is delivered to the guest as the #PF it is.
//!
//! Cost: one exit per guest page fault and per syscall, small beside the emulated
//! kernel work of either. While armed, the guest's own hardware breakpoints are
//! not available to it (guest debugging owns DR0-DR7); a gdb client gets the other
//! three (vcpu/debug.rs).

use iced_x86::Mnemonic;
use kvm_bindings::{Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::GuestMemoryMmap;

use super::Vcpu;
use crate::x86::insn;
use crate::x86::paging::{self, PagingContext, Translation};

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_SFMASK: u32 = 0xc000_0084;
const PF_VECTOR: u64 = 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_DF: u64 = 1 << 10;

/// Per-vCPU state of the fix-up.
#[derive(Debug, Default)]
pub struct SyscallFixup {
    /// The guest's syscall entry (LSTAR), once it has written it.
    lstar: Option<u64>,
    /// The guest's #PF handler, where the breakpoint sits.
    pf_handler: Option<u64>,
    /// Single-stepping over the handler's first instruction.
    stepping: bool,
    pub completed: u64,
    pub passed_on: u64,
}

impl SyscallFixup {
    /// The guest wrote LSTAR (a filtered MSR): write it for real, find the #PF
    /// handler and arm the breakpoint.
    pub fn on_lstar_write(vcpu: &mut Vcpu, value: u64) -> Result<(), String> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_LSTAR, data: value, ..Default::default() }])
            .map_err(|e| format!("LSTAR: {e:?}"))?;
        vcpu.fd.set_msrs(&msrs).map_err(|e| format!("KVM_SET_MSRS (LSTAR): {e}"))?;
        let sregs = vcpu.fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        let handler = pf_handler(&vcpu.mem, &sregs);
        let Some(fixup) = vcpu.syscall_fixup.as_mut() else { return Ok(()) };
        fixup.lstar = Some(value);
        fixup.pf_handler = handler;
        match handler {
            Some(h) => arm(vcpu, h),
            // No readable IDT yet: user mode cannot run either. The next LSTAR write
            // (every vCPU makes one) tries again.
            None => Ok(()),
        }
    }

    /// A KVM_EXIT_DEBUG while the fix-up is armed.
    pub fn on_debug(vcpu: &mut Vcpu) -> Result<(), String> {
        let Some(fixup) = vcpu.syscall_fixup.as_mut() else { return Ok(()) };
        let (Some(lstar), Some(handler)) = (fixup.lstar, fixup.pf_handler) else { return Ok(()) };
        if fixup.stepping {
            fixup.stepping = false;
            return arm(vcpu, handler);
        }
        let mut regs = vcpu.fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let mut sregs = vcpu.fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        if regs.rip != handler {
            return Ok(());
        }
        // Only a user-mode fault at LSTAR is worth reading STAR and SFMASK for.
        let candidate = read_frame(&vcpu.mem, &sregs, regs.rsp).filter(|f| f.rip == lstar && f.cs & 3 == 3);
        let syscall = match candidate {
            Some(frame) => {
                let (star, sfmask) = read_star_sfmask(vcpu)?;
                is_half_done_syscall(&vcpu.mem, &frame, &regs, &sregs, lstar, sfmask, vcpu.maxphyaddr).then_some((frame, star, sfmask))
            }
            None => None,
        };
        match syscall {
            Some((frame, star, sfmask)) => {
                complete_syscall(vcpu, &mut regs, &mut sregs, frame.rsp, lstar, star, sfmask)?;
                if let Some(f) = vcpu.syscall_fixup.as_mut() {
                    f.completed += 1;
                }
                Ok(())
            }
            _ => {
                if let Some(f) = vcpu.syscall_fixup.as_mut() {
                    f.passed_on += 1;
                }
                step_over(vcpu, &mut regs, &sregs)
            }
        }
    }
}

/// STAR and SFMASK, from KVM.
fn read_star_sfmask(vcpu: &Vcpu) -> Result<(u64, u64), String> {
    let mut msrs = Msrs::from_entries(&[
        kvm_msr_entry { index: MSR_STAR, ..Default::default() },
        kvm_msr_entry { index: MSR_SFMASK, ..Default::default() },
    ])
    .map_err(|e| format!("{e:?}"))?;
    let n = vcpu.fd.get_msrs(&mut msrs).map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
    match msrs.as_slice() {
        [s, f] if n == 2 => Ok((s.data, f.data)),
        _ => Err("KVM_GET_MSRS: STAR/SFMASK not read".into()),
    }
}

/// Points the fix-up's debug register at `addr` (vcpu/debug.rs owns the setting).
fn arm(vcpu: &mut Vcpu, addr: u64) -> Result<(), String> {
    use super::debug::{HwBreak, HwKind, Owner};
    let slot = vcpu.debug.slot_of(Owner::SyscallFixup).ok_or("SYSCALL fix-up: no debug register reserved for it")?;
    vcpu.debug.fixup_stepping = false;
    vcpu.debug.set(slot, Owner::SyscallFixup, Some(HwBreak { addr, kind: HwKind::Execute, len: 1 }));
    vcpu.apply_guest_debug()
}

/// The #PF gate's target in the guest's IDT (64-bit gates, 16 bytes each).
fn pf_handler(mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> Option<u64> {
    if (sregs.idt.limit as u64) < PF_VECTOR * 16 + 15 {
        return None;
    }
    let mut gate = [0u8; 16];
    read_virt(mem, sregs, sregs.idt.base.wrapping_add(PF_VECTOR * 16), &mut gate)?;
    let lo = u64::from_le_bytes(gate[0..8].try_into().ok()?);
    let hi = u64::from_le_bytes(gate[8..16].try_into().ok()?);
    let present = lo & (1 << 47) != 0;
    present.then_some((lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi & 0xffff_ffff) << 32)
}

/// The 64-bit exception frame with an error code, as pushed at `rsp`.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
}

// #PF error-code bits (SDM vol. 3, 4.7).
const PF_WRITE: u64 = 1 << 1;
const PF_USER: u64 = 1 << 2;
const PF_RSVD: u64 = 1 << 3;
const PF_FETCH: u64 = 1 << 4;
/// RFLAGS bits no SYSCALL leaves different between R11 and the pushed frame: RF is
/// set by the fault delivery itself, so it is not compared.
const RFLAGS_COMPARED: u64 = !RFLAGS_RF;

/// Whether the #PF whose frame this is was raised by a SYSCALL that jumped to LSTAR
/// without leaving user mode, and not by a user jumping there itself (module notes).
fn is_half_done_syscall(
    mem: &GuestMemoryMmap,
    frame: &Frame,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    lstar: u64,
    sfmask: u64,
    maxphyaddr: u8,
) -> bool {
    let fetch_from_user = frame.error & (PF_USER | PF_FETCH) == PF_USER | PF_FETCH
        && frame.error & (PF_WRITE | PF_RSVD) == 0;
    if frame.rip != lstar || frame.cs & 3 != 3 || sregs.cr2 != lstar || !fetch_from_user {
        return false;
    }
    // SYSCALL copies RFLAGS into R11; where KVM also applied SFMASK before the fault,
    // the frame holds the masked value.
    let flags = frame.rflags & RFLAGS_COMPARED;
    let r11 = regs.r11 & RFLAGS_COMPARED;
    if flags != r11 && flags != r11 & !sfmask {
        return false;
    }
    syscall_before(mem, sregs, regs.rcx, maxphyaddr)
}

/// Whether the two bytes before `rcx` are `syscall` (0f 05), fetched as user mode
/// fetches them (user-accessible, executable pages).
fn syscall_before(mem: &GuestMemoryMmap, sregs: &kvm_sregs, rcx: u64, maxphyaddr: u8) -> bool {
    // Protection keys never apply to instruction fetches; reserved address bits do.
    let mut ctx = PagingContext::for_vcpu(sregs, 0, 0, maxphyaddr);
    ctx.cpl = 3;
    let at = rcx.wrapping_sub(2);
    let byte = |gva: u64| match paging::translate(mem, &ctx, gva, paging::Access::Execute) {
        Translation::Ok(gpa) => {
            let mut b = [0u8; 1];
            paging::PhysMem::read_bytes(mem, gpa, &mut b).then_some(b[0])
        }
        _ => None,
    };
    byte(at) == Some(0x0f) && byte(at.wrapping_add(1)) == Some(0x05)
}

fn read_frame(mem: &GuestMemoryMmap, sregs: &kvm_sregs, rsp: u64) -> Option<Frame> {
    let mut raw = [0u8; 48];
    read_virt(mem, sregs, rsp, &mut raw)?;
    let q = |i: usize| raw.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    // error code, RIP, CS, RFLAGS, RSP, SS
    Some(Frame { error: q(0)?, rip: q(1)?, cs: q(2)?, rflags: q(3)?, rsp: q(4)? })
}

/// Reads guest-virtual memory as the kernel would (CPL 0). None where any page does
/// not translate to RAM: nothing is injected.
fn read_virt(mem: &GuestMemoryMmap, sregs: &kvm_sregs, gva: u64, buf: &mut [u8]) -> Option<()> {
    let mut ctx = PagingContext::from_sregs(sregs, 0);
    ctx.cpl = 0;
    paging::read_virt(mem, &ctx, gva, buf).ok()
}

/// Gives the vCPU the state SYSCALL from 64-bit user mode produces (SDM vol. 2,
/// SYSCALL; AMD APM vol. 3): CS = STAR[47:32] & ~3, SS = that + 8, both flat at
/// DPL 0; RIP = LSTAR; RFLAGS = R11 & ~SFMASK, RF clear. RCX, R11 and RSP are what
/// the half-done SYSCALL left (RSP from the exception frame: the user stack).
fn complete_syscall(
    vcpu: &mut Vcpu,
    regs: &mut kvm_regs,
    sregs: &mut kvm_sregs,
    user_rsp: u64,
    lstar: u64,
    star: u64,
    sfmask: u64,
) -> Result<(), String> {
    let kernel_cs = ((star >> 32) & 0xfffc) as u16;
    sregs.cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: kernel_cs,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // 16-bit selector arithmetic, as the CPU does it: a STAR whose CS is 0xfff8 or
    // more gives an SS that wraps (and a guest that faults on it, as on hardware).
    sregs.ss = kvm_segment { selector: kernel_cs.wrapping_add(8), type_: 0x3, db: 1, l: 0, ..sregs.cs };
    regs.rip = lstar;
    regs.rsp = user_rsp;
    regs.rflags = (regs.r11 & !sfmask & !RFLAGS_RF) | 2;
    vcpu.fd.set_sregs(sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    vcpu.fd.set_regs(regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
}

/// Lets an ordinary #PF continue into the handler past the breakpoint: a no-op or
/// CLD first instruction is emulated here; anything else is single-stepped, and the
/// breakpoint comes back on the step's debug exit.
fn step_over(vcpu: &mut Vcpu, regs: &mut kvm_regs, sregs: &kvm_sregs) -> Result<(), String> {
    if let Ok(f) = insn::fetch(&vcpu.mem, sregs, regs.rip, regs.rflags) {
        let emulated = match f.insn.mnemonic() {
            Mnemonic::Nop | Mnemonic::Endbr64 => true,
            Mnemonic::Cld => {
                regs.rflags &= !RFLAGS_DF;
                true
            }
            _ => false,
        };
        if emulated {
            regs.rip = regs.rip.wrapping_add(f.insn.len() as u64);
            return vcpu.fd.set_regs(regs).map_err(|e| format!("KVM_SET_REGS: {e}"));
        }
    }
    if let Some(f) = vcpu.syscall_fixup.as_mut() {
        f.stepping = true;
    }
    vcpu.debug.fixup_stepping = true;
    vcpu.apply_guest_debug()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn long_mode_sregs(cr3: u64) -> kvm_sregs {
        let mut s = kvm_sregs { cr0: 0x8000_0011, cr3, cr4: 1 << 5, efer: 0x500, ..Default::default() };
        s.cs.l = 1;
        s
    }

    /// Identity-maps the first 2 MiB with one large page (PML4 0x1000, PDPT 0x2000, PD 0x3000).
    fn mem_with_identity_map() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x83u64, GuestAddress(0x3000)).unwrap();
        mem
    }

    #[test]
    fn finds_the_page_fault_gate() {
        let mem = mem_with_identity_map();
        let mut s = long_mode_sregs(0x1000);
        s.idt.base = 0x8000;
        s.idt.limit = 0xfff;
        let h: u64 = 0xffff_ffff_81c0_0be0;
        let lo = (h & 0xffff) | (0x10 << 16) | (0x8e << 40) | ((h >> 16) & 0xffff) << 48;
        mem.write_obj(lo, GuestAddress(0x8000 + 14 * 16)).unwrap();
        mem.write_obj(h >> 32, GuestAddress(0x8000 + 14 * 16 + 8)).unwrap();
        assert_eq!(pf_handler(&mem, &s), Some(h));
        // Not present, or an IDT too short for vector 14: nothing to arm.
        mem.write_obj(lo & !(1 << 47), GuestAddress(0x8000 + 14 * 16)).unwrap();
        assert_eq!(pf_handler(&mem, &s), None);
        s.idt.limit = 14 * 16;
        assert_eq!(pf_handler(&mem, &s), None);
    }

    #[test]
    fn reads_the_exception_frame_and_refuses_unmapped_stacks() {
        let mem = mem_with_identity_map();
        let s = long_mode_sregs(0x1000);
        let words = [4u64, 0xffff_ffff_81c0_0080, 0x33, 0x10202, 0x7ffd_0000_2b50, 0x2b];
        for (i, w) in words.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(0x9000 + i as u64 * 8)).unwrap();
        }
        assert_eq!(
            read_frame(&mem, &s, 0x9000),
            Some(Frame { error: 4, rip: 0xffff_ffff_81c0_0080, cs: 0x33, rflags: 0x10202, rsp: 0x7ffd_0000_2b50 })
        );
        // A stack pointer the guest's tables do not map, or one near the top of the
        // address space: no frame, no panic.
        assert_eq!(read_frame(&mem, &s, 0x40_0000), None);
        assert_eq!(read_frame(&mem, &s, u64::MAX - 8), None);
    }

    /// The first 2 MiB identity-mapped for user mode (U bit at every level).
    fn mem_with_user_map() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_obj(0x2007u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3007u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x87u64, GuestAddress(0x3000)).unwrap();
        mem
    }

    const LSTAR: u64 = 0xffff_ffff_81e0_0040;
    const USER_FLAGS: u64 = 0x246;
    const SFMASK: u64 = 0x4_7700;

    /// What a half-done SYSCALL at 0x5000 leaves: the frame of its fetch fault at
    /// LSTAR, RCX after the instruction, R11 = RFLAGS, CR2 = LSTAR.
    fn half_done() -> (GuestMemoryMmap, Frame, kvm_regs, kvm_sregs) {
        let mem = mem_with_user_map();
        mem.write_slice(&[0x0f, 0x05], GuestAddress(0x5000)).unwrap();
        let frame = Frame { error: PF_USER | PF_FETCH | 1, rip: LSTAR, cs: 0x33, rflags: USER_FLAGS, rsp: 0x7000 };
        let regs = kvm_regs { rcx: 0x5002, r11: USER_FLAGS, ..Default::default() };
        let mut sregs = long_mode_sregs(0x1000);
        sregs.cr2 = LSTAR;
        (mem, frame, regs, sregs)
    }

    #[test]
    fn a_real_half_done_syscall_is_recognised() {
        let (mem, frame, regs, sregs) = half_done();
        assert!(is_half_done_syscall(&mem, &frame, &regs, &sregs, LSTAR, SFMASK, 48));
        // Where KVM applied SFMASK before the fault, the frame holds the masked flags.
        let masked = Frame { rflags: USER_FLAGS & !SFMASK, ..frame };
        assert!(is_half_done_syscall(&mem, &masked, &regs, &sregs, LSTAR, SFMASK, 48));
    }

    #[test]
    fn a_user_jump_to_lstar_is_not_a_syscall() {
        let (mem, frame, regs, sregs) = half_done();
        let check = |frame: &Frame, regs: &kvm_regs, sregs: &kvm_sregs| {
            is_half_done_syscall(&mem, frame, regs, sregs, LSTAR, SFMASK, 48)
        };
        // R11 forged with IOPL 3 (or TF, or AC): not the user's own RFLAGS.
        for forged in [0x3000, 0x100, 0x4_0000] {
            assert!(!check(&frame, &kvm_regs { r11: USER_FLAGS | forged, ..regs }, &sregs), "{forged:#x}");
        }
        // RCX not after a `syscall` instruction, or outside any mapping, or wrapping.
        for rcx in [0x5003, 0x40_0000, 0, 1] {
            assert!(!check(&frame, &kvm_regs { rcx, ..regs }, &sregs), "{rcx:#x}");
        }
        // A kernel-only page before RCX: user mode could not have fetched it.
        mem.write_obj(0x83u64, GuestAddress(0x3000)).unwrap();
        assert!(!check(&frame, &regs, &sregs));
        mem.write_obj(0x87u64, GuestAddress(0x3000)).unwrap();
        // Not the fetch fault at LSTAR: a data access, a write, another CR2, a kernel frame.
        assert!(!check(&Frame { error: PF_USER | 1, ..frame }, &regs, &sregs));
        assert!(!check(&Frame { error: PF_USER | PF_FETCH | PF_WRITE | 1, ..frame }, &regs, &sregs));
        assert!(!check(&frame, &regs, &kvm_sregs { cr2: LSTAR + 1, ..sregs }));
        assert!(!check(&Frame { cs: 0x10, ..frame }, &regs, &sregs));
        assert!(!check(&Frame { rip: LSTAR + 2, ..frame }, &regs, &sregs));
        assert!(check(&frame, &regs, &sregs), "the unaltered case still passes");
    }
}
