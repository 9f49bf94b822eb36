//! The transport-independent half of a virtio device: feature negotiation, the device
//! status, the split virtqueues, chain draining and completion, and the decision to
//! interrupt. The MMIO and PCI transports keep only their register interfaces and how
//! an interrupt reaches the guest ([`Interrupt`]).
//!
//! The transport holds a [`CoreState`] under its one lock and calls [`Core`]'s methods
//! with it. A pass over a queue takes at most one queue's worth of chains, then yields
//! through the core's "resume" eventfd, so a guest that keeps posting cannot hold the
//! lock forever.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::state::{QueueSnapshot, VirtioCoreState};
use super::{Completion, Handled, Outcome, TRANSPORT_FEATURES, VirtioDevice, VirtioError, VirtioStats, chain};

pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// Why the device interrupts the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Queue `n` has used buffers the driver asked to hear about.
    Queue(u16),
    /// The configuration (or the device status: NEEDS_RESET) changed.
    Config,
}

/// How a transport delivers an interrupt (called with the transport's lock held).
pub trait Interrupt {
    fn raise(&mut self, cause: Cause);
}

/// What the driver wrote for one queue, applied when it enables the queue.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueRegs {
    pub size: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The mutable half, under the transport's lock.
pub struct CoreState {
    pub device: Box<dyn VirtioDevice>,
    pub queues: Vec<Queue>,
    pub regs: Vec<QueueRegs>,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
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

/// The fixed half: what does not change after creation, and the counters.
pub struct Core {
    mem: GuestMemoryMmap,
    /// Signalled when a pass over a queue stopped with chains left (see module doc).
    resume: EventFd,
    device_type: u32,
    max_sizes: Vec<u16>,
    offered: u64,
    device_fds: Vec<RawFd>,
    counters: Counters,
}

impl Core {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<(Core, CoreState), VirtioError> {
        let resume = EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioError::EventFd(e.to_string()))?;
        let max_sizes = device.queue_max_sizes().to_vec();
        let core = Core {
            mem,
            resume,
            device_type: device.device_type(),
            offered: device.features() | TRANSPORT_FEATURES,
            device_fds: device.backend_fds(),
            counters: Counters::default(),
            max_sizes,
        };
        let state = CoreState {
            device,
            queues: fresh_queues(&core.max_sizes)?,
            regs: vec![QueueRegs::default(); core.max_sizes.len()],
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        };
        Ok((core, state))
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn queue_count(&self) -> usize {
        self.max_sizes.len()
    }

    pub fn max_size(&self, q: usize) -> Option<u16> {
        self.max_sizes.get(q).copied()
    }

    /// The 32 feature bits selected by `sel` (0 or 1; others read 0).
    pub fn device_features(&self, sel: u32) -> u32 {
        match sel {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 feature bits (ignored once FEATURES_OK or DRIVER_OK is set).
    pub fn write_driver_features(&self, st: &mut CoreState, v: u32) {
        if st.status & (FEATURES_OK | DRIVER_OK) != 0 {
            return;
        }
        match st.driver_features_sel {
            0 => st.driver_features = (st.driver_features & !0xffff_ffff) | u64::from(v),
            1 => st.driver_features = (st.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// Fds the event loop watches: the device's backends, then the core's resume fd.
    pub fn backend_fds(&self) -> Vec<RawFd> {
        let mut fds = self.device_fds.clone();
        fds.push(self.resume.as_raw_fd());
        fds
    }

    /// The `i`-th fd of [`Self::backend_fds`] is readable.
    pub fn backend_ready(&self, st: &mut CoreState, irq: &mut dyn Interrupt, i: usize) {
        if i < self.device_fds.len() {
            let done = st.device.backend_ready(i);
            self.complete(st, irq, done);
        } else if i == self.device_fds.len() {
            let _ = self.resume.read();
        } else {
            return;
        }
        // Completions may have made room for chains a busy device left in the ring.
        self.run_all(st, irq);
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

    /// The state, after every request in flight was waited for and returned.
    pub fn state(&self, st: &mut CoreState, irq: &mut dyn Interrupt) -> VirtioCoreState {
        let done = st.device.quiesce();
        self.complete(st, irq, done);
        let queues = st
            .queues
            .iter()
            .zip(&st.regs)
            .enumerate()
            .map(|(i, (q, r))| QueueSnapshot {
                size: r.size,
                ready: q.ready(),
                desc_table: r.desc,
                avail_ring: r.driver,
                used_ring: r.device,
                // Chains the device holds unused are taken again after a restore.
                next_avail: q.next_avail().wrapping_sub(st.device.held(i as u16)),
                next_used: q.next_used(),
            })
            .collect();
        VirtioCoreState {
            device_type: self.device_type,
            device_features_sel: st.device_features_sel,
            driver_features_sel: st.driver_features_sel,
            driver_features: st.driver_features,
            queue_sel: st.queue_sel,
            status: st.status,
            config_generation: st.config_generation,
            queues,
            device: st.device.state(),
        }
    }

    /// Checks a state against this device; nothing changes if it does not fit.
    pub fn check(&self, s: &VirtioCoreState) -> Result<(), VirtioError> {
        if s.device_type != self.device_type {
            return Err(VirtioError::DeviceType { found: s.device_type, expected: self.device_type });
        }
        if s.queues.len() != self.queue_count() {
            return Err(VirtioError::QueueCount { found: s.queues.len(), expected: self.queue_count() });
        }
        if s.driver_features & !self.offered != 0 {
            return Err(VirtioError::Features { features: s.driver_features, offered: self.offered });
        }
        Ok(())
    }

    /// Restores a checked state ([`Self::check`]); on an error the device is left reset.
    pub fn restore(&self, st: &mut CoreState, s: &VirtioCoreState) -> Result<(), VirtioError> {
        self.check(s)?;
        self.reset(st);
        let result = self.restore_into(st, s);
        if result.is_err() {
            self.reset(st);
        }
        result
    }

    fn restore_into(&self, st: &mut CoreState, s: &VirtioCoreState) -> Result<(), VirtioError> {
        st.device.restore(&s.device)?;
        st.device_features_sel = s.device_features_sel;
        st.driver_features_sel = s.driver_features_sel;
        st.driver_features = s.driver_features;
        st.queue_sel = s.queue_sel;
        st.config_generation = s.config_generation;
        for (index, q) in s.queues.iter().enumerate() {
            let regs = QueueRegs { size: q.size, desc: q.desc_table, driver: q.avail_ring, device: q.used_ring };
            if let Some(r) = st.regs.get_mut(index) {
                *r = regs;
            }
            if q.ready {
                let mut live = self
                    .build_queue(st, index)
                    .map_err(|reason| VirtioError::Queue { index, reason: reason.to_string() })?;
                live.set_next_avail(q.next_avail);
                live.set_next_used(q.next_used);
                if let Some(slot) = st.queues.get_mut(index) {
                    *slot = live;
                }
            }
        }
        st.status = s.status & 0xff;
        if st.status & DRIVER_OK != 0 {
            st.device.activate(st.driver_features);
            // Chains the driver posted before the snapshot and will not notify again
            // (receive buffers a device held, given back by `held`) are taken on the
            // event loop's next turn.
            let _ = self.resume.write(1);
        }
        Ok(())
    }

    /// Whether queue `sel` exists and is enabled.
    pub fn queue_ready(st: &CoreState, sel: usize) -> bool {
        st.queues.get(sel).is_some_and(|q| q.ready())
    }

    /// Changes queue `sel`'s registers, unless it does not exist or is live.
    pub fn idle_regs(st: &mut CoreState, sel: usize, f: impl FnOnce(&mut QueueRegs)) {
        let live = st.queues.get(sel).is_none_or(|q| q.ready());
        if let (false, Some(r)) = (live, st.regs.get_mut(sel)) {
            f(r);
        }
    }

    /// The driver enables (1) or disables (0) queue `sel`.
    pub fn set_queue_ready(&self, st: &mut CoreState, irq: &mut dyn Interrupt, sel: usize, v: u32) {
        let Some(&max) = self.max_sizes.get(sel) else { return };
        match v {
            0 => {
                if let Some(q) = st.queues.get_mut(sel) {
                    q.set_ready(false);
                }
            }
            1 if st.queues.get(sel).is_some_and(|q| !q.ready()) => match self.build_queue(st, sel) {
                Ok(q) => {
                    if let Some(slot) = st.queues.get_mut(sel) {
                        *slot = q;
                    }
                }
                Err(_) => {
                    if let Ok(q) = Queue::new(max)
                        && let Some(slot) = st.queues.get_mut(sel)
                    {
                        *slot = q;
                    }
                    self.set_needs_reset(st, irq);
                }
            },
            _ => {}
        }
    }

    /// A live queue from the registers the driver wrote, or why they are unusable.
    fn build_queue(&self, st: &CoreState, sel: usize) -> Result<Queue, &'static str> {
        let (Some(&max), Some(r)) = (self.max_sizes.get(sel), st.regs.get(sel)) else {
            return Err("no such queue");
        };
        let mut q = Queue::new(max).map_err(|_| "bad maximum size")?;
        q.try_set_size(r.size).map_err(|_| "size is 0, not a power of two or too large")?;
        q.try_set_desc_table_address(GuestAddress(r.desc)).map_err(|_| "descriptor table misaligned")?;
        q.try_set_avail_ring_address(GuestAddress(r.driver)).map_err(|_| "available ring misaligned")?;
        q.try_set_used_ring_address(GuestAddress(r.device)).map_err(|_| "used ring misaligned")?;
        q.set_event_idx(st.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err("a ring is outside guest RAM");
        }
        Ok(q)
    }

    /// The driver writes the device status (0 resets the device).
    pub fn set_status(&self, st: &mut CoreState, irq: &mut dyn Interrupt, v: u32) {
        if v == 0 {
            self.reset(st);
            return;
        }
        let old = st.status;
        // NEEDS_RESET is the device's to set; the driver may not clear any bit.
        let mut new = (v & 0xff & !NEEDS_RESET) | (old & NEEDS_RESET);
        if old & !new != 0 {
            return;
        }
        let features = st.driver_features;
        let acceptable = features & !self.offered == 0 && features & (1 << VIRTIO_F_VERSION_1) != 0;
        if new & FEATURES_OK != 0 && old & FEATURES_OK == 0 && !acceptable {
            new &= !FEATURES_OK;
        }
        if new & FEATURES_OK == 0 {
            new &= !DRIVER_OK;
        }
        st.status = new;
        if new & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            st.device.activate(features);
            // Chains posted before DRIVER_OK were not looked at.
            self.run_all(st, irq);
        }
    }

    /// Back to the power-up state; waits for the device's requests in flight.
    pub fn reset(&self, st: &mut CoreState) {
        st.device.reset();
        if let Ok(q) = fresh_queues(&self.max_sizes) {
            st.queues = q;
        }
        st.regs = vec![QueueRegs::default(); self.max_sizes.len()];
        st.device_features_sel = 0;
        st.driver_features_sel = 0;
        st.driver_features = 0;
        st.queue_sel = 0;
        st.status = 0;
        let _ = self.resume.read();
    }

    fn running(st: &CoreState) -> bool {
        st.status & (DRIVER_OK | NEEDS_RESET) == DRIVER_OK
    }

    pub fn run_all(&self, st: &mut CoreState, irq: &mut dyn Interrupt) {
        for q in 0..self.max_sizes.len() {
            self.run_queue(st, irq, q);
        }
    }

    /// Takes the chains the driver made available on queue `q`, at most one queue's worth.
    pub fn run_queue(&self, st: &mut CoreState, irq: &mut dyn Interrupt, q: usize) {
        if !Self::running(st) || st.queues.get(q).is_none_or(|queue| !queue.ready()) {
            return;
        }
        match self.drain_queue(st, q) {
            Ok(true) => self.interrupt_if_needed(st, irq, q),
            Ok(false) => {}
            Err(Broken) => self.set_needs_reset(st, irq),
        }
    }

    /// Returns whether anything went into the used ring.
    fn drain_queue(&self, st: &mut CoreState, q: usize) -> Result<bool, Broken> {
        let indirect = st.driver_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        let CoreState { device, queues, .. } = st;
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
    fn take_chain(&self, device: &mut dyn VirtioDevice, queue: &mut Queue, q: u16, head: u16, indirect: bool) -> Result<bool, Broken> {
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
    pub fn complete(&self, st: &mut CoreState, irq: &mut dyn Interrupt, done: Vec<Completion>) {
        let mut touched = vec![false; self.max_sizes.len()];
        let running = Self::running(st);
        for c in done {
            self.count(&c.outcome);
            let Some(queue) = st.queues.get_mut(usize::from(c.queue)).filter(|q| running && q.ready()) else {
                continue;
            };
            if queue.add_used(&self.mem, c.head, c.outcome.used_len).is_err() {
                self.set_needs_reset(st, irq);
                return;
            }
            if let Some(t) = touched.get_mut(usize::from(c.queue)) {
                *t = true;
            }
        }
        for (q, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
            self.interrupt_if_needed(st, irq, q);
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

    fn interrupt_if_needed(&self, st: &mut CoreState, irq: &mut dyn Interrupt, q: usize) {
        let Some(queue) = st.queues.get_mut(q) else { return };
        match queue.needs_notification(&self.mem) {
            Ok(true) => self.raise(irq, Cause::Queue(q as u16)),
            Ok(false) => {}
            Err(_) => self.set_needs_reset(st, irq),
        }
    }

    fn raise(&self, irq: &mut dyn Interrupt, cause: Cause) {
        self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
        irq.raise(cause);
    }

    /// The driver broke a ring: stop all queues until it resets the device.
    pub fn set_needs_reset(&self, st: &mut CoreState, irq: &mut dyn Interrupt) {
        if st.status & NEEDS_RESET == 0 {
            st.status |= NEEDS_RESET;
            self.counters.needs_reset.fetch_add(1, Ordering::Relaxed);
            self.raise(irq, Cause::Config);
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
