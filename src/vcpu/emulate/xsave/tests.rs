//! The XSAVE family against the fake vCPU: results in memory and in KVM's state,
//! and every fault.

use super::super::fake::*;
use zerocopy::IntoBytes;
use crate::vcpu::xsave::{self as area, COMPACTED, HEADER, MXCSR};

const XSAVE64: [u8; 4] = [0x48, 0x0f, 0xae, 0x27];
const XSAVEOPT64: [u8; 4] = [0x48, 0x0f, 0xae, 0x37];
const XRSTOR64: [u8; 4] = [0x48, 0x0f, 0xae, 0x2f];
const XSAVEC64: [u8; 4] = [0x48, 0x0f, 0xc7, 0x27];
const XSAVES64: [u8; 4] = [0x48, 0x0f, 0xc7, 0x2f];
const XRSTORS64: [u8; 4] = [0x48, 0x0f, 0xc7, 0x1f];

/// A fake whose KVM state has recognisable values in every component of 0xe7.
fn fake() -> Fake {
    let mut f = Fake::new();
    let k = f.xsave_bytes();
    area::put(k, 0, &0x27fu16.to_le_bytes());
    area::put(k, MXCSR, &0x1fa0u32.to_le_bytes());
    k[160] = 0xaa; // XMM0
    k[0x240] = 0xbb; // YMM0_H
    k[0x440] = 0xcc; // k0
    k[0x480] = 0xcd; // ZMM0_H
    k[0x680] = 0xdd; // ZMM16
    area::put(k, HEADER, &0xe7u64.to_le_bytes());
    (f.regs.rax, f.regs.rdx) = (u64::MAX, u64::MAX);
    f
}

#[test]
fn xsave_stores_everything_in_xcr0() {
    for insn in [XSAVE64, XSAVEOPT64] {
        let mut f = fake();
        f.poke(DATA + HEADER as u64, &(1u64 << 9).to_le_bytes());
        f.regs.rdi = DATA;
        f.run(&insn);
        f.assert_done(4);
        let g = f.peek(DATA, 0xa88);
        assert_eq!((g[0], g[24], g[160], g[0x240], g[0x440], g[0x480], g[0x680]), (0x7f, 0xa0, 0xaa, 0xbb, 0xcc, 0xcd, 0xdd));
        assert_eq!(area::u64_at(&g, HEADER), 0xe7, "PKRU requested, not in use: its bit cleared");
        assert_eq!((f.xsave_gets, f.xsave_sets), (1, 0), "one KVM_GET_XSAVE, no set");
    }
}

#[test]
fn xsave_with_a_partial_mask_keeps_other_header_bits() {
    let mut f = fake();
    f.poke(DATA + HEADER as u64, &0x84u64.to_le_bytes());
    f.poke(DATA + 0x240, &[0x11]);
    f.regs.rdi = DATA;
    (f.regs.rax, f.regs.rdx) = (3, 0);
    f.run(&XSAVE64);
    f.assert_done(4);
    assert_eq!(area::u64_at(&f.peek(DATA + HEADER as u64, 8), 0), 0x87);
    assert_eq!(f.peek(DATA + 0x240, 1), [0x11], "AVX not requested: untouched");
}

#[test]
fn xrstor_round_trip() {
    let mut f = fake();
    f.regs.rdi = DATA;
    f.run(&XSAVE64);
    let saved = f.xsave.region;
    let k = f.xsave_bytes();
    k[160] = 0;
    k[0x680] = 0;
    area::put(k, MXCSR, &0x1f80u32.to_le_bytes());
    f.injected.clear();
    f.run(&XRSTOR64);
    f.assert_done(4);
    assert_eq!(f.xsave_sets, 1, "one KVM_SET_XSAVE");
    let now = super::kvm_bytes(&f.xsave);
    assert!(now[..HEADER] == saved.as_bytes()[..HEADER], "legacy region restored");
    assert!(now[HEADER + 8..0xa88] == saved.as_bytes()[HEADER + 8..0xa88], "extended region restored");
    // Every requested component is marked in use (PKRU with its init value, 0), so
    // KVM takes each from the buffer.
    assert_eq!(area::u64_at(now, HEADER), 0x2e7);
}

#[test]
fn xrstor_faults_instead_of_stopping_the_vm() {
    let run = |hdr: (u64, u64), mxcsr: u32, xcr0: u64| {
        let mut f = fake();
        f.xcr0 = xcr0;
        f.poke(DATA + HEADER as u64, &hdr.0.to_le_bytes());
        f.poke(DATA + HEADER as u64 + 8, &hdr.1.to_le_bytes());
        f.poke(DATA + MXCSR as u64, &mxcsr.to_le_bytes());
        f.regs.rdi = DATA;
        f.run(&XRSTOR64);
        f
    };
    let f = run((3, 0), 0x1_1f80, XCR0);
    f.assert_fault(13, Some(0));
    assert_eq!(f.xsave_sets, 0, "KVM never sees reserved MXCSR bits");
    run((0x20, 0), 0x1f80, 0x7).assert_fault(13, Some(0)); // XSTATE_BV outside XCR0
    run((3, 1), 0x1f80, XCR0).assert_fault(13, Some(0)); // XCOMP_BV without bit 63
    run((3, COMPACTED | 1 << 17), 0x1f80, XCR0).assert_fault(13, Some(0));
    run((3, 0), 0x1f80, XCR0).assert_done(4);
}

#[test]
fn operand_in_mmio_or_outside_ram_is_not_a_page_fault() {
    for va in [MMIO_VA, HOLE_VA] {
        let mut f = fake();
        f.regs.rdi = va;
        (f.regs.rax, f.regs.rdx) = (3, 0);
        f.run(&XSAVE64);
        f.assert_done(4);
        assert!(!f.mmio_writes.is_empty());
    }
    // XRSTOR from MMIO nothing claims: the header reads as all ones, which hardware
    // refuses with #GP(0) (not #PF).
    let mut f = fake();
    f.regs.rdi = MMIO_VA;
    f.run(&XRSTOR64);
    f.assert_fault(13, Some(0));
}

#[test]
fn area_across_a_page_boundary_is_two_translated_halves() {
    let mut f = fake();
    f.regs.rdi = SPLIT_VA + 0xc00;
    f.run(&XSAVE64);
    f.assert_done(4);
    assert_eq!(f.peek(SPLIT_GPA_LO + 0xc00 + 160, 1), [0xaa]);
    assert_eq!(f.peek(SPLIT_GPA_HI + 0x440 - 0x400, 1), [0xcc], "k0 in the second page");
    f.injected.clear();
    f.xsave_bytes()[0x440] = 0;
    f.run(&XRSTOR64);
    f.assert_done(4);
    assert_eq!(f.xsave_bytes()[0x440], 0xcc);
}

#[test]
fn page_faults_name_the_page_and_the_access() {
    let mut f = fake();
    f.regs.rdi = UNMAPPED_VA;
    f.run(&XSAVE64);
    f.assert_page_fault(UNMAPPED_VA, 0b010);
    // The area's first page is present, the second is not: CR2 is the second.
    let mut f = fake();
    f.regs.rdi = HOLE_VA + 0xc00;
    f.run(&XSAVE64);
    f.assert_page_fault(UNMAPPED_VA, 0b010);
    let mut f = fake();
    f.regs.rdi = UNMAPPED_VA;
    f.run(&XRSTOR64);
    f.assert_page_fault(UNMAPPED_VA, 0);
    let mut f = fake();
    f.regs.rdi = READ_ONLY_VA;
    f.run(&XSAVE64);
    f.assert_page_fault(READ_ONLY_VA, 0b011);
    // From user mode (a signal frame): U set.
    let mut f = fake();
    f.sregs.cs.dpl = 3;
    f.regs.rdi = UNMAPPED_VA;
    f.run(&XSAVE64);
    f.assert_page_fault(UNMAPPED_VA, 0b110);
    // A physical-address bit above MAXPHYADDR in the PTE: reserved.
    let mut f = fake();
    f.regs.rdi = RSVD_VA;
    f.run(&XSAVE64);
    f.assert_page_fault(RSVD_VA, 0b1011);
}

#[test]
fn protection_keys_use_the_real_pkru() {
    // PKRU in KVM's state: access disabled for key 1, which USER_VA carries.
    let mut f = fake();
    f.sregs.cr4 |= 1 << 22;
    let k = f.xsave_bytes();
    area::put(k, 0xa80, &0b0100u32.to_le_bytes());
    f.regs.rdi = USER_VA;
    f.run(&XSAVE64);
    f.assert_page_fault(USER_VA, 0b10_0011);
    let mut f = fake();
    f.regs.rdi = USER_VA;
    f.run(&XSAVE64);
    f.assert_done(4);
}

#[test]
fn alignment_and_enablement_faults() {
    let mut f = fake();
    f.regs.rdi = DATA + 32;
    f.run(&XSAVE64);
    f.assert_fault(13, Some(0));
    let mut f = fake();
    f.sregs.cr4 &= !super::CR4_OSXSAVE;
    f.run(&XRSTOR64);
    f.assert_fault(6, None);
    let mut f = fake();
    f.sregs.cr0 |= super::CR0_TS;
    f.run(&XSAVE64);
    f.assert_fault(7, None);
}

#[test]
fn xsavec_writes_the_compacted_area_only() {
    let mut f = fake();
    area::put(f.xsave_bytes(), HEADER, &0xe3u64.to_le_bytes()); // AVX in init state
    f.poke(DATA, &[0x55; 0xb00]);
    f.regs.rdi = DATA;
    f.run(&XSAVEC64);
    f.assert_done(4);
    let g = f.peek(DATA, 0xb00);
    assert_eq!(area::u64_at(&g, HEADER), 0xe3);
    assert_eq!(area::u64_at(&g, HEADER + 8), COMPACTED | 0x2e7);
    let end = f.layout.area_size(0x2e7, true);
    assert!(g[end..].iter().all(|b| *b == 0x55), "nothing past {end:#x}");
    assert_eq!(g[576 + 0x100], 0xcc, "opmask right after AVX's slot");
    f.injected.clear();
    f.xsave_bytes()[0x440] = 0;
    f.run(&XRSTOR64);
    f.assert_done(4);
    assert_eq!(f.xsave_bytes()[0x440], 0xcc, "XRSTOR reads the compacted form");
}

#[test]
fn xsaves_and_xrstors() {
    let mut f = fake();
    f.regs.rdi = DATA;
    f.run(&XSAVES64);
    f.assert_done(4);
    assert_eq!(area::u64_at(&f.peek(DATA + HEADER as u64, 16), 8), COMPACTED | 0x2e7);
    f.injected.clear();
    f.xsave_bytes()[0x680] = 0;
    f.run(&XRSTORS64);
    f.assert_done(4);
    assert_eq!(f.xsave_bytes()[0x680], 0xdd);
    // XRSTORS takes no standard form; neither runs above CPL 0.
    let mut f = fake();
    f.regs.rdi = DATA;
    f.poke(DATA + HEADER as u64, &[0; 64]);
    f.run(&XRSTORS64);
    f.assert_fault(13, Some(0));
    let mut f = fake();
    f.sregs.cs.dpl = 3;
    f.regs.rdi = DATA;
    f.run(&XSAVES64);
    f.assert_fault(13, Some(0));
}

#[test]
fn supervisor_state_skiff_cannot_hold_stops_with_a_diagnostic() {
    let mut f = fake();
    f.xss = 1 << 11; // CET user state
    f.regs.rdi = DATA;
    f.run(&XSAVES64);
    assert!(f.unhandled.as_deref().is_some_and(|d| d.contains("xsaves")), "{:?}", f.unhandled);
    assert!(f.injected.is_empty());
}
