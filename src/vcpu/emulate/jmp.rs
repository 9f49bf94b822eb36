//! Near JMP (relative, register or memory operand): one KVM normally runs, here in
//! case it gives up on it. The target must be canonical in 64-bit mode and within
//! CS's limit elsewhere, else #GP(0), as on hardware.

use iced_x86::{Instruction, OpKind};

use super::{CR4_LA57, Cx, EmuCpu};
use crate::x86::paging;

/// A JMP that stays in the code segment (not a far jump through a selector).
pub(super) fn near_jmp(i: &Instruction) -> bool {
    match i.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 | OpKind::Register => true,
        // jmp m16:16/m16:32/m16:64 is far; only the plain memory forms are near.
        OpKind::Memory => matches!(i.memory_size().size(), 2 | 4 | 8) && !i.is_jmp_far_indirect(),
        _ => false,
    }
}

impl<C: EmuCpu> Cx<'_, C> {
    pub(super) fn jmp_near(&mut self) -> Result<(), String> {
        let i = self.insn.insn;
        let target = match i.op0_kind() {
            OpKind::Register => self.gpr(i.op0_register()),
            OpKind::Memory => {
                let Some(gva) = self.memory_operand() else { return self.ud("jmp (bad operand) -> #UD") };
                let Some(v) = self.read_value(gva, i.memory_size().size())? else { return Ok(()) };
                Some(v)
            }
            _ => Some(i.near_branch_target()),
        };
        let Some(target) = target else { return self.ud("jmp (bad operand) -> #UD") };
        let ok = if self.long_mode() {
            paging::is_canonical(target, self.sregs.cr4 & CR4_LA57 != 0)
        } else {
            target <= u64::from(self.sregs.cs.limit)
        };
        if !ok {
            return self.gp("jmp to a bad target -> #GP");
        }
        self.regs.rip = target;
        self.cpu.set_regs(&self.regs)?;
        self.count("jmp (near)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::*;
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0xffff_ffff_8100_0000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn near_and_far_jumps() {
        assert!(near_jmp(&decode(&[0xe9, 0x10, 0x00, 0x00, 0x00]))); // jmp rel32
        assert!(near_jmp(&decode(&[0xeb, 0xfe]))); // jmp rel8
        assert!(near_jmp(&decode(&[0xff, 0xe0]))); // jmp rax
        assert!(near_jmp(&decode(&[0xff, 0x20]))); // jmp qword [rax]
        assert!(!near_jmp(&decode(&[0xff, 0x28]))); // jmp far [rax]
    }

    #[test]
    fn targets() {
        let mut f = Fake::new();
        f.run(&[0xe9, 0x10, 0x00, 0x00, 0x00]);
        assert_eq!((f.regs.rip, f.injected.len()), (CODE + 0x15, 0));
        let mut f = Fake::new();
        f.regs.rax = 0x1234;
        f.run(&[0xff, 0xe0]);
        assert_eq!(f.regs.rip, 0x1234);
        let mut f = Fake::new();
        f.poke(DATA, &0x5678u64.to_le_bytes());
        f.regs.rax = DATA;
        f.run(&[0xff, 0x20]);
        assert_eq!(f.regs.rip, 0x5678);
        let mut f = Fake::new();
        f.regs.rax = 0x8000_0000_0000_0000;
        f.run(&[0xff, 0xe0]);
        f.assert_fault(13, Some(0));
        let mut f = Fake::new();
        f.regs.rax = UNMAPPED_VA;
        f.run(&[0xff, 0x20]);
        f.assert_page_fault(UNMAPPED_VA, 0);
    }
}
