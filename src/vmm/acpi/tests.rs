//! The ACPI tables read back as a guest and ACPICA's iasl read them.

use super::*;
use crate::vmm::layout::COM1_PORT;

const MEM_SIZE: usize = 0x10_0000; // 1 MiB: covers the whole ACPI area.

fn guest_mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

/// Reads a whole system description table (header length tells its size).
fn read_table(mem: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
    let header = read(mem, addr, 36);
    read(mem, addr, u32_at(&header, 4) as usize)
}

/// The tables of a machine, read back from guest memory via the RSDP.
struct Guest {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
    facs: Vec<u8>,
    fadt_addr: u64,
    madt_addr: u64,
}

fn tables_for(num_cpus: u8) -> Guest {
    let mem = guest_mem();
    let rsdp_at = create_acpi_tables(&mem, num_cpus, &crate::vmm::devices::legacy_acpi_devices()).unwrap();
    assert_eq!(rsdp_at, rsdp_addr());
    let rsdp = read(&mem, rsdp_at.0, 36);
    let xsdt = read_table(&mem, u64_at(&rsdp, 24));
    let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
    assert_eq!(entries.len(), 2);
    let fadt = read_table(&mem, entries[0]);
    let madt = read_table(&mem, entries[1]);
    let dsdt = read_table(&mem, u64_at(&fadt, 140));
    let facs = read(&mem, u32_at(&fadt, 36) as u64, 64);
    Guest {
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
        facs,
        fadt_addr: entries[0],
        madt_addr: entries[1],
    }
}

/// MADT interrupt controller structures as (type, bytes).
fn madt_structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        assert!(len >= 2, "zero-length MADT structure at {off}");
        out.push((madt[off], madt[off..off + len].to_vec()));
        off += len;
    }
    assert_eq!(off, madt.len(), "MADT structures overrun the table");
    out
}

#[test]
fn all_checksums_are_zero() {
    for cpus in [1, 2, 64, MAX_CPUS] {
        let g = tables_for(cpus);
        assert_eq!(sum(&g.rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&g.rsdp), 0, "RSDP extended checksum");
        for (name, t) in [
            ("XSDT", &g.xsdt),
            ("FACP", &g.fadt),
            ("APIC", &g.madt),
            ("DSDT", &g.dsdt),
        ] {
            assert_eq!(&t[..4], name.as_bytes());
            assert_eq!(sum(t), 0, "{name} checksum ({cpus} cpus)");
        }
    }
}

#[test]
fn rsdp_fields() {
    let g = tables_for(1);
    assert_eq!(&g.rsdp[..8], b"RSD PTR ");
    assert_eq!(g.rsdp[15], 2, "revision");
    assert_eq!(u32_at(&g.rsdp, 20), 36, "length");
    assert_eq!(&g.rsdp[9..15], &OEM_ID);
    let xsdt_addr = u64_at(&g.rsdp, 24);
    assert!((ACPI_START..ACPI_END).contains(&xsdt_addr));
}

/// The guest finds the RSDP the way Linux does without EFI or a boot-parameter
/// pointer (drivers/acpi/acpica/tbxfroot.c): on a 16-byte boundary in the BIOS
/// area 0xE0000..0xFFFFF, with the signature and a valid ACPI 1.0 checksum; the
/// first such match is the one it uses, and it must be the one skiff returned.
#[test]
fn the_bios_area_scan_finds_the_rsdp() {
    let mem = guest_mem();
    let rsdp = create_acpi_tables(&mem, 2, &crate::vmm::devices::legacy_acpi_devices()).unwrap();
    let area = read(&mem, 0xe_0000, 0x2_0000);
    let found = (0..area.len())
        .step_by(16)
        .find(|&off| area[off..].starts_with(b"RSD PTR ") && sum(&area[off..off + 20]) == 0)
        .map(|off| 0xe_0000 + off as u64);
    assert_eq!(found, Some(rsdp.0), "the scan's first valid RSDP");
    assert_eq!(rsdp, rsdp_addr());
}

#[test]
fn xsdt_lists_fadt_and_madt() {
    let g = tables_for(2);
    assert_eq!(&g.xsdt[..4], b"XSDT");
    assert_eq!(u32_at(&g.xsdt, 4), 36 + 16);
    assert_eq!(&g.fadt[..4], b"FACP");
    assert_eq!(&g.madt[..4], b"APIC");
    for addr in [g.fadt_addr, g.madt_addr] {
        assert!((ACPI_START..ACPI_END).contains(&addr));
    }
}

#[test]
fn all_tables_lie_in_the_acpi_area_without_overlap() {
    let t = build_tables(MAX_CPUS, &crate::vmm::devices::legacy_acpi_devices(), ACPI_START, ACPI_END).unwrap();
    assert_eq!(t.rsdp, ACPI_START);
    let mut spans: Vec<(u64, u64)> = t
        .tables
        .iter()
        .map(|t| (t.addr, t.addr + t.bytes.len() as u64))
        .collect();
    spans.sort();
    for (start, end) in &spans {
        assert!(*start >= ACPI_START && *end <= ACPI_END);
    }
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "tables overlap: {spans:x?}");
    }
}

#[test]
fn fadt_fields() {
    let g = tables_for(1);
    let f = &g.fadt;
    assert_eq!(f.len(), 276, "ACPI 6.x FADT length");
    assert_eq!(f[8], 6, "FADT major revision");
    // FIRMWARE_CTRL -> 64-byte aligned FACS; X_FIRMWARE_CTRL unused.
    let facs_addr = u32_at(f, 36) as u64;
    assert_eq!(facs_addr % 64, 0);
    assert_eq!(u64_at(f, 132), 0);
    assert_eq!(&g.facs[..4], b"FACS");
    assert_eq!(u32_at(&g.facs, 4), 64);
    // DSDT and X_DSDT agree.
    let dsdt = u32_at(f, 40) as u64;
    assert_ne!(dsdt, 0);
    assert_eq!(u64_at(f, 140), dsdt);
    assert_eq!(&g.dsdt[..4], b"DSDT");
    // SCI_INT, SMI_CMD, ACPI_ENABLE/DISABLE.
    assert_eq!(u16_at(f, 46) as u32, SCI_IRQ);
    assert_eq!(u32_at(f, 48), 0);
    assert_eq!((f[52], f[53]), (0, 0));
    // Legacy port fields and lengths.
    assert_eq!(u32_at(f, 56), PM1A_EVT_PORT as u32);
    assert_eq!(u32_at(f, 60), 0, "no PM1b event block");
    assert_eq!(u32_at(f, 64), PM1A_CNT_PORT as u32);
    assert_eq!(u32_at(f, 68), 0, "no PM1b control block");
    assert_eq!(u32_at(f, 76), PM_TMR_PORT as u32);
    assert_eq!(u32_at(f, 80), 0, "no GPE0 block");
    assert_eq!(
        (f[88], f[89], f[91]),
        (PM1A_EVT_LEN, PM1A_CNT_LEN, PM_TMR_LEN)
    );
    // IAPC_BOOT_ARCH: legacy devices, no 8042 for the OS to drive.
    assert_eq!(u16_at(f, 109), 0b01);
    // Flags.
    let flags = u32_at(f, 112);
    let expected = (1 << 0) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 10);
    assert_eq!(flags, expected);
    assert_eq!(
        flags & (1 << 8),
        0,
        "TMR_VAL_EXT must be clear (24-bit timer)"
    );
    assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
    // RESET_REG: SystemIO, 8 bits, offset 0, byte access, ACPI_RESET_PORT.
    assert_eq!(&f[116..120], &[1, 8, 0, 1]);
    assert_eq!(u64_at(f, 120), ACPI_RESET_PORT as u64);
    assert_eq!(f[128], ACPI_RESET_VALUE);
    // X_ GAS blocks (SystemIO, bit width = 8 * legacy length).
    let gas = |off: usize| (f[off], f[off + 1], f[off + 2], u64_at(f, off + 4));
    assert_eq!(gas(148), (1, PM1A_EVT_LEN * 8, 0, PM1A_EVT_PORT as u64));
    assert_eq!(gas(172), (1, PM1A_CNT_LEN * 8, 0, PM1A_CNT_PORT as u64));
    assert_eq!(gas(208), (1, PM_TMR_LEN * 8, 0, PM_TMR_PORT as u64));
    assert_eq!(gas(160).3, 0, "no X_PM1b event block");
    assert_eq!(gas(184).3, 0, "no X_PM1b control block");
}

#[test]
fn madt_has_one_lapic_per_cpu_and_the_ioapic() {
    for cpus in [1u8, 2, 64, MAX_CPUS] {
        let g = tables_for(cpus);
        let m = &g.madt;
        assert_eq!(m[8], MADT_REVISION);
        assert_eq!(u32_at(m, 36) as u64, LAPIC_ADDR);
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
        let s = madt_structures(m);

        let lapics: Vec<_> = s.iter().filter(|(t, _)| *t == 0).collect();
        assert_eq!(lapics.len(), cpus as usize);
        for (i, (_, l)) in lapics.iter().enumerate() {
            assert_eq!(l.len(), 8);
            assert_eq!(l[2] as usize, i, "processor UID");
            assert_eq!(l[3] as usize, i, "APIC ID");
            assert_eq!(u32_at(l, 4), 1, "enabled");
        }

        let ioapics: Vec<_> = s.iter().filter(|(t, _)| *t == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let io = &ioapics[0].1;
        assert_eq!(io.len(), 12);
        assert_eq!(io[2], cpus, "I/O APIC ID distinct from the CPUs'");
        assert_eq!(u32_at(io, 4) as u64, IOAPIC_ADDR);
        assert_eq!(u32_at(io, 8), 0, "GSI base");
    }
}

#[test]
fn madt_overrides_and_nmi() {
    let g = tables_for(2);
    let s = madt_structures(&g.madt);
    let isos: Vec<_> = s.iter().filter(|(t, _)| *t == 2).map(|(_, b)| b).collect();
    // Only the SCI: ISA IRQ 9 -> GSI 9, active high (01), level (11 << 2).
    assert_eq!(isos.len(), 1);
    assert_eq!(isos[0][2..4], [0, SCI_IRQ as u8]);
    assert_eq!(u32_at(isos[0], 4), SCI_IRQ);
    assert_eq!(u16_at(isos[0], 8), 0b1101);
    let nmis: Vec<_> = s.iter().filter(|(t, _)| *t == 4).map(|(_, b)| b).collect();
    assert_eq!(nmis.len(), 1);
    assert_eq!(nmis[0].as_slice(), &[4, 6, 0xff, 0, 0, 1]);
}

#[test]
fn dsdt_contains_s5_and_devices() {
    let g = tables_for(1);
    let d = &g.dsdt;
    assert_eq!(d[8], DSDT_REVISION);
    let aml = &d[36..];
    // NameOp '\' "_S5_" PackageOp PkgLength(8) NumElements(4)
    //   BytePrefix SLP_TYP, BytePrefix SLP_TYP, ZeroOp, ZeroOp
    let s5 = [
        0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, SLP_TYP_S5, 0x0a,
        SLP_TYP_S5, 0x00, 0x00,
    ];
    assert!(aml.windows(s5.len()).any(|w| w == s5), "no \\_S5_ package");
    let contains = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"_SB_"));
    for dev in [b"COM1", b"KBD_", b"RTC_"] {
        assert!(contains(dev));
    }
    // EISA IDs, compressed: PNP0501, PNP0303, PNP0B00.
    for id in [0x0105_d041u32, 0x0303_d041, 0x000b_d041] {
        assert!(contains(&id.to_le_bytes()), "missing EISA id {id:#x}");
    }
    // COM1 I/O descriptor and IRQ 4.
    let [lo, hi] = COM1_PORT.to_le_bytes();
    assert!(contains(&[0x47, 1, lo, hi, lo, hi, 1, 8, 0x22, 0x10, 0x00]));
}

#[test]
fn cpu_count_is_validated() {
    let mem = guest_mem();
    assert!(matches!(
        create_acpi_tables(&mem, 0, &crate::vmm::devices::legacy_acpi_devices()),
        Err(AcpiError::NoCpus)
    ));
    assert!(matches!(
        create_acpi_tables(&mem, 255, &crate::vmm::devices::legacy_acpi_devices()),
        Err(AcpiError::TooManyCpus(255))
    ));
    // Nothing was written for a rejected request.
    assert_eq!(read(&mem, ACPI_START, 8), vec![0u8; 8]);
}

#[test]
fn tables_that_do_not_fit_are_an_error() {
    // The full ACPI area always fits 254 CPUs; a smaller window must fail cleanly.
    let fits = build_tables(64, &crate::vmm::devices::legacy_acpi_devices(), ACPI_START, ACPI_END).unwrap();
    let used = fits
        .tables
        .iter()
        .map(|t| t.addr + t.bytes.len() as u64)
        .max()
        .unwrap()
        - ACPI_START;
    let err = build_tables(64, &crate::vmm::devices::legacy_acpi_devices(), ACPI_START, ACPI_START + used - 1).unwrap_err();
    match err {
        AcpiError::TablesTooLarge { needed, available } => {
            assert_eq!(needed, used);
            assert_eq!(available, used - 1);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(matches!(
        build_tables(MAX_CPUS, &crate::vmm::devices::legacy_acpi_devices(), ACPI_START, ACPI_START + 0x100),
        Err(AcpiError::TablesTooLarge { .. })
    ));
    // Placement near the top of the address space does not overflow.
    assert!(matches!(
        build_tables(1, &crate::vmm::devices::legacy_acpi_devices(), u64::MAX - 0x40, u64::MAX),
        Err(AcpiError::TablesTooLarge { .. })
    ));
}

#[test]
fn missing_guest_memory_is_an_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    assert!(matches!(
        create_acpi_tables(&mem, 1, &crate::vmm::devices::legacy_acpi_devices()),
        Err(AcpiError::GuestMemory { table: "RSDP", .. })
    ));
}

/// The FADT describes the devices skiff puts on its port bus (vmm/mod.rs places
/// these two at these ports): an OS that follows the FADT and the DSDT reads a PM
/// timer of the width the FADT claims, finds SCI_EN set (there is no SMI_CMD to
/// switch to ACPI mode), powers off with \_S5_'s SLP_TYPa, and resets through
/// RESET_REG.
#[test]
fn an_os_following_the_tables_drives_skiff_s_devices() {
    use crate::devices::bus::Bus;
    use crate::devices::legacy::ResetControl;
    use crate::devices::pm::{PM_BLOCK_LEN, PmBlock};
    use crate::control::{Control, StopReason};
    use crate::vmm::layout::RESET_CF9_PORT;
    use std::sync::Arc;

    let machine = || {
        let control = Arc::new(Control::new());
        let mut bus = Bus::new();
        bus.insert(Arc::new(PmBlock::new(control.clone())), PM1A_EVT_PORT.into(), PM_BLOCK_LEN).unwrap();
        bus.insert(Arc::new(ResetControl::new(control.clone(), "0xcf9")), RESET_CF9_PORT.into(), 1).unwrap();
        (control, bus)
    };
    let g = tables_for(1);
    let f = &g.fadt;
    let port = |off: usize| u64::from(u32_at(f, off));

    // PM timer: TMR_VAL_EXT clear means 24 bits; the count moves.
    let (_, bus) = machine();
    assert_eq!(f[91], 4, "PM_TMR_LEN");
    let timer_ext = u32_at(f, 112) & (1 << 8) != 0;
    let mut t = [0u8; 4];
    let mut seen = Vec::new();
    for _ in 0..3 {
        assert!(bus.read(port(76), &mut t), "nothing at PM_TMR_BLK");
        seen.push(u32::from_le_bytes(t));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(!timer_ext && seen.iter().all(|v| v >> 24 == 0), "24-bit timer: {seen:x?}");
    assert!(seen.windows(2).any(|w| w[0] != w[1]), "the PM timer does not count: {seen:x?}");

    // ACPI mode from the start: SMI_CMD is zero, so SCI_EN must read as set.
    assert_eq!(u32_at(f, 48), 0);
    let mut cnt = [0u8; 2];
    assert!(bus.read(port(64), &mut cnt), "nothing at PM1a_CNT_BLK");
    assert_eq!(u16::from_le_bytes(cnt) & 1, 1, "SCI_EN");

    // Power off: SLP_TYPa from \_S5_ (the package's first element) with SLP_EN.
    let aml = &g.dsdt[36..];
    let at = aml.windows(5).position(|w| w == b"\\_S5_").expect("\\_S5_ in the DSDT");
    let pkg = &aml[at + 5..];
    assert_eq!((pkg[0], pkg[2], pkg[3]), (0x12, 4, 0x0a), "Package (4) {{ ByteConst, ... }}");
    let slp_typ_a = u16::from(pkg[4]);
    let (control, bus) = machine();
    // S1 with SLP_EN is not a poweroff (no \_S1_ offered); \_S5_'s value is.
    assert!(bus.write(port(64), &((1u16 << 10) | (1 << 13)).to_le_bytes()));
    assert_eq!(control.reason(), None);
    assert!(bus.write(port(64), &((slp_typ_a << 10) | (1 << 13)).to_le_bytes()));
    assert_eq!(control.reason(), Some(StopReason::Poweroff));

    // Reset: RESET_VALUE written to RESET_REG (SystemIO, byte access).
    let (control, bus) = machine();
    assert_eq!((f[116], f[119]), (1, 1), "RESET_REG: SystemIO, byte access");
    assert!(bus.write(u64_at(f, 120), &[f[128]]), "nothing at RESET_REG");
    assert!(matches!(control.reason(), Some(StopReason::Reboot(_))), "{:?}", control.reason());
}

/// ACPICA's `iasl` (Debian package acpica-tools), in a scratch directory of its
/// own: an independent reader of the tables. It is required: without it these
/// tests fail (CI installs it, see .ci/run).
struct Iasl {
    dir: std::path::PathBuf,
}

impl Iasl {
    fn new(test: &str) -> Self {
        if let Err(e) = std::process::Command::new("iasl").arg("-v").output() {
            panic!(
                "iasl cannot be run ({e}): the ACPI tables are checked with ACPICA's iasl; \
                 install it (Debian: apt-get install acpica-tools, as .ci/run does)"
            );
        }
        let dir = std::env::temp_dir().join(format!("skiff-acpi-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Iasl { dir }
    }

    /// Runs iasl with `args`; its status and all it printed.
    fn run(&self, args: &[&std::ffi::OsStr]) -> (bool, String) {
        let out = std::process::Command::new("iasl").args(args).current_dir(&self.dir).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Disassembles one table (`iasl -d`) and returns the source it wrote; fails on
    /// any error, or a checksum or length iasl calls incorrect.
    fn disassemble(&self, name: &str, bytes: &[u8]) -> String {
        let dat = self.dir.join(format!("{name}.dat"));
        std::fs::write(&dat, bytes).unwrap();
        let (ok, text) = self.run(&["-d".as_ref(), dat.as_os_str()]);
        assert!(ok && !text.contains("Error"), "iasl -d {name}:\n{text}");
        let source = std::fs::read_to_string(dat.with_extension("dsl")).unwrap();
        assert!(!source.contains("Incorrect") && !source.contains("Invalid"), "iasl flags {name}:\n{source}");
        source
    }
}

impl Drop for Iasl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of a field in iasl's disassembly of a data table
/// (`[off len]  Field Name : value`), the first one with that name.
fn field<'a>(dsl: &'a str, name: &str) -> &'a str {
    dsl.lines()
        .find_map(|l| {
            let (key, value) = l.split_once(" : ")?;
            let key = key.rsplit(']').next()?.trim();
            (key == name).then(|| value.split_whitespace().next().unwrap_or(""))
        })
        .unwrap_or_else(|| panic!("no field {name:?} in:\n{dsl}"))
}

fn hex(value: &str) -> u64 {
    u64::from_str_radix(value, 16).unwrap_or_else(|_| panic!("not hex: {value:?}"))
}

/// Every table disassembles without errors or checksum complaints, and compiling
/// the disassembly back (without optimizations) gives the same bytes, apart from
/// the checksum and the creator (compiler) fields iasl stamps. For the DSDT this
/// means iasl parsed exactly the AML we wrote.
#[test]
fn iasl_round_trips_tables() {
    let iasl = Iasl::new("round-trip");
    let tables = build_tables(4, &crate::vmm::devices::legacy_acpi_devices(), ACPI_START, ACPI_END).unwrap();
    // iasl does not take a bare RSDP; the_bios_area_scan_finds_the_rsdp checks it.
    for t in tables.tables.iter().filter(|t| t.name != "RSDP") {
        let name = t.name.to_lowercase();
        iasl.disassemble(&name, &t.bytes);
        let dsl = iasl.dir.join(format!("{name}.dsl"));
        let recompiled = iasl.dir.join(format!("re_{name}"));
        let (ok, text) = iasl.run(&["-oa".as_ref(), "-p".as_ref(), recompiled.as_os_str(), dsl.as_os_str()]);
        assert!(ok, "recompiling {name} failed:\n{text}");
        let again = std::fs::read(recompiled.with_extension("aml")).unwrap();
        assert_eq!(again.len(), t.bytes.len(), "{name} length after round trip");
        let stamped = |i: usize| t.name != "FACS" && (i == 9 || (28..36).contains(&i));
        for (i, (a, b)) in t.bytes.iter().zip(&again).enumerate() {
            assert!(stamped(i) || a == b, "{name} differs at byte {i}: {a:#x} vs {b:#x}");
        }
    }
}

/// iasl's reading of the FADT names the machine's ports, IRQ and flags: the
/// field offsets used here agree with ACPICA's.
#[test]
fn iasl_reads_the_fadt_skiff_means() {
    let iasl = Iasl::new("fadt");
    let tables = build_tables(1, &crate::vmm::devices::legacy_acpi_devices(), ACPI_START, ACPI_END).unwrap();
    let placed = |name: &str| tables.tables.iter().find(|t| t.name == name).unwrap();
    let fadt = iasl.disassemble("fadt", &placed("FADT").bytes);
    let expect = [
        ("Signature", "\"FACP\"".to_string()),
        ("Revision", "06".into()),
        ("FADT Minor Revision", "05".into()),
        ("FACS Address", format!("{:08X}", placed("FACS").addr)),
        ("DSDT Address", format!("{:08X}", placed("DSDT").addr)),
        ("SCI Interrupt", format!("{SCI_IRQ:04X}")),
        ("SMI Command Port", "00000000".into()),
        ("PM1A Event Block Address", format!("{PM1A_EVT_PORT:08X}")),
        ("PM1A Control Block Address", format!("{PM1A_CNT_PORT:08X}")),
        ("PM Timer Block Address", format!("{PM_TMR_PORT:08X}")),
        ("PM1 Event Block Length", format!("{PM1A_EVT_LEN:02X}")),
        ("PM1 Control Block Length", format!("{PM1A_CNT_LEN:02X}")),
        ("PM Timer Block Length", format!("{PM_TMR_LEN:02X}")),
        ("Value to cause reset", format!("{ACPI_RESET_VALUE:02X}")),
        ("Legacy Devices Supported (V2)", "1".into()),
        ("8042 Present on ports 60/64 (V2)", "0".into()),
        ("32-bit PM Timer (V1)", "0".into()),
        ("Reset Register Supported (V2)", "1".into()),
        ("Hardware Reduced (V5)", "0".into()),
    ];
    for (name, value) in expect {
        assert_eq!(field(&fadt, name), value, "FADT {name}");
    }
    // The X_ GAS blocks and RESET_REG: the address of each, in the order iasl
    // prints them (RESET_REG, then X_PM1a_EVT, X_PM1b_EVT, X_PM1a_CNT ...).
    let addresses: Vec<u64> = fadt
        .lines()
        .filter_map(|l| l.split_once(" : ").filter(|(k, _)| k.trim_end().ends_with("Address")))
        .filter(|(k, _)| k.contains("  8]"))
        .map(|(_, v)| hex(v.trim()))
        .collect();
    assert_eq!(
        addresses[..6],
        [u64::from(ACPI_RESET_PORT), 0, placed("DSDT").addr, u64::from(PM1A_EVT_PORT), 0, u64::from(PM1A_CNT_PORT)],
        "RESET_REG, X_FIRMWARE_CTRL, X_DSDT, X_PM1a_EVT, X_PM1b_EVT, X_PM1a_CNT:\n{fadt}"
    );
}

/// iasl's reading of the DSDT is the ASL the module means: \_S5_ with the
/// SLP_TYP the PM block powers off on, COM1 and the RTC with their ports and IRQs.
#[test]
fn iasl_reads_the_dsdt_skiff_means() {
    let iasl = Iasl::new("dsdt");
    let asl: String = iasl
        .disassemble("dsdt", &build_dsdt(&crate::vmm::devices::legacy_acpi_devices()).unwrap())
        .lines()
        .map(|l| l.split("//").next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with("/*"))
        .collect::<Vec<_>>()
        .join(" ");
    // Written out, not built from this module's constants: the PC/AT resources of a
    // 16550 at COM1 (0x3F8-0x3FF, IRQ 4), of the keyboard controller (0x60, 0x64,
    // IRQ 1) and of the RTC (0x70-0x71, IRQ 8).
    let s5 = format!("Name (\\_S5, Package (0x04) {{ 0x{SLP_TYP_S5:02X}, 0x{SLP_TYP_S5:02X}, Zero, Zero }})");
    let com1 = "Device (COM1) { Name (_HID, EisaId (\"PNP0501\") /* 16550A-compatible COM Serial Port */) \
                Name (_UID, Zero) Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, \
                0x08, ) IRQNoFlags () {4} }) }";
    let kbd = "Device (KBD) { Name (_HID, EisaId (\"PNP0303\") /* IBM Enhanced Keyboard (101/102-key, PS/2 Mouse) */) \
               Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0060, 0x0060, 0x01, 0x01, ) \
               IO (Decode16, 0x0064, 0x0064, 0x01, 0x01, ) IRQNoFlags () {1} }) }";
    let rtc = "Device (RTC) { Name (_HID, EisaId (\"PNP0B00\") /* AT Real-Time Clock */) \
               Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0070, 0x0070, 0x01, 0x02, ) \
               IRQNoFlags () {8} }) }";
    let expected = format!(
        "DefinitionBlock (\"\", \"DSDT\", 2, \"SKIFF \", \"SKIFFVM \", 0x00000001) {{ {s5} Scope (\\_SB) {{ {com1} {kbd} {rtc} }} }}"
    );
    assert_eq!(asl, expected);
}

/// A virtio-mmio device as the device manager declares one: iasl reads the string
/// _HID Linux's virtio_mmio driver binds to, the register window and the edge GSI.
#[test]
fn iasl_reads_a_virtio_device_skiff_means() {
    let iasl = Iasl::new("dsdt-virtio");
    let vr = AcpiDevice {
        name: "VR01".into(),
        hid: AcpiHid::Str("LNRO0005"),
        uid: Some(1),
        window: AcpiWindow::Mmio { base: 0xd000_1000, len: 0x1000 },
        irq: Some(AcpiIrq::EdgeGsi(17)),
    };
    let asl: String = iasl
        .disassemble("dsdt", &build_dsdt(&[vr]).unwrap())
        .lines()
        .map(|l| l.split("//").next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with("/*"))
        .collect::<Vec<_>>()
        .join(" ");
    let want = "Device (VR01) { Name (_HID, \"LNRO0005\") Name (_UID, One) Name (_CRS, ResourceTemplate () { \
                Memory32Fixed (ReadWrite, 0xD0001000, 0x00001000, ) \
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000011, } }) }";
    assert!(asl.contains(want), "{asl}");
    // Names that are not four characters of A-Z, 0-9 and _ never reach the table.
    for bad in ["VR1", "vr01", "VR0.1"] {
        let d = AcpiDevice { name: bad.into(), hid: AcpiHid::Str("LNRO0005"), uid: None, window: AcpiWindow::Io { port: 0x10, len: 1 }, irq: None };
        assert!(matches!(build_dsdt(&[d]), Err(AcpiError::BadDeviceName(_))), "{bad}");
    }
}

/// fw_cfg's entry as Linux's qemu_fw_cfg driver looks for it: _HID "QEMU0002" and its
/// selector and data ports as the one I/O resource.
#[test]
fn iasl_reads_the_fw_cfg_device_skiff_means() {
    let iasl = Iasl::new("dsdt-fwcfg");
    let fw = AcpiDevice { name: "FWCF".into(), hid: AcpiHid::Str("QEMU0002"), uid: None, window: AcpiWindow::Io { port: 0x510, len: 2 }, irq: None };
    let asl: String = iasl
        .disassemble("dsdt", &build_dsdt(&[fw]).unwrap())
        .lines()
        .map(|l| l.split("//").next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with("/*"))
        .collect::<Vec<_>>()
        .join(" ");
    let want = "Device (FWCF) { Name (_HID, \"QEMU0002\") Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0510, 0x0510, 0x01, 0x02, ) }) }";
    assert!(asl.contains(want), "{asl}");
}

/// iasl's reading of the MADT: one enabled local APIC per vCPU, the I/O APIC at
/// its address, the SCI override and the LINT1 NMI.
#[test]
fn iasl_reads_the_madt_skiff_means() {
    let iasl = Iasl::new("madt");
    let madt = iasl.disassemble("madt", &build_madt(3));
    assert_eq!(hex(field(&madt, "Local Apic Address")), LAPIC_ADDR);
    assert_eq!(field(&madt, "PC-AT Compatibility"), "1");
    // The subtables, each as (its type as iasl names it, its lines).
    let mut subtables: Vec<(&str, String)> = Vec::new();
    for line in madt.lines() {
        if let Some((_, kind)) = line.split_once("Subtable Type : ") {
            let kind = kind.split_once('[').map_or(kind, |(_, k)| k.trim_end_matches(']'));
            subtables.push((kind, String::new()));
        } else if let Some((_, text)) = subtables.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    let of = |kind: &str| subtables.iter().filter(|(k, _)| *k == kind).map(|(_, t)| t.as_str()).collect::<Vec<_>>();
    let lapics = of("Processor Local APIC");
    assert_eq!(lapics.len(), 3);
    for (i, l) in lapics.iter().enumerate() {
        assert_eq!((hex(field(l, "Processor ID")), hex(field(l, "Local Apic ID"))), (i as u64, i as u64));
        assert_eq!(field(l, "Processor Enabled"), "1");
    }
    let ioapic = of("I/O APIC");
    assert_eq!(ioapic.len(), 1);
    assert_eq!(hex(field(ioapic[0], "I/O Apic ID")), 3, "after the local APICs");
    assert_eq!(hex(field(ioapic[0], "Address")), IOAPIC_ADDR);
    let over = of("Interrupt Source Override");
    assert_eq!(over.len(), 1);
    assert_eq!((hex(field(over[0], "Source")), hex(field(over[0], "Interrupt"))), (SCI_IRQ.into(), SCI_IRQ.into()));
    // The SCI is active high (1) and level-triggered (3).
    assert_eq!((field(over[0], "Polarity"), field(over[0], "Trigger Mode")), ("1", "3"));
    let nmi = of("Local APIC NMI");
    assert_eq!(nmi.len(), 1);
    assert_eq!((field(nmi[0], "Processor ID"), field(nmi[0], "Interrupt Input LINT")), ("FF", "01"));
    assert_eq!(subtables.len(), 3 + 1 + 1 + 1, "nothing else");
}

/// The PCI host bridge as the device manager declares it with `--virtio-transport pci`:
/// iasl reads PNP0A08/PNP0A03, segment and bus 0, and a _CRS with bus 0, the
/// configuration ports, the legacy port ranges and the BAR window.
#[test]
fn iasl_reads_the_pci_host_bridge_skiff_means() {
    use crate::vmm::layout::{PCI_MMIO_SIZE, PCI_MMIO_START};
    let iasl = Iasl::new("dsdt-pci");
    let pci = AcpiDevice {
        name: "PCI0".into(),
        hid: AcpiHid::Eisa("PNP0A08"),
        uid: Some(0),
        window: AcpiWindow::PciRoot { mmio_base: PCI_MMIO_START as u32, mmio_len: PCI_MMIO_SIZE as u32 },
        irq: None,
    };
    let asl: String = iasl
        .disassemble("dsdt", &build_dsdt(&[pci]).unwrap())
        .lines()
        .map(|l| l.split("//").next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with("/*"))
        .collect::<Vec<_>>()
        .join(" ");
    for want in [
        "Device (PCI0) { Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "Name (_UID, Zero) Name (_SEG, Zero) Name (_BBN, Zero)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x0000, 0x0000, 0x0001,",
        "IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, )",
        "0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,",
        "0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x00000000, 0xE0000000, 0xEFFFFFFF, 0x00000000, 0x10000000,",
    ] {
        assert!(asl.contains(want), "{want}\n in: {asl}");
    }
    // The window stays clear of RAM's hole neighbours: the virtio-mmio slots, the
    // hostile kernels' unclaimed address, the I/O APIC and local APIC.
    let end = PCI_MMIO_START + PCI_MMIO_SIZE;
    for addr in [0xd000_0000u64, 0xd000_8000, 0xdf00_0000, IOAPIC_ADDR, LAPIC_ADDR] {
        assert!(addr < PCI_MMIO_START || addr >= end, "{addr:#x}");
    }
}
