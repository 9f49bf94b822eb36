//! The virtio-mmio transport, version 2 (virtio 1.x, no legacy): the register window
//! the driver programs, feature negotiation, the device status, the split virtqueues and
//! the interrupt. Generic over the device type ([`VirtioDevice`]).
//!
//! The queues, chains and interrupt decisions are the transport-independent core's
//! (virtio/core.rs); this file is the register window and the interrupt status.
//! One lock guards the transport and its device. It is taken by vCPU threads (register
//! accesses) and by the event-loop thread (queue notifications, backend completions).

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::core::{Cause, Core, CoreState, Interrupt};
use super::state::{STATE_VERSION, VirtioMmioState};
use super::{VirtioDevice, VirtioError, VirtioStats};
use crate::devices::BusDevice;

/// One device's window on the MMIO bus.
pub const MMIO_SIZE: u64 = 0x1000;
/// The QueueNotify register (an ioeventfd with datamatch = queue index).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4649_4b53; // "SKIF"
const CONFIG_SPACE: u64 = 0x100;

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

struct Inner {
    st: CoreState,
    interrupt_status: u32,
}

/// The MMIO transport's interrupt: a status bit the driver reads and acknowledges,
/// and one edge on the device's GSI.
struct MmioIrq<'a> {
    status: &'a mut u32,
    fd: &'a EventFd,
}

impl Interrupt for MmioIrq<'_> {
    fn raise(&mut self, cause: Cause) {
        *self.status |= match cause {
            Cause::Queue(_) => INT_VRING,
            Cause::Config => INT_CONFIG,
        };
        // An eventfd write fails only if its counter would overflow: already pending.
        let _ = self.fd.write(1);
    }
}

/// A virtio device behind its MMIO register window.
pub struct VirtioMmio {
    inner: Mutex<Inner>,
    core: Core,
    interrupt: EventFd,
}

/// Runs `f` with the core state and the transport's interrupt, borrowed apart.
macro_rules! with_irq {
    ($self:ident, $inner:expr, |$st:ident, $irq:ident| $body:expr) => {{
        let Inner { st: $st, interrupt_status } = $inner;
        let $irq = &mut MmioIrq { status: interrupt_status, fd: &$self.interrupt };
        $body
    }};
}

impl VirtioMmio {
    /// Puts `device` behind a register window; `interrupt` is the irqfd of its GSI.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: EventFd) -> Result<Self, VirtioError> {
        let (core, st) = Core::new(device, mem)?;
        Ok(VirtioMmio { inner: Mutex::new(Inner { st, interrupt_status: 0 }), core, interrupt })
    }

    pub fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    pub fn queue_count(&self) -> usize {
        self.core.queue_count()
    }

    /// Queue `index` was notified (an ioeventfd, or a QueueNotify write that exited).
    pub fn notify(&self, index: u16) {
        let mut inner = self.lock();
        with_irq!(self, &mut *inner, |st, irq| self.core.run_queue(st, irq, usize::from(index)));
    }

    /// Fds the event loop watches: the device's backends, then the core's resume fd.
    pub fn backend_fds(&self) -> Vec<RawFd> {
        self.core.backend_fds()
    }

    /// The `i`-th fd of [`Self::backend_fds`] is readable.
    pub fn backend_ready(&self, i: usize) {
        let mut inner = self.lock();
        with_irq!(self, &mut *inner, |st, irq| self.core.backend_ready(st, irq, i));
    }

    pub fn stats(&self) -> VirtioStats {
        self.core.stats()
    }

    /// The whole state. Call with the vCPUs paused: requests in flight are waited for and
    /// returned to the guest first, so the snapshot holds none.
    pub fn state(&self) -> VirtioMmioState {
        let mut inner = self.lock();
        let core = with_irq!(self, &mut *inner, |st, irq| self.core.state(st, irq));
        VirtioMmioState::from_core(core, inner.interrupt_status)
    }

    /// Restores a state from [`Self::state`], checked as untrusted input. A snapshot of
    /// another version, device or feature set changes nothing; one whose queues or device
    /// part do not fit leaves the device reset.
    pub fn restore(&self, state: &VirtioMmioState) -> Result<(), VirtioError> {
        if state.version != STATE_VERSION {
            return Err(VirtioError::Version { found: state.version, expected: STATE_VERSION });
        }
        let mut inner = self.lock();
        inner.interrupt_status = 0;
        self.core.restore(&mut inner.st, &state.core())?;
        inner.interrupt_status = state.interrupt_status & (INT_VRING | INT_CONFIG);
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
        let st = &inner.st;
        let sel = st.queue_sel as usize;
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.core.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => self.core.device_features(st.device_features_sel),
            reg::QUEUE_NUM_MAX => self.core.max_size(sel).map_or(0, u32::from),
            reg::QUEUE_READY => u32::from(Core::queue_ready(st, sel)),
            reg::INTERRUPT_STATUS => inner.interrupt_status,
            reg::STATUS => st.status,
            // No shared memory regions: their length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => st.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&self, inner: &mut Inner, offset: u64, v: u32) {
        let sel = inner.st.queue_sel as usize;
        with_irq!(self, inner, |st, irq| match offset {
            reg::DEVICE_FEATURES_SEL => st.device_features_sel = v,
            reg::DRIVER_FEATURES => self.core.write_driver_features(st, v),
            reg::DRIVER_FEATURES_SEL => st.driver_features_sel = v,
            reg::QUEUE_SEL => st.queue_sel = v,
            // An out-of-range size is kept as 0, which QueueReady then refuses.
            reg::QUEUE_NUM => Core::idle_regs(st, sel, |r| r.size = u16::try_from(v).unwrap_or(0)),
            reg::QUEUE_READY => self.core.set_queue_ready(st, irq, sel, v),
            QUEUE_NOTIFY => self.core.run_queue(st, irq, v as usize),
            reg::INTERRUPT_ACK => *irq.status &= !v,
            reg::STATUS => {
                self.core.set_status(st, irq, v);
                if v == 0 {
                    *irq.status = 0;
                }
            }
            reg::QUEUE_DESC_LOW => Core::idle_regs(st, sel, |r| set_low(&mut r.desc, v)),
            reg::QUEUE_DESC_HIGH => Core::idle_regs(st, sel, |r| set_high(&mut r.desc, v)),
            reg::QUEUE_DRIVER_LOW => Core::idle_regs(st, sel, |r| set_low(&mut r.driver, v)),
            reg::QUEUE_DRIVER_HIGH => Core::idle_regs(st, sel, |r| set_high(&mut r.driver, v)),
            reg::QUEUE_DEVICE_LOW => Core::idle_regs(st, sel, |r| set_low(&mut r.device, v)),
            reg::QUEUE_DEVICE_HIGH => Core::idle_regs(st, sel, |r| set_high(&mut r.device, v)),
            _ => {}
        })
    }

    fn reset_inner(&self, inner: &mut Inner) {
        self.core.reset(&mut inner.st);
        inner.interrupt_status = 0;
    }
}

pub(super) fn set_low(r: &mut u64, v: u32) {
    *r = (*r & !0xffff_ffff) | u64::from(v);
}

pub(super) fn set_high(r: &mut u64, v: u32) {
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
            inner.st.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(&inner, offset).to_le_bytes());
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut inner = self.lock();
        if offset >= CONFIG_SPACE {
            inner.st.device.write_config(offset - CONFIG_SPACE, data);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(&mut inner, offset, u32::from_le_bytes(bytes));
        }
    }

    /// A QueueNotify write whose value is unknown: look at every queue.
    fn doorbell(&self, offset: u64) {
        if offset == QUEUE_NOTIFY {
            let mut inner = self.lock();
            with_irq!(self, &mut *inner, |st, irq| self.core.run_all(st, irq));
        }
    }

    fn reset(&self) {
        let mut inner = self.lock();
        self.reset_inner(&mut inner);
    }
}
