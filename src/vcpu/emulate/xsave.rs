//! The XSAVE family: XSAVE, XSAVEOPT, XSAVEC, XSAVES (and their 64-bit forms) store
//! KVM's copy of the extended state into the guest's area; XRSTOR and XRSTORS load
//! it. One KVM_GET_XSAVE per instruction, and one KVM_SET_XSAVE for a restore; the
//! area is translated page by page (it may cross pages, and lie in MMIO space).
//! Faults, in the order hardware checks them (SDM vol. 1, 13.7-13.12): CR4.OSXSAVE
//! clear #UD, CR0.TS #NM, XSAVES/XRSTORS above CPL 0 #GP(0), an area not 64-byte
//! aligned #GP(0), paging #PF, then XRSTOR's header and MXCSR checks #GP(0).

use iced_x86::Mnemonic;
use kvm_bindings::kvm_xsave;

use super::mem::Span;
use super::{CR0_TS, CR4_OSXSAVE, CR4_PKE, Cx, EmuCpu, VEC_NM};
use crate::vcpu::xsave::{self as area, Area, COMPACTED, LEGACY_AND_HEADER, SaveForm};
use crate::x86::paging::Access;

/// KVM's xsave buffer as bytes.
pub(super) fn kvm_bytes(x: &kvm_xsave) -> &[u8] {
    // SAFETY: `region` is a plain [u32; 1024] array; viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts(x.region.as_ptr().cast::<u8>(), std::mem::size_of_val(&x.region)) }
}

pub(super) fn kvm_bytes_mut(x: &mut kvm_xsave) -> &mut [u8] {
    // SAFETY: as above, exclusively borrowed.
    unsafe { std::slice::from_raw_parts_mut(x.region.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(&x.region)) }
}

#[derive(Clone, Copy)]
enum Op {
    Save(SaveForm),
    /// XRSTORS takes the compacted form only.
    Restore { only_compacted: bool },
}

/// What each mnemonic does, whether it is a supervisor instruction, and its name
/// in the stats.
fn classify(m: Mnemonic) -> Option<(Op, bool, &'static str)> {
    Some(match m {
        Mnemonic::Xsave | Mnemonic::Xsave64 => (Op::Save(SaveForm::Standard), false, "xsave"),
        Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => (Op::Save(SaveForm::Standard), false, "xsaveopt"),
        Mnemonic::Xsavec | Mnemonic::Xsavec64 => (Op::Save(SaveForm::Compacted), false, "xsavec"),
        Mnemonic::Xsaves | Mnemonic::Xsaves64 => (Op::Save(SaveForm::Compacted), true, "xsaves"),
        Mnemonic::Xrstor | Mnemonic::Xrstor64 => (Op::Restore { only_compacted: false }, false, "xrstor"),
        Mnemonic::Xrstors | Mnemonic::Xrstors64 => (Op::Restore { only_compacted: true }, true, "xrstors"),
        _ => return None,
    })
}

/// The guest's area through a translated span.
struct SpanArea<'c, 'a, C: EmuCpu> {
    cx: &'c mut Cx<'a, C>,
    span: Span,
}

impl<C: EmuCpu> Area for SpanArea<'_, '_, C> {
    fn read(&mut self, offset: usize, out: &mut [u8]) {
        self.cx.read_span(&self.span, offset, out);
    }
    fn write(&mut self, offset: usize, data: &[u8]) {
        self.cx.write_span(&self.span, offset, data);
    }
}

impl<C: EmuCpu> Cx<'_, C> {
    pub(super) fn xsave_family(&mut self) -> Result<(), String> {
        let Some((op, supervisor, name)) = classify(self.insn.insn.mnemonic()) else { return self.cannot_emulate() };
        if self.sregs.cr4 & CR4_OSXSAVE == 0 {
            return self.ud("xsave family (CR4.OSXSAVE clear) -> #UD");
        }
        if self.sregs.cr0 & CR0_TS != 0 {
            return self.fault(VEC_NM, None, "xsave family (CR0.TS) -> #NM");
        }
        if supervisor && self.sregs.cs.dpl != 0 {
            return self.gp("xsaves/xrstors at CPL > 0 -> #GP");
        }
        let Some(gva) = self.memory_operand() else { return self.ud("xsave family (bad operand) -> #UD") };
        if !gva.is_multiple_of(64) {
            return self.gp("xsave family (unaligned) -> #GP");
        }
        let enabled = self.cpu.xcr0()? | if supervisor { self.cpu.xss()? } else { 0 };
        let rfbm = ((self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff)) & enabled;
        let layout = self.cpu.xsave_layout();
        // KVM_GET_XSAVE's 4 KiB must hold every component enabled (AMX's would not).
        let needed = layout.area_size(enabled, false);
        if layout.unknown(enabled) != 0 || needed > std::mem::size_of::<kvm_xsave>() {
            self.unhandled = Some(format!(
                "{name}: XCR0 | IA32_XSS = {enabled:#x} names state skiff cannot hold ({needed} bytes of XSAVE area)"
            ));
            return Ok(());
        }
        let mut state = self.cpu.get_xsave()?;
        if self.sregs.cr4 & CR4_PKE != 0 {
            self.note_pkru(&state);
        }
        let long = self.long_mode();
        match op {
            Op::Save(form) => {
                let size = layout.area_size(rfbm, form == SaveForm::Compacted);
                let Some(span) = self.span(gva, size, Access::Write)? else { return Ok(()) };
                area::save(kvm_bytes(&state), &mut SpanArea { cx: self, span }, rfbm, form, &layout, long);
            }
            Op::Restore { only_compacted } => {
                let Some(span) = self.span(gva, LEGACY_AND_HEADER, Access::Read)? else { return Ok(()) };
                let header = area::check_header(&mut SpanArea { cx: self, span }, enabled, only_compacted);
                let Ok((xstate_bv, xcomp_bv)) = header else { return self.gp("xrstor (bad header) -> #GP") };
                let compacted = xcomp_bv & COMPACTED != 0;
                let placement = if compacted { xcomp_bv & !COMPACTED } else { rfbm };
                let size = layout.extent(placement, rfbm & xstate_bv, compacted);
                let Some(span) = self.span(gva, size, Access::Read)? else { return Ok(()) };
                let kvm = kvm_bytes_mut(&mut state);
                let loaded = area::restore(kvm, &mut SpanArea { cx: self, span }, rfbm, (xstate_bv, xcomp_bv), &layout, long);
                if loaded.is_err() {
                    return self.gp("xrstor (reserved MXCSR bits) -> #GP");
                }
                self.cpu.set_xsave(&state)?;
            }
        }
        self.advance()?;
        self.count(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
