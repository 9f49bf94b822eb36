//! The XSAVE family's data movement against a plain byte buffer.

use super::*;
use kvm_bindings::kvm_cpuid_entry2;

/// This host's layout: x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM, PKRU.
pub fn layout() -> XsaveLayout {
    let e = |index, eax, ebx, ecx| kvm_cpuid_entry2 { function: 0xd, index, eax, ebx, ecx, ..Default::default() };
    let cpuid = CpuId::from_entries(&[
        e(0, 0x2e7, 0xa88, 0xa88),
        e(2, 0x100, 0x240, 0),
        e(5, 0x40, 0x440, 0),
        e(6, 0x200, 0x480, 0),
        e(7, 0x400, 0x680, 0),
        e(9, 0x8, 0xa80, 0),
    ])
    .unwrap();
    XsaveLayout::from_cpuid(&cpuid)
}

/// A guest area in a vector; counts the bytes written.
struct Buf(Vec<u8>, usize);

impl Area for Buf {
    fn read(&mut self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.0[offset..offset + out.len()]);
    }
    fn write(&mut self, offset: usize, data: &[u8]) {
        self.0[offset..offset + data.len()].copy_from_slice(data);
        self.1 += data.len();
    }
}

fn kvm_state() -> Vec<u8> {
    let mut k = vec![0u8; 4096];
    put(&mut k, 0, &0x27fu16.to_le_bytes()); // FCW
    put(&mut k, MXCSR, &0x1fa0u32.to_le_bytes());
    put(&mut k, MXCSR_MASK, &0xffffu32.to_le_bytes());
    k[32] = 0x11; // ST0
    k[160] = 0xaa; // XMM0
    k[400] = 0xaf; // XMM15
    k[0x240] = 0xbb; // YMM0_H
    k[0x440] = 0xcc; // k0
    k[0x680] = 0xdd; // ZMM16
    put(&mut k, HEADER, &0xe7u64.to_le_bytes());
    k
}

#[test]
fn layout_from_cpuid() {
    let l = layout();
    assert_eq!(l.components.len(), 5);
    assert_eq!(l.standard_size, 0xa88);
    let c: Vec<_> = l.placed(0xe7).collect();
    assert_eq!(c[0], (2, 0x240, 0x100, 576));
    assert_eq!(c[1], (5, 0x440, 0x40, 576 + 0x100));
    assert_eq!(l.area_size(0x7, true), 576 + 0x100);
    assert_eq!(l.area_size(0x7, false), 0x340);
    assert_eq!(l.area_size(0xe7, false), 0xa80);
    assert_eq!(l.area_size(0x3, false), 576);
    assert_eq!(l.unknown(0x2e7), 0);
    assert_eq!(l.unknown(1 << 17), 1 << 17);
}

#[test]
fn standard_save_writes_rfbm_and_keeps_other_header_bits() {
    let l = layout();
    let k = kvm_state();
    let mut g = Buf(vec![0x55; 0xa88], 0);
    // XSTATE_BV bit 9 (not requested) set before; header bytes 8.. left alone.
    put(&mut g.0, HEADER, &(1u64 << 9 | 4).to_le_bytes());
    save(&k, &mut g, 0x3, SaveForm::Standard, &l, true);
    assert_eq!(u64_at(&g.0, HEADER), 1 << 9 | 4 | 3, "bits outside RFBM unchanged");
    assert_eq!(g.0[HEADER + 8], 0x55, "XCOMP_BV not written");
    assert_eq!((g.0[0], g.0[32], g.0[160], g.0[400]), (0x7f, 0x11, 0xaa, 0xaf));
    assert_eq!(u32_at(&g.0, MXCSR), 0x1fa0);
    assert_eq!(u32_at(&g.0, MXCSR_MASK), 0xffff, "MXCSR_MASK stored with MXCSR");
    assert_eq!(g.0[24 + 8 + 16], 0, "ST1 from KVM's area");
    assert_eq!(g.0[416], 0x55, "bytes 416..511 untouched");
    assert_eq!(g.0[0x240], 0x55, "AVX not requested");
    // Everything.
    save(&k, &mut g, 0x2e7, SaveForm::Standard, &l, true);
    assert_eq!((g.0[0x240], g.0[0x440], g.0[0x680]), (0xbb, 0xcc, 0xdd));
    assert_eq!(u64_at(&g.0, HEADER), 0xe7 | 4, "PKRU (bit 9) not in use: cleared");
}

#[test]
fn standard_save_outside_64_bit_mode_skips_xmm8_15() {
    let l = layout();
    let mut g = Buf(vec![0x55; 0xa88], 0);
    save(&kvm_state(), &mut g, 0x3, SaveForm::Standard, &l, false);
    assert_eq!((g.0[160], g.0[288], g.0[400]), (0xaa, 0x55, 0x55));
}

#[test]
fn compacted_save_writes_only_the_compacted_size() {
    let l = layout();
    let mut k = kvm_state();
    put(&mut k, HEADER, &0x23u64.to_le_bytes()); // AVX not in use
    let mut g = Buf(vec![0x55; 0xa88], 0);
    save(&k, &mut g, 0x27, SaveForm::Compacted, &l, true);
    assert_eq!(u64_at(&g.0, HEADER), 0x23);
    assert_eq!(u64_at(&g.0, HEADER + 8), COMPACTED | 0x27);
    assert!(g.0[HEADER + 16..HEADER + 64].iter().all(|b| *b == 0), "rest of the header zeroed");
    assert_eq!(g.0[576 + 0x100], 0xcc, "opmask after AVX's slot");
    assert_eq!(g.0[576], 0x55, "AVX not in use: not written");
    let end = l.area_size(0x27, true);
    assert!(g.0[end..].iter().all(|b| *b == 0x55), "nothing past the compacted area ({end:#x})");
}

#[test]
fn restore_standard_round_trip_and_init() {
    let l = layout();
    let mut g = Buf(vec![0; 0xa88], 0);
    save(&kvm_state(), &mut g, 0x2e7, SaveForm::Standard, &l, true);
    let mut fresh = vec![0x99u8; 4096];
    put(&mut fresh, MXCSR_MASK, &0xffffu32.to_le_bytes());
    put(&mut fresh, HEADER, &0u64.to_le_bytes());
    // AVX requested but absent from XSTATE_BV -> init (zeros), still marked in KVM.
    put(&mut g.0, HEADER, &0xe3u64.to_le_bytes());
    let hdr = check_header(&mut g, 0x2e7, false).unwrap();
    restore(&mut fresh, &mut g, 0xe7, hdr, &l, true).unwrap();
    assert_eq!((fresh[0], fresh[32], fresh[160], fresh[400]), (0x7f, 0x11, 0xaa, 0xaf));
    assert_eq!(u32_at(&fresh, MXCSR), 0x1fa0);
    assert!(fresh[0x240..0x340].iter().all(|b| *b == 0), "AVX initialised");
    assert_eq!((fresh[0x440], fresh[0x680]), (0xcc, 0xdd));
    assert_eq!(u64_at(&fresh, HEADER), 0xe7);
    assert_eq!(fresh[0xa80], 0x99, "PKRU not requested: unchanged");
}

#[test]
fn restore_x87_and_sse_init() {
    let l = layout();
    let mut g = Buf(vec![0x44; 0xa88], 0);
    put(&mut g.0, HEADER, &[0u8; 64]);
    put(&mut g.0, MXCSR, &0x1f80u32.to_le_bytes());
    let mut k = kvm_state();
    let hdr = check_header(&mut g, 0xe7, false).unwrap();
    restore(&mut k, &mut g, 0x3, hdr, &l, true).unwrap();
    assert_eq!(u16::from_le_bytes([k[0], k[1]]), FCW_INIT);
    assert_eq!((k[2], k[32], k[160]), (0, 0, 0));
    assert_eq!(u32_at(&k, MXCSR), 0x1f80, "standard form: MXCSR from memory even with XSTATE_BV[1] = 0");
    assert_eq!(u32_at(&k, MXCSR_MASK), 0xffff, "MXCSR_MASK is read-only");
}

#[test]
fn restore_compacted() {
    let l = layout();
    let mut k = kvm_state();
    let mut g = Buf(vec![0; 0xa88], 0);
    save(&k, &mut g, 0x2e7, SaveForm::Compacted, &l, true);
    k[0x440] = 0;
    k[0x680] = 0;
    let hdr = check_header(&mut g, 0x2e7, false).unwrap();
    // Restore a subset: the placement still follows XCOMP_BV.
    restore(&mut k, &mut g, 0x80, hdr, &l, true).unwrap();
    assert_eq!((k[0x440], k[0x680]), (0, 0xdd));
    // Compacted form, SSE requested but not present: MXCSR to its init value.
    put(&mut g.0, HEADER, &0x1u64.to_le_bytes());
    let hdr = check_header(&mut g, 0x2e7, false).unwrap();
    restore(&mut k, &mut g, 0x3, hdr, &l, true).unwrap();
    assert_eq!(u32_at(&k, MXCSR), MXCSR_INIT);
}

#[test]
fn restore_faults() {
    let l = layout();
    let k0 = kvm_state();
    let check = |hdr: &[u8], mxcsr: u32, rfbm: u64, only_compacted: bool| {
        let mut g = Buf(vec![0; 0xa88], 0);
        put(&mut g.0, HEADER, hdr);
        put(&mut g.0, MXCSR, &mxcsr.to_le_bytes());
        let mut k = k0.clone();
        let r = check_header(&mut g, 0xe7, only_compacted).and_then(|h| restore(&mut k, &mut g, rfbm, h, &l, true));
        if r.is_err() {
            assert_eq!(k, k0, "a fault changes nothing");
        }
        r
    };
    let hdr = |bv: u64, comp: u64, rest: u8| {
        let mut h = vec![rest; 64];
        h[..8].copy_from_slice(&bv.to_le_bytes());
        h[8..16].copy_from_slice(&comp.to_le_bytes());
        h
    };
    assert_eq!(check(&hdr(3, 0, 0), 0x1f80, 3, false), Ok(()));
    assert_eq!(check(&hdr(3, 4, 0), 0x1f80, 3, false), Err(XsaveFault::ReservedHeader), "XCOMP_BV without bit 63");
    assert_eq!(check(&hdr(3, 0, 1), 0x1f80, 3, false), Err(XsaveFault::ReservedHeader), "bytes 16..23");
    let mut h = hdr(3, 0, 0);
    h[40] = 1;
    assert_eq!(check(&h, 0x1f80, 3, false), Ok(()), "standard form ignores bytes 24..63");
    assert_eq!(check(&hdr(1 << 9, 0, 0), 0x1f80, 3, false), Err(XsaveFault::NotEnabled), "XSTATE_BV outside XCR0");
    assert_eq!(check(&hdr(3, 0, 0), 0x1_0000, 3, false), Err(XsaveFault::ReservedMxcsr));
    assert_eq!(check(&hdr(0, 0, 0), 0x1_0000, 4, false), Err(XsaveFault::ReservedMxcsr), "AVX alone loads MXCSR");
    assert_eq!(check(&hdr(0, 0, 0), 0x1_0000, 1, false), Ok(()), "x87 alone does not");
    assert_eq!(check(&hdr(3, COMPACTED | 3, 0), 0x1f80, 3, false), Ok(()));
    assert_eq!(check(&hdr(3, COMPACTED | 3, 1), 0x1f80, 3, false), Err(XsaveFault::ReservedHeader));
    assert_eq!(check(&hdr(7, COMPACTED | 3, 0), 0x1f80, 3, false), Err(XsaveFault::NotInCompacted));
    assert_eq!(check(&hdr(3, COMPACTED | 1 << 9, 0), 0x1f80, 3, false), Err(XsaveFault::NotEnabled));
    assert_eq!(check(&hdr(3, 0, 0), 0x1f80, 3, true), Err(XsaveFault::NotCompacted), "XRSTORS");
}
