//! The virtio-mmio transport, version 2 (virtio 1.x, no legacy): the register window
//! the driver programs, feature negotiation, the device status, the split virtqueues and
//! the interrupt. Generic over the device type ([`VirtioDevice`]).
//!
//! One lock guards the transport and its device. It is taken by vCPU threads (register
//! accesses) and by the event-loop thread (queue notifications, backend completions); a
//! pass over a queue takes at most one queue's worth of chains, then yields through the
//! transport's own "resume" eventfd, so a guest that keeps posting cannot hold it forever.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::state::{QueueSnapshot, STATE_VERSION, VirtioMmioState};
use super::{Completion, Handled, Outcome, TRANSPORT_FEATURES, VirtioDevice, VirtioError, VirtioStats, chain};
use crate::devices::BusDevice;

/// One device's window on the MMIO bus.
pub const MMIO_SIZE: u64 = 0x1000;
/// The QueueNotify register (an ioeventfd with datamatch = queue index).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4649_4b53; // "SKIF"
const CONFIG_SPACE: u64 = 0x100;

const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

/// Register offsets (virtio 1.x, 4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
    pub const SHM_LEN_LOW: u64 = 0xb0;
    pub const SHM_BASE_HIGH: u64 = 0xbc;
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

/// What the driver wrote for one queue, applied when it sets QueueReady.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

struct Inner {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    regs: Vec<QueueRegs>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
    interrupts: AtomicU64,
    needs_reset: AtomicU64,
}

/// The ring is unusable: the device must be reset.
struct Broken;

/// A virtio device behind its MMIO register window.
pub struct VirtioMmio {
    inner: Mutex<Inner>,
    mem: GuestMemoryMmap,
    interrupt: EventFd,
    /// Signalled when a pass over a queue stopped with chains left (see module doc).
    resume: EventFd,
    device_type: u32,
    max_sizes: Vec<u16>,
    offered: u64,
    device_fds: Vec<RawFd>,
    counters: Counters,
}

impl VirtioMmio {
    /// Puts `device` behind a register window; `interrupt` is the irqfd of its GSI.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: EventFd) -> Result<Self, VirtioError> {
        let resume = EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioError::EventFd(e.to_string()))?;
        let max_sizes = device.queue_max_sizes().to_vec();
        let device_type = device.device_type();
        let offered = device.features() | TRANSPORT_FEATURES;
        let device_fds = device.backend_fds();
        let inner = Inner {
            device,
            queues: fresh_queues(&max_sizes)?,
            regs: vec![QueueRegs::default(); max_sizes.len()],
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        };
        Ok(VirtioMmio {
            inner: Mutex::new(inner),
            mem,
            interrupt,
            resume,
            device_type,
            max_sizes,
            offered,
            device_fds,
            counters: Counters::default(),
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn queue_count(&self) -> usize {
        self.max_sizes.len()
    }

    /// Queue `index` was notified (an ioeventfd, or a QueueNotify write that exited).
    pub fn notify(&self, index: u16) {
        let mut inner = self.lock();
        self.run_queue(&mut inner, usize::from(index));
    }

    /// Fds the event loop watches: the device's backends, then the transport's resume fd.
    pub fn backend_fds(&self) -> Vec<RawFd> {
        let mut fds = self.device_fds.clone();
        fds.push(self.resume.as_raw_fd());
        fds
    }

    /// The `i`-th fd of [`Self::backend_fds`] is readable.
    pub fn backend_ready(&self, i: usize) {
        let mut inner = self.lock();
        if i < self.device_fds.len() {
            let done = inner.device.backend_ready(i);
            self.complete(&mut inner, done);
        } else if i == self.device_fds.len() {
            let _ = self.resume.read();
        } else {
            return;
        }
        // Completions may have made room for chains a busy device left in the ring.
        self.run_all(&mut inner);
    }

    pub fn stats(&self) -> VirtioStats {
        let c = &self.counters;
        VirtioStats {
            requests: c.requests.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            interrupts: c.interrupts.load(Ordering::Relaxed),
            needs_reset: c.needs_reset.load(Ordering::Relaxed),
        }
    }

    /// The whole state. Call with the vCPUs paused: requests in flight are waited for and
    /// returned to the guest first, so the snapshot holds none.
    pub fn state(&self) -> VirtioMmioState {
        let mut inner = self.lock();
        let done = inner.device.quiesce();
        self.complete(&mut inner, done);
        let queues = inner
            .queues
            .iter()
            .zip(&inner.regs)
            .map(|(q, r)| QueueSnapshot {
                size: r.size,
                ready: q.ready(),
                desc_table: r.desc,
                avail_ring: r.driver,
                used_ring: r.device,
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect();
        VirtioMmioState {
            version: STATE_VERSION,
            device_type: self.device_type,
            device_features_sel: inner.device_features_sel,
            driver_features_sel: inner.driver_features_sel,
            driver_features: inner.driver_features,
            queue_sel: inner.queue_sel,
            status: inner.status,
            interrupt_status: inner.interrupt_status,
            config_generation: inner.config_generation,
            queues,
            device: inner.device.state(),
        }
    }

    /// Restores a state from [`Self::state`], checked as untrusted input. A snapshot of
    /// another version, device or feature set changes nothing; one whose queues or device
    /// part do not fit leaves the device reset.
    pub fn restore(&self, state: &VirtioMmioState) -> Result<(), VirtioError> {
        if state.version != STATE_VERSION {
            return Err(VirtioError::Version { found: state.version, expected: STATE_VERSION });
        }
        if state.device_type != self.device_type {
            return Err(VirtioError::DeviceType { found: state.device_type, expected: self.device_type });
        }
        if state.queues.len() != self.queue_count() {
            return Err(VirtioError::QueueCount { found: state.queues.len(), expected: self.queue_count() });
        }
        if state.driver_features & !self.offered != 0 {
            return Err(VirtioError::Features { features: state.driver_features, offered: self.offered });
        }
        let mut inner = self.lock();
        self.reset_inner(&mut inner);
        let result = self.restore_into(&mut inner, state);
        if result.is_err() {
            self.reset_inner(&mut inner);
        }
        result
    }

    fn restore_into(&self, inner: &mut Inner, state: &VirtioMmioState) -> Result<(), VirtioError> {
        inner.device.restore(&state.device)?;
        inner.device_features_sel = state.device_features_sel;
        inner.driver_features_sel = state.driver_features_sel;
        inner.driver_features = state.driver_features;
        inner.queue_sel = state.queue_sel;
        inner.config_generation = state.config_generation;
        for (index, s) in state.queues.iter().enumerate() {
            let regs = QueueRegs { size: s.size, desc: s.desc_table, driver: s.avail_ring, device: s.used_ring };
            if let Some(r) = inner.regs.get_mut(index) {
                *r = regs;
            }
            if s.ready {
                let mut q = self
                    .build_queue(inner, index)
                    .map_err(|reason| VirtioError::Queue { index, reason: reason.to_string() })?;
                q.set_next_avail(s.next_avail);
                q.set_next_used(s.next_used);
                if let Some(slot) = inner.queues.get_mut(index) {
                    *slot = q;
                }
            }
        }
        inner.status = state.status & 0xff;
        inner.interrupt_status = state.interrupt_status & (INT_VRING | INT_CONFIG);
        if inner.status & DRIVER_OK != 0 {
            inner.device.activate(inner.driver_features);
        }
        if inner.interrupt_status != 0 {
            // An edge the guest may not have taken before the snapshot: raise it again.
            let _ = self.interrupt.write(1);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_reg(&self, inner: &Inner, offset: u64) -> u32 {
        let queue = inner.queues.get(inner.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match inner.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => inner.interrupt_status,
            reg::STATUS => inner.status,
            // No shared memory regions: their length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => inner.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&self, inner: &mut Inner, offset: u64, v: u32) {
        let sel = inner.queue_sel as usize;
        let negotiating = inner.status & (FEATURES_OK | DRIVER_OK) == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => inner.device_features_sel = v,
            reg::DRIVER_FEATURES if negotiating => match inner.driver_features_sel {
                0 => inner.driver_features = (inner.driver_features & !0xffff_ffff) | u64::from(v),
                1 => inner.driver_features = (inner.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            reg::DRIVER_FEATURES_SEL => inner.driver_features_sel = v,
            reg::QUEUE_SEL => inner.queue_sel = v,
            // An out-of-range size is kept as 0, which QueueReady then refuses.
            reg::QUEUE_NUM => Self::idle_regs(inner, sel, |r| r.size = u16::try_from(v).unwrap_or(0)),
            reg::QUEUE_READY => self.set_queue_ready(inner, sel, v),
            QUEUE_NOTIFY => self.run_queue(inner, v as usize),
            reg::INTERRUPT_ACK => inner.interrupt_status &= !v,
            reg::STATUS => self.set_status(inner, v),
            reg::QUEUE_DESC_LOW => Self::idle_regs(inner, sel, |r| set_low(&mut r.desc, v)),
            reg::QUEUE_DESC_HIGH => Self::idle_regs(inner, sel, |r| set_high(&mut r.desc, v)),
            reg::QUEUE_DRIVER_LOW => Self::idle_regs(inner, sel, |r| set_low(&mut r.driver, v)),
            reg::QUEUE_DRIVER_HIGH => Self::idle_regs(inner, sel, |r| set_high(&mut r.driver, v)),
            reg::QUEUE_DEVICE_LOW => Self::idle_regs(inner, sel, |r| set_low(&mut r.device, v)),
            reg::QUEUE_DEVICE_HIGH => Self::idle_regs(inner, sel, |r| set_high(&mut r.device, v)),
            _ => {}
        }
    }

    /// Changes the selected queue's registers, unless it does not exist or is live.
    fn idle_regs(inner: &mut Inner, sel: usize, f: impl FnOnce(&mut QueueRegs)) {
        let live = inner.queues.get(sel).is_none_or(|q| q.ready());
        if let (false, Some(r)) = (live, inner.regs.get_mut(sel)) {
            f(r);
        }
    }

    fn set_queue_ready(&self, inner: &mut Inner, sel: usize, v: u32) {
        let Some(&max) = self.max_sizes.get(sel) else { return };
        match v {
            0 => {
                if let Some(q) = inner.queues.get_mut(sel) {
                    q.set_ready(false);
                }
            }
            1 if inner.queues.get(sel).is_some_and(|q| !q.ready()) => match self.build_queue(inner, sel) {
                Ok(q) => {
                    if let Some(slot) = inner.queues.get_mut(sel) {
                        *slot = q;
                    }
                }
                Err(_) => {
                    if let Ok(q) = Queue::new(max)
                        && let Some(slot) = inner.queues.get_mut(sel)
                    {
                        *slot = q;
                    }
                    self.set_needs_reset(inner);
                }
            },
            _ => {}
        }
    }

    /// A live queue from the registers the driver wrote, or why they are unusable.
    fn build_queue(&self, inner: &Inner, sel: usize) -> Result<Queue, &'static str> {
        let (Some(&max), Some(r)) = (self.max_sizes.get(sel), inner.regs.get(sel)) else {
            return Err("no such queue");
        };
        let mut q = Queue::new(max).map_err(|_| "bad maximum size")?;
        q.try_set_size(r.size).map_err(|_| "size is 0, not a power of two or too large")?;
        q.try_set_desc_table_address(GuestAddress(r.desc)).map_err(|_| "descriptor table misaligned")?;
        q.try_set_avail_ring_address(GuestAddress(r.driver)).map_err(|_| "available ring misaligned")?;
        q.try_set_used_ring_address(GuestAddress(r.device)).map_err(|_| "used ring misaligned")?;
        q.set_event_idx(inner.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err("a ring is outside guest RAM");
        }
        Ok(q)
    }

    fn set_status(&self, inner: &mut Inner, v: u32) {
        if v == 0 {
            self.reset_inner(inner);
            return;
        }
        let old = inner.status;
        // NEEDS_RESET is the device's to set; the driver may not clear any bit.
        let mut new = (v & 0xff & !NEEDS_RESET) | (old & NEEDS_RESET);
        if old & !new != 0 {
            return;
        }
        let features = inner.driver_features;
        let acceptable = features & !self.offered == 0 && features & (1 << VIRTIO_F_VERSION_1) != 0;
        if new & FEATURES_OK != 0 && old & FEATURES_OK == 0 && !acceptable {
            new &= !FEATURES_OK;
        }
        if new & FEATURES_OK == 0 {
            new &= !DRIVER_OK;
        }
        inner.status = new;
        if new & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            inner.device.activate(features);
            // Chains posted before DRIVER_OK were not looked at.
            self.run_all(inner);
        }
    }

    /// Back to the power-up state; waits for the device's requests in flight.
    fn reset_inner(&self, inner: &mut Inner) {
        inner.device.reset();
        if let Ok(q) = fresh_queues(&self.max_sizes) {
            inner.queues = q;
        }
        inner.regs = vec![QueueRegs::default(); self.max_sizes.len()];
        inner.device_features_sel = 0;
        inner.driver_features_sel = 0;
        inner.driver_features = 0;
        inner.queue_sel = 0;
        inner.status = 0;
        inner.interrupt_status = 0;
        let _ = self.resume.read();
    }

    fn running(&self, inner: &Inner) -> bool {
        inner.status & (DRIVER_OK | NEEDS_RESET) == DRIVER_OK
    }

    fn run_all(&self, inner: &mut Inner) {
        for q in 0..self.max_sizes.len() {
            self.run_queue(inner, q);
        }
    }

    /// Takes the chains the driver made available on queue `q`, at most one queue's worth.
    fn run_queue(&self, inner: &mut Inner, q: usize) {
        if !self.running(inner) || inner.queues.get(q).is_none_or(|queue| !queue.ready()) {
            return;
        }
        match self.drain_queue(inner, q) {
            Ok(true) => self.interrupt_if_needed(inner, q),
            Ok(false) => {}
            Err(Broken) => self.set_needs_reset(inner),
        }
    }

    /// Returns whether anything went into the used ring.
    fn drain_queue(&self, inner: &mut Inner, q: usize) -> Result<bool, Broken> {
        let indirect = inner.driver_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        let Inner { device, queues, .. } = inner;
        let queue = queues.get_mut(q).ok_or(Broken)?;
        let mem = &self.mem;
        let mut budget = queue.size();
        let mut added = false;
        loop {
            queue.disable_notification(mem).map_err(|_| Broken)?;
            loop {
                if !device.ready_for_more(q as u16) {
                    return Ok(added); // its next completion runs the queue again
                }
                if budget == 0 {
                    let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(|_| Broken)?;
                    if avail.0 == queue.next_avail() {
                        break; // all taken: re-arm notifications below
                    }
                    let _ = self.resume.write(1);
                    return Ok(added);
                }
                let head = match queue.iter(mem).map_err(|_| Broken)?.next() {
                    Some(chain) => chain.head_index(),
                    None => break,
                };
                budget -= 1;
                added |= self.take_chain(device.as_mut(), queue, q as u16, head, indirect)?;
            }
            // Re-arm, then look again: the driver may have posted in between.
            if !queue.enable_notification(mem).map_err(|_| Broken)? {
                return Ok(added);
            }
        }
    }

    /// Hands one chain to the device; returns whether it went into the used ring now.
    fn take_chain(
        &self,
        device: &mut dyn VirtioDevice,
        queue: &mut Queue,
        q: u16,
        head: u16,
        indirect: bool,
    ) -> Result<bool, Broken> {
        if head >= queue.size() {
            return Err(Broken); // cannot even be given back
        }
        let table = GuestAddress(queue.desc_table());
        let outcome = match chain::walk(&self.mem, table, queue.size(), head, indirect) {
            Ok(chain) => match device.handle_chain(q, chain, &self.mem) {
                Handled::Done(outcome) => outcome,
                Handled::Queued => return Ok(false),
            },
            Err((_, partial)) => Outcome::refused(device.refuse_chain(q, &partial, &self.mem)),
        };
        self.count(&outcome);
        queue.add_used(&self.mem, head, outcome.used_len).map_err(|_| Broken)?;
        Ok(true)
    }

    /// Returns finished chains to the guest (dropped if the device was reset or broke).
    fn complete(&self, inner: &mut Inner, done: Vec<Completion>) {
        let mut touched = vec![false; self.max_sizes.len()];
        let running = self.running(inner);
        for c in done {
            self.count(&c.outcome);
            let Some(queue) = inner.queues.get_mut(usize::from(c.queue)).filter(|q| running && q.ready()) else {
                continue;
            };
            if queue.add_used(&self.mem, c.head, c.outcome.used_len).is_err() {
                self.set_needs_reset(inner);
                return;
            }
            if let Some(t) = touched.get_mut(usize::from(c.queue)) {
                *t = true;
            }
        }
        for (q, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
            self.interrupt_if_needed(inner, q);
        }
    }

    fn count(&self, o: &Outcome) {
        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(o.bytes, Ordering::Relaxed);
        if o.refused {
            c.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn interrupt_if_needed(&self, inner: &mut Inner, q: usize) {
        let Some(queue) = inner.queues.get_mut(q) else { return };
        match queue.needs_notification(&self.mem) {
            Ok(true) => self.raise(inner, INT_VRING),
            Ok(false) => {}
            Err(_) => self.set_needs_reset(inner),
        }
    }

    fn raise(&self, inner: &mut Inner, bit: u32) {
        inner.interrupt_status |= bit;
        self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
        // An eventfd write fails only if its counter would overflow: already pending.
        let _ = self.interrupt.write(1);
    }

    /// The driver broke a ring: stop all queues until it resets the device.
    fn set_needs_reset(&self, inner: &mut Inner) {
        if inner.status & NEEDS_RESET == 0 {
            inner.status |= NEEDS_RESET;
            self.counters.needs_reset.fetch_add(1, Ordering::Relaxed);
            self.raise(inner, INT_CONFIG);
        }
    }
}

fn fresh_queues(max_sizes: &[u16]) -> Result<Vec<Queue>, VirtioError> {
    max_sizes
        .iter()
        .enumerate()
        .map(|(index, &m)| Queue::new(m).map_err(|e| VirtioError::Queue { index, reason: e.to_string() }))
        .collect()
}

fn set_low(r: &mut u64, v: u32) {
    *r = (*r & !0xffff_ffff) | u64::from(v);
}

fn set_high(r: &mut u64, v: u32) {
    *r = (*r & 0xffff_ffff) | (u64::from(v) << 32);
}

impl BusDevice for VirtioMmio {
    fn state(&self) -> crate::devices::state::DeviceState {
        crate::devices::state::DeviceState::Virtio(VirtioMmio::state(self))
    }
    fn restore(&self, state: &crate::devices::state::DeviceState) -> Result<(), crate::devices::state::RestoreError> {
        use crate::devices::state::{DeviceState, RestoreError};
        match state {
            DeviceState::Virtio(v) => {
                VirtioMmio::restore(self, v).map_err(|e| RestoreError::Invalid { device: "virtio", reason: e.to_string() })
            }
            other => Err(RestoreError::wrong_kind(other, "virtio")),
        }
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let inner = self.lock();
        if offset >= CONFIG_SPACE {
            inner.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(&inner, offset).to_le_bytes());
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut inner = self.lock();
        if offset >= CONFIG_SPACE {
            inner.device.write_config(offset - CONFIG_SPACE, data);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(&mut inner, offset, u32::from_le_bytes(bytes));
        }
    }

    /// A QueueNotify write whose value is unknown: look at every queue.
    fn doorbell(&self, offset: u64) {
        if offset == QUEUE_NOTIFY {
            let mut inner = self.lock();
            self.run_all(&mut inner);
        }
    }

    fn reset(&self) {
        let mut inner = self.lock();
        self.reset_inner(&mut inner);
    }
}
