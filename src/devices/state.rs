//! Every device's state as one declared, versioned, serializable value. Each device
//! on a bus must say what its state is and take it back ([`super::BusDevice::state`]
//! and `restore` have no default), so a snapshot cannot forget a device, and what
//! is saved is exactly what is restored. A restored state is as untrusted as the
//! guest that produced it: every field is checked on the way in.

use serde::{Deserialize, Serialize};

/// Bumped whenever a state below changes shape or meaning; older versions are read by
/// explicit upgrade code (snapshot/format.rs `upgradable`).
pub const DEVICE_STATE_VERSION: u32 = 3;

/// Version 1 had no keyboard behind the i8042 (its state was the unit `I8042`) and no
/// hypercall ports. Version 2 only added [`DeviceState::Keyboard`] and
/// [`DeviceState::Hypercall`] at the end of the enum, so a version 1 payload decodes
/// as it is: the i8042 takes `I8042` as power-on state, and absent hypercall ports
/// start unused.
pub const DEVICE_STATE_VERSION_NO_KEYBOARD: u32 = 1;

/// Version 2 had no network or vsock device. Version 3 only appended
/// `virtio::DeviceState::Net` and `Vsock` at the end of that enum, so a version 2
/// payload decodes as it is.
pub const DEVICE_STATE_VERSION_NO_NET: u32 = 2;

/// Whether a device state payload of `version` is read by this skiff (the current one,
/// or an older one that decodes unchanged, see above).
pub fn device_state_readable(version: u32) -> bool {
    matches!(version, DEVICE_STATE_VERSION | DEVICE_STATE_VERSION_NO_NET | DEVICE_STATE_VERSION_NO_KEYBOARD)
}

/// The 16550 UART's registers and receive FIFO (vm-superio's model of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The ACPI PM1 event and control registers (the PM timer follows the host clock).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmRegs {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

/// One device's state, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Serial(SerialRegs),
    /// Version 1's i8042 (reset line only): restored as a controller at power-on.
    I8042,
    /// CMOS RAM (128 bytes) and the selected index; the clock follows the host.
    Cmos { index: u8, ram: Vec<u8> },
    PostPort { last: u8 },
    ResetControl { value: u8 },
    Pm(PmRegs),
    /// The boot marker is skiff's own timing aid: nothing the guest can see.
    BootMarker,
    Virtio(super::virtio::VirtioMmioState),
    /// PCI configuration mechanism #1: the address register, and the 0xcf9 reset
    /// control register that shares its ports.
    PciRoot { address: u32, reset_control: u8 },
    /// The host bridge has nothing the guest can change.
    PciHostBridge,
    /// The BAR window: the BARs are their functions' state.
    PciWindow,
    VirtioPci(Box<super::virtio::VirtioPciState>),
    /// The exit-status device has no state of its own.
    ExitDevice,
    /// fw_cfg: the selected item and the next byte's offset (the items are config).
    FwCfg { selector: u16, offset: u32 },
    /// The i8042 controller and its keyboard (version 2 on). New kinds go at the end
    /// (with a new version): the encoding numbers them in order.
    Keyboard(super::i8042::I8042Regs),
    /// skiff's hypercall ports (version 2 on): the registered ring (0: none), its consumed count,
    /// and where the guest mapped the hypercall page (0: not said).
    Hypercall { ring_gpa: u64, ring_tail: u32, page_va: u64 },
    /// Stand-ins in tests.
    #[cfg(test)]
    None,
}

impl DeviceState {
    /// The kind's name, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Serial(_) => "serial",
            DeviceState::I8042 | DeviceState::Keyboard(_) => "i8042",
            DeviceState::Cmos { .. } => "cmos",
            DeviceState::PostPort { .. } => "post-port",
            DeviceState::ResetControl { .. } => "reset-control",
            DeviceState::Pm(_) => "pm",
            DeviceState::BootMarker => "boot-marker",
            DeviceState::Virtio(_) => "virtio",
            DeviceState::PciRoot { .. } => "pci-root",
            DeviceState::PciHostBridge => "pci-host-bridge",
            DeviceState::PciWindow => "pci-window",
            DeviceState::VirtioPci(_) => "virtio-pci",
            DeviceState::ExitDevice => "exit-device",
            DeviceState::FwCfg { .. } => "fw-cfg",
            DeviceState::Hypercall { .. } => "hypercall",
            #[cfg(test)]
            DeviceState::None => "none",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("a {found} state cannot be restored into a {expected} device")]
    WrongKind { found: &'static str, expected: &'static str },
    #[error("{device} state: {reason}")]
    Invalid { device: &'static str, reason: String },
}

impl RestoreError {
    /// `state` is not the kind `expected` takes.
    pub fn wrong_kind(state: &DeviceState, expected: &'static str) -> Self {
        RestoreError::WrongKind { found: state.kind(), expected }
    }
}
