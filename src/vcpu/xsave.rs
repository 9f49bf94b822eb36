//! User-space emulation of the XSAVE family (XSAVE, XSAVEOPT, XSAVEC, XRSTOR) for
//! hosts whose KVM cannot emulate them in guest kernel mode. The vCPU's extended state
//! lives in KVM; skiff reads it with KVM_GET_XSAVE (standard, non-compacted layout),
//! moves components between it and the guest's buffer, and writes it back with
//! KVM_SET_XSAVE. Layout facts: Intel SDM vol. 1, 13.4 (XSAVE area) and 13.8-13.12.

use kvm_bindings::{CpuId, kvm_xsave};

/// Size of the legacy region plus the XSAVE header.
pub const LEGACY_AND_HEADER: usize = 576;
const HEADER: usize = 512;
/// XCOMP_BV bit 63: the buffer is in compacted form.
const COMPACTED: u64 = 1 << 63;

/// Where each extended component (2..63) sits in the standard layout, its size, and
/// whether the compacted form aligns it to 64 bytes (CPUID leaf 0xD, subleaf i).
#[derive(Clone, Debug, Default)]
pub struct XsaveLayout {
    pub components: Vec<(u8, usize, usize, bool)>, // (index, standard offset, size, align64)
    /// Size of the standard-form area for every supported component.
    pub standard_size: usize,
}

impl XsaveLayout {
    pub fn from_cpuid(cpuid: &CpuId) -> Self {
        let mut components = Vec::new();
        let mut standard_size = LEGACY_AND_HEADER;
        for e in cpuid.as_slice() {
            if e.function == 0xd && (2..64).contains(&e.index) && e.eax != 0 {
                let (offset, size) = (e.ebx as usize, e.eax as usize);
                components.push((e.index as u8, offset, size, e.ecx & 2 != 0));
                standard_size = standard_size.max(offset + size);
            }
        }
        components.sort_by_key(|c| c.0);
        Self { components, standard_size }
    }

    /// Offsets of the components of `xcomp_bv` in the compacted form.
    pub fn compacted_offsets(&self, xcomp_bv: u64) -> Vec<(u8, usize, usize, usize)> {
        let mut offset = LEGACY_AND_HEADER;
        let mut out = Vec::new();
        for &(i, std_off, size, align) in &self.components {
            if xcomp_bv & (1 << i) == 0 {
                continue;
            }
            if align {
                offset = offset.next_multiple_of(64);
            }
            out.push((i, offset, std_off, size));
            offset += size;
        }
        out
    }

    /// Bytes a compacted buffer for `xcomp_bv` occupies.
    pub fn compacted_size(&self, xcomp_bv: u64) -> usize {
        self.compacted_offsets(xcomp_bv).last().map_or(LEGACY_AND_HEADER, |&(_, o, _, s)| o + s)
    }
}

/// KVM's xsave buffer as bytes.
fn kvm_bytes(x: &kvm_xsave) -> &[u8] {
    // SAFETY: `region` is a plain [u32; 1024] array; viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts(x.region.as_ptr().cast::<u8>(), std::mem::size_of_val(&x.region)) }
}

fn kvm_bytes_mut(x: &mut kvm_xsave) -> &mut [u8] {
    // SAFETY: as above, exclusively borrowed.
    unsafe { std::slice::from_raw_parts_mut(x.region.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(&x.region)) }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn copy(dst: &mut [u8], dst_off: usize, src: &[u8], src_off: usize, len: usize) {
    if let (Some(d), Some(s)) = (dst.get_mut(dst_off..dst_off + len), src.get(src_off..src_off + len)) {
        d.copy_from_slice(s);
    }
}

/// The legacy-region pieces of components 0 (x87) and 1 (SSE).
fn copy_legacy(dst: &mut [u8], src: &[u8], rfbm: u64) {
    if rfbm & 1 != 0 {
        copy(dst, 0, src, 0, 24); // FCW, FSW, FTW, FOP, FIP, FDP
        copy(dst, 32, src, 32, 128); // ST0-ST7
    }
    if rfbm & 2 != 0 {
        copy(dst, 160, src, 160, 256); // XMM0-XMM15
    }
    if rfbm & 6 != 0 {
        copy(dst, 24, src, 24, 8); // MXCSR, MXCSR_MASK
    }
}

/// Why an XSAVE-family access must fault (#GP).
#[derive(Debug, PartialEq, Eq)]
pub enum XsaveFault {
    Misaligned,
    ReservedHeader,
}

/// XRSTOR from `guest` (the guest's buffer, at least the size its header implies) into
/// KVM's state, for requested-feature bitmap `rfbm` (already ANDed with XCR0).
pub fn xrstor(state: &mut kvm_xsave, guest: &[u8], rfbm: u64, layout: &XsaveLayout) -> Result<(), XsaveFault> {
    let xstate_bv = u64_at(guest, HEADER);
    let xcomp_bv = u64_at(guest, HEADER + 8);
    let compacted = xcomp_bv & COMPACTED != 0;
    if !compacted && xcomp_bv != 0 {
        return Err(XsaveFault::ReservedHeader);
    }
    if compacted && xstate_bv & !xcomp_bv & !COMPACTED != 0 {
        return Err(XsaveFault::ReservedHeader);
    }
    let kvm = kvm_bytes_mut(state);
    let mut bv = u64_at(kvm, HEADER);
    // Legacy components: loaded if requested and present, else left in init state.
    let load = rfbm & xstate_bv;
    copy_legacy(kvm, guest, load & 3);
    if rfbm & 6 != 0 {
        // MXCSR is loaded whenever SSE or AVX is requested, even if not in XSTATE_BV.
        copy(kvm, 24, guest, 24, 4);
    }
    if compacted {
        for (i, off, std_off, size) in layout.compacted_offsets(xcomp_bv & !COMPACTED) {
            if load & (1 << i) != 0 {
                copy(kvm, std_off, guest, off, size);
            }
        }
    } else {
        for &(i, std_off, size, _) in &layout.components {
            if load & (1 << i) != 0 {
                copy(kvm, std_off, guest, std_off, size);
            }
        }
    }
    // Requested components not present in the buffer go to their init state, which the
    // cleared XSTATE_BV bit expresses.
    bv = (bv & !rfbm) | (xstate_bv & rfbm);
    put_u64(kvm, HEADER, bv);
    put_u64(kvm, HEADER + 8, 0);
    Ok(())
}

/// XSAVE / XSAVEOPT (standard form) or XSAVEC (`compact`) of KVM's state into the
/// guest's buffer `guest` (which holds the buffer's current bytes on entry).
pub fn xsave(state: &kvm_xsave, guest: &mut [u8], rfbm: u64, compact: bool, layout: &XsaveLayout) {
    let kvm = kvm_bytes(state);
    let in_use = u64_at(kvm, HEADER) & rfbm;
    copy_legacy(guest, kvm, rfbm & 3);
    if rfbm & 6 != 0 {
        copy(guest, 24, kvm, 24, 8);
    }
    if compact {
        for (i, off, std_off, size) in layout.compacted_offsets(rfbm) {
            if in_use & (1 << i) != 0 {
                copy(guest, off, kvm, std_off, size);
            }
        }
        put_u64(guest, HEADER, in_use);
        put_u64(guest, HEADER + 8, COMPACTED | rfbm);
    } else {
        for &(i, std_off, size, _) in &layout.components {
            if rfbm & (1 << i) != 0 {
                copy(guest, std_off, kvm, std_off, size);
            }
        }
        let old = u64_at(guest, HEADER);
        put_u64(guest, HEADER, (old & !rfbm) | in_use);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn layout() -> XsaveLayout {
        let e = |index, eax, ebx, ecx| kvm_cpuid_entry2 { function: 0xd, index, eax, ebx, ecx, ..Default::default() };
        let cpuid = CpuId::from_entries(&[
            e(0, 0xe7, 0x980, 0x980),
            e(2, 0x100, 0x240, 0),
            e(5, 0x40, 0x340, 0),
            e(6, 0x200, 0x380, 0),
            e(7, 0x400, 0x580, 0),
        ])
        .unwrap();
        XsaveLayout::from_cpuid(&cpuid)
    }

    #[test]
    fn layout_from_cpuid() {
        let l = layout();
        assert_eq!(l.components.len(), 4);
        assert_eq!(l.standard_size, 0x980);
        // Compacted: AVX right after the header, then opmask...
        let offs = l.compacted_offsets(0xe7);
        assert_eq!(offs[0], (2, 576, 0x240, 0x100));
        assert_eq!(offs[1], (5, 576 + 0x100, 0x340, 0x40));
        assert_eq!(l.compacted_size(0x7), 576 + 0x100);
    }

    #[test]
    fn standard_round_trip_and_init() {
        let l = layout();
        let mut kvm = kvm_xsave::default();
        {
            let b = kvm_bytes_mut(&mut kvm);
            b[0] = 0x7f; // FCW
            b[24] = 0x80; // MXCSR
            b[160] = 0xaa; // XMM0
            b[0x240] = 0xbb; // YMM0 high
            put_u64(b, HEADER, 0x7);
        }
        let mut guest = vec![0u8; 0x980];
        xsave(&kvm, &mut guest, 0x7, false, &l);
        assert_eq!((guest[0], guest[24], guest[160], guest[0x240]), (0x7f, 0x80, 0xaa, 0xbb));
        assert_eq!(u64_at(&guest, HEADER), 0x7);

        // Restore into a fresh state; AVX requested but absent from XSTATE_BV -> init.
        let mut fresh = kvm_xsave::default();
        put_u64(&mut guest, HEADER, 0x3);
        xrstor(&mut fresh, &guest, 0x7, &l).unwrap();
        let b = kvm_bytes(&fresh);
        assert_eq!((b[0], b[24], b[160]), (0x7f, 0x80, 0xaa));
        assert_eq!(b[0x240], 0, "AVX not loaded");
        assert_eq!(u64_at(b, HEADER), 0x3);
    }

    #[test]
    fn compacted_save_restore() {
        let l = layout();
        let mut kvm = kvm_xsave::default();
        {
            let b = kvm_bytes_mut(&mut kvm);
            b[0x340] = 0x11; // opmask k0
            put_u64(b, HEADER, 0x23);
        }
        let mut guest = vec![0u8; 0x980];
        xsave(&kvm, &mut guest, 0x27, true, &l);
        assert_eq!(u64_at(&guest, HEADER + 8), COMPACTED | 0x27);
        assert_eq!(u64_at(&guest, HEADER), 0x23);
        assert_eq!(guest[576 + 0x100], 0x11, "opmask after AVX in compacted form");
        let mut fresh = kvm_xsave::default();
        xrstor(&mut fresh, &guest, 0x27, &l).unwrap();
        assert_eq!(kvm_bytes(&fresh)[0x340], 0x11);
    }

    #[test]
    fn reserved_header_faults() {
        let l = layout();
        let mut guest = vec![0u8; 0x980];
        put_u64(&mut guest, HEADER + 8, 0x4); // XCOMP_BV without bit 63
        assert_eq!(xrstor(&mut kvm_xsave::default(), &guest, 0x7, &l), Err(XsaveFault::ReservedHeader));
    }
}
