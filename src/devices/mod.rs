//! Devices and the bus they sit on.
//!
//! Legacy PC devices are port-I/O: the 16550 serial port, the i8042 (for its reset
//! line), the CMOS RTC, the ACPI power-management block with its PM timer, the 0xcf9
//! reset register, port 0x80 and skiff's boot-marker port.

pub mod bus;
pub mod coalesced;
pub mod doorbell;
pub mod exit;
pub mod fw_cfg;
pub mod i8042;
pub mod legacy;
pub mod pci;
pub mod pm;
pub mod rtc;
pub mod serial;
pub mod state;
pub mod virtio;

pub use bus::{Bus, BusDevice, Buses};
