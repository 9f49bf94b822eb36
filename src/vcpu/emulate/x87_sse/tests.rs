//! LDMXCSR, STMXCSR, FNINIT, FNCLEX, FWAIT against the fake vCPU, and the x87/SSE
//! state surviving an emulated instruction, an INIT reset and a state round trip.

use super::super::fake::*;
use crate::vcpu::xsave::{self as area, HEADER, MXCSR};

const LDMXCSR_RDI: [u8; 3] = [0x0f, 0xae, 0x17];
const STMXCSR_RDI: [u8; 3] = [0x0f, 0xae, 0x1f];

fn mxcsr_of(f: &mut Fake) -> u32 {
    area::u32_at(f.xsave_bytes(), MXCSR)
}

#[test]
fn ldmxcsr_then_stmxcsr_reads_it_back() {
    let mut f = Fake::new();
    // SSE not in use in KVM's copy: the load must mark it, or KVM ignores MXCSR.
    area::put(f.xsave_bytes(), HEADER, &1u64.to_le_bytes());
    f.poke(DATA, &0x1fa0u32.to_le_bytes());
    f.regs.rdi = DATA;
    f.run(&LDMXCSR_RDI);
    f.assert_done(3);
    assert_eq!(mxcsr_of(&mut f), 0x1fa0);
    assert_eq!(area::u64_at(f.xsave_bytes(), HEADER) & 2, 2, "SSE marked in use");
    assert_eq!((f.xsave_gets, f.xsave_sets), (1, 1));
    f.injected.clear();
    f.regs.rdi = DATA + 64;
    f.run(&STMXCSR_RDI);
    f.assert_done(3);
    assert_eq!(f.peek(DATA + 64, 4), 0x1fa0u32.to_le_bytes());
}

#[test]
fn ldmxcsr_faults() {
    let mut f = Fake::new();
    f.poke(DATA, &0x1_0000u32.to_le_bytes());
    f.regs.rdi = DATA;
    f.run(&LDMXCSR_RDI);
    f.assert_fault(13, Some(0));
    assert_eq!(mxcsr_of(&mut f), 0x1f80, "unchanged");
    // MXCSR_MASK without DAZ (bit 6): setting it is reserved.
    let mut f = Fake::new();
    area::put(f.xsave_bytes(), area::MXCSR_MASK, &0xffbfu32.to_le_bytes());
    f.poke(DATA, &0x1fc0u32.to_le_bytes());
    f.regs.rdi = DATA;
    f.run(&LDMXCSR_RDI);
    f.assert_fault(13, Some(0));
    let mut f = Fake::new();
    f.regs.rdi = UNMAPPED_VA;
    f.run(&LDMXCSR_RDI);
    f.assert_page_fault(UNMAPPED_VA, 0);
    let mut f = Fake::new();
    f.regs.rdi = READ_ONLY_VA;
    f.run(&STMXCSR_RDI);
    f.assert_page_fault(READ_ONLY_VA, 0b011);
    let mut f = Fake::new();
    f.sregs.cr0 |= 8; // TS
    f.run(&LDMXCSR_RDI);
    f.assert_fault(7, None);
    let mut f = Fake::new();
    f.sregs.cr4 &= !(1 << 9); // OSFXSR
    f.run(&STMXCSR_RDI);
    f.assert_fault(6, None);
}

#[test]
fn stmxcsr_across_a_page_boundary() {
    let mut f = Fake::new();
    area::put(f.xsave_bytes(), MXCSR, &0x1234_5678u32.to_le_bytes());
    f.regs.rdi = SPLIT_VA + 0xffe;
    f.run(&STMXCSR_RDI);
    f.assert_done(3);
    assert_eq!(f.peek(SPLIT_GPA_LO + 0xffe, 2), [0x78, 0x56]);
    assert_eq!(f.peek(SPLIT_GPA_HI, 2), [0x34, 0x12]);
}

#[test]
fn fninit_fnclex_fwait() {
    let mut f = Fake::new();
    area::put(f.xsave_bytes(), 0, &[0x7f, 0x02, 0xff, 0x80, 0xff, 0, 1, 2]);
    area::put(f.xsave_bytes(), HEADER, &2u64.to_le_bytes());
    f.run(&[0xdb, 0xe2]); // fnclex
    f.assert_done(2);
    assert_eq!(&f.xsave_bytes()[..8], &[0x7f, 0x02, 0x00, 0x00, 0xff, 0, 1, 2]);
    assert_eq!(area::u64_at(f.xsave_bytes(), HEADER), 3, "x87 marked in use");
    let mut f = Fake::new();
    area::put(f.xsave_bytes(), 0, &[0x7f, 0x02, 0xff, 0x80, 0xff, 0, 1, 2]);
    f.run(&[0xdb, 0xe3]); // fninit
    f.assert_done(2);
    assert_eq!(&f.xsave_bytes()[..8], &[0x7f, 0x03, 0, 0, 0, 0, 0, 0]);
    let mut f = Fake::new();
    f.run(&[0x9b]);
    f.assert_done(1);
    let mut f = Fake::new();
    area::put(f.xsave_bytes(), 2, &0x80u16.to_le_bytes());
    f.run(&[0x9b]);
    f.assert_fault(16, None);
    let mut f = Fake::new();
    f.sregs.cr0 |= 8 | 2;
    f.run(&[0x9b]);
    f.assert_fault(7, None);
    let mut f = Fake::new();
    f.sregs.cr0 |= 8;
    f.run(&[0xdb, 0xe3]);
    f.assert_fault(7, None);
}

/// MXCSR, FCW and XMM0, set by emulated instructions, survive an INIT reset and
/// the trip out of the vCPU into the state list and back: all of them live in the
/// one XSAVE area, which the state list carries whole.
#[test]
fn x87_sse_state_survives_emulation_reset_and_round_trip() {
    use crate::vcpu::reset::{self, ResetKind};
    use crate::vcpu::state::{MsrValues, SpecialRegs, TscKhz, VcpuState, XsaveArea};
    let mut f = Fake::new();
    f.poke(DATA, &0x1fa0u32.to_le_bytes());
    f.regs.rdi = DATA;
    f.run(&LDMXCSR_RDI);
    f.assert_done(3);
    area::put(f.xsave_bytes(), 0, &0x27fu16.to_le_bytes());
    area::put(f.xsave_bytes(), 160, &[0xab; 16]);
    let mut state = VcpuState {
        tsc_khz: TscKhz(0),
        sregs: SpecialRegs::V1(f.sregs),
        regs: f.regs,
        xsave: XsaveArea(f.xsave.region.to_vec()),
        xcrs: kvm_bindings::kvm_xcrs { nr_xcrs: 1, ..Default::default() },
        debugregs: Default::default(),
        lapic: kvm_bindings::kvm_lapic_state { regs: [0; 1024] },
        msrs: MsrValues(Vec::new()),
        mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
        events: Default::default(),
    };
    reset::apply(ResetKind::Init, reset::Vendor::Amd, &mut state, 1, 0xa00f11);
    let x = &state.xsave;
    assert_eq!((x.mxcsr(), x.fcw()), (0x1fa0, 0x27f));
    // Back into a vCPU; STMXCSR (emulated) reads what LDMXCSR loaded.
    let mut g = Fake::new();
    for (d, s) in g.xsave.region.iter_mut().zip(&state.xsave.0) {
        *d = *s;
    }
    g.regs.rdi = DATA + 64;
    g.run(&STMXCSR_RDI);
    g.assert_done(3);
    assert_eq!(g.peek(DATA + 64, 4), 0x1fa0u32.to_le_bytes());
    assert_eq!(&g.xsave_bytes()[160..176], &[0xab; 16], "XMM0 kept");
    assert_eq!(&g.xsave_bytes()[..2], &0x27fu16.to_le_bytes(), "FCW kept");
}
