//! The multiboot loader against hand-built kernels: good ones load where they say,
//! bad ones give one line and load nothing past what they were checked for.

use super::*;
use vm_memory::GuestMemoryMmap;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;

fn mem() -> GuestMemoryMmap {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    // Not zero: BSS must be zeroed by the loader, not by luck.
    m.write_slice(&vec![0xaa; 4 * MIB as usize], GuestAddress(MIB)).unwrap();
    m
}

/// A multiboot header with `flags` and, for flag 16, the address fields.
fn header(flags: u32, fields: [u32; 5]) -> Vec<u8> {
    let mut h = Vec::new();
    for v in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    if flags & FLAG_ADDRESSES != 0 {
        fields.iter().for_each(|v| h.extend_from_slice(&v.to_le_bytes()));
    }
    h
}

/// An ELF file: (offset, vaddr, paddr, filesz, memsz) per PT_LOAD, the header at
/// 0x200, `body` from 0x1000.
fn elf(wide: bool, entry: u64, phdrs: &[(u64, u64, u64, u64, u64)], body: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 0x1000];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = if wide { 2 } else { 1 };
    b[5] = 1;
    b[0x12..0x14].copy_from_slice(&(if wide { 62u16 } else { 3 }).to_le_bytes());
    let (phoff, size) = (0x40u64, if wide { 56 } else { 32 });
    if wide {
        b[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    } else {
        b[0x18..0x1c].copy_from_slice(&(entry as u32).to_le_bytes());
        b[0x1c..0x20].copy_from_slice(&(phoff as u32).to_le_bytes());
        b[0x2a..0x2c].copy_from_slice(&32u16.to_le_bytes());
        b[0x2c..0x2e].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    }
    for (i, &(off, vaddr, paddr, filesz, memsz)) in phdrs.iter().enumerate() {
        let at = phoff as usize + i * size;
        b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        if wide {
            for (o, v) in [(8, off), (0x10, vaddr), (0x18, paddr), (0x20, filesz), (0x28, memsz)] {
                b[at + o..at + o + 8].copy_from_slice(&v.to_le_bytes());
            }
        } else {
            for (o, v) in [(4, off), (8, vaddr), (12, paddr), (16, filesz), (20, memsz)] {
                b[at + o..at + o + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
        }
    }
    let h = header(3, [0; 5]);
    b[0x200..0x200 + h.len()].copy_from_slice(&h);
    b.extend_from_slice(body);
    b
}

/// Finds the header and loads `bytes` as a kernel into `m`.
fn load_bytes(m: &GuestMemoryMmap, bytes: &[u8]) -> Result<Image, String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("skiff-mb-{}-{n}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let mut f = File::open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let h = match find_header(bytes) {
        Found::Header(h) => h,
        other => return Err(format!("{other:?}")),
    };
    load(m, &mut f, bytes.len() as u64, &h, RAM)
}

fn read(m: &GuestMemoryMmap, at: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    m.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

#[test]
fn the_header_is_found_where_the_spec_puts_it() {
    let mut b = vec![0u8; 0x3000];
    b[0x404..0x404 + 12].copy_from_slice(&header(3, [0; 5]));
    assert!(matches!(find_header(&b), Found::Header(Header { offset: 0x404, flags: 3, .. })));
    // Not 32-bit aligned: not a header.
    let mut b = vec![0u8; 0x3000];
    b[0x402..0x402 + 12].copy_from_slice(&header(3, [0; 5]));
    assert_eq!(find_header(&b), Found::None);
    // Past the first 8 KiB: not looked for.
    let mut b = vec![0u8; 0x3000];
    b[0x2000..0x200c].copy_from_slice(&header(3, [0; 5]));
    assert_eq!(find_header(&b), Found::None);
    // A wrong checksum is named, and a later good header still wins.
    let mut b = vec![0u8; 0x1000];
    b[0x10..0x1c].copy_from_slice(&header(3, [0; 5]));
    b[0x18] ^= 1;
    assert_eq!(find_header(&b), Found::BadChecksum(0x10));
    b[0x40..0x4c].copy_from_slice(&header(2, [0; 5]));
    assert!(matches!(find_header(&b), Found::Header(Header { offset: 0x40, .. })));
    // Short files.
    assert_eq!(find_header(&[]), Found::None);
    assert_eq!(find_header(&header(3, [0; 5])[..11]), Found::None);
}

#[test]
fn elf32_and_elf64_segments_load_at_their_physical_addresses() {
    for wide in [false, true] {
        let m = mem();
        let body: Vec<u8> = (0..0x800u32).map(|i| i as u8).collect();
        // A higher-half kernel: virtual 0xc0100000, physical 1 MiB; BSS after its data.
        let k = elf(wide, 0xc010_0010, &[(0x1000, 0xc010_0000, MIB, 0x800, 0x3000), (0x1400, 0x40_0000, 0x40_0000, 0x10, 0x10)], &body);
        let img = load_bytes(&m, &k).unwrap_or_else(|e| panic!("wide={wide}: {e}"));
        assert_eq!(img.entry, MIB as u32 + 0x10, "e_entry translated to its physical address");
        assert_eq!(img.segments, vec![(MIB, MIB + 0x3000), (0x40_0000, 0x40_0010)]);
        assert_eq!(img.end, 0x40_0010);
        assert!(img.page_align);
        assert_eq!(read(&m, MIB, 0x800), body);
        assert!(read(&m, MIB + 0x800, 0x2800).iter().all(|&b| b == 0), "BSS zeroed");
        assert_eq!(read(&m, MIB + 0x3000, 1), [0xaa], "nothing past the segment");
        assert_eq!(read(&m, 0x40_0000, 0x10), body[0x400..0x410]);
    }
}

#[test]
fn the_address_fields_load_a_flat_binary() {
    let m = mem();
    // header at file offset 8 = address 0x100008; image is the whole file; BSS to +0x2000.
    let mut k = vec![0x90u8; 8];
    k.extend_from_slice(&header(FLAG_ADDRESSES, [0x10_0008, 0x10_0000, 0, 0x10_2000, 0x10_0000]));
    k.resize(0x100, 0xcc);
    let img = load_bytes(&m, &k).unwrap();
    assert_eq!((img.entry, img.end, img.page_align), (0x10_0000, 0x10_2000, false));
    assert_eq!(read(&m, MIB, 0x100), k);
    assert!(read(&m, MIB + 0x100, 0x1f00).iter().all(|&b| b == 0));
    assert_eq!(read(&m, MIB + 0x2000, 1), [0xaa]);
    // load_end_addr cuts the file; load_addr below header_addr skips the file's start.
    let m = mem();
    let mut k = vec![0u8; 0x20];
    k.extend_from_slice(&header(FLAG_ADDRESSES, [0x20_0010, 0x20_0000, 0x20_0040, 0, 0x20_0000]));
    k.resize(0x100, 0xcc);
    load_bytes(&m, &k).unwrap();
    assert_eq!(read(&m, 0x20_0000, 0x40), k[0x10..0x50]);
    assert_eq!(read(&m, 0x20_0040, 1), [0xaa]);
}

/// `fields` in a flat binary whose header sits at file offset 0.
fn flat(fields: [u32; 5], len: usize) -> Vec<u8> {
    let mut k = header(FLAG_ADDRESSES, fields);
    k.resize(len, 0);
    k
}

#[test]
fn bad_kernels_are_one_line_each() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("video mode", { let mut k = vec![0u8; 0x40]; k[..12].copy_from_slice(&header(4 | 3, [0; 5])); k }, "bit 2 is a video mode"),
        ("not ELF, no address fields", header(3, [0; 5]), "not a little-endian ELF32 or ELF64"),
        ("load above header", flat([0x10_0000, 0x10_0010, 0, 0, 0x10_0010], 0x40), "above header_addr"),
        ("load before file", flat([0x10_0010, 0x10_0000, 0, 0, 0x10_0000], 0x40), "before the start of the file"),
        ("end below load", flat([0x10_0000, 0x10_0000, 0xf_0000, 0, 0x10_0000], 0x40), "below load_addr"),
        ("truncated", flat([0x10_0000, 0x10_0000, 0x10_1000, 0, 0x10_0000], 0x40), "truncated"),
        ("bss below end", flat([0x10_0000, 0x10_0000, 0x10_0040, 0x10_0020, 0x10_0000], 0x40), "below load_end_addr"),
        ("below 1 MiB", flat([0x8_0000, 0x8_0000, 0, 0, 0x8_0000], 0x40), "outside guest RAM"),
        ("past RAM", flat([0x10_0000, 0x10_0000, 0, 0xffff_f000, 0x10_0000], 0x40), "outside guest RAM"),
        ("entry outside", flat([0x10_0000, 0x10_0000, 0, 0, 0x50_0000], 0x40), "entry_addr"),
        ("segment past RAM", elf(false, MIB, &[(0x1000, 0, 60 * MIB, 0, 8 * MIB)], &[]), "PT_LOAD segment 0"),
        ("segment wraps", elf(true, MIB, &[(0x1000, 0, u64::MAX - 4, 0, 16)], &[]), "outside guest RAM"),
        ("filesz above memsz", elf(true, MIB, &[(0x1000, 0, MIB, 0x20, 0x10)], &[0; 0x20]), "above its memory size"),
        ("data past the file", elf(true, MIB, &[(0x1000, 0, MIB, 0x2000, 0x2000)], &[0; 0x10]), "past the end of the file"),
        ("huge offset", elf(true, MIB, &[(u64::MAX, 0, MIB, 2, 2)], &[]), "past the end of the file"),
        ("entry nowhere", elf(false, 0x80_0000, &[(0x1000, MIB, MIB, 0x10, 0x10)], &[0; 0x10]), "entry point"),
        ("ELF64 entry above 4 GiB", elf(true, 1 << 33, &[(0x1000, MIB, MIB, 0x10, 0x10)], &[0; 0x10]), "entry point"),
        ("nothing to load", elf(false, MIB, &[], &[]), "no loadable segment"),
        ("too many headers", elf(false, MIB, &[(0x1000, MIB, MIB, 0, 0); 65], &[]), "more than the 64"),
    ];
    for (what, kernel, needle) in cases {
        let e = load_bytes(&mem(), &kernel).err().unwrap_or_else(|| panic!("{what}: loaded"));
        assert!(e.contains(needle), "{what}: {e:?} lacks {needle:?}");
        assert_eq!(e.lines().count(), 1, "{what}: {e}");
    }
    // A wrong program-header size, and a cut ELF header.
    let mut k = elf(false, MIB, &[(0x1000, MIB, MIB, 0x10, 0x10)], &[0; 0x10]);
    k[0x2a] = 40;
    assert!(load_bytes(&mem(), &k).unwrap_err().contains("program header size 40"));
    let mut k = elf(true, MIB, &[(0x1000, MIB, MIB, 0x10, 0x10)], &[0; 0x10]);
    k[0x12] = 40;
    assert!(load_bytes(&mem(), &k).unwrap_err().contains("not x86"));
}

#[test]
fn the_information_structure_carries_everything() {
    let m = mem();
    let e820 = crate::x86::boot::e820_map(RAM, EBDA_START, HIMEM_START, 0xc000_0000, 1 << 32);
    let modules = [(0x20_0000u64, 0x20_0100u64, "first"), (0x20_1000, 0x20_1000, "second one")];
    let at = write_info(&m, "/k a=b", &modules, &e820).unwrap();
    assert!(at >= INFO_AREA_START);
    let info = read(&m, at, INFO_SIZE);
    let u = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap());
    assert_eq!(u(0), 0x24d);
    assert_eq!((u(4), u(8)), (639, ((RAM - MIB) >> 10) as u32));
    let cstr = |addr: u32| {
        let raw = read(&m, u64::from(addr), 64);
        String::from_utf8(raw[..raw.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap()
    };
    assert_eq!(cstr(u(16)), "/k a=b");
    assert_eq!(cstr(u(64)), "skiff");
    assert_eq!(u(20), 2);
    let mods = read(&m, u64::from(u(24)), 32);
    let mu = |o: usize| u32::from_le_bytes(mods[o..o + 4].try_into().unwrap());
    assert_eq!((mu(0), mu(4), cstr(mu(8))), (0x20_0000, 0x20_0100, "first".into()));
    assert_eq!((mu(16), mu(20), cstr(mu(24))), (0x20_1000, 0x20_1000, "second one".into()));
    assert_eq!(u(44), 24 * e820.len() as u32);
    let mmap = read(&m, u64::from(u(48)), u(44) as usize);
    for (i, e) in e820.iter().enumerate() {
        let r = &mmap[i * 24..i * 24 + 24];
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 20);
        assert_eq!(u64::from_le_bytes(r[4..12].try_into().unwrap()), e.addr);
        assert_eq!(u64::from_le_bytes(r[12..20].try_into().unwrap()), e.size);
        assert_eq!(u32::from_le_bytes(r[20..24].try_into().unwrap()), e.kind);
    }
    // Every piece inside the area.
    for a in [u(16), u(24), u(48), u(64)] {
        assert!((INFO_AREA_START..INFO_AREA_END).contains(&u64::from(a)));
    }
    // A command line larger than the area: one line, nothing written past it.
    let huge = "x".repeat((INFO_AREA_END - INFO_AREA_START) as usize);
    let e = write_info(&m, &huge, &[], &e820).unwrap_err();
    assert!(e.contains("does not fit"), "{e}");
}

#[test]
fn modules_go_after_the_kernel_page_aligned_and_must_fit() {
    let m = mem();
    let dir = std::env::temp_dir();
    let (a, b) = (dir.join(format!("skiff-mb-mod-a-{}", std::process::id())), dir.join(format!("skiff-mb-mod-b-{}", std::process::id())));
    std::fs::write(&a, vec![1u8; 5000]).unwrap();
    std::fs::write(&b, b"two").unwrap();
    let img = Image { entry: MIB as u32, segments: vec![(MIB, MIB + 0x1234)], end: MIB + 0x1234, page_align: true };
    let src = [ModuleSource { path: &a, string: "a" }, ModuleSource { path: &b, string: "b" }];
    let placed = load_modules(&m, &img, &src, RAM).unwrap();
    assert_eq!(placed, vec![(MIB + 0x2000, MIB + 0x2000 + 5000), (MIB + 0x4000, MIB + 0x4003)]);
    assert_eq!(read(&m, MIB + 0x4000, 3), b"two");
    // The same modules with the kernel ending just below the top of RAM.
    let img = Image { end: RAM - 0x1000, ..img };
    let e = load_modules(&m, &img, &src, RAM).unwrap_err();
    assert_eq!(e.path, a);
    assert!(e.reason.contains("5000 bytes do not fit"), "{}", e.reason);
    let missing = dir.join("skiff-no-such-module");
    let e = load_modules(&m, &Image { end: MIB, ..img }, &[ModuleSource { path: &missing, string: "" }], RAM).unwrap_err();
    assert!(e.reason.contains("No such file"), "{}", e.reason);
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
}
