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
//! exception frame says whether this #PF is a syscall gone wrong (faulting RIP =
//! LSTAR, from CPL 3). If so, skiff discards the frame and gives the vCPU the state
//! SYSCALL should have produced: CS and SS from STAR, RIP = LSTAR, RSP unchanged,
//! RFLAGS = R11 & ~SFMASK (RCX and R11 are already right). Any other #PF continues
//! into the handler: skiff steps over the handler's first instruction (emulating
//! it when it is a no-op, else with one single step) and re-arms the breakpoint.
//!
//! Cost: one exit per guest page fault and per syscall, small beside the emulated
//! kernel work of either. While armed, the guest's own hardware breakpoints are
//! not available to it (guest debugging owns DR0-DR7).

use iced_x86::Mnemonic;
use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, Msrs, kvm_guest_debug, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs,
};
use vm_memory::GuestMemoryMmap;

use super::Vcpu;
use crate::x86::insn;
use crate::x86::paging::{self, PagingContext};

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_SFMASK: u32 = 0xc000_0084;
const PF_VECTOR: u64 = 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_DF: u64 = 1 << 10;
/// DR7: L0 (local enable of DR0), condition 00 (execute), length 00; bit 10 reads as one.
const DR7_EXEC_BP0: u64 = 0x401;

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
        match read_frame(&vcpu.mem, &sregs, regs.rsp) {
            Some(frame) if frame.rip == lstar && frame.cs & 3 == 3 => {
                complete_syscall(vcpu, &mut regs, &mut sregs, frame.rsp, lstar)?;
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

/// The hardware-breakpoint guest-debug setting on `addr`.
fn arm(vcpu: &mut Vcpu, addr: u64) -> Result<(), String> {
    let mut dbg = kvm_guest_debug { control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, ..Default::default() };
    dbg.arch.debugreg[0] = addr;
    dbg.arch.debugreg[7] = DR7_EXEC_BP0;
    vcpu.fd.set_guest_debug(&dbg).map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))
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
    rip: u64,
    cs: u64,
    rsp: u64,
}

fn read_frame(mem: &GuestMemoryMmap, sregs: &kvm_sregs, rsp: u64) -> Option<Frame> {
    let mut raw = [0u8; 48];
    read_virt(mem, sregs, rsp, &mut raw)?;
    let q = |i: usize| raw.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    // error code, RIP, CS, RFLAGS, RSP, SS
    Some(Frame { rip: q(1)?, cs: q(2)?, rsp: q(4)? })
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
) -> Result<(), String> {
    let mut msrs = Msrs::from_entries(&[
        kvm_msr_entry { index: MSR_STAR, ..Default::default() },
        kvm_msr_entry { index: MSR_SFMASK, ..Default::default() },
    ])
    .map_err(|e| format!("{e:?}"))?;
    let n = vcpu.fd.get_msrs(&mut msrs).map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
    let (star, sfmask) = match msrs.as_slice() {
        [s, f] if n == 2 => (s.data, f.data),
        _ => return Err("KVM_GET_MSRS: STAR/SFMASK not read".into()),
    };
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
    sregs.ss = kvm_segment { selector: kernel_cs + 8, type_: 0x3, db: 1, l: 0, ..sregs.cs };
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
    let dbg = kvm_guest_debug { control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, ..Default::default() };
    vcpu.fd.set_guest_debug(&dbg).map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))
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
            Some(Frame { rip: 0xffff_ffff_81c0_0080, cs: 0x33, rsp: 0x7ffd_0000_2b50 })
        );
        // A stack pointer the guest's tables do not map, or one near the top of the
        // address space: no frame, no panic.
        assert_eq!(read_frame(&mem, &s, 0x40_0000), None);
        assert_eq!(read_frame(&mem, &s, u64::MAX - 8), None);
    }
}
