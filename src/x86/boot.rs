//! The Linux x86 boot protocols skiff speaks, as data: the e820 memory map, the
//! `boot_params` zero page (64-bit boot protocol), the PVH `hvm_start_info`, and the
//! CPU state each entry point expects (flat GDT, identity page tables).
//!
//! Facts from the kernel's Documentation/arch/x86/boot.rst and the Xen PVH ABI.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Boot-protocol magic values.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// `loadflags` bit: the protected-mode kernel is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The most e820 entries `boot_params` has room for.
pub const E820_MAX_ENTRIES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("e820 map has more than {E820_MAX_ENTRIES} entries")]
    E820TooLarge,
    #[error("writing {what} to guest memory at {addr:#x} failed")]
    GuestWrite { what: &'static str, addr: u64 },
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Where and how big the pieces a kernel needs beside itself are.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    pub cmdline_addr: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: u32,
    pub initrd: Option<(u64, u32)>,
    pub rsdp_addr: u64,
}

/// Writes the zero page for the 64-bit boot protocol. `hdr` is the bzImage's own
/// setup header when booting a bzImage (it must be passed back to the kernel), or
/// `None` for a vmlinux, which gets a minimal header of its own.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    at: u64,
    hdr: Option<setup_header>,
    info: &BootInfo,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let mut params = boot_params { hdr: hdr.unwrap_or_default(), ..Default::default() };
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.hdr.cmdline_size = info.cmdline_len;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
        params.ext_ramdisk_image = (addr >> 32) as u32;
    }
    params.acpi_rsdp_addr = info.rsdp_addr;
    if e820.len() > E820_MAX_ENTRIES {
        return Err(BootError::E820TooLarge);
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(at))
        .map_err(|_| BootError::GuestWrite { what: "boot_params", addr: at })
}

/// Writes the PVH start-of-day structure, its memory map and the initrd module entry,
/// packed from `at` upwards. Returns the address of the `hvm_start_info` (for EBX).
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    at: u64,
    info: &BootInfo,
    e820: &[E820Entry],
) -> Result<u64, BootError> {
    let start_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = at + start_size;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: info.cmdline_addr,
        rsdp_paddr: info.rsdp_addr,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = info.initrd {
        start.nr_modules = 1;
        start.modlist_paddr = modlist_addr;
        let module = hvm_modlist_entry { paddr: addr, size: size as u64, ..Default::default() };
        write_bytes(mem, modlist_addr, module_bytes(&module), "PVH module list")?;
    }
    for (i, entry) in e820.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        let addr = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        write_bytes(mem, addr, memmap_bytes(&e), "PVH memory map")?;
    }
    mem.write_obj(start, GuestAddress(at))
        .map_err(|_| BootError::GuestWrite { what: "PVH start info", addr: at })?;
    Ok(at)
}

fn write_bytes(
    mem: &GuestMemoryMmap,
    addr: u64,
    bytes: Vec<u8>,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite { what, addr })
}

fn module_bytes(m: &hvm_modlist_entry) -> Vec<u8> {
    [m.paddr, m.size, m.cmdline_paddr, m.reserved]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn memmap_bytes(e: &hvm_memmap_table_entry) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&e.addr.to_le_bytes());
    v.extend_from_slice(&e.size.to_le_bytes());
    v.extend_from_slice(&e.type_.to_le_bytes());
    v.extend_from_slice(&e.reserved.to_le_bytes());
    v
}

/// A GDT entry from its parts (Intel SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08), flat data (0x10), 32-bit code (0x18, PVH),
/// TSS (0x20, required by VMX for a valid TR even though it is never used).
pub const BOOT_GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code, long mode, present, accessed
    gdt_entry(0xc093, 0, 0xfffff), // data, 32-bit, present, accessed
    gdt_entry(0xc09b, 0, 0xfffff), // code, 32-bit
    gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS
];
pub const SEL_CODE64: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_CODE32: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;

/// Turns a GDT entry into the segment KVM takes.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_bindings::kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages: the low 12 bits read as ones.
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    kvm_bindings::kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Identity page tables for the 64-bit entry: the first 4 GiB with 2 MiB pages.
/// Returns the PML4 address for CR3.
pub fn write_identity_page_tables(
    mem: &GuestMemoryMmap,
    pml4: u64,
    pdpt: u64,
    pd: u64,
) -> Result<u64, BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|_| BootError::GuestWrite { what: "boot page tables", addr })
    };
    w(pml4, pdpt | PRESENT_RW)?;
    for gib in 0..4u64 {
        let pd_page = pd + gib * 0x1000;
        w(pdpt + gib * 8, pd_page | PRESENT_RW)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            w(pd_page + i * 8, phys | PRESENT_RW | PAGE_SIZE_2M)?;
        }
    }
    Ok(pml4)
}

/// Builds the e820 map for `mem_size` bytes of RAM split around the MMIO hole, with
/// the EBDA/BIOS area below 1 MiB reserved.
pub fn e820_map(
    mem_size: u64,
    ebda_start: u64,
    himem_start: u64,
    hole_start: u64,
    hole_end: u64,
) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: ebda_start, kind: E820_RAM },
        E820Entry { addr: ebda_start, size: himem_start - ebda_start, kind: E820_RESERVED },
    ];
    let low_end = mem_size.min(hole_start);
    if low_end > himem_start {
        map.push(E820Entry { addr: himem_start, size: low_end - himem_start, kind: E820_RAM });
    }
    if mem_size > hole_start {
        map.push(E820Entry { addr: hole_end, size: mem_size - hole_start, kind: E820_RAM });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn gdt_round_trip() {
        let cs = kvm_segment_from_gdt(BOOT_GDT[1], SEL_CODE64);
        assert_eq!((cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.g), (0, 0xffff_ffff, 0xb, 1, 0, 1));
        assert_eq!((cs.present, cs.s, cs.dpl, cs.unusable), (1, 1, 0, 0));
        let ds = kvm_segment_from_gdt(BOOT_GDT[2], SEL_DATA);
        assert_eq!((ds.type_, ds.db, ds.l), (0x3, 1, 0));
        let cs32 = kvm_segment_from_gdt(BOOT_GDT[3], SEL_CODE32);
        assert_eq!((cs32.type_, cs32.db, cs32.l), (0xb, 1, 0));
        let tss = kvm_segment_from_gdt(BOOT_GDT[4], SEL_TSS);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn e820_small_and_split() {
        let m = e820_map(256 << 20, 0x9fc00, 0x100000, 0xc000_0000, 1 << 32);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], E820Entry { addr: 0, size: 0x9fc00, kind: E820_RAM });
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(m[1].addr + m[1].size, 0x100000);
        assert_eq!(m[2], E820Entry { addr: 0x100000, size: (256 << 20) - 0x100000, kind: E820_RAM });
        let big = e820_map(4 << 30, 0x9fc00, 0x100000, 0xc000_0000, 1 << 32);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, 0xc000_0000);
        assert_eq!(big[3], E820Entry { addr: 1 << 32, size: 1 << 30, kind: E820_RAM });
        let total: u64 = big.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(total, (4 << 30) - (0x100000 - 0x9fc00));
    }

    #[test]
    fn boot_params_fields() {
        let m = mem();
        let info = BootInfo {
            cmdline_addr: 0x20000,
            cmdline_len: 12,
            initrd: Some((0x80_0000, 0x1234)),
            rsdp_addr: 0xe0000,
        };
        let e820 = e820_map(16 << 20, 0x9fc00, 0x100000, 0xc000_0000, 1 << 32);
        write_boot_params(&m, 0x7000, None, &info, &e820).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(0x7000)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.hdr.ramdisk_image }, 0x80_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, 0x100000);
        // Offsets fixed by the boot protocol: e820_entries at 0x1e8, table at 0x2d0.
        let mut raw = vec![0u8; 0x1000];
        m.read_slice(&mut raw, GuestAddress(0x7000)).unwrap();
        assert_eq!(raw[0x1e8], 3);
        assert_eq!(&raw[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(u64::from_le_bytes(raw[0x2d0 + 40..0x2d0 + 48].try_into().unwrap()), 0x100000);
        let too_many = vec![E820Entry { addr: 0, size: 1, kind: 1 }; 129];
        assert!(write_boot_params(&m, 0x7000, None, &info, &too_many).is_err());
    }

    #[test]
    fn pvh_start_info_layout() {
        let m = mem();
        let info = BootInfo {
            cmdline_addr: 0x20000,
            cmdline_len: 3,
            initrd: Some((0x80_0000, 0x1000)),
            rsdp_addr: 0xe0000,
        };
        let e820 = e820_map(16 << 20, 0x9fc00, 0x100000, 0xc000_0000, 1 << 32);
        let at = write_pvh_start_info(&m, 0x6000, &info, &e820).unwrap();
        let mut raw = [0u8; 56];
        m.read_slice(&mut raw, GuestAddress(at)).unwrap();
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(0), 0x336e_c578);
        assert_eq!(u32_at(4), 1);
        assert_eq!(u32_at(12), 1); // nr_modules
        assert_eq!(u64_at(24), 0x20000);
        assert_eq!(u64_at(32), 0xe0000);
        assert_eq!(u32_at(48), 3);
        let modlist: u64 = m.read_obj(GuestAddress(u64_at(16))).unwrap();
        assert_eq!(modlist, 0x80_0000);
        let memmap = u64_at(40);
        let third_addr: u64 = m.read_obj(GuestAddress(memmap + 48)).unwrap();
        let third_type: u32 = m.read_obj(GuestAddress(memmap + 48 + 16)).unwrap();
        assert_eq!((third_addr, third_type), (0x100000, E820_RAM));
    }

    #[test]
    fn identity_tables() {
        let m = mem();
        write_identity_page_tables(&m, 0x9000, 0xa000, 0xb000).unwrap();
        let pml4e: u64 = m.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!(pml4e, 0xa003);
        let pdpte3: u64 = m.read_obj(GuestAddress(0xa000 + 3 * 8)).unwrap();
        assert_eq!(pdpte3, 0xe003);
        let pde: u64 = m.read_obj(GuestAddress(0xb000 + 8 * 5)).unwrap();
        assert_eq!(pde, (5 << 21) | 0x83);
    }
}
