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
