//! Translating a guest virtual address through the guest's own page tables, with the
//! three outcomes of seed 002: the physical address, "retry" (a not-present entry:
//! resume the guest and let it fault the page in), or "fail" (the tables forbid the
//! access, or point outside RAM), with the level and entry that decided it.
//!
//! Facts from the Intel SDM vol. 3, chapter 4 (paging) and AMD APM vol. 2, 5.
//! Page-table entries are guest data: every read is bounds-checked, every loop is
//! bounded by the paging depth.

use std::fmt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest-physical memory as the walker sees it.
pub trait PhysMem {
    /// None: not RAM (outside guest memory, or MMIO).
    fn read_u64(&self, gpa: u64) -> Option<u64>;
    fn read_u32(&self, gpa: u64) -> Option<u32>;
    fn is_ram(&self, gpa: u64) -> bool;
}

impl PhysMem for vm_memory::GuestMemoryMmap {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.read_obj::<u64>(GuestAddress(gpa)).ok()
    }
    fn read_u32(&self, gpa: u64) -> Option<u32> {
        self.read_obj::<u32>(GuestAddress(gpa)).ok()
    }
    fn is_ram(&self, gpa: u64) -> bool {
        self.address_in_range(GuestAddress(gpa))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Execute,
}

// Control-register and EFER bits the walk depends on.
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const CR4_PKE: u64 = 1 << 22;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;

// Page-table entry bits.
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// The vCPU state a walk needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct PagingContext {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cpl: u8,
    /// For SMAP's RFLAGS.AC override.
    pub rflags: u64,
    /// Protection-key rights for user pages (PKRU), when CR4.PKE is set.
    pub pkru: u32,
    /// Physical-address width; 0 means 52.
    pub maxphyaddr: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical.
    None,
    Bits32,
    Pae,
    Level4,
    Level5,
}

impl PagingContext {
    pub fn from_sregs(s: &kvm_bindings::kvm_sregs, rflags: u64) -> Self {
        PagingContext {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cpl: s.cs.dpl,
            rflags,
            pkru: 0,
            maxphyaddr: 0,
        }
    }

    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::None
        } else if self.cr4 & CR4_PAE == 0 {
            PagingMode::Bits32
        } else if self.efer & EFER_LMA == 0 {
            PagingMode::Pae
        } else if self.cr4 & CR4_LA57 != 0 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }

    /// Physical-address bits of an entry (bits 12 up to MAXPHYADDR-1).
    fn addr_mask(&self) -> u64 {
        let width = if self.maxphyaddr == 0 { 52 } else { self.maxphyaddr.min(52) };
        ((1u64 << width) - 1) & !0xfff
    }
}

/// Why a translation fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    NonCanonical(u64),
    Reserved { level: u8, entry: u64 },
    NoExecute { level: u8 },
    User { level: u8 },
    WriteProtect { level: u8 },
    Smep,
    Smap,
    ProtectionKey(u8),
    NotRam { level: u8, gpa: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Translation {
    Ok(u64),
    /// A not-present entry at `level` (1 = PTE): the guest would take a page fault.
    Retry { level: u8, entry: u64 },
    Fail(FailReason),
}

fn level_name(level: u8) -> &'static str {
    match level {
        5 => "PML5E",
        4 => "PML4E",
        3 => "PDPTE",
        2 => "PDE",
        1 => "PTE",
        _ => "entry",
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            FailReason::NonCanonical(a) => write!(f, "address {a:#x} is not canonical"),
            FailReason::Reserved { level, entry } => {
                write!(f, "{} (level {level}) = {entry:#x}: reserved bit set", level_name(level))
            }
            FailReason::NoExecute { level } => write!(f, "{} (level {level}) forbids execution (XD)", level_name(level)),
            FailReason::User { level } => {
                write!(f, "{} (level {level}) is a supervisor page, accessed from user mode", level_name(level))
            }
            FailReason::WriteProtect { level } => write!(f, "{} (level {level}) is read-only", level_name(level)),
            FailReason::Smep => write!(f, "SMEP: supervisor fetch from a user page"),
            FailReason::Smap => write!(f, "SMAP: supervisor data access to a user page"),
            FailReason::ProtectionKey(k) => write!(f, "protection key {k} forbids the access"),
            FailReason::NotRam { level, gpa } => {
                write!(f, "{} (level {level}) address {gpa:#x} is not guest RAM", level_name(level))
            }
        }
    }
}

impl fmt::Display for Translation {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Translation::Ok(gpa) => write!(f, "physical {gpa:#x}"),
            Translation::Retry { level, entry } => {
                write!(f, "not present: {} (level {level}) = {entry:#x} (retry after the guest faults it in)", level_name(*level))
            }
            Translation::Fail(r) => write!(f, "fail: {r}"),
        }
    }
}

/// Rights accumulated over the levels of a walk.
struct Rights {
    write: bool,
    user: bool,
    exec: bool,
}

/// Translates `gva` for `access` in the mode `ctx` describes. No allocation.
pub fn translate<M: PhysMem>(mem: &M, ctx: &PagingContext, gva: u64, access: Access) -> Translation {
    match ctx.mode() {
        PagingMode::None => {
            let gpa = if ctx.efer & EFER_LMA != 0 { gva } else { gva & 0xffff_ffff };
            final_address(mem, 0, gpa)
        }
        PagingMode::Bits32 => walk_32bit(mem, ctx, gva & 0xffff_ffff, access),
        PagingMode::Pae => walk_pae(mem, ctx, gva & 0xffff_ffff, access),
        PagingMode::Level4 => walk_long(mem, ctx, gva, access, 4),
        PagingMode::Level5 => walk_long(mem, ctx, gva, access, 5),
    }
}

fn final_address<M: PhysMem>(mem: &M, level: u8, gpa: u64) -> Translation {
    if mem.is_ram(gpa) { Translation::Ok(gpa) } else { Translation::Fail(FailReason::NotRam { level, gpa }) }
}

/// 4- and 5-level paging: 9 bits a level, 2 MiB pages at level 2, 1 GiB at level 3.
fn walk_long<M: PhysMem>(mem: &M, ctx: &PagingContext, gva: u64, access: Access, levels: u8) -> Translation {
    let va_bits = if levels == 5 { 57 } else { 48 };
    let shift = 64 - va_bits;
    if (((gva << shift) as i64) >> shift) as u64 != gva {
        return Translation::Fail(FailReason::NonCanonical(gva));
    }
    let mask = ctx.addr_mask();
    let nxe = ctx.efer & EFER_NXE != 0;
    // Bits above MAXPHYADDR (and below 52) are reserved; XD is reserved without NXE.
    let rsvd_high = 0x000f_ffff_ffff_f000 & !mask;
    let rsvd_xd = if nxe { 0 } else { XD };
    let mut table = ctx.cr3 & mask;
    let mut rights = Rights { write: true, user: true, exec: true };
    for level in (1..=levels).rev() {
        let index = (gva >> (12 + 9 * (level as u64 - 1))) & 0x1ff;
        let entry_addr = table + index * 8;
        let Some(entry) = mem.read_u64(entry_addr) else {
            return Translation::Fail(FailReason::NotRam { level, gpa: entry_addr });
        };
        if entry & P == 0 {
            return Translation::Retry { level, entry };
        }
        let mut rsvd = rsvd_high | rsvd_xd;
        let large = entry & PS != 0 && (level == 2 || level == 3);
        if entry & PS != 0 && level >= 4 {
            rsvd |= PS;
        }
        if large {
            // Bits from 13 up to the page boundary are reserved (bit 12 is PAT).
            let page_bits = 12 + 9 * (level as u64 - 1);
            rsvd |= ((1u64 << page_bits) - 1) & !0x1fff;
        }
        if entry & rsvd != 0 {
            return Translation::Fail(FailReason::Reserved { level, entry });
        }
        rights.write &= entry & RW != 0;
        rights.user &= entry & US != 0;
        rights.exec &= !(nxe && entry & XD != 0);
        if large || level == 1 {
            let page_bits = 12 + 9 * (level as u64 - 1);
            let base = entry & mask & !((1u64 << page_bits) - 1);
            if let Some(r) = check_rights(ctx, &rights, access, level, entry) {
                return Translation::Fail(r);
            }
            return final_address(mem, level, base | (gva & ((1u64 << page_bits) - 1)));
        }
        table = entry & mask;
    }
    // Unreachable: level 1 always returns above.
    Translation::Fail(FailReason::Reserved { level: 1, entry: 0 })
}

/// PAE: four PDPTEs from CR3, then 9-bit PD and PT levels; 2 MiB pages.
fn walk_pae<M: PhysMem>(mem: &M, ctx: &PagingContext, gva: u64, access: Access) -> Translation {
    let mask = ctx.addr_mask();
    let nxe = ctx.efer & EFER_NXE != 0;
    let pdpte_addr = (ctx.cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8;
    let Some(pdpte) = mem.read_u64(pdpte_addr) else {
        return Translation::Fail(FailReason::NotRam { level: 3, gpa: pdpte_addr });
    };
    if pdpte & P == 0 {
        return Translation::Retry { level: 3, entry: pdpte };
    }
    // PDPTE reserved: bits 1-2, 5-8, 63, and above MAXPHYADDR.
    if pdpte & (0x1e6 | XD | (0x000f_ffff_ffff_f000 & !mask)) != 0 {
        return Translation::Fail(FailReason::Reserved { level: 3, entry: pdpte });
    }
    let mut rights = Rights { write: true, user: true, exec: true };
    let mut table = pdpte & mask;
    for level in [2u8, 1] {
        let index = (gva >> (12 + 9 * (level as u64 - 1))) & 0x1ff;
        let entry_addr = table + index * 8;
        let Some(entry) = mem.read_u64(entry_addr) else {
            return Translation::Fail(FailReason::NotRam { level, gpa: entry_addr });
        };
        if entry & P == 0 {
            return Translation::Retry { level, entry };
        }
        let large = level == 2 && entry & PS != 0;
        let mut rsvd = (0x000f_ffff_ffff_f000 & !mask) | if nxe { 0 } else { XD };
        if large {
            rsvd |= 0x1f_e000;
        }
        if entry & rsvd != 0 {
            return Translation::Fail(FailReason::Reserved { level, entry });
        }
        rights.write &= entry & RW != 0;
        rights.user &= entry & US != 0;
        rights.exec &= !(nxe && entry & XD != 0);
        if large || level == 1 {
            let page_bits = if large { 21 } else { 12 };
            let base = entry & mask & !((1u64 << page_bits) - 1);
            if let Some(r) = check_rights(ctx, &rights, access, level, entry) {
                return Translation::Fail(r);
            }
            return final_address(mem, level, base | (gva & ((1u64 << page_bits) - 1)));
        }
        table = entry & mask;
    }
    Translation::Fail(FailReason::Reserved { level: 1, entry: 0 })
}

/// 32-bit paging: 10-bit PD and PT indices; 4 MiB pages with CR4.PSE (PSE-36 puts
/// physical bits 32-39 in PDE bits 13-20).
fn walk_32bit<M: PhysMem>(mem: &M, ctx: &PagingContext, gva: u64, access: Access) -> Translation {
    let pde_addr = (ctx.cr3 & 0xffff_f000) + ((gva >> 22) & 0x3ff) * 4;
    let Some(pde) = mem.read_u32(pde_addr).map(u64::from) else {
        return Translation::Fail(FailReason::NotRam { level: 2, gpa: pde_addr });
    };
    if pde & P == 0 {
        return Translation::Retry { level: 2, entry: pde };
    }
    let mut rights = Rights { write: pde & RW != 0, user: pde & US != 0, exec: true };
    if pde & PS != 0 && ctx.cr4 & CR4_PSE != 0 {
        // Bit 21 is reserved; bits 13-20 are physical bits 32-39 (up to MAXPHYADDR).
        if pde & (1 << 21) != 0 {
            return Translation::Fail(FailReason::Reserved { level: 2, entry: pde });
        }
        let high = ((pde >> 13) & 0xff) << 32;
        let base = (pde & 0xffc0_0000) | high;
        if let Some(r) = check_rights(ctx, &rights, access, 2, pde) {
            return Translation::Fail(r);
        }
        return final_address(mem, 2, base | (gva & 0x3f_ffff));
    }
    let pte_addr = (pde & 0xffff_f000) + ((gva >> 12) & 0x3ff) * 4;
    let Some(pte) = mem.read_u32(pte_addr).map(u64::from) else {
        return Translation::Fail(FailReason::NotRam { level: 1, gpa: pte_addr });
    };
    if pte & P == 0 {
        return Translation::Retry { level: 1, entry: pte };
    }
    rights.write &= pte & RW != 0;
    rights.user &= pte & US != 0;
    if let Some(r) = check_rights(ctx, &rights, access, 1, pte) {
        return Translation::Fail(r);
    }
    final_address(mem, 1, (pte & 0xffff_f000) | (gva & 0xfff))
}

/// The access-rights checks of SDM 4.6, applied once the leaf is known.
fn check_rights(ctx: &PagingContext, r: &Rights, access: Access, level: u8, leaf: u64) -> Option<FailReason> {
    let user_mode = ctx.cpl == 3;
    if user_mode && !r.user {
        return Some(FailReason::User { level });
    }
    match access {
        Access::Execute => {
            if !r.exec {
                return Some(FailReason::NoExecute { level });
            }
            if !user_mode && r.user && ctx.cr4 & CR4_SMEP != 0 {
                return Some(FailReason::Smep);
            }
        }
        Access::Read | Access::Write => {
            if !user_mode && r.user && ctx.cr4 & CR4_SMAP != 0 && ctx.rflags & RFLAGS_AC == 0 {
                return Some(FailReason::Smap);
            }
            if access == Access::Write && !r.write && (user_mode || ctx.cr0 & CR0_WP != 0) {
                return Some(FailReason::WriteProtect { level });
            }
            // Protection keys apply to user pages in long mode (bits 62:59 of the leaf).
            if ctx.cr4 & CR4_PKE != 0 && r.user && ctx.efer & EFER_LMA != 0 {
                let key = ((leaf >> 59) & 0xf) as u8;
                let ad = ctx.pkru >> (2 * key) & 1 != 0;
                let wd = ctx.pkru >> (2 * key + 1) & 1 != 0;
                if ad || (access == Access::Write && wd && (user_mode || ctx.cr0 & CR0_WP != 0)) {
                    return Some(FailReason::ProtectionKey(key));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Sparse fake physical memory: RAM below `size`.
    struct Fake {
        words: HashMap<u64, u64>,
        size: u64,
    }

    impl Fake {
        fn new(size: u64) -> Self {
            Fake { words: HashMap::new(), size }
        }
        fn set(&mut self, addr: u64, v: u64) {
            self.words.insert(addr, v);
        }
    }

    impl PhysMem for Fake {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            (gpa + 8 <= self.size).then(|| self.words.get(&gpa).copied().unwrap_or(0))
        }
        fn read_u32(&self, gpa: u64) -> Option<u32> {
            (gpa + 4 <= self.size).then(|| {
                let base = gpa & !7;
                let w = self.words.get(&base).copied().unwrap_or(0);
                (w >> ((gpa - base) * 8)) as u32
            })
        }
        fn is_ram(&self, gpa: u64) -> bool {
            gpa < self.size
        }
    }

    fn long_ctx() -> PagingContext {
        PagingContext {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | EFER_NXE | (1 << 8),
            ..Default::default()
        }
    }

    /// Maps gva -> gpa with 4 KiB pages, tables at 0x1000.. (one table per level).
    fn map_4k(m: &mut Fake, gva: u64, gpa: u64, flags: u64) {
        let idx = |l: u64| (gva >> (12 + 9 * (l - 1))) & 0x1ff;
        m.set(0x1000 + idx(4) * 8, 0x2000 | P | RW | US);
        m.set(0x2000 + idx(3) * 8, 0x3000 | P | RW | US);
        m.set(0x3000 + idx(2) * 8, 0x4000 | P | RW | US);
        m.set(0x4000 + idx(1) * 8, gpa | flags);
    }

    #[test]
    fn four_level_4k_2m_1g() {
        let mut m = Fake::new(1 << 32);
        let ctx = long_ctx();
        map_4k(&mut m, 0xffff_8000_0012_3000, 0x50_0000, P | RW);
        assert_eq!(translate(&m, &ctx, 0xffff_8000_0012_3abc, Access::Read), Translation::Ok(0x50_0abc));
        // 2 MiB page at PD index 1.
        m.set(0x3000 + 8, 0x4000_0000 | P | RW | PS);
        assert_eq!(translate(&m, &ctx, 0xffff_8000_0021_2345, Access::Write), Translation::Ok(0x4001_2345));
        // 1 GiB page at PDPT index 1.
        m.set(0x2000 + 8, 0x8000_0000 | P | RW | PS);
        assert_eq!(translate(&m, &ctx, 0xffff_8000_4abc_def0, Access::Read), Translation::Ok(0x8abc_def0));
    }

    #[test]
    fn faults() {
        let mut m = Fake::new(1 << 32);
        let mut ctx = long_ctx();
        let gva = 0x40_0000u64;
        map_4k(&mut m, gva, 0x9000, P); // read-only, supervisor, executable
        assert_eq!(translate(&m, &ctx, gva, Access::Execute), Translation::Ok(0x9000));
        assert_eq!(translate(&m, &ctx, gva, Access::Write), Translation::Fail(FailReason::WriteProtect { level: 1 }));
        ctx.cpl = 3;
        assert_eq!(translate(&m, &ctx, gva, Access::Read), Translation::Fail(FailReason::User { level: 1 }));
        ctx.cpl = 0;
        map_4k(&mut m, gva, 0x9000, P | XD);
        assert_eq!(translate(&m, &ctx, gva, Access::Execute), Translation::Fail(FailReason::NoExecute { level: 1 }));
        ctx.efer &= !EFER_NXE;
        assert!(matches!(translate(&m, &ctx, gva, Access::Read), Translation::Fail(FailReason::Reserved { level: 1, .. })));
        ctx.efer |= EFER_NXE;
        map_4k(&mut m, gva, 0x9000, 0);
        assert_eq!(translate(&m, &ctx, gva, Access::Read), Translation::Retry { level: 1, entry: 0x9000 });
        assert_eq!(
            translate(&m, &ctx, 0x0000_8000_0000_0000, Access::Read),
            Translation::Fail(FailReason::NonCanonical(0x0000_8000_0000_0000))
        );
        // SMEP and SMAP against a user page.
        map_4k(&mut m, gva, 0x9000, P | RW | US);
        ctx.cr4 |= CR4_SMEP | CR4_SMAP;
        assert_eq!(translate(&m, &ctx, gva, Access::Execute), Translation::Fail(FailReason::Smep));
        assert_eq!(translate(&m, &ctx, gva, Access::Read), Translation::Fail(FailReason::Smap));
        ctx.rflags |= RFLAGS_AC;
        assert_eq!(translate(&m, &ctx, gva, Access::Read), Translation::Ok(0x9000));
        // Page outside RAM, table outside RAM.
        map_4k(&mut m, gva, 0x2_0000_0000, P);
        assert!(matches!(translate(&m, &ctx, gva, Access::Read), Translation::Fail(FailReason::NotRam { .. })));
        ctx.cr3 = 0x3_0000_0000;
        assert!(matches!(translate(&m, &ctx, gva, Access::Read), Translation::Fail(FailReason::NotRam { level: 4, .. })));
    }

    #[test]
    fn pae_and_32bit_and_flat() {
        let mut m = Fake::new(1 << 32);
        // PAE: PDPT at 0x1000 (cr3), PD at 0x2000, PT at 0x3000.
        let ctx = PagingContext { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, ..Default::default() };
        m.set(0x1000 + 3 * 8, 0x2000 | P);
        m.set(0x2000 + 8, 0x3000 | P | RW);
        m.set(0x3000 + 2 * 8, 0x7000 | P | RW);
        assert_eq!(translate(&m, &ctx, 0xc020_2123, Access::Read), Translation::Ok(0x7123));
        m.set(0x2000 + 2 * 8, 0x60_0000 | P | PS);
        assert_eq!(translate(&m, &ctx, 0xc041_0000, Access::Read), Translation::Ok(0x61_0000));
        // 32-bit paging: PD at 0x5000; a 4 MiB page with PSE-36 high bits.
        let ctx32 = PagingContext { cr0: CR0_PG | 1, cr3: 0x5000, cr4: CR4_PSE, ..Default::default() };
        let pde = 0x0080_0000u64 | (0x1 << 13) | P | PS;
        let slot = 0x5000 + 4 * 4;
        let old = m.words.get(&(slot & !7)).copied().unwrap_or(0);
        m.set(slot & !7, old | (pde << ((slot & 7) * 8)));
        assert_eq!(translate(&m, &ctx32, 0x0100_1234, Access::Read), Translation::Fail(FailReason::NotRam { level: 2, gpa: 0x1_0080_1234 }));
        // Paging off: linear is physical.
        let flat = PagingContext::default();
        assert_eq!(translate(&m, &flat, 0x1234, Access::Execute), Translation::Ok(0x1234));
    }

    #[test]
    fn hostile_tables_never_panic() {
        let mut m = Fake::new(1 << 20);
        let mut seed = 0x1234_5678_9abc_def0u64;
        for i in 0..512u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            m.set((i % 256) * 8 + 0x1000, seed);
        }
        for mode in [long_ctx(), PagingContext { cr4: CR4_PAE | CR4_LA57, ..long_ctx() }] {
            for k in 0..2000u64 {
                let _ = translate(&m, &mode, k.wrapping_mul(0x9e37_79b9_7f4a_7c15), Access::Write);
            }
        }
    }
}
