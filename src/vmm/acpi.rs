//! ACPI tables for a skiff guest: RSDP, XSDT, FADT, FACS, MADT and DSDT.
//!
//! The machine is a (non-hardware-reduced) legacy PC as far as ACPI is concerned: a
//! fixed-hardware PM1a event/control block and PM timer in port I/O, an SCI on ISA
//! IRQ 9, a reset register, one local APIC per vCPU plus one I/O APIC, and a DSDT that
//! names the soft-off sleep state (`\_S5_`) and the devices the device manager
//! declares (vmm/devices.rs: COM1, the RTC, virtio-mmio devices).
//!
//! Everything is written into guest memory in `[ACPI_START, ACPI_END)`, the RSDP first,
//! at [`ACPI_START`] (16-byte aligned, inside the BIOS area that Linux scans for the
//! `"RSD PTR "` signature). Field layouts and flag bits follow the ACPI specification
//! (6.x); the `acpi_tables` crate provides the table encoders and the AML builders.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{
    ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_START,
    IOAPIC_ADDR, LAPIC_ADDR, PM_TMR_LEN, PM_TMR_PORT, PM1A_CNT_LEN, PM1A_CNT_PORT, PM1A_EVT_LEN,
    PM1A_EVT_PORT, SCI_IRQ, SLP_TYP_S5,
};

/// Most vCPUs the MADT can describe. Local APIC IDs are the vCPU indices
/// `0..num_cpus` and the I/O APIC takes ID `num_cpus`; all must be valid xAPIC IDs,
/// i.e. below 0xFF (the broadcast ID), so `num_cpus <= 254`.
pub const MAX_CPUS: u8 = 254;

/// Errors from building or writing the ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// A machine needs at least one vCPU (and one local APIC entry).
    #[error("cannot build ACPI tables for a machine with no vCPUs")]
    NoCpus,
    /// More vCPUs than xAPIC IDs (one of which the I/O APIC takes).
    #[error("{0} vCPUs requested, but the MADT can describe at most {MAX_CPUS}")]
    TooManyCpus(u8),
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables need {needed:#x} bytes but only {available:#x} are reserved for them")]
    TablesTooLarge { needed: u64, available: u64 },
    /// A table that must be reachable through a 32-bit pointer was placed above 4 GiB.
    #[error("ACPI table at {0:#x} is not addressable by a 32-bit table pointer")]
    AddressAbove4Gib(u64),
    /// Writing a table into guest memory failed (e.g. the ACPI area is not guest RAM).
    #[error("failed to write the {table} table to guest memory at {addr:#x}")]
    GuestMemory {
        table: &'static str,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("ACPI device name {0:?} is not four characters of A-Z, 0-9 and _")]
    BadDeviceName(String),
    #[error("IRQ {0} is not an ISA IRQ (0-15)")]
    BadIrq(u32),
}

/// Guest-physical address of the RSDP, the root the guest finds the other tables from.
pub fn rsdp_addr() -> GuestAddress {
    GuestAddress(ACPI_START)
}

/// Writes the ACPI tables for a machine with `num_cpus` vCPUs into `mem` and returns
/// the address of the RSDP (which is always [`rsdp_addr()`]).
///
/// Fails, without writing anything, if `num_cpus` is 0 or above [`MAX_CPUS`] or the
/// tables would not fit in `[ACPI_START, ACPI_END)`. Fails with
/// [`AcpiError::GuestMemory`] if that range is not backed by guest memory, in which
/// case the tables before the failing one may already have been written.
///
/// The `acpi_tables` builders used here assert on malformed input (AML name segments
/// that are not 4 characters, malformed EISA IDs, table lengths below the header size);
/// every such input is a constant in this module and covered by the unit tests.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap<()>,
    num_cpus: u8,
    devices: &[AcpiDevice],
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(num_cpus, devices, ACPI_START, ACPI_END)?;
    for table in &tables.tables {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|source| AcpiError::GuestMemory {
                table: table.name,
                addr: table.addr,
                source,
            })?;
    }
    Ok(GuestAddress(tables.rsdp))
}

// ---------------------------------------------------------------------------------
// Identification and compile-time checks of the layout constants used below.

const OEM_ID: [u8; 6] = *b"SKIFF ";
const OEM_TABLE_ID: [u8; 8] = *b"SKIFFVM ";
const OEM_REVISION: u32 = 1;

/// The RSDP must sit on a 16-byte boundary to be found by the BIOS-area scan.
const _: () = assert!(ACPI_START.is_multiple_of(16));
/// The FADT's legacy FIRMWARE_CTRL/DSDT fields and the MADT's local APIC address are
/// 32-bit; the ACPI area (and the APICs) must lie below 4 GiB.
const _: () = assert!(ACPI_START < ACPI_END && ACPI_END <= 1 << 32);

/// Local APIC address, checked at compile time to fit the MADT's 32-bit field.
const LAPIC_ADDR_32: u32 = {
    assert!(LAPIC_ADDR <= u32::MAX as u64);
    LAPIC_ADDR as u32
};
/// I/O APIC address, checked at compile time to fit the MADT's 32-bit field.
const IOAPIC_ADDR_32: u32 = {
    assert!(IOAPIC_ADDR <= u32::MAX as u64);
    IOAPIC_ADDR as u32
};
/// SCI interrupt as the FADT's 16-bit SCI_INT and as an ISA IRQ (MADT override source).
const SCI_INT: u16 = {
    assert!(SCI_IRQ < 16);
    SCI_IRQ as u16
};
const SCI_ISA_IRQ: u8 = SCI_INT as u8;


// ---------------------------------------------------------------------------------
// Table building.

/// Alignment of the tables (other than the RSDP and FACS); generous, not required.
const TABLE_ALIGN: u64 = 16;
/// The FACS must be 64-byte aligned (ACPI spec, FACS).
const FACS_ALIGN: u64 = 64;

/// MADT revision (ACPI 6.3 and later use 5; the structures used here are unchanged).
const MADT_REVISION: u8 = 5;
/// MADT flag: the system also has a PC-AT-compatible dual 8259 setup.
const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// MADT structure types and lengths (ACPI spec, MADT interrupt controller structures).
const MADT_TYPE_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LEN_INT_SRC_OVERRIDE: u8 = 10;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
const MADT_LEN_LAPIC_NMI: u8 = 6;
/// MPS INTI flags: polarity in bits 1:0 (01 = active high), trigger mode in bits 3:2
/// (11 = level). Zero means "conforms to the bus" (ISA: edge, active high).
const MPS_INTI_CONFORMS: u16 = 0;
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_LEVEL: u16 = 0b11 << 2;
/// Processor UID meaning "all processors" in a Local APIC NMI structure.
const ALL_PROCESSORS_UID: u8 = 0xff;

/// DSDT revision 2 selects 64-bit AML integers.
const DSDT_REVISION: u8 = 2;

/// FADT IAPC_BOOT_ARCH bit: legacy (ISA) devices present. (Bit 1, an 8042 the OS
/// may drive, stays clear.)
const IAPC_BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// FADT P_LVL2_LAT above 100 and P_LVL3_LAT above 1000 mean "C2/C3 not supported".
const P_LVL2_LAT_UNSUPPORTED: u16 = 101;
const P_LVL3_LAT_UNSUPPORTED: u16 = 1001;

/// One table ready to be written: a name for errors, its address and its bytes.
#[derive(Debug)]
struct Table {
    name: &'static str,
    addr: u64,
    bytes: Vec<u8>,
}

/// All tables with their placement, and the RSDP address.
#[derive(Debug)]
struct AcpiTables {
    rsdp: u64,
    tables: Vec<Table>,
}

/// Bump allocator for table placement in `[start, end)`.
struct Placer {
    start: u64,
    next: u64,
    end: u64,
}

impl Placer {
    fn new(start: u64, end: u64) -> Self {
        Placer {
            start,
            next: start,
            end,
        }
    }

    /// Reserves `len` bytes aligned to `align` (a power of two) and returns their address.
    fn place(&mut self, len: usize, align: u64) -> Result<u64, AcpiError> {
        let too_large = |needed: Option<u64>| AcpiError::TablesTooLarge {
            needed: needed.unwrap_or(u64::MAX),
            available: self.end.saturating_sub(self.start),
        };
        let addr = self
            .next
            .checked_next_multiple_of(align)
            .ok_or_else(|| too_large(None))?;
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| addr.checked_add(len))
            .ok_or_else(|| too_large(None))?;
        if end > self.end {
            return Err(too_large(Some(end - self.start)));
        }
        self.next = end;
        Ok(addr)
    }
}

fn addr32(addr: u64) -> Result<u32, AcpiError> {
    u32::try_from(addr).map_err(|_| AcpiError::AddressAbove4Gib(addr))
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Builds and places all tables in `[start, end)`, RSDP at `start`.
fn build_tables(num_cpus: u8, devices: &[AcpiDevice], start: u64, end: u64) -> Result<AcpiTables, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }

    // Tables whose contents do not depend on where the others are.
    let dsdt = build_dsdt(devices)?;
    let madt = build_madt(num_cpus);
    let facs = aml_bytes(&FACS::new());

    // Place everything (sizes of the pointer tables are fixed), then fill pointers in.
    let mut placer = Placer::new(start, end);
    let rsdp_addr = placer.place(Rsdp::len(), 16)?;
    // XSDT: header plus two 64-bit entries (FADT, MADT).
    let xsdt_len = 36 + 2 * core::mem::size_of::<u64>();
    let xsdt_addr = placer.place(xsdt_len, TABLE_ALIGN)?;
    let fadt_addr = placer.place(acpi_tables::fadt::FADT::len(), TABLE_ALIGN)?;
    let facs_addr = placer.place(facs.len(), FACS_ALIGN)?;
    let dsdt_addr = placer.place(dsdt.len(), TABLE_ALIGN)?;
    let madt_addr = placer.place(madt.len(), TABLE_ALIGN)?;

    let fadt = build_fadt(addr32(dsdt_addr)?, addr32(facs_addr)?);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), xsdt_len);

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let table = |name, addr, bytes| Table { name, addr, bytes };
    Ok(AcpiTables {
        rsdp: rsdp_addr,
        tables: vec![
            table("RSDP", rsdp_addr, rsdp),
            table("XSDT", xsdt_addr, xsdt),
            table("FADT", fadt_addr, fadt),
            table("FACS", facs_addr, facs),
            table("DSDT", dsdt_addr, dsdt),
            table("MADT", madt_addr, madt),
        ],
    })
}

/// Register widths in bits for the X_ GAS fields (8 x the legacy byte lengths;
/// overflow would fail the build).
const PM1A_EVT_BITS: u8 = PM1A_EVT_LEN * 8;
const PM1A_CNT_BITS: u8 = PM1A_CNT_LEN * 8;
const PM_TMR_BITS: u8 = PM_TMR_LEN * 8;
const RESET_REG_BITS: u8 = 8;

/// A port-I/O Generic Address Structure for a register block of `bits` bits.
fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

/// FADT for a non-hardware-reduced PC with the PM1a blocks and PM timer from layout.rs.
fn build_fadt(dsdt_addr: u32, facs_addr: u32) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // WBINVD works; C1 (HLT) is supported on all processors.
        .flag(FadtFlags::Wbinvd)
        .flag(FadtFlags::ProcC1)
        // No fixed-feature power or sleep button.
        .flag(FadtFlags::PwrButton)
        .flag(FadtFlags::SlpButton)
        // RESET_REG is valid. TMR_VAL_EXT stays clear: the PM timer is 24 bits.
        .flag(FadtFlags::ResetRegSup);

    // The FACS is below 4 GiB: name it in FIRMWARE_CTRL only, X_FIRMWARE_CTRL stays 0
    // (the spec has OSPM ignore FIRMWARE_CTRL when X_FIRMWARE_CTRL is usable; leaving
    // one of them zero avoids any ambiguity).
    fadt.firmware_ctrl = facs_addr.into();
    // The DSDT is given both ways, with the same address.
    fadt.dsdt = dsdt_addr.into();
    fadt.x_dsdt = u64::from(dsdt_addr).into();

    fadt.sci_int = SCI_INT.into();
    // No SMI command port: the machine is always in ACPI mode.
    fadt.smi_cmd = 0.into();
    fadt.acpi_enable = 0;
    fadt.acpi_disable = 0;

    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    fadt.pm_tmr_blk = u32::from(PM_TMR_PORT).into();
    fadt.pm1_evt_len = PM1A_EVT_LEN;
    fadt.pm1_cnt_len = PM1A_CNT_LEN;
    fadt.pm_tmr_len = PM_TMR_LEN;
    // PM1 status/enable and PM1 control are 16-bit registers; the timer is 32-bit.
    fadt.x_pm1a_evt_blk = io_gas(PM1A_EVT_PORT, PM1A_EVT_BITS, AccessSize::WordAccess);
    fadt.x_pm1a_cnt_blk = io_gas(PM1A_CNT_PORT, PM1A_CNT_BITS, AccessSize::WordAccess);
    fadt.x_pm_tmr_blk = io_gas(PM_TMR_PORT, PM_TMR_BITS, AccessSize::DwordAccess);

    fadt.p_lvl2_lat = P_LVL2_LAT_UNSUPPORTED.into();
    fadt.p_lvl3_lat = P_LVL3_LAT_UNSUPPORTED.into();

    // No 8042 to the OS: skiff's i8042 is only the reset line (port 0x64, command
    // 0xfe), which Linux's reboot=k drives without a driver. Advertising one makes the
    // driver wait out its controller timeouts.
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_LEGACY_DEVICES.into();

    fadt.reset_reg = io_gas(ACPI_RESET_PORT, RESET_REG_BITS, AccessSize::ByteAccess);
    fadt.reset_value = ACPI_RESET_VALUE;

    aml_bytes(&fadt.finalize())
}

/// MADT Interrupt Source Override for an ISA (bus 0) IRQ.
fn madt_int_src_override(isa_irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut s = [0u8; MADT_LEN_INT_SRC_OVERRIDE as usize];
    s[0] = MADT_TYPE_INT_SRC_OVERRIDE;
    s[1] = MADT_LEN_INT_SRC_OVERRIDE;
    s[2] = 0; // bus: ISA
    s[3] = isa_irq;
    s[4..8].copy_from_slice(&gsi.to_le_bytes());
    s[8..10].copy_from_slice(&flags.to_le_bytes());
    s
}

/// MADT Local APIC NMI structure.
fn madt_lapic_nmi(processor_uid: u8, flags: u16, lint: u8) -> [u8; 6] {
    let mut s = [0u8; MADT_LEN_LAPIC_NMI as usize];
    s[0] = MADT_TYPE_LAPIC_NMI;
    s[1] = MADT_LEN_LAPIC_NMI;
    s[2] = processor_uid;
    s[3..5].copy_from_slice(&flags.to_le_bytes());
    s[5] = lint;
    s
}

/// MADT: one enabled local APIC per vCPU (UID = APIC ID = index), the I/O APIC
/// (ID `num_cpus`, GSI base 0), the PC interrupt overrides and LINT1 as NMI.
fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    for cpu in 0..num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(num_cpus, IOAPIC_ADDR_32, 0).to_aml_bytes(&mut body);
    // No IRQ 0 -> GSI 2 override: KVM's default routing (and its in-kernel PIT)
    // wires ISA IRQ n to I/O APIC input n, so identity is what the guest must assume.
    // The SCI is level-triggered, active high.
    body.extend_from_slice(&madt_int_src_override(
        SCI_ISA_IRQ,
        SCI_IRQ,
        MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL,
    ));
    body.extend_from_slice(&madt_lapic_nmi(ALL_PROCESSORS_UID, MPS_INTI_CONFORMS, 1));

    // Header (36) + local interrupt controller address (4) + flags (4).
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, LAPIC_ADDR_32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

/// Small "IRQNoFlags" resource descriptor: one ISA IRQ, edge-triggered, active high.
struct IrqNoFlags {
    mask: u16,
}

impl IrqNoFlags {
    /// `mask` has one bit per ISA IRQ.
    const fn new(mask: u16) -> Self {
        IrqNoFlags { mask }
    }
}

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource: type 0x04 (IRQ) in bits 6:3, length 2 in bits 2:0.
        sink.byte((0x04 << 3) | 2);
        sink.word(self.mask);
    }
}

/// A fixed 16-bit-decoded I/O port range.
fn io_range(port: u16, len: u8) -> aml::IO {
    aml::IO::new(port, port, 1, len)
}

/// How a device names itself to the OS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcpiHid {
    /// A compressed EISA id such as "PNP0501".
    Eisa(&'static str),
    /// A string id such as "LNRO0005" (virtio-mmio).
    Str(&'static str),
}

/// A device's register window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiWindow {
    Io { port: u16, len: u8 },
    /// Two one-byte ports, in this order (the i8042's data and command ports).
    IoPair { data: u16, command: u16 },
    Mmio { base: u32, len: u32 },
    /// A PCI host bridge (bus 0, segment 0): configuration ports 0xcf8-0xcff, every
    /// other port passed through, and this 32-bit memory window for BARs.
    PciRoot { mmio_base: u32, mmio_len: u32 },
}

/// A device's interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiIrq {
    /// A legacy ISA IRQ (short descriptor: edge, active high).
    Isa(u32),
    /// A GSI of the I/O APIC, edge-triggered, active high (extended descriptor).
    EdgeGsi(u32),
}

/// One device's entry in the DSDT, as the device manager (vmm/devices.rs) declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiDevice {
    /// The four-character ACPI name.
    pub name: String,
    pub hid: AcpiHid,
    pub uid: Option<u8>,
    pub window: AcpiWindow,
    pub irq: Option<AcpiIrq>,
}

impl AcpiDevice {
    /// `Device (name) { _HID hid, [_UID uid,] _CRS { window, irq } }`.
    fn aml(&self) -> Result<Vec<u8>, AcpiError> {
        if let AcpiWindow::PciRoot { mmio_base, mmio_len } = self.window {
            return self.pci_root_aml(mmio_base, mmio_len);
        }
        if self.name.len() != 4 || !self.name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
            return Err(AcpiError::BadDeviceName(self.name.clone()));
        }
        let eisa;
        let string;
        let hid_value: &dyn Aml = match self.hid {
            AcpiHid::Eisa(id) => {
                eisa = aml::EISAName::new(id);
                &eisa
            }
            AcpiHid::Str(id) => {
                string = id;
                &string
            }
        };
        let hid = aml::Name::new("_HID".into(), hid_value);
        let uid = self.uid.map(|uid| aml::Name::new("_UID".into(), &uid));
        let io;
        let second_io;
        let mmio;
        let mut resources: Vec<&dyn Aml> = Vec::new();
        match self.window {
            AcpiWindow::Io { port, len } => {
                io = io_range(port, len);
                resources.push(&io);
            }
            AcpiWindow::IoPair { data, command } => {
                io = io_range(data, 1);
                second_io = io_range(command, 1);
                resources.push(&io);
                resources.push(&second_io);
            }
            AcpiWindow::Mmio { base, len } | AcpiWindow::PciRoot { mmio_base: base, mmio_len: len } => {
                mmio = aml::Memory32Fixed::new(true, base, len);
                resources.push(&mmio);
            }
        }
        let isa;
        let ext;
        match self.irq {
            Some(AcpiIrq::Isa(irq)) if irq < 16 => {
                isa = IrqNoFlags::new(1 << irq);
                resources.push(&isa);
            }
            Some(AcpiIrq::Isa(irq)) => return Err(AcpiError::BadIrq(irq)),
            Some(AcpiIrq::EdgeGsi(gsi)) => {
                ext = aml::Interrupt::new(true, true, false, false, gsi);
                resources.push(&ext);
            }
            None => {}
        }
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources));
        let mut children: Vec<&dyn Aml> = vec![&hid];
        if let Some(uid) = &uid {
            children.push(uid);
        }
        children.push(&crs);
        Ok(aml_bytes(&aml::Device::new(self.name.as_str().into(), children)))
    }
}

impl AcpiDevice {
    /// `Device (PCI0) { _HID PNP0A08, _CID PNP0A03, _UID, _SEG 0, _BBN 0, _CRS }`: the
    /// _CRS holds bus 0, the configuration ports, the legacy port ranges on either side
    /// of them, and the BAR window. No _PRT: the functions have no INTx pin.
    fn pci_root_aml(&self, mmio_base: u32, mmio_len: u32) -> Result<Vec<u8>, AcpiError> {
        if self.name.len() != 4 || !self.name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
            return Err(AcpiError::BadDeviceName(self.name.clone()));
        }
        let hid_id = match self.hid {
            AcpiHid::Eisa(id) => id,
            AcpiHid::Str(_) => "PNP0A08",
        };
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(hid_id));
        let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
        let uid = aml::Name::new("_UID".into(), &self.uid.unwrap_or(0));
        let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
        let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
        let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
        let cf8 = io_range(0xcf8, 8);
        let low_io = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
        let high_io = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
        let last = mmio_base.saturating_add(mmio_len.saturating_sub(1));
        let mem = aml::AddressSpace::new_memory(aml::AddressSpaceCacheable::NotCacheable, true, mmio_base, last, None);
        let crs_items: Vec<&dyn Aml> = vec![&bus, &cf8, &low_io, &high_io, &mem];
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(crs_items));
        let children: Vec<&dyn Aml> = vec![&hid, &cid, &uid, &seg, &bbn, &crs];
        Ok(aml_bytes(&aml::Device::new(self.name.as_str().into(), children)))
    }
}

/// The DSDT's AML: `\_S5_` and the machine's devices under `\_SB_`.
fn dsdt_aml(devices: &[AcpiDevice]) -> Result<Vec<u8>, AcpiError> {
    // \_S5_: { SLP_TYPa, SLP_TYPb, reserved, reserved }.
    let s5_package = aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &0u8, &0u8]);
    let mut bytes = aml_bytes(&aml::Name::new("\\_S5_".into(), &s5_package));
    let mut body = Vec::new();
    for d in devices {
        body.extend(d.aml()?);
    }
    bytes.extend(aml::Scope::raw("\\_SB_".into(), body));
    Ok(bytes)
}

fn build_dsdt(devices: &[AcpiDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_aml(devices)?);
    Ok(dsdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests;
