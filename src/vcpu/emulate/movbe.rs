//! MOVBE: a load or store with the bytes reversed (16, 32 or 64 bits). A 16-bit
//! load keeps the register's upper bits, a 32-bit one zeroes them. The operand may
//! be unaligned, cross a page, or be MMIO.

use iced_x86::OpKind;

use super::{Cx, EmuCpu};
use crate::x86::paging::Access;

impl<C: EmuCpu> Cx<'_, C> {
    pub(super) fn movbe(&mut self) -> Result<(), String> {
        let i = self.insn.insn;
        let size = i.memory_size().size().min(8);
        let Some(gva) = self.memory_operand() else { return self.ud("movbe (bad operand) -> #UD") };
        let load = i.op0_kind() == OpKind::Register;
        if load {
            let Some(v) = self.read_value(gva, size)? else { return Ok(()) };
            let swapped = v.swap_bytes() >> (64 - 8 * size as u32);
            self.set_gpr(i.op0_register(), swapped)?;
        } else {
            let v = self.gpr(i.op1_register()).unwrap_or(0);
            let swapped = (v.swap_bytes() >> (64 - 8 * size as u32)).to_le_bytes();
            let Some(span) = self.span(gva, size, Access::Write)? else { return Ok(()) };
            self.write_span(&span, 0, swapped.get(..size).unwrap_or(&[]));
        }
        self.advance()?;
        self.count("movbe");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::*;

    #[test]
    fn loads_and_stores() {
        let mut f = Fake::new();
        f.poke(DATA, &[1, 2, 3, 4, 5, 6, 7, 8]);
        f.regs.rdi = DATA;
        f.regs.rax = u64::MAX;
        f.run(&[0x0f, 0x38, 0xf0, 0x07]); // movbe eax,[rdi]
        f.assert_done(4);
        assert_eq!(f.regs.rax, 0x0102_0304);
        let mut f = Fake::new();
        f.poke(DATA, &[1, 2]);
        f.regs.rdi = DATA;
        f.regs.rax = 0xffff_ffff_ffff_ffff;
        f.run(&[0x66, 0x0f, 0x38, 0xf0, 0x07]); // movbe ax,[rdi]
        f.assert_done(5);
        assert_eq!(f.regs.rax, 0xffff_ffff_ffff_0102);
        let mut f = Fake::new();
        f.regs.rdi = SPLIT_VA + 0xffc;
        f.regs.rax = 0x0102_0304_0506_0708;
        f.run(&[0x48, 0x0f, 0x38, 0xf1, 0x07]); // movbe [rdi],rax, across two pages
        f.assert_done(5);
        assert_eq!(f.peek(SPLIT_GPA_LO + 0xffc, 4), [1, 2, 3, 4]);
        assert_eq!(f.peek(SPLIT_GPA_HI, 4), [5, 6, 7, 8]);
    }

    #[test]
    fn mmio_and_faults() {
        let mut f = Fake::new();
        f.regs.rdi = MMIO_VA;
        f.regs.rax = 0x1122_3344;
        f.run(&[0x0f, 0x38, 0xf1, 0x07]); // movbe [rdi],eax
        f.assert_done(4);
        assert_eq!(f.mmio_writes, vec![(MMIO_GPA, vec![0x11, 0x22, 0x33, 0x44])]);
        let mut f = Fake::new();
        f.regs.rdi = READ_ONLY_VA;
        f.run(&[0x0f, 0x38, 0xf1, 0x07]);
        f.assert_page_fault(READ_ONLY_VA, 0b011);
        let mut f = Fake::new();
        f.regs.rdi = READ_ONLY_VA;
        f.poke(0x30_3000, &[0, 0, 0, 9]);
        f.run(&[0x0f, 0x38, 0xf0, 0x07]);
        f.assert_done(4);
        assert_eq!(f.regs.rax, 9, "a read-only page reads");
    }
}
