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
    /// Fills `out` from `gpa`; false (and `out` unspecified) where any byte is not RAM.
    fn read_bytes(&self, gpa: u64, out: &mut [u8]) -> bool {
        for (i, b) in out.iter_mut().enumerate() {
            let a = gpa.wrapping_add(i as u64);
            let Some(word) = self.read_u32(a & !3) else { return false };
            *b = (word >> ((a & 3) * 8)) as u8;
        }
        true
    }
}

impl PhysMem for vm_memory::GuestMemoryMmap {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        // Page-table entries are naturally aligned: one region lookup and one
        // volatile load (the guest may be writing it). Anything else takes
        // vm-memory's general path.
        if gpa.is_multiple_of(8)
            && let Some(p) = aligned_host_ptr(self, gpa, 8)
        {
            // SAFETY: `aligned_host_ptr` checked that the 8 bytes lie inside one mapped
            // region of this guest memory and that the address is 8-aligned.
            return Some(unsafe { std::ptr::read_volatile(p as *const u64) });
        }
        self.read_obj::<u64>(GuestAddress(gpa)).ok()
    }
    fn read_u32(&self, gpa: u64) -> Option<u32> {
        if gpa.is_multiple_of(4)
            && let Some(p) = aligned_host_ptr(self, gpa, 4)
        {
            // SAFETY: as above, for 4 bytes at a 4-aligned address.
            return Some(unsafe { std::ptr::read_volatile(p as *const u32) });
        }
        self.read_obj::<u32>(GuestAddress(gpa)).ok()
    }
    fn is_ram(&self, gpa: u64) -> bool {
        self.address_in_range(GuestAddress(gpa))
    }
    fn read_bytes(&self, gpa: u64, out: &mut [u8]) -> bool {
        self.read_slice(out, GuestAddress(gpa)).is_ok()
    }
}

/// The host address of `len` bytes at `gpa`, when they lie inside one region.
fn aligned_host_ptr(mem: &vm_memory::GuestMemoryMmap, gpa: u64, len: u64) -> Option<*const u8> {
    use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
    let region = mem.find_region(GuestAddress(gpa))?;
    let offset = gpa.checked_sub(region.start_addr().0)?;
    if offset.checked_add(len)? > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok().map(|p| p as *const u8)
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
    /// The A20 gate is closed: physical address bit 20 reads as zero (a PC's
    /// power-up state on old chipsets; skiff's machine keeps A20 open).
    pub a20_masked: bool,
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
    /// The walk a vCPU's own accesses get: its control registers, CPL and RFLAGS, its
    /// PKRU (protection keys, with CR4.PKE) and its MAXPHYADDR (reserved bits).
    pub fn for_vcpu(s: &kvm_bindings::kvm_sregs, rflags: u64, pkru: u32, maxphyaddr: u8) -> Self {
        PagingContext {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cpl: s.cs.dpl,
            rflags,
            pkru,
            maxphyaddr,
            a20_masked: false,
        }
    }

    /// A walk with no protection-key restriction and the widest physical address
    /// (52 bits): for diagnostics and checks that must not depend on either, and for
    /// instruction fetches (protection keys never apply to them).
    pub fn from_sregs(s: &kvm_bindings::kvm_sregs, rflags: u64) -> Self {
        Self::for_vcpu(s, rflags, 0, 0)
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
    /// The page the walk arrived at (a leaf at `level`; 0: paging off) is not RAM:
    /// MMIO, or nothing. The translation itself is well-formed.
    NotRam { level: u8, gpa: u64 },
    /// The page-table entry at `level` lies outside guest RAM: the walk cannot go on.
    TableNotRam { level: u8, gpa: u64 },
    /// Segmentation refused the access before paging: outside the segment's limit.
    SegmentLimit { offset: u64, len: u64, limit: u32 },
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
            FailReason::NotRam { level: 0, gpa } => write!(f, "physical address {gpa:#x} is not guest RAM"),
            FailReason::NotRam { level, gpa } => {
                write!(f, "{} (level {level}) maps {gpa:#x}, which is not guest RAM", level_name(level))
            }
            FailReason::TableNotRam { level, gpa } => {
                write!(f, "{} (level {level}) would be read at {gpa:#x}, which is not guest RAM", level_name(level))
            }
            FailReason::SegmentLimit { offset, len, limit } => {
                write!(f, "{len} byte(s) at offset {offset:#x} are outside the segment limit {limit:#x}")
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

/// A segment register as the walk needs it (base, limit, and whether it is usable).
#[derive(Clone, Copy, Debug, Default)]
pub struct Segment {
    pub base: u64,
    /// Byte-granular limit (KVM reports it scaled already).
    pub limit: u32,
    /// Expand-down data segment: valid offsets are above the limit.
    pub expand_down: bool,
    /// A 32-bit (B/D set) expand-down segment's top is 4 GiB, else 64 KiB.
    pub big: bool,
}

impl Segment {
    pub fn from_kvm(s: &kvm_bindings::kvm_segment) -> Self {
        // Data segment (type bit 3 clear) with the expand-down bit (bit 2).
        let expand_down = s.s != 0 && s.type_ & 0x8 == 0 && s.type_ & 0x4 != 0;
        Segment { base: s.base, limit: s.limit, expand_down, big: s.db != 0 }
    }
}

/// Segmentation, before paging: the linear address of `len` bytes at `offset` in
/// `seg` for code of `bits` (16, 32 or 64). Real mode and 16/32-bit protected mode add
/// the base and check the limit (a linear address wraps at 4 GiB). 64-bit mode has
/// no limits and adds the base as given: pass FS's or GS's, and a zero base for the
/// other segments, whose bases 64-bit mode ignores. Canonicality is the walk's check.
pub fn linear_address(seg: &Segment, offset: u64, len: u64, bits: u32) -> Result<u64, FailReason> {
    if bits == 64 {
        return Ok(seg.base.wrapping_add(offset));
    }
    // EIP, not IP: 16-bit code past the limit (or past 64 KiB) faults, it does not wrap.
    let offset = offset & 0xffff_ffff;
    let last = offset.wrapping_add(len.saturating_sub(1));
    let limit = u64::from(seg.limit);
    let ok = if seg.expand_down {
        let top = if seg.big { 0xffff_ffff } else { 0xffff };
        offset > limit && last <= top
    } else {
        last <= limit && last >= offset
    };
    if !ok {
        return Err(FailReason::SegmentLimit { offset, len, limit: seg.limit });
    }
    Ok(seg.base.wrapping_add(offset) & 0xffff_ffff)
}

/// Translates the virtual range `[gva, gva + len)` page by page and calls
/// `piece(gpa, done, n)` for each physically contiguous piece in order (`done` bytes
/// precede it). Stops at the first page that does not translate and returns its
/// address with the outcome. At most `len / 4096 + 2` walks, whatever the guest
/// put in its tables.
pub fn for_each_piece<M: PhysMem>(
    mem: &M,
    ctx: &PagingContext,
    gva: u64,
    len: usize,
    access: Access,
    mut piece: impl FnMut(u64, usize, usize),
) -> Result<(), (u64, Translation)> {
    let mut done = 0usize;
    while done < len {
        let addr = gva.wrapping_add(done as u64);
        let n = ((0x1000 - (addr & 0xfff)) as usize).min(len - done);
        match translate(mem, ctx, addr, access) {
            Translation::Ok(gpa) => piece(gpa, done, n),
            other => return Err((addr, other)),
        }
        done += n;
    }
    Ok(())
}

/// Reads guest-virtual memory into `buf` through the guest's tables. On failure, the
/// first address that did not translate (or is not RAM) and why.
pub fn read_virt<M: PhysMem>(mem: &M, ctx: &PagingContext, gva: u64, buf: &mut [u8]) -> Result<(), (u64, Translation)> {
    let mut bad: Option<(u64, Translation)> = None;
    let len = buf.len();
    for_each_piece(mem, ctx, gva, len, Access::Read, |gpa, done, n| {
        if bad.is_none() {
            let ok = buf.get_mut(done..done + n).is_some_and(|dst| mem.read_bytes(gpa, dst));
            if !ok {
                bad = Some((gva.wrapping_add(done as u64), Translation::Fail(FailReason::NotRam { level: 0, gpa })));
            }
        }
    })?;
    bad.map_or(Ok(()), Err)
}

/// One present leaf mapping found by [`for_each_mapping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First virtual address (sign-extended in long mode).
    pub gva: u64,
    pub gpa: u64,
    /// Page size in bytes (4 KiB, 2 MiB, 4 MiB or 1 GiB).
    pub size: u64,
    pub level: u8,
    pub writable: bool,
    pub user: bool,
    pub executable: bool,
}

/// Visits the present leaf mappings of the guest's current address space in address
/// order, at most `max_entries` page-table entries read in all (a hostile guest's
/// tables cannot make it loop longer). Entries with reserved bits are skipped, as the
/// CPU would fault on them. Returns the number of entries read. For diagnostics, the
/// gdb stub and the translator's self-check: the walk itself is [`translate`].
pub fn for_each_mapping<M: PhysMem>(
    mem: &M,
    ctx: &PagingContext,
    max_entries: usize,
    mut visit: impl FnMut(&Mapping),
) -> usize {
    let mut budget = max_entries;
    let mode = ctx.mode();
    let (levels, entry_bytes): (u8, u64) = match mode {
        PagingMode::None => return 0,
        PagingMode::Bits32 => (2, 4),
        PagingMode::Pae => (3, 8),
        PagingMode::Level4 => (4, 8),
        PagingMode::Level5 => (5, 8),
    };
    let root = match mode {
        PagingMode::Bits32 => ctx.cr3 & 0xffff_f000,
        PagingMode::Pae => ctx.cr3 & 0xffff_ffe0,
        _ => ctx.cr3 & ctx.addr_mask(),
    };
    let rights = Rights { write: true, user: true, exec: true };
    visit_table(mem, ctx, mode, root, levels, entry_bytes, 0, &rights, &mut budget, &mut visit);
    max_entries - budget
}

/// Bits of the virtual address a level's index covers, and how many entries it has.
fn level_geometry(mode: PagingMode, level: u8) -> (u32, u64) {
    match (mode, level) {
        (PagingMode::Bits32, 2) => (22, 1024),
        (PagingMode::Bits32, _) => (12, 1024),
        (PagingMode::Pae, 3) => (30, 4),
        _ => (12 + 9 * (u32::from(level) - 1), 512),
    }
}

#[allow(clippy::too_many_arguments)]
fn visit_table<M: PhysMem>(
    mem: &M,
    ctx: &PagingContext,
    mode: PagingMode,
    table: u64,
    level: u8,
    entry_bytes: u64,
    prefix: u64,
    rights: &Rights,
    budget: &mut usize,
    visit: &mut impl FnMut(&Mapping),
) {
    let (shift, entries) = level_geometry(mode, level);
    let nxe = ctx.efer & EFER_NXE != 0 && mode != PagingMode::Bits32;
    for index in 0..entries {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let addr = table + index * entry_bytes;
        let Some(entry) = (if entry_bytes == 4 { mem.read_u32(addr).map(u64::from) } else { mem.read_u64(addr) }) else {
            return;
        };
        if entry & P == 0 {
            continue;
        }
        let mut gva = prefix | (index << shift);
        if matches!(mode, PagingMode::Level4 | PagingMode::Level5) {
            let top = if mode == PagingMode::Level5 { 57 } else { 48 };
            gva = (((gva << (64 - top)) as i64) >> (64 - top)) as u64;
        }
        // The walk decides what is valid: a leaf is whatever translate() accepts.
        let is_pdpte_pae = mode == PagingMode::Pae && level == 3;
        let large = !is_pdpte_pae
            && level > 1
            && entry & PS != 0
            && match mode {
                PagingMode::Bits32 => ctx.cr4 & CR4_PSE != 0,
                _ => level <= 3,
            };
        let next = Rights {
            write: rights.write && (is_pdpte_pae || entry & RW != 0),
            user: rights.user && (is_pdpte_pae || entry & US != 0),
            exec: rights.exec && !(nxe && entry & XD != 0),
        };
        if large || level == 1 {
            let size = 1u64 << shift;
            // Ask the walk itself, so reserved bits and rights agree with translate().
            let probe_ctx = PagingContext { cpl: 0, cr4: ctx.cr4 & !(CR4_SMAP | CR4_SMEP | CR4_PKE), ..*ctx };
            if let Translation::Ok(gpa) | Translation::Fail(FailReason::NotRam { level: 1..=3, gpa }) =
                translate(mem, &probe_ctx, gva, Access::Read)
            {
                visit(&Mapping {
                    gva,
                    gpa,
                    size,
                    level,
                    writable: next.write,
                    user: next.user,
                    executable: next.exec,
                });
            }
            continue;
        }
        let child = match mode {
            PagingMode::Bits32 => entry & 0xffff_f000,
            _ => entry & ctx.addr_mask(),
        };
        visit_table(mem, ctx, mode, child, level - 1, entry_bytes, gva, &next, budget, visit);
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
            let mut gpa = if ctx.efer & EFER_LMA != 0 { gva } else { gva & 0xffff_ffff };
            if ctx.a20_masked {
                gpa &= !(1 << 20);
            }
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

/// Whether `addr` is canonical: bits 63..48 (63..57 with LA57) copy the top bit of
/// the linear address.
pub fn is_canonical(addr: u64, la57: bool) -> bool {
    let shift = if la57 { 64 - 57 } else { 64 - 48 };
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// 4- and 5-level paging: 9 bits a level, 2 MiB pages at level 2, 1 GiB at level 3.
fn walk_long<M: PhysMem>(mem: &M, ctx: &PagingContext, gva: u64, access: Access, levels: u8) -> Translation {
    if !is_canonical(gva, levels == 5) {
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
            return Translation::Fail(FailReason::TableNotRam { level, gpa: entry_addr });
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
        return Translation::Fail(FailReason::TableNotRam { level: 3, gpa: pdpte_addr });
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
            return Translation::Fail(FailReason::TableNotRam { level, gpa: entry_addr });
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
        return Translation::Fail(FailReason::TableNotRam { level: 2, gpa: pde_addr });
    };
    if pde & P == 0 {
        return Translation::Retry { level: 2, entry: pde };
    }
    let mut rights = Rights { write: pde & RW != 0, user: pde & US != 0, exec: true };
    if pde & PS != 0 && ctx.cr4 & CR4_PSE != 0 {
        // Bit 21 is reserved; bits 13-20 are physical bits 32-39, and those at or
        // above MAXPHYADDR are reserved too.
        let width = if ctx.maxphyaddr == 0 { 40 } else { ctx.maxphyaddr.clamp(32, 40) };
        let high_bits = u64::from(width - 32);
        let rsvd = (1u64 << 21) | ((0xffu64 << 13) & !(((1u64 << high_bits) - 1) << 13));
        if pde & rsvd != 0 {
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
        return Translation::Fail(FailReason::TableNotRam { level: 1, gpa: pte_addr });
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
mod tests;
