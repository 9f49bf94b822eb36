//! What skiff does when KVM's instruction emulator gives up (KVM_EXIT_INTERNAL_ERROR,
//! emulation failure). Where guest kernel mode is emulated by KVM, instructions the
//! emulator lacks land here. skiff fetches the instruction at CS:RIP through the
//! guest's own page tables (x86/insn.rs), decodes it, and emulates it, injects the
//! exception hardware raises for it, or stops the machine with a diagnostic.
//!
//! The emulation runs against [`EmuCpu`]: registers, guest memory reached through
//! the page walker, MMIO through the bus, XSAVE state and exception injection. The
//! vCPU implements it with KVM ioctls (kvm.rs); the unit tests with a fake (fake.rs).
//! One file per instruction family; mem.rs holds the operand access shared by all.

mod cmpxchg;
mod jmp;
mod kvm;
mod mem;
mod movbe;
mod random;
mod system;
mod x87_sse;
mod xsave;

#[cfg(test)]
mod fake;

use std::sync::Arc;

use iced_x86::{Mnemonic, Register};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};
use vm_memory::GuestMemoryMmap;

pub use kvm::{diagnose, format_regs, handle_failure};

use super::xsave::XsaveLayout;
use crate::x86::insn::FetchedInsn;
use crate::x86::paging::PagingContext;

/// Outcome of handling an emulation failure.
pub enum Emulated {
    /// The guest can continue.
    Done,
    /// skiff cannot handle it; the text is the diagnostic.
    Unhandled(String),
}

/// The vCPU as the emulator sees it. Errors are failures of the VMM itself (an
/// ioctl refused); what the guest did wrong is answered with an exception.
pub trait EmuCpu {
    /// Guest RAM, which the page walker reads tables from.
    fn mem(&self) -> &GuestMemoryMmap;
    /// An access to guest-physical space outside RAM, through the MMIO bus. Reads
    /// nothing claims return all ones, writes are dropped (as on a PC).
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), String>;
    /// Also how CR2 is set for a #PF, and how cached translations are dropped.
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), String>;
    fn xcr0(&mut self) -> Result<u64, String>;
    /// IA32_XSS (supervisor components for XSAVES/XRSTORS).
    fn xss(&mut self) -> Result<u64, String>;
    /// The x87/SSE/AVX... state: the one source of truth for all of it (MXCSR and
    /// FCW included; KVM_GET_FPU is never used).
    fn get_xsave(&mut self) -> Result<kvm_xsave, String>;
    fn set_xsave(&mut self, x: &kvm_xsave) -> Result<(), String>;
    /// Queues an exception for delivery at the next entry.
    fn inject(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), String>;
    /// The guest's physical-address width (CPUID 0x80000008 EAX[7:0]).
    fn maxphyaddr(&mut self) -> u8;
    fn xsave_layout(&self) -> Arc<XsaveLayout>;
    /// Random bytes for RDRAND/RDSEED; false if none could be had.
    fn random(&mut self, buf: &mut [u8]) -> bool;
    /// Counts an outcome in the vCPU's stats (a fixed name, never guest data).
    fn count(&mut self, what: &'static str);
}

const VEC_DB: u8 = 1;
const VEC_BP: u8 = 3;
const VEC_UD: u8 = 6;
const VEC_NM: u8 = 7;
const VEC_SS: u8 = 12;
const VEC_GP: u8 = 13;
const VEC_PF: u8 = 14;
const VEC_MF: u8 = 16;
const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_AC: u64 = 1 << 18;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PKE: u64 = 1 << 22;
/// XSAVE component 9.
const PKRU_COMPONENT: u8 = 9;

/// One emulation: the vCPU, its registers as read at the failure, the instruction.
pub struct Cx<'a, C: EmuCpu> {
    cpu: &'a mut C,
    regs: kvm_regs,
    sregs: kvm_sregs,
    insn: &'a FetchedInsn,
    /// PKRU, once read (only needed with CR4.PKE).
    pkru: Option<u32>,
    /// Set when skiff cannot go on: the diagnostic.
    unhandled: Option<String>,
}

/// Emulates `insn` on `cpu`. `retry_first`: an instruction KVM normally runs is
/// resumed once (its bytes may have changed under KVM's fetch) before it counts
/// as one skiff cannot emulate.
pub fn emulate<C: EmuCpu>(
    cpu: &mut C,
    regs: kvm_regs,
    sregs: kvm_sregs,
    insn: &FetchedInsn,
    retry_first: bool,
) -> Result<Emulated, String> {
    let mut cx = Cx { cpu, regs, sregs, insn, pkru: None, unhandled: None };
    cx.dispatch(retry_first)?;
    Ok(cx.unhandled.take().map_or(Emulated::Done, Emulated::Unhandled))
}

impl<C: EmuCpu> Cx<'_, C> {
    fn dispatch(&mut self, retry_first: bool) -> Result<(), String> {
        match self.insn.insn.mnemonic() {
            Mnemonic::Int3 => self.trap(VEC_BP, "int3 -> #BP"),
            Mnemonic::Int1 => self.trap(VEC_DB, "icebp -> #DB"),
            Mnemonic::Clac | Mnemonic::Stac => self.clac_stac(),
            Mnemonic::Lfence | Mnemonic::Sfence | Mnemonic::Mfence => self.fence(),
            Mnemonic::Clwb | Mnemonic::Clflushopt | Mnemonic::Clflush => self.cache_flush(),
            Mnemonic::Xgetbv => self.xgetbv(),
            Mnemonic::Invpcid => self.invpcid(),
            Mnemonic::Rdrand | Mnemonic::Rdseed => self.rdrand(),
            Mnemonic::Cmpxchg16b => self.cmpxchg16b(),
            Mnemonic::Wait => self.fwait(),
            Mnemonic::Fninit | Mnemonic::Fnclex => self.fninit_fnclex(),
            Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => self.mxcsr(),
            Mnemonic::Xsave
            | Mnemonic::Xsave64
            | Mnemonic::Xsaveopt
            | Mnemonic::Xsaveopt64
            | Mnemonic::Xsavec
            | Mnemonic::Xsavec64
            | Mnemonic::Xsaves
            | Mnemonic::Xsaves64
            | Mnemonic::Xrstor
            | Mnemonic::Xrstor64
            | Mnemonic::Xrstors
            | Mnemonic::Xrstors64 => self.xsave_family(),
            Mnemonic::Movbe => self.movbe(),
            Mnemonic::Jmp if jmp::near_jmp(&self.insn.insn) => self.jmp_near(),
            _ if retry_first => {
                // An instruction KVM's emulator normally handles, and KVM did not say
                // which bytes it saw: they may not be the ones here now (another vCPU
                // patching kernel text races with KVM's fetch). Run it again once.
                self.count("re-executed (code may have changed under KVM's emulator)");
                Ok(())
            }
            _ => self.cannot_emulate(),
        }
    }

    /// An instruction skiff does not emulate, failing again. In guest kernel mode the
    /// machine stops with a diagnostic naming it: #UD would tell the kernel this CPU
    /// lacks an instruction its CPUID may well advertise, and a kernel that meets #UD
    /// in its own text oopses or worse. In user mode the process gets #UD (SIGILL in
    /// Linux): one process, not the machine, pays for what it ran.
    fn cannot_emulate(&mut self) -> Result<(), String> {
        if self.sregs.cs.dpl != 0 {
            return self.ud("not emulated, user mode -> #UD");
        }
        self.count("not emulated, kernel mode (machine stopped)");
        self.unhandled = Some(format!(
            "KVM could not emulate a guest kernel instruction and skiff does not emulate {:?} either",
            self.insn.insn.mnemonic()
        ));
        Ok(())
    }

    fn count(&mut self, what: &'static str) {
        self.cpu.count(what);
    }

    fn len(&self) -> u64 {
        self.insn.insn.len() as u64
    }

    /// Completes the instruction: RIP past it, registers written back.
    fn advance(&mut self) -> Result<(), String> {
        self.regs.rip = self.regs.rip.wrapping_add(self.len());
        self.cpu.set_regs(&self.regs)
    }

    /// Completes a trap-like instruction (int3, icebp): RIP past it, then the trap.
    fn trap(&mut self, vector: u8, what: &'static str) -> Result<(), String> {
        self.advance()?;
        self.cpu.inject(vector, None)?;
        self.count(what);
        Ok(())
    }

    /// Injects a fault at the instruction (RIP unchanged) and counts it.
    fn fault(&mut self, vector: u8, error_code: Option<u32>, what: &'static str) -> Result<(), String> {
        self.cpu.inject(vector, error_code)?;
        self.count(what);
        Ok(())
    }

    fn gp(&mut self, what: &'static str) -> Result<(), String> {
        self.fault(VEC_GP, Some(0), what)
    }

    fn ud(&mut self, what: &'static str) -> Result<(), String> {
        self.fault(VEC_UD, None, what)
    }

    fn long_mode(&self) -> bool {
        self.insn.bitness == 64
    }

    /// The walker's view of this vCPU: its real PKRU and MAXPHYADDR.
    fn paging(&mut self) -> Result<PagingContext, String> {
        let pkru = if self.sregs.cr4 & CR4_PKE != 0 { self.pkru()? } else { 0 };
        Ok(PagingContext::for_vcpu(&self.sregs, self.regs.rflags, pkru, self.cpu.maxphyaddr()))
    }

    fn pkru(&mut self) -> Result<u32, String> {
        if let Some(p) = self.pkru {
            return Ok(p);
        }
        let x = self.cpu.get_xsave()?;
        self.note_pkru(&x);
        Ok(self.pkru.unwrap_or(0))
    }

    /// Takes PKRU from an XSAVE state already read (no second ioctl).
    fn note_pkru(&mut self, x: &kvm_xsave) {
        let bytes = xsave::kvm_bytes(x);
        let off = self.cpu.xsave_layout().components.iter().find(|c| c.0 == PKRU_COMPONENT).map(|c| c.1);
        self.pkru = Some(off.map_or(0, |o| super::xsave::u32_at(bytes, o)));
    }

    /// The linear address of the instruction's memory operand (None: no memory
    /// operand, or a base register skiff does not know).
    fn memory_operand(&self) -> Option<u64> {
        let i = &self.insn.insn;
        let base = match i.memory_base() {
            Register::None | Register::RIP | Register::EIP => 0, // iced folded RIP in
            r => self.gpr(r)?,
        };
        let index = match i.memory_index() {
            Register::None => 0,
            r => self.gpr(r)?.wrapping_mul(u64::from(i.memory_index_scale())),
        };
        let seg_base = match i.memory_segment() {
            Register::FS => self.sregs.fs.base,
            Register::GS => self.sregs.gs.base,
            _ if self.long_mode() => 0,
            Register::ES => self.sregs.es.base,
            Register::CS => self.sregs.cs.base,
            Register::SS => self.sregs.ss.base,
            _ => self.sregs.ds.base,
        };
        let mut ea = base.wrapping_add(index).wrapping_add(i.memory_displacement64());
        if !self.long_mode() {
            ea &= 0xffff_ffff;
        }
        let mut addr = ea.wrapping_add(seg_base);
        if !self.long_mode() {
            addr &= 0xffff_ffff;
        }
        Some(addr)
    }

    fn gpr(&self, r: Register) -> Option<u64> {
        let v = *gpr_slot_ref(&self.regs, r.full_register())?;
        Some(match r.size() {
            1 if matches!(r, Register::AH | Register::BH | Register::CH | Register::DH) => (v >> 8) & 0xff,
            1 => v & 0xff,
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        })
    }

    /// Writes a register as the CPU does: a 32-bit write zeroes the upper half,
    /// 8/16-bit writes merge.
    fn set_gpr(&mut self, r: Register, value: u64) -> Result<(), String> {
        let size = r.size();
        let high8 = matches!(r, Register::AH | Register::BH | Register::CH | Register::DH);
        let slot = gpr_slot(&mut self.regs, r.full_register()).ok_or_else(|| format!("cannot write register {r:?}"))?;
        *slot = match size {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => (*slot & !0xffff) | (value & 0xffff),
            _ if high8 => (*slot & !0xff00) | ((value & 0xff) << 8),
            _ => (*slot & !0xff) | (value & 0xff),
        };
        Ok(())
    }
}

fn gpr_slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn gpr_slot_ref(regs: &kvm_regs, full: Register) -> Option<&u64> {
    Some(match full {
        Register::RAX => &regs.rax,
        Register::RBX => &regs.rbx,
        Register::RCX => &regs.rcx,
        Register::RDX => &regs.rdx,
        Register::RSI => &regs.rsi,
        Register::RDI => &regs.rdi,
        Register::RSP => &regs.rsp,
        Register::RBP => &regs.rbp,
        Register::R8 => &regs.r8,
        Register::R9 => &regs.r9,
        Register::R10 => &regs.r10,
        Register::R11 => &regs.r11,
        Register::R12 => &regs.r12,
        Register::R13 => &regs.r13,
        Register::R14 => &regs.r14,
        Register::R15 => &regs.r15,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::fake::*;

    /// Instruction bytes recorded from emulation failures of Debian's 6.1 kernel
    /// under PVM-backed KVM: each is emulated (whatever the outcome for these
    /// operands), none is "not emulated".
    #[test]
    fn recorded_failures_are_emulated() {
        let cases: &[&[u8]] = &[
            &[0xf0, 0x48, 0x0f, 0xc7, 0x0f], // lock cmpxchg16b [rdi]
            &[0x48, 0x0f, 0xae, 0x2f],       // xrstor64 [rdi]
            &[0x48, 0x0f, 0xae, 0x27],       // xsave64 [rdi]
            &[0x0f, 0x38, 0xf0, 0x07],       // movbe eax,[rdi]
            &[0x0f, 0x01, 0xd0],             // xgetbv
            &[0x0f, 0x01, 0xca],             // clac
            &[0x66, 0x0f, 0xae, 0x37],       // clwb [rdi]
            &[0x66, 0x0f, 0x38, 0x82, 0x07], // invpcid rax,[rdi]
            &[0x9b],                         // fwait
            &[0x0f, 0xae, 0x54, 0x24, 0x04], // ldmxcsr [rsp+4]
            &[0xdb, 0xe3],                   // fninit
            &[0xcc],                         // int3
        ];
        for bytes in cases {
            let mut f = Fake::new();
            (f.regs.rdi, f.regs.rsp) = (DATA, DATA + 0x1000);
            f.run(bytes);
            assert!(f.unhandled.is_none() && !f.counts.iter().any(|c| c.starts_with("not emulated")), "{bytes:02x?}: {:?}", f.counts);
        }
    }

    /// What skiff does with an instruction it does not emulate: in kernel mode the
    /// machine stops with a diagnostic naming it; in user mode the process gets #UD.
    #[test]
    fn instructions_skiff_cannot_emulate() {
        let rdpru = [0x0f, 0x01, 0xfd];
        let mut f = Fake::new();
        f.run(&rdpru);
        assert!(f.unhandled.as_deref().is_some_and(|d| d.contains("Rdpru")), "{:?}", f.unhandled);
        assert!(f.injected.is_empty(), "no #UD for the kernel");
        let mut f = Fake::new();
        f.sregs.cs.dpl = 3;
        f.run(&rdpru);
        f.assert_fault(6, None);
        assert!(f.unhandled.is_none());
    }

    #[test]
    fn memory_operand_addressing() {
        // mov rax,[fs:rbx+rcx*4+0x10]: FS's base counts in 64-bit mode, DS's does not.
        let mut f = Fake::new();
        f.sregs.fs.base = 0x1000;
        f.sregs.ds.base = 0x5555;
        (f.regs.rbx, f.regs.rcx) = (0x100, 2);
        let bytes = [0x64, 0x0f, 0x38, 0xf0, 0x44, 0x8b, 0x10]; // movbe eax,fs:[rbx+rcx*4+10h]
        f.poke(0x1118, &[0, 0, 0, 1]);
        f.run(&bytes);
        f.assert_done(bytes.len());
        assert_eq!(f.regs.rax, 1);
    }
}
