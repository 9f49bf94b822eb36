//! The XSAVE family's data movement (XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR,
//! XRSTORS) between KVM's copy of a vCPU's extended state and the guest's XSAVE
//! area. KVM's copy (KVM_GET_XSAVE) is in the standard, non-compacted layout, with
//! every user component filled in (KVM writes init values for components not in use);
//! its XSTATE_BV says which components are in use (XINUSE).
//!
//! The guest's area is reached through [`Area`], so these functions touch only the
//! bytes the instruction architecturally reads or writes. Layout facts: Intel SDM
//! vol. 1, 13.4 (XSAVE area), 13.7-13.12 (operation of each instruction).

use kvm_bindings::CpuId;

/// Size of the legacy region plus the XSAVE header.
pub const LEGACY_AND_HEADER: usize = 576;
pub const HEADER: usize = 512;
/// XCOMP_BV bit 63: the area is in compacted form.
pub const COMPACTED: u64 = 1 << 63;
/// MXCSR's offset in the legacy region, then MXCSR_MASK.
pub const MXCSR: usize = 24;
pub const MXCSR_MASK: usize = 28;
/// MXCSR_MASK when the area says 0 (SDM vol. 1, 11.6.6).
pub const DEFAULT_MXCSR_MASK: u32 = 0xffbf;
/// MXCSR's value in SSE's initial configuration.
pub const MXCSR_INIT: u32 = 0x1f80;
/// FCW after FNINIT, in x87's initial configuration.
pub const FCW_INIT: u16 = 0x37f;

const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const AVX: u64 = 1 << 2;

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
            // User components only (ECX bit 0 clear): supervisor ones have no place
            // in the standard form, nor in KVM's copy of the state.
            if e.function == 0xd && (2..64).contains(&e.index) && e.eax != 0 && e.ecx & 1 == 0 {
                let (offset, size) = (e.ebx as usize, e.eax as usize);
                components.push((e.index as u8, offset, size, e.ecx & 2 != 0));
                standard_size = standard_size.max(offset.saturating_add(size));
            }
        }
        components.sort_by_key(|c| c.0);
        Self { components, standard_size }
    }

    /// The extended components of `mask`: (index, standard offset, size, compacted
    /// offset for a compacted area whose XCOMP_BV is `mask`). No allocation.
    pub fn placed(&self, mask: u64) -> impl Iterator<Item = (u8, usize, usize, usize)> + '_ {
        let mut offset = LEGACY_AND_HEADER;
        self.components.iter().filter(move |c| mask & bit(c.0) != 0).map(move |&(i, std_off, size, align)| {
            if align {
                offset = offset.next_multiple_of(64);
            }
            let here = offset;
            offset += size;
            (i, std_off, size, here)
        })
    }

    /// Bytes of the area an instruction for `mask` spans: the standard form up to
    /// the end of the last component in `mask`, or the compacted form's size.
    pub fn area_size(&self, mask: u64, compacted: bool) -> usize {
        self.extent(mask, mask, compacted)
    }

    /// Bytes of the area up to the end of the last component of `touched`, placed
    /// by `placement` (XCOMP_BV) when `compacted`. At least the legacy region and
    /// header.
    pub fn extent(&self, placement: u64, touched: u64, compacted: bool) -> usize {
        self.placed(placement).filter(|c| touched & bit(c.0) != 0).fold(LEGACY_AND_HEADER, |end, (_, std_off, size, c_off)| {
            end.max(if compacted { c_off + size } else { std_off + size })
        })
    }

    /// Components of `mask` the layout does not describe (the area cannot hold them).
    pub fn unknown(&self, mask: u64) -> u64 {
        let known = self.components.iter().fold(X87 | SSE, |m, c| m | bit(c.0));
        mask & !known
    }
}

fn bit(i: u8) -> u64 {
    1u64.checked_shl(u32::from(i)).unwrap_or(0)
}

/// The guest's XSAVE area, at offsets from its base. Reads of bytes the area cannot
/// supply fill with what the bus returns; the caller has already translated it.
pub trait Area {
    fn read(&mut self, offset: usize, out: &mut [u8]);
    fn write(&mut self, offset: usize, data: &[u8]);

    fn read_u64(&mut self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read(offset, &mut b);
        u64::from_le_bytes(b)
    }
}

pub fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(off..off + v.len()) {
        s.copy_from_slice(v);
    }
}

fn zero(b: &mut [u8], off: usize, len: usize) {
    if let Some(s) = b.get_mut(off..off + len) {
        s.fill(0);
    }
}

/// The MXCSR_MASK in force (from KVM's area; 0 there means the default).
pub fn mxcsr_mask(kvm: &[u8]) -> u32 {
    match u32_at(kvm, MXCSR_MASK) {
        0 => DEFAULT_MXCSR_MASK,
        m => m,
    }
}

/// Which save instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveForm {
    /// XSAVE and XSAVEOPT: standard form, XSTATE_BV updated for RFBM only.
    Standard,
    /// XSAVEC and XSAVES: compacted form, the whole header written.
    Compacted,
}

/// Why an XRSTOR or XRSTORS faults (#GP(0) in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsaveFault {
    /// Header bytes that must be zero are not (XCOMP_BV for the standard form).
    ReservedHeader,
    /// XSTATE_BV or XCOMP_BV names a component outside XCR0 (| IA32_XSS).
    NotEnabled,
    /// XSTATE_BV names a component XCOMP_BV does not.
    NotInCompacted,
    /// The standard form of XRSTORS does not exist.
    NotCompacted,
    /// MXCSR would get reserved bits.
    ReservedMxcsr,
}

/// Byte ranges of the legacy region: x87 (FCW..FDP, ST0-7), MXCSR + MXCSR_MASK,
/// and the XMM registers (only XMM0-7 outside 64-bit mode, SDM vol. 1, 13.13).
const X87_RANGES: [(usize, usize); 2] = [(0, 24), (32, 128)];
const MXCSR_RANGE: (usize, usize) = (MXCSR, 8);
fn xmm_range(long_mode: bool) -> (usize, usize) {
    (160, if long_mode { 256 } else { 128 })
}

/// XSAVE / XSAVEOPT / XSAVEC / XSAVES of `kvm` (KVM's standard-form area) to the
/// guest's area, for requested-feature bitmap `rfbm`.
pub fn save(kvm: &[u8], area: &mut impl Area, rfbm: u64, form: SaveForm, layout: &XsaveLayout, long_mode: bool) {
    let in_use = u64_at(kvm, HEADER) & rfbm;
    // Standard form saves every requested component (KVM's copy holds init values
    // for those not in use); the compacted forms save only those in use.
    let saved = if form == SaveForm::Standard { rfbm } else { in_use };
    let mut copy = |off: usize, len: usize| {
        if let Some(s) = kvm.get(off..off + len) {
            area.write(off, s);
        }
    };
    if saved & X87 != 0 {
        X87_RANGES.iter().for_each(|&(o, l)| copy(o, l));
    }
    if saved & SSE != 0 {
        let (o, l) = xmm_range(long_mode);
        copy(o, l);
    }
    // MXCSR goes with SSE or AVX in the standard form, with SSE in the compacted.
    let mxcsr = if form == SaveForm::Standard { rfbm & (SSE | AVX) != 0 } else { rfbm & SSE != 0 };
    if mxcsr {
        copy(MXCSR_RANGE.0, MXCSR_RANGE.1);
    }
    let compacted = form == SaveForm::Compacted;
    for (i, std_off, size, c_off) in layout.placed(rfbm) {
        if let Some(s) = kvm.get(std_off..std_off + size).filter(|_| saved & bit(i) != 0) {
            area.write(if compacted { c_off } else { std_off }, s);
        }
    }
    match form {
        SaveForm::Standard => {
            let old = area.read_u64(HEADER);
            area.write(HEADER, &((old & !rfbm) | in_use).to_le_bytes());
        }
        SaveForm::Compacted => {
            let mut header = [0u8; 64];
            put(&mut header, 0, &in_use.to_le_bytes());
            put(&mut header, 8, &(COMPACTED | rfbm).to_le_bytes());
            area.write(HEADER, &header);
        }
    }
}

/// The header's checks, before anything is loaded. `enabled` is XCR0 (| IA32_XSS
/// for XRSTORS); `only_compacted` for XRSTORS. Returns XSTATE_BV and XCOMP_BV.
pub fn check_header(area: &mut impl Area, enabled: u64, only_compacted: bool) -> Result<(u64, u64), XsaveFault> {
    let mut header = [0u8; 64];
    area.read(HEADER, &mut header);
    let xstate_bv = u64_at(&header, 0);
    let xcomp_bv = u64_at(&header, 8);
    if xcomp_bv & COMPACTED == 0 {
        if only_compacted {
            return Err(XsaveFault::NotCompacted);
        }
        // Standard form: bytes 23:8 of the header must be zero.
        if xcomp_bv != 0 || u64_at(&header, 16) != 0 {
            return Err(XsaveFault::ReservedHeader);
        }
        if xstate_bv & !enabled != 0 {
            return Err(XsaveFault::NotEnabled);
        }
    } else {
        if xcomp_bv & !COMPACTED & !enabled != 0 {
            return Err(XsaveFault::NotEnabled);
        }
        if xstate_bv & !xcomp_bv != 0 {
            return Err(XsaveFault::NotInCompacted);
        }
        if header.get(16..).is_some_and(|r| r.iter().any(|b| *b != 0)) {
            return Err(XsaveFault::ReservedHeader);
        }
    }
    Ok((xstate_bv, xcomp_bv))
}

/// XRSTOR / XRSTORS from the guest's area into `kvm` (KVM's standard-form area), for
/// `rfbm`, after [`check_header`] returned `xstate_bv` and `xcomp_bv`. Requested
/// components absent from XSTATE_BV get their initial configuration, written out
/// (KVM keeps MXCSR only while x87, SSE or AVX is marked in use, so components are
/// never left to an XSTATE_BV bit alone). Nothing in `kvm` changes on a fault.
pub fn restore(
    kvm: &mut [u8],
    area: &mut impl Area,
    rfbm: u64,
    (xstate_bv, xcomp_bv): (u64, u64),
    layout: &XsaveLayout,
    long_mode: bool,
) -> Result<(), XsaveFault> {
    let compacted = xcomp_bv & COMPACTED != 0;
    let load = rfbm & xstate_bv;
    // MXCSR first: the only value that can still fault.
    let mxcsr = if !compacted && rfbm & (SSE | AVX) != 0 || compacted && load & SSE != 0 {
        let mut b = [0u8; 4];
        area.read(MXCSR, &mut b);
        Some(u32::from_le_bytes(b))
    } else if rfbm & SSE != 0 {
        Some(MXCSR_INIT)
    } else {
        None
    };
    if let Some(m) = mxcsr {
        if m & !mxcsr_mask(kvm) != 0 {
            return Err(XsaveFault::ReservedMxcsr);
        }
        put(kvm, MXCSR, &m.to_le_bytes());
    }
    if rfbm & X87 != 0 {
        for &(o, l) in &X87_RANGES {
            match kvm.get_mut(o..o + l) {
                Some(d) if load & X87 != 0 => area.read(o, d),
                _ => zero(kvm, o, l),
            }
        }
        if load & X87 == 0 {
            put(kvm, 0, &FCW_INIT.to_le_bytes());
        }
    }
    if rfbm & SSE != 0 {
        let (o, l) = xmm_range(long_mode);
        match kvm.get_mut(o..o + l) {
            Some(d) if load & SSE != 0 => area.read(o, d),
            _ => zero(kvm, o, l),
        }
    }
    // Extended components: every requested one to its initial configuration (all
    // zeros for each user component), then those present loaded from where the
    // area's form puts them (XCOMP_BV decides the compacted placement).
    for &(i, std_off, size, _) in &layout.components {
        if rfbm & bit(i) != 0 {
            zero(kvm, std_off, size);
        }
    }
    let placement = if compacted { xcomp_bv & !COMPACTED } else { rfbm };
    for (i, std_off, size, c_off) in layout.placed(placement) {
        if let Some(d) = kvm.get_mut(std_off..std_off + size).filter(|_| load & bit(i) != 0) {
            area.read(if compacted { c_off } else { std_off }, d);
        }
    }
    let bv = u64_at(kvm, HEADER) | rfbm;
    put(kvm, HEADER, &bv.to_le_bytes());
    put(kvm, HEADER + 8, &0u64.to_le_bytes());
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
