//! virtio 1.x devices over the MMIO transport (modern only, MMIO version 2).
//!
//! - [`mmio`]: the transport: registers, feature negotiation, status, queues,
//!   notifications and interrupts, for any [`VirtioDevice`].
//! - [`chain`]: descriptor chains, walked and checked before a device sees them.
//! - [`block`]: virtio-blk on a raw image file or block device, I/O on a worker pool.
//! - [`rng`]: virtio-rng, fed from the host's `getrandom`.
//! - [`net`]: virtio-net on a host TAP device.
//! - [`vsock`]: virtio-vsock, host side on Unix sockets (Firecracker's convention).
//! - [`poller`]: a device's own epoll set (for fds that come and go).
//! - [`state`]: the serializable snapshot of a device.
//!
//! Everything the guest writes (registers, rings, descriptors) is checked here; a bad
//! request chain is completed with an error, an unusable ring sets DEVICE_NEEDS_RESET.
//!
//! Wiring a device into a machine: put the [`VirtioMmio`] on the MMIO bus over
//! [`MMIO_SIZE`] bytes; register an ioeventfd per queue on base + [`QUEUE_NOTIFY`]
//! (4 bytes, datamatch = queue index) and call `notify(index)` when it fires; register the
//! `interrupt` eventfd as an irqfd on the device's GSI; watch every fd of `backend_fds()`
//! (readable = call `backend_ready(i)`). Reset the bus's devices before guest RAM is
//! cleared at a reboot: a block device's reset waits for its requests in flight.

pub mod block;
pub mod chain;
pub mod core;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod poller;
pub mod rng;
pub mod state;
pub mod vsock;

#[cfg(test)]
mod tests;

use std::os::fd::RawFd;

use vm_memory::GuestMemoryMmap;

pub use chain::{Chain, ChainError, Desc};
pub use mmio::{MMIO_SIZE, QUEUE_NOTIFY, VirtioMmio};
pub use pci::VirtioPci;
pub use state::{DeviceState, QueueSnapshot, VirtioCoreState, VirtioMmioState, VirtioPciState};

/// Feature bits the transport offers for every device (on top of the device's own).
pub const TRANSPORT_FEATURES: u64 = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);

/// What became of one request chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes the device wrote into the chain's writable buffers (the used ring's `len`).
    pub used_len: u32,
    /// Payload bytes moved (for the statistics).
    pub bytes: u64,
    /// The chain was malformed and refused (completed with an error, or with nothing).
    pub refused: bool,
}

impl Outcome {
    pub fn refused(used_len: u32) -> Self {
        Outcome { used_len, bytes: 0, refused: true }
    }
}

/// How a device took a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Finished: the transport returns it in the used ring now.
    Done(Outcome),
    /// Taken by a backend; it comes back later from [`VirtioDevice::backend_ready`].
    Queued,
}

/// A chain a backend finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub queue: u16,
    pub head: u16,
    pub outcome: Outcome,
}

/// A device type behind the MMIO transport. Called with the transport's lock held, from
/// vCPU threads (register accesses) and the event-loop thread (notifications, backends).
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 block, 4 entropy).
    fn device_type(&self) -> u32;
    /// The largest size of each queue (powers of two); their number is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits; the transport adds [`TRANSPORT_FEATURES`].
    fn features(&self) -> u64;
    /// Reads the device configuration space at `offset` (out-of-range bytes read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; the default ignores writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, _features: u64) {}
    /// The device is reset: forget requests, after any in flight has finished with guest
    /// memory (so nothing is written into memory the guest has since reused).
    fn reset(&mut self) {}
    /// Chains of queue `index` the device took and holds unused (receive buffers
    /// waiting for data), all taken after any it has returned. A snapshot moves the
    /// queue's `next_avail` back over them, so the restored device takes them again
    /// instead of losing them.
    fn held(&self, _index: u16) -> u16 {
        0
    }
    /// Whether the device takes another chain from queue `index` now.
    fn ready_for_more(&self, _index: u16) -> bool {
        true
    }
    /// One well-formed chain (structure checked, every buffer inside guest RAM).
    fn handle_chain(&mut self, index: u16, chain: Chain, mem: &GuestMemoryMmap) -> Handled;
    /// A malformed chain: `partial` holds the descriptors read before the fault. The
    /// device may report an error in it; returns the used length. The default writes nothing.
    fn refuse_chain(&mut self, _index: u16, _partial: &Chain, _mem: &GuestMemoryMmap) -> u32 {
        0
    }
    /// Fds the event loop watches for this device (each an eventfd or similar).
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// The `i`-th backend fd is readable: the chains that finished.
    fn backend_ready(&mut self, _i: usize) -> Vec<Completion> {
        Vec::new()
    }
    /// Waits for every request in flight and returns their completions (before a snapshot).
    fn quiesce(&mut self) -> Vec<Completion> {
        Vec::new()
    }
    /// The device-specific part of a snapshot.
    fn state(&self) -> DeviceState;
    /// Checks that a snapshot's device part fits this device.
    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError>;
}

impl std::fmt::Display for VirtioStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, {} bytes, {} refused, {} interrupts, {} times needing reset",
            self.requests, self.bytes, self.refused, self.interrupts, self.needs_reset
        )
    }
}

/// Counters of one device, for `--stats` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VirtioStats {
    /// Chains completed (including refused ones).
    pub requests: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Malformed chains refused.
    pub refused: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Times the device set DEVICE_NEEDS_RESET (an unusable ring or queue setup).
    pub needs_reset: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioError {
    #[error("virtio device: creating its eventfd: {0}")]
    EventFd(String),
    #[error("virtio snapshot: version {found}, this skiff reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("virtio snapshot: device type {found}, this device is type {expected}")]
    DeviceType { found: u32, expected: u32 },
    #[error("virtio snapshot: {found} queues, this device has {expected}")]
    QueueCount { found: usize, expected: usize },
    #[error("virtio snapshot: queue {index} is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("virtio snapshot: driver features {features:#x} were never offered ({offered:#x})")]
    Features { features: u64, offered: u64 },
    #[error("virtio snapshot: device state does not fit: {0}")]
    Device(String),
}
