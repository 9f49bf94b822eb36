//! System instructions: CLAC/STAC, the fences and cache flushes, XGETBV and INVPCID.
//! int3 and icebp are dispatched straight to their traps in mod.rs.

use super::{CR4_LA57, CR4_OSXSAVE, CR4_PCIDE, Cx, EmuCpu, RFLAGS_AC};
use crate::x86::paging::{self, Access};

impl<C: EmuCpu> Cx<'_, C> {
    /// CLAC/STAC: RFLAGS.AC; #UD above CPL 0.
    pub(super) fn clac_stac(&mut self) -> Result<(), String> {
        if self.sregs.cs.dpl != 0 {
            return self.ud("clac/stac at CPL > 0 -> #UD");
        }
        let clac = self.insn.insn.mnemonic() == iced_x86::Mnemonic::Clac;
        if clac {
            self.regs.rflags &= !RFLAGS_AC;
        } else {
            self.regs.rflags |= RFLAGS_AC;
        }
        self.advance()?;
        self.count(if clac { "clac" } else { "stac" });
        Ok(())
    }

    /// Guest memory is ordinary host memory, coherent with every vCPU: a fence has
    /// nothing left to order once the exit has happened.
    pub(super) fn fence(&mut self) -> Result<(), String> {
        self.advance()?;
        self.count("fence");
        Ok(())
    }

    /// CLFLUSH/CLFLUSHOPT/CLWB: nothing to flush (coherent memory), but the operand
    /// is translated as a read: an unmapped line page-faults, as on hardware.
    pub(super) fn cache_flush(&mut self) -> Result<(), String> {
        let Some(gva) = self.memory_operand() else { return self.ud("cache flush (bad operand) -> #UD") };
        if self.span(gva, 1, Access::Read)?.is_none() {
            return Ok(());
        }
        self.advance()?;
        self.count("cache line flush");
        Ok(())
    }

    /// XGETBV: XCR0 for ECX = 0, XINUSE & XCR0 for ECX = 1, #GP(0) otherwise;
    /// #UD with CR4.OSXSAVE clear.
    pub(super) fn xgetbv(&mut self) -> Result<(), String> {
        if self.sregs.cr4 & CR4_OSXSAVE == 0 {
            return self.ud("xgetbv (CR4.OSXSAVE clear) -> #UD");
        }
        let value = match self.regs.rcx as u32 {
            0 => self.cpu.xcr0()?,
            1 => {
                let x = self.cpu.get_xsave()?;
                let in_use = crate::vcpu::xsave::u64_at(super::xsave::kvm_bytes(&x), crate::vcpu::xsave::HEADER);
                in_use & self.cpu.xcr0()?
            }
            _ => return self.gp("xgetbv (bad XCR) -> #GP"),
        };
        self.regs.rax = value & 0xffff_ffff;
        self.regs.rdx = value >> 32;
        self.advance()?;
        self.count("xgetbv");
        Ok(())
    }

    /// INVPCID: #GP(0) above CPL 0, for a type above 3, for descriptor bits 63:12
    /// set, for a non-canonical address (type 0), and for a PCID other than 0 with
    /// CR4.PCIDE clear (types 0 and 1). Otherwise a full flush (reloading the special
    /// registers drops every cached translation), which covers every type.
    pub(super) fn invpcid(&mut self) -> Result<(), String> {
        if self.sregs.cs.dpl != 0 {
            return self.gp("invpcid at CPL > 0 -> #GP");
        }
        let i = self.insn.insn;
        let kind = self.gpr(i.op0_register()).unwrap_or(u64::MAX);
        let Some(gva) = self.memory_operand() else { return self.ud("invpcid (bad operand) -> #UD") };
        let Some(span) = self.span(gva, 16, Access::Read)? else { return Ok(()) };
        if kind > 3 {
            return self.gp("invpcid (bad type) -> #GP");
        }
        let mut d = [0u8; 16];
        self.read_span(&span, 0, &mut d);
        let (lo, hi) = d.split_at(8);
        let pcid_word = u64::from_le_bytes(lo.try_into().map_err(|_| "invpcid descriptor")?);
        let addr = u64::from_le_bytes(hi.try_into().map_err(|_| "invpcid descriptor")?);
        let bad = pcid_word >> 12 != 0
            || kind == 0 && !paging::is_canonical(addr, self.sregs.cr4 & CR4_LA57 != 0)
            || kind <= 1 && self.sregs.cr4 & CR4_PCIDE == 0 && pcid_word != 0;
        if bad {
            return self.gp("invpcid (bad descriptor) -> #GP");
        }
        self.regs.rip = self.regs.rip.wrapping_add(self.len());
        self.cpu.set_regs(&self.regs)?;
        self.cpu.set_sregs(&self.sregs)?;
        self.count("invpcid (full flush)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::*;
    use super::super::RFLAGS_AC;

    #[test]
    fn clac_stac() {
        let mut f = Fake::new();
        f.run(&[0x0f, 0x01, 0xcb]); // stac
        f.assert_done(3);
        assert_ne!(f.regs.rflags & RFLAGS_AC, 0);
        let mut f = Fake::new();
        f.regs.rflags |= RFLAGS_AC;
        f.run(&[0x0f, 0x01, 0xca]); // clac
        f.assert_done(3);
        assert_eq!(f.regs.rflags & RFLAGS_AC, 0);
        let mut f = Fake::new();
        f.sregs.cs.dpl = 3;
        f.run(&[0x0f, 0x01, 0xca]);
        f.assert_fault(6, None);
    }

    #[test]
    fn int3_and_icebp_are_traps() {
        let mut f = Fake::new();
        f.run(&[0xcc]);
        assert_eq!((f.injected.clone(), f.regs.rip), (vec![(3, None)], CODE + 1));
        let mut f = Fake::new();
        f.run(&[0xf1]);
        assert_eq!((f.injected.clone(), f.regs.rip), (vec![(1, None)], CODE + 1), "icebp is #DB, not #UD");
    }

    #[test]
    fn fences_and_flushes() {
        for bytes in [&[0x0f, 0xae, 0xe8][..], &[0x0f, 0xae, 0xf0], &[0x0f, 0xae, 0xf8]] {
            let mut f = Fake::new();
            f.run(bytes);
            f.assert_done(3);
        }
        let clwb_rdi = [0x66, 0x0f, 0xae, 0x37];
        let mut f = Fake::new();
        f.regs.rdi = DATA;
        f.run(&clwb_rdi);
        f.assert_done(4);
        let mut f = Fake::new();
        f.regs.rdi = UNMAPPED_VA;
        f.run(&clwb_rdi);
        f.assert_page_fault(UNMAPPED_VA, 0);
    }

    #[test]
    fn xgetbv() {
        let mut f = Fake::new();
        f.regs.rcx = 0;
        f.run(&[0x0f, 0x01, 0xd0]);
        f.assert_done(3);
        assert_eq!((f.regs.rax, f.regs.rdx), (XCR0, 0));
        let mut f = Fake::new();
        f.regs.rcx = 1;
        f.run(&[0x0f, 0x01, 0xd0]);
        f.assert_done(3);
        assert_eq!(f.regs.rax, 3, "XINUSE: x87 and SSE");
        let mut f = Fake::new();
        f.regs.rcx = 2;
        f.run(&[0x0f, 0x01, 0xd0]);
        f.assert_fault(13, Some(0));
        let mut f = Fake::new();
        f.sregs.cr4 &= !super::CR4_OSXSAVE;
        f.run(&[0x0f, 0x01, 0xd0]);
        f.assert_fault(6, None);
    }

    const INVPCID_RAX_RDI: [u8; 5] = [0x66, 0x0f, 0x38, 0x82, 0x07];

    fn invpcid(kind: u64, desc: (u64, u64), pcide: bool) -> Fake {
        let mut f = Fake::new();
        f.poke(DATA, &desc.0.to_le_bytes());
        f.poke(DATA + 8, &desc.1.to_le_bytes());
        if pcide {
            f.sregs.cr4 |= super::CR4_PCIDE;
        }
        (f.regs.rax, f.regs.rdi) = (kind, DATA);
        f.run(&INVPCID_RAX_RDI);
        f
    }

    #[test]
    fn invpcid_types_and_faults() {
        for kind in 0..4 {
            invpcid(kind, (0, 0x1000), false).assert_done(5);
        }
        invpcid(1, (5, 0), true).assert_done(5);
        invpcid(4, (0, 0), false).assert_fault(13, Some(0));
        invpcid(u64::MAX, (0, 0), false).assert_fault(13, Some(0));
        invpcid(0, (1 << 12, 0), true).assert_fault(13, Some(0));
        invpcid(0, (0, 0x8000_0000_0000_0000), false).assert_fault(13, Some(0));
        invpcid(1, (5, 0), false).assert_fault(13, Some(0));
        let mut f = Fake::new();
        f.sregs.cs.dpl = 3;
        f.run(&INVPCID_RAX_RDI);
        f.assert_fault(13, Some(0));
    }
}
