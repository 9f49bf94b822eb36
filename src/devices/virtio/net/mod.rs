//! virtio-net (device ID 1) on a host TAP device, one receive and one transmit queue.
//!
//! Transmit: each chain the guest posts on queue 1 is a virtio-net header and a frame,
//! written to the TAP as it lies in guest memory (one `writev`, no copy), and returned
//! at once. Receive: the chains the guest posts on queue 0 are held, in order, until a
//! frame comes; the TAP is read straight into them (one `readv`), spread over several
//! chains when the guest negotiated mergeable receive buffers. The TAP is watched
//! edge-triggered in the device's own epoll set ([`super::poller`]): when the guest
//! has no buffers, the frame waits in the TAP's queue and nothing wakes until the guest
//! posts more; at most [`RX_BUDGET`] frames are taken per wake-up, the rest on the next
//! turn of the event loop, so a flood cannot hold it.
//!
//! What the guest negotiates for its own receive side (checksum, TSO, UFO) is what the
//! TAP may send: TUNSETOFFLOAD at DRIVER_OK, cleared at reset. What it sends (CSUM,
//! HOST_TSO/UFO) the host kernel checks in the header and finishes.
//!
//! Snapshots: the MAC and the TAP's name are configuration; the negotiated features
//! are the transport's. Receive chains held at a snapshot are given back to the ring
//! (the saved `next_avail` is moved back over them: [`super::VirtioDevice::held`]), so
//! the restored device takes them again. The TAP is opened again by name on restore;
//! frames in flight on the host side are lost, as on a real link.

pub mod tap;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::{Chain, HostSlice, host_slices, write_stream};
use super::poller::Poller;
use super::{Completion, DeviceState, Handled, Outcome, VirtioDevice, VirtioError};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// Frames taken from the TAP per wake-up of the event loop.
pub const RX_BUDGET: usize = 64;
/// The largest frame a TAP hands over: a 64 KiB GSO frame and its Ethernet header.
pub const MAX_FRAME: usize = 65_550;
/// Receive space a frame needs before the TAP is read: a frame cannot be split after
/// it was read, so mergeable buffers are gathered for the largest one first.
const RX_NEED: u64 = (VNET_HDR_LEN + MAX_FRAME) as u64;
const CONFIG_LEN: usize = 10;

const TOKEN_TAP: u64 = 0;
const TOKEN_KICK: u64 = 1;

fn bit(b: u32) -> u64 {
    1 << b
}

/// The features offered: checksum and segmentation offload both ways, mergeable
/// receive buffers, the MAC and link status in configuration space.
pub const FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_UFO)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_STATUS);

/// Counters of the device's own, beyond the transport's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Guest frames the TAP refused (a bad header, the interface down).
    pub tx_dropped: u64,
    /// Frames read while the guest's buffers could not take them whole.
    pub rx_truncated: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    poller: Poller,
    /// Written when reading must go on without a new TAP edge: receive buffers came
    /// while a frame waited, or a pass stopped at its budget.
    kick: EventFd,
    /// Receive chains taken from queue 0, oldest first, not yet used.
    rx: VecDeque<Chain>,
    /// The TAP may hold frames (its last edge was not read down to EAGAIN).
    tap_pending: bool,
    features: u64,
    mem: Option<GuestMemoryMmap>,
    pub counters: NetCounters,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> std::io::Result<Net> {
        let poller = Poller::new(4)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        poller.add(tap.fd(), EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP)?;
        poller.add(kick.as_raw_fd(), EventSet::IN, TOKEN_KICK)?;
        Ok(Net {
            tap,
            mac,
            poller,
            kick,
            rx: VecDeque::new(),
            tap_pending: true,
            features: 0,
            mem: None,
            counters: NetCounters::default(),
        })
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mergeable(&self) -> bool {
        self.features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// The TAP offloads that follow from what the guest takes on receive.
    fn offload_flags(features: u64) -> u32 {
        if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
            return 0; // segmentation offload needs checksum offload (the TAP refuses it alone)
        }
        let mut f = tap::TUN_F_CSUM;
        for (feature, flag) in
            [(VIRTIO_NET_F_GUEST_TSO4, tap::TUN_F_TSO4), (VIRTIO_NET_F_GUEST_TSO6, tap::TUN_F_TSO6), (VIRTIO_NET_F_GUEST_UFO, tap::TUN_F_UFO)]
        {
            if features & bit(feature) != 0 {
                f |= flag;
            }
        }
        f
    }

    /// Reads frames into held chains, at most [`RX_BUDGET`]; returns the chains used.
    fn receive(&mut self) -> Vec<Completion> {
        let mut done = Vec::new();
        let Some(mem) = self.mem.clone() else { return done };
        for _ in 0..RX_BUDGET {
            if !self.tap_pending {
                return done;
            }
            match self.receive_one(&mem, &mut done) {
                Some(true) => {}
                Some(false) => {
                    self.tap_pending = false; // drained: the next frame brings an edge
                    return done;
                }
                None => return done, // no room: handle_chain kicks when buffers come
            }
        }
        // Budget spent with frames maybe left: go on at the next turn of the loop.
        let _ = self.kick.write(1);
        done
    }

    /// One frame: Some(true) taken, Some(false) none waiting, None no room for one.
    fn receive_one(&mut self, mem: &GuestMemoryMmap, done: &mut Vec<Completion>) -> Option<bool> {
        // The chains to read into and their capacities: one chain, or with mergeable
        // buffers as many as the largest frame needs.
        let mut iov: Vec<HostSlice> = Vec::new();
        let mut caps: Vec<u64> = Vec::new();
        let mut room = 0u64;
        for c in &self.rx {
            let cap = c.writable_len();
            iov.extend(host_slices(mem, c.writable(), 0, cap)?);
            caps.push(cap);
            room += cap;
            if !self.mergeable() || room >= RX_NEED {
                break;
            }
        }
        if caps.is_empty() || (self.mergeable() && room < RX_NEED) {
            return None;
        }
        let n = match self.tap.read_frame(&iov) {
            Ok(Some(n)) => n as u64,
            Ok(None) => return Some(false),
            Err(_) => return Some(false), // the TAP went away under us: wait for an edge
        };
        if n >= room {
            self.counters.rx_truncated += 1;
        }
        // Spread the frame over the chains it filled, in order.
        let mut left = n;
        let mut used = 0u16;
        let mut first = None;
        for cap in caps {
            if left == 0 && used > 0 {
                break;
            }
            let Some(chain) = self.rx.pop_front() else { break };
            let len = left.min(cap);
            left -= len;
            used += 1;
            done.push(Completion { queue: RX_QUEUE, head: chain.head, outcome: Outcome { used_len: len as u32, bytes: len, refused: false } });
            if first.is_none() {
                first = Some(chain);
            }
        }
        // num_buffers (the TAP leaves those two header bytes alone).
        if let Some(c) = first {
            write_stream(mem, c.writable(), 10, &used.to_le_bytes());
        }
        self.counters.rx_frames += 1;
        Some(true)
    }

    fn transmit(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> Outcome {
        let len = chain.readable_len();
        if chain.writable().next().is_some() || len < VNET_HDR_LEN as u64 || len > RX_NEED {
            return Outcome::refused(0);
        }
        let Some(iov) = host_slices(mem, chain.readable(), 0, len) else {
            return Outcome::refused(0);
        };
        match self.tap.write_frame(&iov) {
            Ok(_) => {
                self.counters.tx_frames += 1;
                Outcome { used_len: 0, bytes: len - VNET_HDR_LEN as u64, refused: false }
            }
            // A header the host kernel refuses, a full or down interface: the frame is
            // lost, as on a wire.
            Err(_) => {
                self.counters.tx_dropped += 1;
                Outcome { used_len: 0, bytes: 0, refused: false }
            }
        }
    }
}

/// `--net ...,mac=` text: six hex pairs split by ':' (or '-'), unicast, not all zero.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return None;
    }
    Some(mac)
}

/// A stable, locally administered MAC for a TAP that was given none (FNV-1a of its name).
pub fn default_mac(tap: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in tap.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let [a, b, c, d] = h.to_be_bytes();
    [0x02, 0x5f, a, b, c, d]
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        data.fill(0);
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        for (d, s) in data.iter_mut().zip(c.get(from..).unwrap_or(&[])) {
            *d = *s;
        }
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
        // A refusal leaves the TAP sending plain frames, which every guest takes.
        let _ = self.tap.set_offload(Self::offload_flags(features));
        if self.tap_pending {
            let _ = self.kick.write(1);
        }
    }

    fn reset(&mut self) {
        self.rx.clear();
        self.features = 0;
        let _ = self.tap.set_offload(0);
        // Frames may be waiting; they are read once the next driver posts buffers.
        self.tap_pending = true;
        let _ = self.kick.read();
    }

    fn ready_for_more(&self, index: u16) -> bool {
        // A guest posting the same buffers again and again cannot grow the hold.
        index != RX_QUEUE || self.rx.len() < usize::from(QUEUE_SIZE)
    }

    fn handle_chain(&mut self, index: u16, chain: Chain, mem: &GuestMemoryMmap) -> Handled {
        match index {
            RX_QUEUE => {
                if chain.readable().next().is_some() || chain.writable_len() < VNET_HDR_LEN as u64 {
                    return Handled::Done(Outcome::refused(0));
                }
                if self.mem.is_none() {
                    self.mem = Some(mem.clone());
                }
                self.rx.push_back(chain);
                if self.tap_pending {
                    let _ = self.kick.write(1);
                }
                Handled::Queued
            }
            TX_QUEUE => Handled::Done(self.transmit(&chain, mem)),
            _ => Handled::Done(Outcome::refused(0)),
        }
    }

    fn held(&self, index: u16) -> u16 {
        if index == RX_QUEUE { self.rx.len() as u16 } else { 0 }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.poller.fd()]
    }

    fn backend_ready(&mut self, _i: usize) -> Vec<Completion> {
        for (token, _) in self.poller.ready() {
            match token {
                TOKEN_TAP => self.tap_pending = true,
                _ => {
                    let _ = self.kick.read();
                }
            }
        }
        self.receive()
    }

    fn state(&self) -> DeviceState {
        DeviceState::Net { mac: self.mac.to_vec(), tap: self.tap.name().to_string() }
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError> {
        match state {
            DeviceState::Net { mac, .. } if mac[..] == self.mac[..] => Ok(()),
            DeviceState::Net { mac, .. } => Err(VirtioError::Device(format!("the snapshot's network device had MAC {mac:02x?}, this one {:02x?}", self.mac))),
            other => Err(VirtioError::Device(format!("a network device cannot take {other:?}"))),
        }
    }
}
