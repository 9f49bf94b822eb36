//! Unit and property tests of the page walker.

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
    assert!(matches!(translate(&m, &ctx, gva, Access::Read), Translation::Fail(FailReason::TableNotRam { level: 4, .. })));
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

/// Writes a 32-bit entry into the fake memory (which stores 64-bit words).
fn set32(m: &mut Fake, addr: u64, v: u32) {
    let base = addr & !7;
    let shift = (addr & 7) * 8;
    let old = m.words.get(&base).copied().unwrap_or(0);
    m.set(base, (old & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift));
}

/// Page tables for 4- or 5-level paging built in fake memory: tables come from a
/// bump allocator above 16 MiB.
struct Builder {
    m: Fake,
    root: u64,
    next: u64,
    levels: u8,
}

impl Builder {
    fn new(levels: u8) -> Self {
        Builder { m: Fake::new(1 << 40), root: 0x100_0000, next: 0x100_1000, levels }
    }
    fn ctx(&self) -> PagingContext {
        let la57 = if self.levels == 5 { CR4_LA57 } else { 0 };
        PagingContext { cr3: self.root, cr4: CR4_PAE | la57, ..long_ctx() }
    }
    /// Maps one page of `size` (4 KiB, 2 MiB or 1 GiB) at `gva` to `gpa`.
    fn map(&mut self, gva: u64, gpa: u64, size: u64, flags: u64) {
        let leaf_level = match size {
            0x1000 => 1,
            0x20_0000 => 2,
            _ => 3,
        };
        let mut table = self.root;
        for level in (leaf_level + 1..=self.levels).rev() {
            let slot = table + ((gva >> (12 + 9 * (u64::from(level) - 1))) & 0x1ff) * 8;
            let entry = self.m.words.get(&slot).copied().unwrap_or(0);
            table = if entry & P != 0 {
                entry & 0x000f_ffff_ffff_f000
            } else {
                let t = self.next;
                self.next += 0x1000;
                self.m.set(slot, t | P | RW | US);
                t
            };
        }
        let slot = table + ((gva >> (12 + 9 * (u64::from(leaf_level) - 1))) & 0x1ff) * 8;
        let ps = if leaf_level > 1 { PS } else { 0 };
        self.m.set(slot, gpa | flags | ps | P);
    }
}

#[test]
fn five_level_paging() {
    let mut b = Builder::new(5);
    let gva = 0xff12_3456_7890_0000u64 & !0xfff; // bits 56:48 used, sign-extended from 56
    let gva = ((gva << 7) as i64 >> 7) as u64;
    b.map(gva, 0x4_5000, 0x1000, RW);
    assert_eq!(translate(&b.m, &b.ctx(), gva | 0x123, Access::Write), Translation::Ok(0x4_5123));
    // Canonical for 5-level but not 4-level, and the reverse check.
    let wide = 0x0100_0000_0000_0000u64 - 0x1000;
    assert!(matches!(translate(&b.m, &b.ctx(), wide, Access::Read), Translation::Retry { level: 5, .. }));
    assert_eq!(
        translate(&b.m, &b.ctx(), 0x0100_0000_0000_0000, Access::Read),
        Translation::Fail(FailReason::NonCanonical(0x0100_0000_0000_0000))
    );
    let four = Builder::new(4);
    assert_eq!(translate(&four.m, &four.ctx(), wide, Access::Read), Translation::Fail(FailReason::NonCanonical(wide)));
}

#[test]
fn reserved_bits_by_level() {
    let mut b = Builder::new(4);
    b.map(0x20_0000, 0x40_0000, 0x20_0000, RW);
    // A 2 MiB page with bit 13 set (reserved: between PAT and the page base).
    let pd_slot = *b.m.words.iter().find(|(_, v)| **v & PS != 0).map(|(k, _)| k).unwrap();
    b.m.set(pd_slot, 0x40_0000 | P | RW | PS | (1 << 13));
    assert!(matches!(translate(&b.m, &b.ctx(), 0x20_0000, Access::Read), Translation::Fail(FailReason::Reserved { level: 2, .. })));
    // PS in a PML4E is reserved.
    b.m.set(b.root, b.m.words[&b.root] | PS);
    assert!(matches!(translate(&b.m, &b.ctx(), 0x20_0000, Access::Read), Translation::Fail(FailReason::Reserved { level: 4, .. })));
    // Above MAXPHYADDR.
    let mut c = Builder::new(4);
    c.map(0x1000, 0x1_0000_0000_0000, 0x1000, 0);
    let ctx = PagingContext { maxphyaddr: 46, ..c.ctx() };
    assert!(matches!(translate(&c.m, &ctx, 0x1000, Access::Read), Translation::Fail(FailReason::Reserved { level: 1, .. })));
}

#[test]
fn write_protect_and_protection_keys() {
    let mut b = Builder::new(4);
    b.map(0x7000, 0x9000, 0x1000, US); // read-only user page
    let mut ctx = b.ctx();
    // CR0.WP clear: the kernel may write a read-only page; user mode never.
    ctx.cr0 &= !CR0_WP;
    assert_eq!(translate(&b.m, &ctx, 0x7000, Access::Write), Translation::Ok(0x9000));
    ctx.cpl = 3;
    assert_eq!(translate(&b.m, &ctx, 0x7000, Access::Write), Translation::Fail(FailReason::WriteProtect { level: 1 }));
    // Key 5 in the leaf, access-disabled in PKRU.
    b.map(0x8000, 0xa000, 0x1000, US | RW | (5 << 59));
    let ctx = PagingContext { cr4: CR4_PAE | CR4_PKE, pkru: 1 << 10, cpl: 3, ..b.ctx() };
    assert_eq!(translate(&b.m, &ctx, 0x8000, Access::Read), Translation::Fail(FailReason::ProtectionKey(5)));
    // Keys do not apply to fetches.
    assert_eq!(translate(&b.m, &ctx, 0x8000, Access::Execute), Translation::Ok(0xa000));
}

#[test]
fn paging_32bit_4k_4m_and_pse36() {
    let mut m = Fake::new(1 << 32);
    // PD at 0x5000; PDE 1 -> PT at 0x6000; PTE 3 -> 0x7000.
    set32(&mut m, 0x5000 + 4, 0x6000 | (P | RW | US) as u32);
    set32(&mut m, 0x6000 + 3 * 4, 0x7000 | P as u32);
    let ctx = PagingContext { cr0: CR0_PG | CR0_WP | 1, cr3: 0x5000, ..Default::default() };
    assert_eq!(translate(&m, &ctx, 0x0040_3abc, Access::Read), Translation::Ok(0x7abc));
    assert_eq!(translate(&m, &ctx, 0x0040_3abc, Access::Write), Translation::Fail(FailReason::WriteProtect { level: 1 }));
    // The upper 32 bits of a linear address do not exist here.
    assert_eq!(translate(&m, &ctx, 0xdead_0000_0040_3abc, Access::Read), Translation::Ok(0x7abc));
    assert_eq!(translate(&m, &ctx, 0x0040_4000, Access::Read), Translation::Retry { level: 1, entry: 0 });
    // A 4 MiB page at PDE 2: honoured with CR4.PSE, a table pointer without it.
    set32(&mut m, 0x5000 + 2 * 4, 0x00c0_0000 | (P | RW | PS) as u32);
    let pse = PagingContext { cr4: CR4_PSE, ..ctx };
    assert_eq!(translate(&m, &pse, 0x0089_abcd, Access::Write), Translation::Ok(0x00c9_abcd));
    assert!(matches!(translate(&m, &ctx, 0x0089_abcd, Access::Read), Translation::Retry { level: 1, .. }));
    // PSE-36: PDE bits 13-16 give physical bits 32-35 when MAXPHYADDR is 36; bit 17
    // is then reserved.
    set32(&mut m, 0x5000 + 3 * 4, 0x0040_0000 | (0x3 << 13) | (P | PS) as u32);
    let pse36 = PagingContext { maxphyaddr: 36, ..pse };
    assert_eq!(
        translate(&m, &pse36, 0x00c0_0010, Access::Read),
        Translation::Fail(FailReason::NotRam { level: 2, gpa: 0x3_0040_0010 })
    );
    set32(&mut m, 0x5000 + 3 * 4, 0x0040_0000 | (0x10 << 13) | (P | PS) as u32);
    assert!(matches!(translate(&m, &pse36, 0x00c0_0010, Access::Read), Translation::Fail(FailReason::Reserved { level: 2, .. })));
    // No NX in 32-bit paging: everything present is executable.
    assert_eq!(translate(&m, &ctx, 0x0040_3000, Access::Execute), Translation::Ok(0x7000));
}

#[test]
fn pae_4k_2m_nx_and_reserved_pdpte() {
    let mut m = Fake::new(1 << 32);
    let ctx = PagingContext { cr0: CR0_PG | 1, cr3: 0x1020, cr4: CR4_PAE, efer: EFER_NXE, ..Default::default() };
    // PDPT at 0x1020 (32-byte aligned, not page aligned).
    m.set(0x1020, 0x2000 | P);
    m.set(0x2000, 0x3000 | P | RW);
    m.set(0x3000 + 5 * 8, 0x8000 | P | RW | XD);
    assert_eq!(translate(&m, &ctx, 0x5123, Access::Write), Translation::Ok(0x8123));
    assert_eq!(translate(&m, &ctx, 0x5123, Access::Execute), Translation::Fail(FailReason::NoExecute { level: 1 }));
    m.set(0x2000 + 8, 0x20_0000 | P | PS);
    assert_eq!(translate(&m, &ctx, 0x3f_ffff, Access::Execute), Translation::Ok(0x3f_ffff));
    // PDPTE 1 with a reserved bit (bit 1, RW, is reserved in PAE PDPTEs).
    m.set(0x1028, 0x4000 | P | RW);
    assert!(matches!(translate(&m, &ctx, 0x4000_0000, Access::Read), Translation::Fail(FailReason::Reserved { level: 3, .. })));
    // Without NXE, XD is a reserved bit.
    let no_nx = PagingContext { efer: 0, ..ctx };
    assert!(matches!(translate(&m, &no_nx, 0x5123, Access::Read), Translation::Fail(FailReason::Reserved { level: 1, .. })));
}

#[test]
fn segments_real_and_protected() {
    // Real mode: CS base + IP, limit 64 KiB, no wrap at 1 MiB with A20 open.
    let real_cs = Segment { base: 0xffff0, limit: 0xffff, ..Default::default() };
    assert_eq!(linear_address(&real_cs, 0xfff0, 1, 16), Ok(0x10_ffe0));
    assert!(matches!(linear_address(&real_cs, 0x1_0000, 1, 16), Err(FailReason::SegmentLimit { .. })));
    assert!(matches!(linear_address(&real_cs, 0xffff, 2, 16), Err(FailReason::SegmentLimit { .. })));
    // A20 closed: bit 20 of the physical address reads as zero.
    let m = Fake::new(1 << 24);
    let a20 = PagingContext { a20_masked: true, ..Default::default() };
    assert_eq!(translate(&m, &a20, 0x10_ffe0, Access::Execute), Translation::Ok(0xffe0));
    // Protected mode: base and limit, 4 GiB wrap.
    let seg = Segment { base: 0xffff_f000, limit: 0x1fff, ..Default::default() };
    assert_eq!(linear_address(&seg, 0x1800, 4, 32), Ok(0x800));
    assert!(matches!(linear_address(&seg, 0x1ffe, 4, 32), Err(FailReason::SegmentLimit { .. })));
    // Expand-down: offsets above the limit are the valid ones.
    let down = Segment { base: 0, limit: 0xfff, expand_down: true, big: true };
    assert!(linear_address(&down, 0x800, 1, 32).is_err());
    assert_eq!(linear_address(&down, 0x1000, 4, 32), Ok(0x1000));
    // 64-bit mode: no limit.
    assert_eq!(linear_address(&seg, 0x1_0000_0000, 8, 64), Ok(0x1_0000_0000u64.wrapping_add(0xffff_f000)));
}

#[test]
fn ranges_cross_pages_one_walk_each() {
    let mut b = Builder::new(4);
    // Two virtually adjacent pages, physically far apart.
    b.map(0x40_0000, 0x9000, 0x1000, RW);
    b.map(0x40_1000, 0x3000, 0x1000, RW);
    let mut pieces = Vec::new();
    let r = for_each_piece(&b.m, &b.ctx(), 0x40_0ff8, 16, Access::Read, |gpa, done, n| pieces.push((gpa, done, n)));
    assert_eq!(r, Ok(()));
    assert_eq!(pieces, vec![(0x9ff8, 0, 8), (0x3000, 8, 8)]);
    // The second page missing: the first piece is delivered, then the failure.
    let mut pieces = Vec::new();
    let r = for_each_piece(&b.m, &b.ctx(), 0x40_1ff8, 16, Access::Read, |gpa, done, n| pieces.push((gpa, done, n)));
    assert_eq!(pieces, vec![(0x3ff8, 0, 8)]);
    assert!(matches!(r, Err((0x40_2000, Translation::Retry { level: 1, .. }))));
}

#[test]
fn mapping_enumeration_matches_the_walk() {
    let mut b = Builder::new(4);
    b.map(0x40_0000, 0x9000, 0x1000, RW);
    b.map(0xffff_8880_0000_0000, 0, 0x4000_0000, RW);
    b.map(0xffff_ffff_8100_0000, 0x100_0000, 0x20_0000, 0);
    b.map(0x7fff_ffff_f000, 0xfee0_0000, 0x1000, RW | US); // MMIO, not RAM (1 TiB fake)
    let mut seen = Vec::new();
    let read = for_each_mapping(&b.m, &b.ctx(), 1 << 20, |m| seen.push((m.gva, m.gpa, m.size, m.user)));
    assert!(read > 0);
    assert_eq!(
        seen,
        vec![
            (0x40_0000, 0x9000, 0x1000, false),
            (0x7fff_ffff_f000, 0xfee0_0000, 0x1000, true),
            (0xffff_8880_0000_0000, 0, 0x4000_0000, false),
            (0xffff_ffff_8100_0000, 0x100_0000, 0x20_0000, false),
        ]
    );
    // The budget bounds the walk.
    let mut n = 0;
    assert_eq!(for_each_mapping(&b.m, &b.ctx(), 100, |_| n += 1), 100);
}

#[test]
fn tables_outside_ram_are_not_leaves_outside_ram() {
    let mut b = Builder::new(4);
    b.m.size = 0x200_0000;
    b.map(0x5000, 0x1_0000_0000, 0x1000, RW);
    assert_eq!(
        translate(&b.m, &b.ctx(), 0x5000, Access::Read),
        Translation::Fail(FailReason::NotRam { level: 1, gpa: 0x1_0000_0000 })
    );
    let ctx = PagingContext { cr3: 0x4000_0000, ..b.ctx() };
    assert_eq!(
        translate(&b.m, &ctx, 0x5000, Access::Read),
        Translation::Fail(FailReason::TableNotRam { level: 4, gpa: 0x4000_0000 })
    );
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// A page: which size, a virtual page number and a physical page number (both
    /// in units of that size), and the page's rights.
    fn page() -> impl Strategy<Value = (u64, u64, u64, u64)> {
        (0u8..3, any::<u64>(), 0u64..(1 << 20), 0u64..8).prop_map(|(k, v, p, f)| {
            let size = [0x1000u64, 0x20_0000, 0x4000_0000][k as usize];
            let vpn_bits = 48 - size.trailing_zeros();
            let gva = (v & ((1 << vpn_bits) - 1)) * size;
            let gva = (((gva << 16) as i64) >> 16) as u64; // canonical
            let gpa = (p * size) & 0x000f_ffff_ffff_f000;
            (gva, gpa, size, f)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Random mappings translate back: every byte offset of every page lands
        /// at the page's physical base plus that offset, with the rights given.
        #[test]
        fn random_mappings_translate_back(pages in proptest::collection::vec(page(), 1..24), offs in any::<u64>()) {
            let mut b = Builder::new(4);
            b.m.size = 1 << 52;
            // Later pages may overlap earlier ones; keep only what survives.
            let mut kept: Vec<(u64, u64, u64, u64)> = Vec::new();
            for &(gva, gpa, size, f) in &pages {
                if kept.iter().any(|&(g, _, s, _)| gva < g.wrapping_add(s) && g < gva.wrapping_add(size)) {
                    continue;
                }
                let flags = (if f & 1 != 0 { RW } else { 0 }) | (if f & 2 != 0 { US } else { 0 }) | (if f & 4 != 0 { XD } else { 0 });
                // A table page could be mapped over by a larger page only if the
                // ranges overlapped, which is excluded above.
                b.map(gva, gpa, size, flags);
                kept.push((gva, gpa, size, f));
            }
            let ctx = b.ctx();
            for &(gva, gpa, size, f) in &kept {
                let off = offs % size;
                prop_assert_eq!(translate(&b.m, &ctx, gva + off, Access::Read), Translation::Ok(gpa + off));
                let w = translate(&b.m, &ctx, gva + off, Access::Write);
                if f & 1 != 0 { prop_assert_eq!(w, Translation::Ok(gpa + off)); } else { prop_assert!(matches!(w, Translation::Fail(FailReason::WriteProtect { .. })), "{:?}", (gva, gpa, size, f)); }
                let x = translate(&b.m, &ctx, gva + off, Access::Execute);
                if f & 4 == 0 { prop_assert_eq!(x, Translation::Ok(gpa + off)); } else { prop_assert!(matches!(x, Translation::Fail(FailReason::NoExecute { .. })), "{:?}", (gva, gpa, size, f)); }
                let user = translate(&b.m, &PagingContext { cpl: 3, ..ctx }, gva + off, Access::Read);
                if f & 2 != 0 { prop_assert_eq!(user, Translation::Ok(gpa + off)); } else { prop_assert!(matches!(user, Translation::Fail(FailReason::User { .. })), "{:?}", (gva, gpa, size, f)); }
            }
            // The enumeration finds exactly the pages that were kept.
            let mut found = Vec::new();
            for_each_mapping(&b.m, &ctx, 1 << 22, |m| found.push((m.gva, m.gpa, m.size)));
            let mut want: Vec<(u64, u64, u64)> = kept.iter().map(|&(g, p, s, _)| (g, p, s)).collect();
            want.sort_unstable();
            found.sort_unstable();
            prop_assert_eq!(found, want);
        }
    }
}
