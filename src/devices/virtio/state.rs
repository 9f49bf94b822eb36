//! The snapshot of one virtio-mmio device: transport registers, queues and the device's
//! own part, as one declared, versioned, serializable struct. Everything in it is
//! untrusted on restore (a snapshot file is as hostile as the guest that made it).

use serde::{Deserialize, Serialize};

/// Bumped whenever a field changes meaning or is added.
pub const STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// What the driver wrote to QueueNum (the device's maximum until then).
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Where the device is in the rings.
    pub next_avail: u16,
    pub next_used: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-rng holds no state of its own.
    Rng,
    /// virtio-blk: what the guest was told about the disk, checked against the disk
    /// on restore (a different disk under a running guest would corrupt it).
    Block { capacity_sectors: u64, read_only: bool, id: Vec<u8> },
    /// virtio-net: its MAC (checked on restore) and the TAP's name (opened again by
    /// name; the negotiated features are the transport's). Appended in device state
    /// version 3: new kinds go at the end, the encoding numbers them in order.
    Net { mac: Vec<u8>, tap: String },
    /// virtio-vsock: the guest's CID (checked on restore). Connections are not saved:
    /// they are reset, and the guest is told so (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
    Vsock { cid: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    pub version: u32,
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: DeviceState,
}

/// The transport-independent part of a device (virtio/core.rs): what both transports
/// save, checked the same way on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioCoreState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: DeviceState,
}

impl VirtioMmioState {
    /// The core's part of an MMIO snapshot.
    pub fn core(&self) -> VirtioCoreState {
        VirtioCoreState {
            device_type: self.device_type,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            queues: self.queues.clone(),
            device: self.device.clone(),
        }
    }

    /// An MMIO snapshot from the core's part and the transport's interrupt status.
    pub fn from_core(c: VirtioCoreState, interrupt_status: u32) -> Self {
        VirtioMmioState {
            version: STATE_VERSION,
            device_type: c.device_type,
            device_features_sel: c.device_features_sel,
            driver_features_sel: c.driver_features_sel,
            driver_features: c.driver_features,
            queue_sel: c.queue_sel,
            status: c.status,
            interrupt_status,
            config_generation: c.config_generation,
            queues: c.queues,
            device: c.device,
        }
    }
}

/// One MSI-X table entry as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

/// The MSI-X capability's state: the table, the pending bits, the two control bits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub enabled: bool,
    pub function_masked: bool,
    pub table: Vec<MsixEntryState>,
    pub pending: Vec<bool>,
}

/// A virtio-pci function: its PCI configuration space, MSI-X, the virtio-pci common
/// configuration's own registers and the core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub version: u32,
    /// The 256-byte configuration space (BAR addresses, command register, capability
    /// registers the driver writes); read-only bytes are checked against the device's own.
    pub config: Vec<u8>,
    pub msix: MsixState,
    pub isr: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub core: VirtioCoreState,
}
