//! RDRAND/RDSEED: a random value from the host (getrandom), CF=1 when one was
//! delivered (CF=0 and a zero register otherwise); OF, SF, ZF, AF, PF cleared.

use super::{Cx, EmuCpu, RFLAGS_CF};

/// OF, SF, ZF, AF, PF and CF.
const ARITH_FLAGS: u64 = 0x8d5;

impl<C: EmuCpu> Cx<'_, C> {
    pub(super) fn rdrand(&mut self) -> Result<(), String> {
        let i = self.insn.insn;
        let size = i.op0_register().size().min(8);
        let mut bytes = [0u8; 8];
        let ok = bytes.get_mut(..size).is_some_and(|b| self.cpu.random(b));
        let value = if ok { u64::from_le_bytes(bytes) } else { 0 };
        self.set_gpr(i.op0_register(), value)?;
        self.regs.rflags &= !ARITH_FLAGS;
        if ok {
            self.regs.rflags |= RFLAGS_CF;
        }
        self.advance()?;
        self.count(if i.mnemonic() == iced_x86::Mnemonic::Rdrand { "rdrand" } else { "rdseed" });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::*;
    use super::*;

    #[test]
    fn delivers_and_sets_cf() {
        let mut f = Fake::new();
        f.regs.rax = u64::MAX;
        f.regs.rflags |= 0x8d4;
        f.run(&[0x0f, 0xc7, 0xf0]); // rdrand eax
        f.assert_done(3);
        assert_eq!(f.regs.rax, 0x5a5a_5a5a, "a 32-bit write zeroes the upper half");
        assert_eq!(f.regs.rflags & ARITH_FLAGS, RFLAGS_CF);
        let mut f = Fake::new();
        f.regs.rbx = 0x1111_1111_1111_1111;
        f.run(&[0x66, 0x0f, 0xc7, 0xfb]); // rdseed bx
        f.assert_done(4);
        assert_eq!(f.regs.rbx, 0x1111_1111_1111_5a5a);
    }

    #[test]
    fn no_entropy_clears_cf_and_the_register() {
        let mut f = Fake::new();
        f.random_ok = false;
        f.regs.rax = 7;
        f.regs.rflags |= RFLAGS_CF;
        f.run(&[0x48, 0x0f, 0xc7, 0xf0]); // rdrand rax
        f.assert_done(4);
        assert_eq!((f.regs.rax, f.regs.rflags & RFLAGS_CF), (0, 0));
    }
}
