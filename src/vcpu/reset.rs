//! The architectural state after RESET (power-up) and after INIT, from the Intel SDM
//! vol. 3 ("Processor state following power-up, reset, or INIT", table 9-1, and
//! 11.11.5 for the MTRRs), with AMD APM vol. 2 ("Initial processor state", 14.1.3)
//! where AMD differs. skiff uses RESET at every cold start and every in-place reboot,
//! so the two cannot differ.
//!
//! The table is applied on top of a vCPU state read from KVM: state the table does
//! not name (model-specific MSRs, PMU counters) keeps the value KVM gave the vCPU
//! when it was created, which is KVM's own power-up value.

use kvm_bindings::{KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, kvm_segment};

use super::msr;
use super::state::{VcpuState, apic_reg, lapic_get, lapic_set};

/// Which reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// RESET#/power-up: everything to its power-up value.
    Power,
    /// INIT: like RESET, except the x87/SSE/AVX state, the MTRRs and other MSRs, the
    /// TSC, XCR0 and the APIC base are left alone (SDM 9.1: "the internal caches,
    /// MSRs, MTRRs, and x87 FPU state are left unchanged").
    Init,
}

/// CPU vendor, where the manuals disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
}

// The table's values.
pub const RIP: u64 = 0xfff0;
pub const RFLAGS: u64 = 0x2;
pub const CS_SELECTOR: u16 = 0xf000;
pub const CS_BASE: u64 = 0xffff_0000;
pub const SEGMENT_LIMIT: u32 = 0xffff;
/// CD | NW | ET: caches disabled, real mode, paging off.
pub const CR0: u64 = 0x6000_0010;
pub const CR0_CD_NW: u64 = 0x6000_0000;
pub const DR6: u64 = 0xffff_0ff0;
pub const DR7: u64 = 0x400;
pub const EFER: u64 = 0;
/// PA0..PA7 = WB, WT, UC-, UC, WB, WT, UC-, UC.
pub const PAT: u64 = 0x0007_0406_0007_0406;
/// Only x87 state enabled.
pub const XCR0: u64 = 1;
pub const MXCSR: u32 = 0x1f80;
/// The x87 control word as FNINIT leaves it (all exceptions masked, 64-bit precision,
/// round to nearest). The SDM's table gives 0040H for the instant after power-up;
/// KVM and every firmware put 037FH before any software can look, and that is the
/// value skiff presents, with all tags empty.
pub const FCW: u16 = 0x37f;
pub const APIC_BASE_ADDR: u64 = 0xfee0_0000;
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_MISC_ENABLE bit 0, fast-string operations: enabled at reset.
pub const MISC_ENABLE_FAST_STRINGS: u64 = 1;
/// LAPIC after power-up (SDM 10.4.7.1): every LVT masked, DFR all ones, SVR 0xFF
/// (APIC software-disabled, spurious vector 0xFF).
pub const LVT_MASKED: u32 = 1 << 16;
pub const DFR: u32 = 0xffff_ffff;
pub const SVR: u32 = 0xff;

// Segment types (SDM 3.4.5.1, 3.5).
const TYPE_DATA_RW_ACCESSED: u8 = 0x3;
const TYPE_CODE_RX_ACCESSED: u8 = 0xb;
const TYPE_LDT: u8 = 0x2;
/// Intel VMX requires a busy TSS in TR (KVM uses the 32-bit busy type, 11).
const TYPE_TSS_BUSY_32: u8 = 0xb;
/// AMD's table: TR is a 16-bit busy TSS (type 3).
const TYPE_TSS_BUSY_16: u8 = 0x3;

fn segment(selector: u16, base: u64, type_: u8, s: u8) -> kvm_segment {
    kvm_segment { base, limit: SEGMENT_LIMIT, selector, type_, present: 1, dpl: 0, db: 0, s, l: 0, g: 0, avl: 0, unusable: 0, padding: 0 }
}

/// The MSRs the table gives a value, at RESET. `vcnt` bounds the variable MTRRs.
pub fn reset_msrs(bsp: bool, vcnt: u32) -> Vec<(u32, u64)> {
    let mut v = vec![
        // SDM 11.11.5: E and FE clear (all memory UC by MTRR) and every variable range
        // invalid. The fixed ranges are undefined at reset; skiff zeroes them.
        (msr::IA32_MTRR_DEF_TYPE, 0),
        (msr::IA32_MTRR_FIX64K_00000, 0),
        (msr::IA32_MTRR_FIX16K_80000, 0),
        (msr::IA32_MTRR_FIX16K_A0000, 0),
    ];
    v.extend((msr::IA32_MTRR_FIX4K_C0000..msr::IA32_MTRR_FIX4K_C0000 + 8).map(|i| (i, 0)));
    for n in 0..vcnt.min(msr::MAX_VARIABLE_MTRRS) {
        let (base, mask) = msr::mtrr_var(n);
        v.extend([(base, 0), (mask, 0)]);
    }
    let apic_base = APIC_BASE_ADDR | APIC_BASE_ENABLE | if bsp { APIC_BASE_BSP } else { 0 };
    v.extend([
        (msr::IA32_PAT, PAT),
        (msr::IA32_TSC, 0),
        (msr::IA32_APIC_BASE, apic_base),
        (msr::IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRINGS),
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::LSTAR, 0),
        (msr::CSTAR, 0),
        (msr::SFMASK, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::TSC_AUX, 0),
        (msr::IA32_TSC_DEADLINE, 0),
        (msr::IA32_SPEC_CTRL, 0),
        // The paravirtual MSRs off: otherwise KVM keeps writing the clock, steal time
        // and async-PF data into guest pages the next kernel owns.
        (msr::KVM_WALL_CLOCK, 0),
        (msr::KVM_SYSTEM_TIME, 0),
        (msr::KVM_WALL_CLOCK_NEW, 0),
        (msr::KVM_SYSTEM_TIME_NEW, 0),
        (msr::KVM_ASYNC_PF_EN, 0),
        (msr::KVM_STEAL_TIME, 0),
        (msr::KVM_PV_EOI_EN, 0),
        (msr::KVM_ASYNC_PF_INT, 0),
        // Guest polling allowed, KVM's documented reset value.
        (msr::KVM_POLL_CONTROL, 1),
    ]);
    v
}

/// Puts `state` (read from the vCPU, or KVM's creation state) into the architectural
/// state after `kind`. `index` 0 is the bootstrap processor; `signature` is CPUID
/// leaf 1 EAX (family, model, stepping), which RESET leaves in EDX.
pub fn apply(kind: ResetKind, vendor: Vendor, state: &mut VcpuState, index: u8, signature: u32) {
    let bsp = index == 0;
    // General registers: all zero but RIP, RFLAGS and EDX.
    state.regs = kvm_bindings::kvm_regs { rip: RIP, rflags: RFLAGS, rdx: signature as u64, ..Default::default() };

    // Segments: real mode at F000:FFF0 with CS based at FFFF0000 (the reset vector is
    // FFFFFFF0 until the first far jump).
    let mut s = state.sregs.as_sregs();
    let data = segment(0, 0, TYPE_DATA_RW_ACCESSED, 1);
    s.cs = segment(CS_SELECTOR, CS_BASE, TYPE_CODE_RX_ACCESSED, 1);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.ldt = segment(0, 0, TYPE_LDT, 0);
    s.tr = segment(0, 0, if vendor == Vendor::Amd { TYPE_TSS_BUSY_16 } else { TYPE_TSS_BUSY_32 }, 0);
    s.gdt = kvm_bindings::kvm_dtable { base: 0, limit: SEGMENT_LIMIT as u16, ..Default::default() };
    s.idt = s.gdt;
    s.cr0 = match kind {
        ResetKind::Power => CR0,
        // INIT keeps CD and NW, sets ET, clears the rest.
        ResetKind::Init => (s.cr0 & CR0_CD_NW) | (CR0 & !CR0_CD_NW),
    };
    (s.cr2, s.cr3, s.cr4, s.cr8) = (0, 0, 0, 0);
    s.efer = EFER;
    if kind == ResetKind::Power {
        s.apic_base = APIC_BASE_ADDR | APIC_BASE_ENABLE | if bsp { APIC_BASE_BSP } else { 0 };
    }
    s.interrupt_bitmap = [0; 4];
    state.sregs.set_from(&s);

    state.debugregs = kvm_bindings::kvm_debugregs { dr6: DR6, dr7: DR7, ..Default::default() };

    if kind == ResetKind::Power {
        // x87/SSE: FNINIT state, MXCSR default, everything else zero; XSTATE_BV says
        // x87 and SSE come from this buffer (so FCW and MXCSR are taken as written)
        // and every other component is in its init state.
        // MXCSR_MASK (word 7) is read-only, and bytes 464..511 of the legacy area are
        // left to software (KVM fills them on every read): both keep their value.
        for (i, w) in state.xsave.0.iter_mut().enumerate() {
            if i != 7 && !(116..128).contains(&i) {
                *w = 0;
            }
        }
        state.xsave.set_fcw(FCW);
        state.xsave.set_mxcsr(MXCSR);
        const XSTATE_BV_WORD: usize = 512 / 4;
        if let Some(w) = state.xsave.0.get_mut(XSTATE_BV_WORD) {
            *w = 0b11;
        }
        state.xcrs = kvm_bindings::kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        if let Some(x) = state.xcrs.xcrs.first_mut() {
            x.xcr = 0;
            x.value = XCR0;
        }
        let vcnt = state
            .msrs
            .0
            .iter()
            .filter(|e| (msr::IA32_MTRR_PHYSBASE0..msr::IA32_MTRR_FIX64K_00000).contains(&e.index))
            .count() as u32
            / 2;
        for (index, value) in reset_msrs(bsp, vcnt) {
            state.msrs.set_value(index, value);
        }
    }

    // The local APIC (SDM 10.4.7.1; INIT resets it the same way, 10.4.7.3, except
    // the APIC base MSR).
    let l = &mut state.lapic;
    let version = lapic_get(l, apic_reg::VERSION);
    l.regs = [0; 1024];
    lapic_set(l, apic_reg::ID, (index as u32) << 24);
    lapic_set(l, apic_reg::VERSION, version);
    lapic_set(l, apic_reg::DFR, DFR);
    lapic_set(l, apic_reg::SVR, SVR);
    for lvt in [
        apic_reg::LVT_CMCI,
        apic_reg::LVT_TIMER,
        apic_reg::LVT_THERMAL,
        apic_reg::LVT_PERF,
        apic_reg::LVT0,
        apic_reg::LVT1,
        apic_reg::LVT_ERROR,
    ] {
        lapic_set(l, lvt, LVT_MASKED);
    }

    // The BSP runs; application processors wait: for INIT then SIPI after RESET, for
    // the SIPI after INIT.
    state.mp_state.mp_state = match (bsp, kind) {
        (true, _) => KVM_MP_STATE_RUNNABLE,
        (false, ResetKind::Power) => KVM_MP_STATE_UNINITIALIZED,
        (false, ResetKind::Init) => KVM_MP_STATE_INIT_RECEIVED,
    };
    // Nothing pending: no exception, interrupt, NMI or SMI survives a reset. The
    // flags say which of those fields KVM is to take (all that it reported).
    let flags = state.events.flags;
    state.events = kvm_bindings::kvm_vcpu_events { flags, ..Default::default() };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::state::{MsrValues, SpecialRegs, TscKhz, XsaveArea};
    use kvm_bindings::kvm_msr_entry;

    /// A state with garbage everywhere, as a running guest leaves it.
    fn dirty(vcnt: u32) -> VcpuState {
        let mut msrs: Vec<kvm_msr_entry> =
            msr::implied(vcnt).into_iter().map(|index| kvm_msr_entry { index, data: 0xdead_beef, ..Default::default() }).collect();
        msrs.push(kvm_msr_entry { index: 0xc001_0015, data: 0x1234, ..Default::default() });
        let mut lapic = kvm_bindings::kvm_lapic_state { regs: [0x55; 1024] };
        lapic_set(&mut lapic, apic_reg::VERSION, 0x5_0014);
        VcpuState {
            tsc_khz: TscKhz(2_000_000),
            sregs: SpecialRegs::V1(kvm_bindings::kvm_sregs {
                cr0: 0xe005_003b,
                cr3: 0x1000,
                cr4: 0x3606f0,
                efer: 0xd01,
                ..Default::default()
            }),
            regs: kvm_bindings::kvm_regs { rax: 1, rip: 0xffff_ffff_8100_0000, rflags: 0x246, ..Default::default() },
            xsave: XsaveArea(vec![0x1111_1111; 1024]),
            xcrs: kvm_bindings::kvm_xcrs { nr_xcrs: 1, ..Default::default() },
            debugregs: kvm_bindings::kvm_debugregs { db: [1, 2, 3, 4], dr6: 0, dr7: 0xff, ..Default::default() },
            lapic,
            msrs: MsrValues(msrs),
            mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
            events: kvm_bindings::kvm_vcpu_events { exception: kvm_bindings::kvm_vcpu_events__bindgen_ty_1 { injected: 1, nr: 14, ..Default::default() }, ..Default::default() },
        }
    }

    #[test]
    fn reset_matches_the_table() {
        let mut s = dirty(8);
        apply(ResetKind::Power, Vendor::Amd, &mut s, 0, 0x00a0_0f11);
        let r = s.regs;
        assert_eq!((r.rip, r.rflags, r.rdx, r.rax, r.rsp), (0xfff0, 2, 0x00a0_0f11, 0, 0));
        let sr = s.sregs.as_sregs();
        assert_eq!(sr.cr0, 0x6000_0010);
        assert_eq!((sr.cr2, sr.cr3, sr.cr4, sr.efer), (0, 0, 0, 0));
        assert_eq!((sr.cs.selector, sr.cs.base, sr.cs.limit, sr.cs.type_, sr.cs.present, sr.cs.s), (0xf000, 0xffff_0000, 0xffff, 0xb, 1, 1));
        for seg in [sr.ds, sr.es, sr.fs, sr.gs, sr.ss] {
            assert_eq!((seg.selector, seg.base, seg.limit, seg.type_, seg.present), (0, 0, 0xffff, 3, 1));
        }
        assert_eq!((sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit), (0, 0xffff, 0, 0xffff));
        assert_eq!((sr.ldt.type_, sr.tr.type_), (2, 3), "AMD: TR is a busy 16-bit TSS");
        assert_eq!(sr.apic_base, 0xfee0_0900, "enabled, BSP");
        assert_eq!((s.debugregs.db, s.debugregs.dr6, s.debugregs.dr7), ([0; 4], 0xffff_0ff0, 0x400));
        assert_eq!((s.xsave.fcw(), s.xsave.mxcsr()), (0x37f, 0x1f80));
        assert_eq!(s.xsave.0.get(128), Some(&3), "XSTATE_BV: x87 and SSE from the buffer");
        assert!(s.xsave.0.iter().enumerate().all(|(i, w)| [0, 6, 7, 128].contains(&i) || (116..128).contains(&i) || *w == 0));
        assert_eq!((s.xcrs.nr_xcrs, s.xcrs.xcrs[0].xcr, s.xcrs.xcrs[0].value), (1, 0, 1));
        let m = |i| s.msrs.get_value(i).unwrap();
        assert_eq!(m(msr::IA32_PAT), 0x0007_0406_0007_0406);
        assert_eq!(m(msr::IA32_MTRR_DEF_TYPE) & (msr::MTRR_DEF_TYPE_E | msr::MTRR_DEF_TYPE_FE), 0);
        for n in 0..8 {
            assert_eq!(m(msr::mtrr_var(n).1) & msr::MTRR_PHYSMASK_VALID, 0, "PHYSMASK{n} valid bit");
        }
        for i in [0x250, 0x258, 0x259, 0x268, 0x26f] {
            assert_eq!(m(i), 0, "fixed MTRR {i:#x}");
        }
        assert_eq!(m(msr::IA32_APIC_BASE), 0xfee0_0900);
        assert_eq!(m(msr::IA32_MISC_ENABLE), 1);
        assert_eq!((m(msr::LSTAR), m(msr::KVM_SYSTEM_TIME_NEW), m(msr::IA32_TSC)), (0, 0, 0));
        assert_eq!(s.msrs.get_value(0xc001_0015), Some(0x1234), "MSRs outside the table keep KVM's value");
        assert_eq!(lapic_get(&s.lapic, apic_reg::ID), 0);
        assert_eq!(lapic_get(&s.lapic, apic_reg::VERSION), 0x5_0014, "version is read-only");
        assert_eq!(lapic_get(&s.lapic, apic_reg::SVR), 0xff);
        assert_eq!(lapic_get(&s.lapic, apic_reg::DFR), 0xffff_ffff);
        for lvt in [apic_reg::LVT_TIMER, apic_reg::LVT0, apic_reg::LVT1, apic_reg::LVT_ERROR] {
            assert_eq!(lapic_get(&s.lapic, lvt), 1 << 16);
        }
        for r in [apic_reg::TPR, apic_reg::ISR, apic_reg::IRR, apic_reg::TMR, apic_reg::ICR_LOW, apic_reg::TIMER_INITIAL] {
            assert_eq!(lapic_get(&s.lapic, r), 0, "{r:#x}");
        }
        assert_eq!(s.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
        assert_eq!(s.events.exception.injected, 0);
        assert_eq!(s.tsc_khz, TscKhz(2_000_000), "the TSC frequency is the hardware's");
    }

    #[test]
    fn application_processors_wait_and_are_not_bsp() {
        let mut s = dirty(2);
        apply(ResetKind::Power, Vendor::Intel, &mut s, 3, 0x906ea);
        assert_eq!(s.mp_state.mp_state, KVM_MP_STATE_UNINITIALIZED);
        assert_eq!(s.sregs.as_sregs().apic_base, 0xfee0_0800);
        assert_eq!(s.sregs.as_sregs().tr.type_, 0xb, "Intel: busy 32-bit TSS, as VMX requires");
        assert_eq!(lapic_get(&s.lapic, apic_reg::ID), 3 << 24);
        let mut s = dirty(2);
        apply(ResetKind::Init, Vendor::Intel, &mut s, 3, 0x906ea);
        assert_eq!(s.mp_state.mp_state, KVM_MP_STATE_INIT_RECEIVED);
    }

    #[test]
    fn init_leaves_fpu_msrs_and_cache_control_alone() {
        let mut s = dirty(8);
        apply(ResetKind::Init, Vendor::Amd, &mut s, 0, 0x00a0_0f11);
        assert_eq!(s.regs.rip, 0xfff0);
        // CR0 had CD=1, NW=1 (0xe005003b): INIT keeps them, sets ET, clears the rest.
        assert_eq!(s.sregs.as_sregs().cr0, 0x6000_0010);
        assert!(s.xsave.0.iter().all(|w| *w == 0x1111_1111), "x87/SSE unchanged");
        assert_eq!(s.msrs.get_value(msr::IA32_MTRR_DEF_TYPE), Some(0xdead_beef), "MTRRs unchanged");
        assert_eq!(s.msrs.get_value(msr::IA32_PAT), Some(0xdead_beef));
        assert_eq!(s.sregs.as_sregs().efer, 0);
        assert_eq!(s.debugregs.dr7, 0x400);

        let mut s = dirty(8);
        if let SpecialRegs::V1(sr) = &mut s.sregs {
            sr.cr0 = 0x8000_0011; // PG, ET, PE; caches on
        }
        apply(ResetKind::Init, Vendor::Amd, &mut s, 0, 0);
        assert_eq!(s.sregs.as_sregs().cr0, 0x10, "CD/NW stay clear across INIT");
    }
}
