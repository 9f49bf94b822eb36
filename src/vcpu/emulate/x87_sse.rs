//! x87 and SSE control: LDMXCSR, STMXCSR, FNINIT, FNCLEX, FWAIT. All of it goes
//! through KVM's XSAVE state, the one place skiff reads or writes x87/SSE state
//! (KVM_GET_FPU disagrees with it on some hosts, so it is never used). A value
//! written is marked in use in XSTATE_BV, so KVM takes it from the buffer.

use super::{CR0_EM, CR0_MP, CR0_NE, CR0_TS, CR4_OSFXSR, Cx, EmuCpu, VEC_MF, VEC_NM};
use crate::vcpu::xsave::{self as area, FCW_INIT, HEADER, MXCSR};

const FSW: usize = 2;
/// FSW's exception flags (0-5), stack fault (6), error summary (7) and busy (15).
const FSW_CLEARED_BY_FNCLEX: u16 = 0x80ff;
const FSW_ES: u16 = 1 << 7;

impl<C: EmuCpu> Cx<'_, C> {
    /// Marks x87 (bit 0) or SSE (bit 1) in use in KVM's XSTATE_BV.
    fn mark_in_use(kvm: &mut [u8], component: u64) {
        let bv = area::u64_at(kvm, HEADER) | component;
        area::put(kvm, HEADER, &bv.to_le_bytes());
    }

    /// LDMXCSR / STMXCSR: #UD with CR0.EM or CR4.OSFXSR clear, #NM with CR0.TS,
    /// #GP(0) for reserved bits (per MXCSR_MASK), #PF as the operand's pages say.
    pub(super) fn mxcsr(&mut self) -> Result<(), String> {
        let load = self.insn.insn.mnemonic() == iced_x86::Mnemonic::Ldmxcsr;
        if self.sregs.cr0 & CR0_EM != 0 || self.sregs.cr4 & CR4_OSFXSR == 0 {
            return self.ud("ldmxcsr/stmxcsr (CR0.EM or no OSFXSR) -> #UD");
        }
        if self.sregs.cr0 & CR0_TS != 0 {
            return self.fault(VEC_NM, None, "ldmxcsr/stmxcsr (CR0.TS) -> #NM");
        }
        let Some(gva) = self.memory_operand() else { return self.ud("ldmxcsr/stmxcsr (bad operand) -> #UD") };
        let mut state = self.cpu.get_xsave()?;
        let kvm = super::xsave::kvm_bytes_mut(&mut state);
        if load {
            let Some(value) = self.read_value(gva, 4)? else { return Ok(()) };
            let value = value as u32;
            if value & !area::mxcsr_mask(kvm) != 0 {
                return self.gp("ldmxcsr (reserved bits) -> #GP");
            }
            area::put(kvm, MXCSR, &value.to_le_bytes());
            Self::mark_in_use(kvm, 2);
            self.cpu.set_xsave(&state)?;
        } else {
            let value = area::u32_at(kvm, MXCSR);
            let Some(span) = self.span(gva, 4, crate::x86::paging::Access::Write)? else { return Ok(()) };
            self.write_span(&span, 0, &value.to_le_bytes());
        }
        self.advance()?;
        self.count(if load { "ldmxcsr" } else { "stmxcsr" });
        Ok(())
    }

    /// FNINIT (x87 to its initial state: FCW 0x37f, the rest 0, every tag empty) and
    /// FNCLEX (clears FSW's exception flags, summary and busy bits). #NM with CR0.EM
    /// or CR0.TS.
    pub(super) fn fninit_fnclex(&mut self) -> Result<(), String> {
        let init = self.insn.insn.mnemonic() == iced_x86::Mnemonic::Fninit;
        if self.sregs.cr0 & (CR0_EM | CR0_TS) != 0 {
            return self.fault(VEC_NM, None, "fninit/fnclex (CR0.EM or TS) -> #NM");
        }
        let mut state = self.cpu.get_xsave()?;
        let kvm = super::xsave::kvm_bytes_mut(&mut state);
        if init {
            // FCW, FSW, FTW, FOP, FIP, FDP: bytes 0..24.
            area::put(kvm, 0, &[0u8; 24]);
            area::put(kvm, 0, &FCW_INIT.to_le_bytes());
        } else {
            let fsw = u16::from_le_bytes([kvm.get(FSW).copied().unwrap_or(0), kvm.get(FSW + 1).copied().unwrap_or(0)]);
            area::put(kvm, FSW, &(fsw & !FSW_CLEARED_BY_FNCLEX).to_le_bytes());
        }
        Self::mark_in_use(kvm, 1);
        self.cpu.set_xsave(&state)?;
        self.advance()?;
        self.count(if init { "fninit" } else { "fnclex" });
        Ok(())
    }

    /// FWAIT: #NM with CR0.TS and CR0.MP; #MF for a pending unmasked x87 exception
    /// (FSW.ES) with CR0.NE (without it, the PC's FERR# interrupt, which skiff's
    /// machine does not wire: nothing happens).
    pub(super) fn fwait(&mut self) -> Result<(), String> {
        if self.sregs.cr0 & (CR0_TS | CR0_MP) == CR0_TS | CR0_MP {
            return self.fault(VEC_NM, None, "fwait (CR0.TS and MP) -> #NM");
        }
        let state = self.cpu.get_xsave()?;
        let kvm = super::xsave::kvm_bytes(&state);
        let fsw = u16::from_le_bytes([kvm.get(FSW).copied().unwrap_or(0), kvm.get(FSW + 1).copied().unwrap_or(0)]);
        if fsw & FSW_ES != 0 && self.sregs.cr0 & CR0_NE != 0 {
            return self.fault(VEC_MF, None, "fwait (pending x87 exception) -> #MF");
        }
        self.advance()?;
        self.count("fwait");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
