//! A PCI bus (bus 0 only) reached through configuration mechanism #1, its host bridge,
//! and the MMIO window the functions' BARs live in.
//!
//! - [`PciRoot`] sits on ports 0xcf8-0xcff: the address register at 0xcf8 (dword; it
//!   reads back what was written) and the data window at 0xcfc-0xcff (1, 2 or 4 bytes
//!   at any offset inside the dword). A byte at 0xcf9 is the PC's reset control
//!   register, which shares those ports; the root passes it on.
//! - Device 0 is the host bridge; devices 1.. are [`PciFunction`]s (function 0 only).
//!   Absent devices, other functions and other buses read all ones.
//! - [`PciWindow`] covers the MMIO window on the MMIO bus and hands each access to the
//!   function whose memory BAR holds it (and whose memory decode is on).

pub mod config;
pub mod msix;
pub mod routing;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::devices::BusDevice;
use crate::devices::state::{DeviceState, RestoreError};
use config::{ConfigSpace, Header};

/// Ports of configuration mechanism #1.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_PORTS_LEN: u64 = 8;
/// The reset control register's offset inside the ports (0xcf9).
const RESET_OFFSET: u64 = 1;
/// Devices on bus 0.
pub const MAX_DEVICES: usize = 32;
const ENABLE: u32 = 1 << 31;

/// A function on the bus: its configuration space through [`BusDevice::read`] and
/// `write` (offset into the 256 bytes, 1, 2 or 4 bytes inside one dword), its memory
/// BARs through the window.
pub trait PciFunction: BusDevice {
    /// An MMIO read at guest-physical `addr`; false if no BAR of this function holds it.
    fn bar_read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// An MMIO write; false if no BAR of this function holds it.
    fn bar_write(&self, addr: u64, data: &[u8]) -> bool;
}

/// The host bridge at 00:00.0: identification only.
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        // Vendor 0x8086 device 0x0d57 is what Cloud Hypervisor's bridge calls itself:
        // no Linux quirk matches it.
        let h = Header { vendor: 0x8086, device: 0x0d57, revision: 0, class: 0x06_00_00, subsystem_vendor: 0, subsystem_id: 0 };
        let mut config = ConfigSpace::new(h);
        config.set_mask(config::COMMAND, &[0, 0]);
        config.set_mask(config::CACHE_LINE, &[0, 0]);
        config.set_mask(config::INTERRUPT_LINE, &[0]);
        HostBridge { config }
    }
}

impl BusDevice for HostBridge {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset as usize, data);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {}
    fn state(&self) -> DeviceState {
        DeviceState::PciHostBridge
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::PciHostBridge => Ok(()),
            other => Err(RestoreError::wrong_kind(other, "pci-host-bridge")),
        }
    }
}

impl PciFunction for HostBridge {
    fn bar_read(&self, _addr: u64, _data: &mut [u8]) -> bool {
        false
    }
    fn bar_write(&self, _addr: u64, _data: &[u8]) -> bool {
        false
    }
}

/// Configuration mechanism #1 on ports 0xcf8-0xcff.
pub struct PciRoot {
    address: AtomicU32,
    /// The 0xcf9 reset control register.
    reset_control: Arc<dyn BusDevice>,
    /// Indexed by device number: 0 the host bridge, then the functions.
    devices: Vec<Arc<dyn PciFunction>>,
}

impl PciRoot {
    /// `devices[0]` should be the host bridge; at most [`MAX_DEVICES`] are reachable.
    pub fn new(reset_control: Arc<dyn BusDevice>, devices: Vec<Arc<dyn PciFunction>>) -> Self {
        PciRoot { address: AtomicU32::new(0), reset_control, devices }
    }

    /// The function the address register selects, and the dword's offset.
    fn selected(&self) -> Option<(&Arc<dyn PciFunction>, u64)> {
        let a = self.address.load(Ordering::Relaxed);
        let (bus, device, function, reg) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7, a & 0xfc);
        // Bits 30:24 are reserved (AMD's extended-register bits 27:24 reach offsets
        // past 0xff, which these functions do not have): they select nothing.
        if a & ENABLE == 0 || a & 0x7f00_0000 != 0 || bus != 0 || function != 0 {
            return None;
        }
        Some((self.devices.get(device as usize)?, u64::from(reg)))
    }

    fn address_bytes(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.address.load(Ordering::Relaxed).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => self.address_bytes(0, data),
            (RESET_OFFSET, 1) => self.reset_control.read(0, data),
            (0..4, _) => self.address_bytes(offset, data),
            (4..8, len) if (offset - 4) as usize + len <= 4 => match self.selected() {
                Some((f, reg)) => f.read(reg + offset - 4, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    self.address.store(u32::from_le_bytes(b), Ordering::Relaxed);
                }
            }
            (RESET_OFFSET, 1) => self.reset_control.write(0, data),
            (4..8, len) if (offset - 4) as usize + len <= 4 => {
                if let Some((f, reg)) = self.selected() {
                    f.write(reg + offset - 4, data);
                }
            }
            _ => {}
        }
    }

    fn state(&self) -> DeviceState {
        let reset = match self.reset_control.state() {
            DeviceState::ResetControl { value } => value,
            _ => 0,
        };
        DeviceState::PciRoot { address: self.address.load(Ordering::Relaxed), reset_control: reset }
    }

    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::PciRoot { address, reset_control } => {
                self.reset_control.restore(&DeviceState::ResetControl { value: *reset_control })?;
                self.address.store(*address, Ordering::Relaxed);
                Ok(())
            }
            other => Err(RestoreError::wrong_kind(other, "pci-root")),
        }
    }

    fn reset(&self) {
        self.address.store(0, Ordering::Relaxed);
        self.reset_control.reset();
    }
}

/// The MMIO window for BARs: each access goes to the function whose BAR holds it.
pub struct PciWindow {
    devices: Vec<Arc<dyn PciFunction>>,
    base: u64,
}

impl PciWindow {
    /// A window at `base` (the bus passes offsets into it).
    pub fn new(base: u64, devices: Vec<Arc<dyn PciFunction>>) -> Self {
        PciWindow { devices, base }
    }
}

impl BusDevice for PciWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let addr = self.base.saturating_add(offset);
        if !self.devices.iter().any(|d| d.bar_read(addr, data)) {
            data.fill(0xff);
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let addr = self.base.saturating_add(offset);
        let _ = self.devices.iter().any(|d| d.bar_write(addr, data));
    }
    /// The BARs are their functions' state; the window has none of its own.
    fn state(&self) -> DeviceState {
        DeviceState::PciWindow
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::PciWindow => Ok(()),
            other => Err(RestoreError::wrong_kind(other, "pci-window")),
        }
    }
}

#[cfg(test)]
mod tests;
