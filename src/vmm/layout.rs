//! The guest-physical and port-I/O address map of a skiff machine, in one place.
//!
//! Low memory (below 1 MiB) follows the PC conventions Linux expects; the kernel goes
//! where its ELF headers ask (16 MiB for Debian's vmlinux); the initrd goes as high as
//! the boot protocol allows. A hole below 4 GiB is kept for MMIO (APIC, IOAPIC, devices).

/// Boot GDT (64-bit boot protocol).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty, limit 0): the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, and PDs.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line (up to [`CMDLINE_MAX_SIZE`] bytes).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Top of the usable low RAM; 0x9fc00..1 MiB is EBDA/VGA/BIOS, reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Start of high memory (1 MiB): the kernel and everything above it.
pub const HIMEM_START: u64 = 0x100000;

/// The 32-bit MMIO hole: RAM beyond it is mapped above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The PCI host bridge's 32-bit memory window, where skiff places BARs (vmm/devices.rs):
/// above the virtio-mmio slots (0xd000_0000) and the address the hostile test kernels
/// leave unclaimed (0xdf00_0000), below the I/O APIC.
pub const PCI_MMIO_START: u64 = 0xe000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map (real-mode emulation).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy port-I/O devices.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60; // data
pub const I8042_COMMAND_PORT: u16 = 0x64; // command (write) and status (read)
pub const I8042_IRQ: u32 = 1;
pub const RTC_PORT: u16 = 0x70; // index; 0x71 is data
pub const POST_PORT: u16 = 0x80;
/// PCI "reset control register": bit 2 with bit 1 resets the machine.
pub const RESET_CF9_PORT: u16 = 0xcf9;

/// ACPI fixed-hardware register block (named in the FADT).
pub const PM1A_EVT_PORT: u16 = 0x600; // 4 bytes: PM1 status (2) + enable (2)
pub const PM1A_EVT_LEN: u8 = 4;
pub const PM1A_CNT_PORT: u16 = 0x604; // 2 bytes: PM1 control (SLP_TYP, SLP_EN)
pub const PM1A_CNT_LEN: u8 = 2;
pub const PM_TMR_PORT: u16 = 0x608; // 4 bytes: 24-bit ACPI PM timer at 3.579545 MHz
pub const PM_TMR_LEN: u8 = 4;
/// SLP_TYP value the DSDT's \_S5_ object names for soft-off.
pub const SLP_TYP_S5: u8 = 5;
/// ACPI reset register (FADT RESET_REG): writing [`ACPI_RESET_VALUE`] resets.
pub const ACPI_RESET_PORT: u16 = RESET_CF9_PORT;
pub const ACPI_RESET_VALUE: u8 = 0x06;
/// SCI interrupt line (ISA IRQ 9, level, active high as on PCs).
pub const SCI_IRQ: u32 = 9;

/// skiff's boot-marker port: the guest's /init writes one byte here so skiff can time
/// the boot to user space (written through /dev/port, which needs no driver).
pub const BOOT_MARKER_PORT: u16 = 0x440;
