//! The virtio-pci modern transport (virtio 1.x, 4.1; no legacy interface) for any
//! [`VirtioDevice`]: a PCI function (vendor 0x1af4, device 0x1040 + the virtio type,
//! revision 1) with one 64-bit memory BAR holding every structure, found through
//! vendor capabilities, and MSI-X with one vector per queue plus one for configuration
//! changes.
//!
//! BAR 0 layout (each part in a 4 KiB page of its own):
//!
//! | offset   | what                                                       |
//! |----------|------------------------------------------------------------|
//! | 0x0000   | common configuration (0x38 bytes)                          |
//! | 0x1000   | ISR status (1 byte, read-to-clear)                         |
//! | 0x2000   | device configuration                                       |
//! | 0x3000   | notifications: queue n at 0x3000 + 4n (multiplier 4)       |
//! | 0x4000   | MSI-X table (16 bytes a vector, at most 512)               |
//! | 0x6000   | MSI-X pending-bit array                                    |
//!
//! Queue notifications are ioeventfds (a 2-byte write of the queue's index at its
//! address), registered where the BAR is and moved with it; they are removed while
//! memory decode is off. Interrupts go to one irqfd per MSI-X vector, each on a GSI of
//! its own routed to the vector's message; a masked vector holds its interrupt in the
//! pending bit until it is unmasked. There is no INTx: with MSI-X disabled the device
//! sets the ISR bits but raises no interrupt (the interrupt pin reads 0).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::core::{Cause, Core, CoreState, Interrupt};
use super::mmio::{set_high, set_low};
use super::state::VirtioPciState;
use super::{VirtioDevice, VirtioError, VirtioStats};
use crate::devices::BusDevice;
use crate::devices::pci::config::{self, Bar, ConfigSpace, Header};
use crate::devices::pci::msix::{self, Msix};
use crate::devices::pci::routing::Kvm;
use crate::devices::pci::PciFunction;
use crate::devices::state::{DeviceState, RestoreError};

pub const VENDOR_ID: u16 = 0x1af4;
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// BAR 0's size, and its parts.
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
pub const ISR: u64 = 0x1000;
pub const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_LEN: u64 = 0x1000;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x6000;
const MAX_VECTORS: usize = ((MSIX_PBA - MSIX_TABLE) / msix::ENTRY_SIZE) as usize;
/// "No vector" for config_msix_vector and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;
/// Bumped whenever [`VirtioPciState`] changes shape or meaning.
pub const PCI_STATE_VERSION: u32 = 1;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;

/// Common configuration offsets (virtio 1.x, 4.1.4.3).
mod common {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGEN: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESCLO: u64 = 0x20;
    pub const Q_DESCHI: u64 = 0x24;
    pub const Q_AVAILLO: u64 = 0x28;
    pub const Q_AVAILHI: u64 = 0x2c;
    pub const Q_USEDLO: u64 = 0x30;
    pub const Q_USEDHI: u64 = 0x34;
}

struct Inner {
    st: CoreState,
    config: ConfigSpace,
    msix: Msix,
    isr: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    /// The BAR address the notifiers are registered at now, if any.
    notify_base: Option<u64>,
    /// Which queues' notifiers KVM took there (the others exit to [`NOTIFY`]).
    notify_registered: Vec<bool>,
}

/// Where the capabilities are in configuration space.
#[derive(Clone, Copy)]
struct Caps {
    msix: usize,
    pci_cfg: usize,
}

/// The virtio-pci interrupt: the ISR bits, and the cause's MSI-X vector.
struct PciIrq<'a> {
    isr: &'a mut u8,
    msix: &'a mut Msix,
    config_vector: u16,
    queue_vectors: &'a [u16],
    irqfds: &'a [EventFd],
}

impl Interrupt for PciIrq<'_> {
    fn raise(&mut self, cause: Cause) {
        let vector = match cause {
            Cause::Queue(q) => {
                *self.isr |= 1;
                self.queue_vectors.get(usize::from(q)).copied().unwrap_or(NO_VECTOR)
            }
            Cause::Config => {
                *self.isr |= 2;
                self.config_vector
            }
        };
        let v = usize::from(vector);
        if vector == NO_VECTOR || !self.msix.enabled() {
            return; // no INTx: see the module doc
        }
        if self.msix.masked(v) {
            self.msix.set_pending(v, true);
        } else if let Some(fd) = self.irqfds.get(v) {
            let _ = fd.write(1);
        }
    }
}

/// A virtio device as a PCI function.
pub struct VirtioPci {
    inner: Mutex<Inner>,
    core: Core,
    kvm: Arc<Kvm>,
    caps: Caps,
    /// The configuration space at power-up (BAR placed, decode on).
    initial: ConfigSpace,
    /// Queue n's notification eventfd (KVM signals it).
    notifiers: Vec<EventFd>,
    /// Vector n's irqfd, on GSI `first_gsi + n`.
    irqfds: Vec<EventFd>,
    first_gsi: u32,
}

/// Runs `body` with the core state and the transport's interrupt, borrowed apart.
macro_rules! with_irq {
    ($self:ident, $inner:expr, |$st:ident, $irq:ident| $body:expr) => {{
        let Inner { st: $st, isr, msix, config_vector, queue_vectors, .. } = $inner;
        let $irq = &mut PciIrq { isr, msix, config_vector: *config_vector, queue_vectors, irqfds: &$self.irqfds };
        $body
    }};
}

fn eventfd() -> Result<EventFd, VirtioError> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| VirtioError::EventFd(e.to_string()))
}

/// The PCI class code for a virtio device type.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00, // network controller
        2 => 0x01_00_00, // mass storage (SCSI, as QEMU reports virtio-blk)
        3 => 0x07_80_00, // communication controller
        _ => 0xff_00_00, // unassigned class
    }
}

/// A virtio vendor capability's body (after the ID and next pointer).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

fn build_config(device_type: u32, vectors: usize, bar: u64) -> Result<(ConfigSpace, Caps), VirtioError> {
    let err = |e: config::ConfigError| VirtioError::Device(e.to_string());
    let device = u16::try_from(device_type).ok().and_then(|t| DEVICE_ID_BASE.checked_add(t)).ok_or(VirtioError::Device("device type".into()))?;
    let h = Header { vendor: VENDOR_ID, device, revision: 1, class: class_of(device_type), subsystem_vendor: VENDOR_ID, subsystem_id: device_type as u16 };
    let mut c = ConfigSpace::new(h);
    c.add_bar(Bar { index: 0, size: BAR_SIZE, prefetchable: false }).map_err(err)?;
    c.set_bar_address(0, bar);
    c.set_u16(config::COMMAND, config::COMMAND_MEMORY);
    c.add_capability(CAP_VENDOR, &virtio_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]), &[]).map_err(err)?;
    c.add_capability(CAP_VENDOR, &virtio_cap(CAP_ISR, ISR, 1, &[]), &[]).map_err(err)?;
    c.add_capability(CAP_VENDOR, &virtio_cap(CAP_DEVICE, DEVICE_CFG, DEVICE_CFG_LEN, &[]), &[]).map_err(err)?;
    let mult = NOTIFY_MULTIPLIER.to_le_bytes();
    c.add_capability(CAP_VENDOR, &virtio_cap(CAP_NOTIFY, NOTIFY, NOTIFY_LEN, &mult), &[]).map_err(err)?;
    // PCI_CFG: bar, offset, length and the data window are the driver's to write.
    let mut wmask = vec![0u8; 18];
    for i in [2usize, 6, 7, 8, 9, 10, 11, 12, 13] {
        if let Some(m) = wmask.get_mut(i) {
            *m = 0xff;
        }
    }
    let pci_cfg = c.add_capability(CAP_VENDOR, &virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]), &wmask).map_err(err)?;
    let table_size = (vectors - 1) as u16;
    let mut body = table_size.to_le_bytes().to_vec();
    body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
    body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
    let msix = c.add_capability(CAP_MSIX, &body, &[0, 0xc0]).map_err(err)?;
    Ok((c, Caps { msix, pci_cfg }))
}

impl VirtioPci {
    /// `device` as a PCI function with BAR 0 at `bar` (aligned to [`BAR_SIZE`]);
    /// `kvm` registers its notifiers and routes its vectors.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, kvm: Arc<Kvm>, bar: u64) -> Result<Self, VirtioError> {
        let (core, st) = Core::new(device, mem)?;
        let queues = core.queue_count();
        let vectors = queues + 1;
        if vectors > MAX_VECTORS || queues > (NOTIFY_LEN / u64::from(NOTIFY_MULTIPLIER)) as usize {
            return Err(VirtioError::Device(format!("{queues} queues: too many for one function")));
        }
        let (config, caps) = build_config(core.device_type(), vectors, bar)?;
        let first_gsi = kvm.allocate_gsis(vectors as u32).map_err(VirtioError::Device)?;
        let irqfds = (0..vectors).map(|_| eventfd()).collect::<Result<Vec<_>, _>>()?;
        for (v, fd) in irqfds.iter().enumerate() {
            kvm.register_irqfd(fd, first_gsi + v as u32).map_err(VirtioError::Device)?;
        }
        let notifiers = (0..queues).map(|_| eventfd()).collect::<Result<Vec<_>, _>>()?;
        let inner = Inner {
            st,
            config: config.clone(),
            msix: Msix::new(vectors),
            isr: 0,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues],
            notify_base: None,
            notify_registered: vec![false; queues],
        };
        let pci = VirtioPci { inner: Mutex::new(inner), core, kvm, caps, initial: config, notifiers, irqfds, first_gsi };
        {
            let mut inner = pci.lock();
            pci.reset_queue_sizes(&mut inner);
            pci.place_notifiers(&mut inner);
        }
        Ok(pci)
    }

    pub fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    pub fn queue_count(&self) -> usize {
        self.core.queue_count()
    }

    /// How many queues' notifiers KVM took where BAR 0 is now (the others exit).
    pub fn notifiers_registered(&self) -> usize {
        self.lock().notify_registered.iter().filter(|r| **r).count()
    }

    /// Queue `index`'s notification eventfd, duplicated for the event loop.
    pub fn notifier(&self, index: usize) -> Option<EventFd> {
        self.notifiers.get(index).and_then(|fd| fd.try_clone().ok())
    }

    /// Queue `index` was notified.
    pub fn notify(&self, index: u16) {
        let mut inner = self.lock();
        with_irq!(self, &mut *inner, |st, irq| self.core.run_queue(st, irq, usize::from(index)));
    }

    pub fn backend_fds(&self) -> Vec<RawFd> {
        self.core.backend_fds()
    }

    pub fn backend_ready(&self, i: usize) {
        let mut inner = self.lock();
        with_irq!(self, &mut *inner, |st, irq| self.core.backend_ready(st, irq, i));
    }

    pub fn stats(&self) -> VirtioStats {
        self.core.stats()
    }

    /// Vector `v`'s irqfd (tests read it to see an interrupt).
    #[cfg(test)]
    pub fn irqfd_for_tests(&self, v: usize) -> EventFd {
        self.irqfds.get(v).and_then(|fd| fd.try_clone().ok()).expect("no such vector")
    }

    /// BAR 0's address now (what the guest last wrote, or where skiff placed it).
    pub fn bar_address(&self) -> u64 {
        self.lock().config.bar(0).map_or(0, |(a, _)| a)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A queue the driver has not sized reads its maximum (virtio 4.1.4.3).
    fn reset_queue_sizes(&self, inner: &mut Inner) {
        for (q, r) in inner.st.regs.iter_mut().enumerate() {
            r.size = self.core.max_size(q).unwrap_or(0);
        }
    }

    /// Registers the notifiers where BAR 0 is now (nowhere while memory decode is off),
    /// removing them from where they were.
    fn place_notifiers(&self, inner: &mut Inner) {
        let want = match (inner.config.memory_enabled(), inner.config.bar(0)) {
            (true, Some((addr, _))) => Some(addr),
            _ => None,
        };
        if want == inner.notify_base {
            return;
        }
        if let Some(old) = inner.notify_base.take() {
            for (q, fd) in self.notifiers.iter().enumerate() {
                if inner.notify_registered.get(q) == Some(&true) {
                    let _ = self.kvm.unregister_notifier(fd, notify_addr(old, q), q as u16);
                }
            }
            inner.notify_registered.fill(false);
        }
        if let Some(base) = want {
            for (q, fd) in self.notifiers.iter().enumerate() {
                let ok = self.kvm.register_notifier(fd, notify_addr(base, q), q as u16).is_ok();
                if let Some(r) = inner.notify_registered.get_mut(q) {
                    *r = ok;
                }
            }
            inner.notify_base = Some(base);
        }
    }

    /// Vector `v` may send: route its GSI to its message and deliver what was pending.
    fn sync_vector(&self, inner: &mut Inner, v: usize) {
        if inner.msix.masked(v) {
            return; // the route stays; nothing is signalled while masked
        }
        let Some(msg) = inner.msix.message(v) else { return };
        if self.kvm.set_msi_route(self.first_gsi + v as u32, Some(msg)).is_err() {
            return;
        }
        if inner.msix.pending(v) {
            inner.msix.set_pending(v, false);
            if let Some(fd) = self.irqfds.get(v) {
                let _ = fd.write(1);
            }
        }
    }

    fn sync_all_vectors(&self, inner: &mut Inner) {
        for v in 0..inner.msix.len() {
            self.sync_vector(inner, v);
        }
    }

    // ---- configuration space -------------------------------------------------------

    fn pci_cfg_data(&self) -> std::ops::Range<usize> {
        let at = self.caps.pci_cfg + 16;
        at..at + 4
    }

    /// The BAR access the PCI_CFG capability describes: (offset in BAR 0, length).
    fn pci_cfg_window(&self, inner: &Inner) -> Option<(u64, usize)> {
        let cap = self.caps.pci_cfg;
        let (bar, offset, len) = (inner.config.u8_at(cap + 4), inner.config.u32_at(cap + 8), inner.config.u32_at(cap + 12));
        (bar == 0 && matches!(len, 1 | 2 | 4)).then_some((u64::from(offset), len as usize))
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let mut inner = self.lock();
        let at = offset as usize;
        if self.pci_cfg_data().contains(&at) {
            data.fill(0);
            if let Some((bar_offset, len)) = self.pci_cfg_window(&inner)
                && let Some(buf) = data.get_mut(..len.min(data.len()))
            {
                self.bar_access_read(&mut inner, bar_offset, buf);
            }
            return;
        }
        inner.config.read(at, data);
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        let mut inner = self.lock();
        let at = offset as usize;
        if self.pci_cfg_data().contains(&at) {
            if let Some((bar_offset, len)) = self.pci_cfg_window(&inner)
                && let Some(buf) = data.get(..len.min(data.len()))
            {
                self.bar_access_write(&mut inner, bar_offset, buf);
            }
            return;
        }
        inner.config.write(at, data);
        let control = self.caps.msix + 2;
        if at < control + 2 && control < at + data.len() {
            let v = inner.config.u16_at(control);
            inner.msix.set_control(v);
            self.sync_all_vectors(&mut inner);
        }
        if at < config::BAR0 + 8 || (config::COMMAND..config::COMMAND + 2).contains(&at) {
            self.place_notifiers(&mut inner);
        }
    }

    // ---- BAR 0 ---------------------------------------------------------------------

    /// BAR 0's offset for `addr`, if the BAR decodes and holds the whole access.
    fn bar_offset(inner: &Inner, addr: u64, len: usize) -> Option<u64> {
        if !inner.config.memory_enabled() {
            return None;
        }
        let (base, size) = inner.config.bar(0)?;
        let offset = addr.checked_sub(base)?;
        (offset.checked_add(len as u64)? <= size).then_some(offset)
    }

    fn bar_access_read(&self, inner: &mut Inner, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            COMMON..0x1000 => {
                let v = self.common_read(inner, offset, data.len());
                let bytes = v.to_le_bytes();
                let n = data.len().min(bytes.len());
                if let (Some(d), Some(b)) = (data.get_mut(..n), bytes.get(..n)) {
                    d.copy_from_slice(b);
                }
            }
            ISR..DEVICE_CFG => {
                if let Some(b) = data.first_mut() {
                    *b = std::mem::take(&mut inner.isr);
                }
            }
            DEVICE_CFG..NOTIFY => inner.st.device.read_config(offset - DEVICE_CFG, data),
            MSIX_TABLE..MSIX_PBA => inner.msix.table_read(offset - MSIX_TABLE, data),
            MSIX_PBA..BAR_SIZE => inner.msix.pba_read(offset - MSIX_PBA, data),
            _ => {}
        }
    }

    fn bar_access_write(&self, inner: &mut Inner, offset: u64, data: &[u8]) {
        match offset {
            COMMON..0x1000 => {
                let mut b = [0u8; 8];
                let n = data.len().min(8);
                if let (Some(d), Some(s)) = (b.get_mut(..n), data.get(..n)) {
                    d.copy_from_slice(s);
                }
                self.common_write(inner, offset, data.len(), u64::from_le_bytes(b));
            }
            DEVICE_CFG..NOTIFY => inner.st.device.write_config(offset - DEVICE_CFG, data),
            NOTIFY..MSIX_TABLE => {
                // A write KVM did not take (no ioeventfd, or another size): the address
                // names the queue.
                let rel = offset - NOTIFY;
                if rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) {
                    let q = (rel / u64::from(NOTIFY_MULTIPLIER)) as usize;
                    with_irq!(self, inner, |st, irq| self.core.run_queue(st, irq, q));
                }
            }
            MSIX_TABLE..MSIX_PBA => {
                if let Some(v) = inner.msix.table_write(offset - MSIX_TABLE, data) {
                    self.sync_vector(inner, v);
                }
            }
            _ => {}
        }
    }

    fn common_read(&self, inner: &Inner, offset: u64, len: usize) -> u64 {
        let st = &inner.st;
        let sel = st.queue_sel as usize;
        let exists = sel < self.core.queue_count();
        let regs = st.regs.get(sel).copied().unwrap_or_default();
        let v: u64 = match (offset, len) {
            (common::DFSELECT, 4) => u64::from(st.device_features_sel),
            (common::DF, 4) => u64::from(self.core.device_features(st.device_features_sel)),
            (common::GFSELECT, 4) => u64::from(st.driver_features_sel),
            (common::GF, 4) => match st.driver_features_sel {
                0 => st.driver_features & 0xffff_ffff,
                1 => st.driver_features >> 32,
                _ => 0,
            },
            (common::MSIX, 2) => u64::from(inner.config_vector),
            (common::NUMQ, 2) => self.core.queue_count() as u64,
            (common::STATUS, 1) => u64::from(st.status),
            (common::CFGGEN, 1) => u64::from(st.config_generation as u8),
            (common::Q_SELECT, 2) => u64::from(st.queue_sel),
            (common::Q_SIZE, 2) if exists => u64::from(regs.size),
            (common::Q_MSIX, 2) => u64::from(inner.queue_vectors.get(sel).copied().unwrap_or(NO_VECTOR)),
            (common::Q_ENABLE, 2) => u64::from(Core::queue_ready(st, sel)),
            (common::Q_NOFF, 2) if exists => sel as u64,
            (common::Q_DESCLO, 4) => regs.desc & 0xffff_ffff,
            (common::Q_DESCHI, 4) => regs.desc >> 32,
            (common::Q_AVAILLO, 4) => regs.driver & 0xffff_ffff,
            (common::Q_AVAILHI, 4) => regs.driver >> 32,
            (common::Q_USEDLO, 4) => regs.device & 0xffff_ffff,
            (common::Q_USEDHI, 4) => regs.device >> 32,
            (common::Q_DESCLO | common::Q_AVAILLO | common::Q_USEDLO, 8) => match offset {
                common::Q_DESCLO => regs.desc,
                common::Q_AVAILLO => regs.driver,
                _ => regs.device,
            },
            _ => 0,
        };
        v
    }

    /// A vector number the driver may use: one of the table's, or NO_VECTOR.
    fn vector(inner: &Inner, v: u16) -> u16 {
        if usize::from(v) < inner.msix.len() { v } else { NO_VECTOR }
    }

    fn common_write(&self, inner: &mut Inner, offset: u64, len: usize, v: u64) {
        let sel = inner.st.queue_sel as usize;
        let v32 = v as u32;
        match (offset, len) {
            (common::DFSELECT, 4) => inner.st.device_features_sel = v32,
            (common::GFSELECT, 4) => inner.st.driver_features_sel = v32,
            (common::GF, 4) => self.core.write_driver_features(&mut inner.st, v32),
            (common::MSIX, 2) => inner.config_vector = Self::vector(inner, v as u16),
            (common::STATUS, 1) => self.set_status(inner, v as u8),
            (common::Q_SELECT, 2) => inner.st.queue_sel = u32::from(v as u16),
            // An out-of-range size is kept as 0, which enabling the queue then refuses.
            (common::Q_SIZE, 2) => Core::idle_regs(&mut inner.st, sel, |r| r.size = v as u16),
            (common::Q_MSIX, 2) => {
                let vector = Self::vector(inner, v as u16);
                if let Some(q) = inner.queue_vectors.get_mut(sel) {
                    *q = vector;
                }
            }
            (common::Q_ENABLE, 2) => with_irq!(self, inner, |st, irq| self.core.set_queue_ready(st, irq, sel, u32::from(v as u16))),
            (common::Q_DESCLO, 4) => Core::idle_regs(&mut inner.st, sel, |r| set_low(&mut r.desc, v32)),
            (common::Q_DESCHI, 4) => Core::idle_regs(&mut inner.st, sel, |r| set_high(&mut r.desc, v32)),
            (common::Q_AVAILLO, 4) => Core::idle_regs(&mut inner.st, sel, |r| set_low(&mut r.driver, v32)),
            (common::Q_AVAILHI, 4) => Core::idle_regs(&mut inner.st, sel, |r| set_high(&mut r.driver, v32)),
            (common::Q_USEDLO, 4) => Core::idle_regs(&mut inner.st, sel, |r| set_low(&mut r.device, v32)),
            (common::Q_USEDHI, 4) => Core::idle_regs(&mut inner.st, sel, |r| set_high(&mut r.device, v32)),
            (common::Q_DESCLO, 8) => Core::idle_regs(&mut inner.st, sel, |r| r.desc = v),
            (common::Q_AVAILLO, 8) => Core::idle_regs(&mut inner.st, sel, |r| r.driver = v),
            (common::Q_USEDLO, 8) => Core::idle_regs(&mut inner.st, sel, |r| r.device = v),
            _ => {}
        }
    }

    fn set_status(&self, inner: &mut Inner, v: u8) {
        with_irq!(self, &mut *inner, |st, irq| self.core.set_status(st, irq, u32::from(v)));
        if v == 0 {
            self.reset_transport(inner);
        }
    }

    /// The virtio reset's transport part (the PCI function's own state stays).
    fn reset_transport(&self, inner: &mut Inner) {
        inner.isr = 0;
        inner.config_vector = NO_VECTOR;
        inner.queue_vectors.fill(NO_VECTOR);
        self.reset_queue_sizes(inner);
    }

    /// Power-up state: the device reset, configuration space and MSI-X as at boot.
    fn reset_function(&self, inner: &mut Inner) {
        self.core.reset(&mut inner.st);
        self.reset_transport(inner);
        for v in 0..inner.msix.len() {
            let _ = self.kvm.set_msi_route(self.first_gsi + v as u32, None);
        }
        inner.msix = Msix::new(inner.msix.len());
        inner.config = self.initial.clone();
        self.place_notifiers(inner);
    }

    pub fn state(&self) -> VirtioPciState {
        let mut inner = self.lock();
        let core = with_irq!(self, &mut *inner, |st, irq| self.core.state(st, irq));
        VirtioPciState {
            version: PCI_STATE_VERSION,
            config: inner.config.bytes().to_vec(),
            msix: inner.msix.state(),
            isr: inner.isr,
            config_vector: inner.config_vector,
            queue_vectors: inner.queue_vectors.clone(),
            core,
        }
    }

    /// Restores a state from [`Self::state`], checked as untrusted input: one that does
    /// not fit changes nothing, or (a bad queue or device part) leaves the function reset.
    pub fn restore(&self, s: &VirtioPciState) -> Result<(), VirtioError> {
        if s.version != PCI_STATE_VERSION {
            return Err(VirtioError::Version { found: s.version, expected: PCI_STATE_VERSION });
        }
        self.core.check(&s.core)?;
        if s.queue_vectors.len() != self.queue_count() {
            return Err(VirtioError::QueueCount { found: s.queue_vectors.len(), expected: self.queue_count() });
        }
        let mut config = self.initial.clone();
        config.restore(&s.config).map_err(VirtioError::Device)?;
        let mut msix = Msix::new(self.irqfds.len());
        msix.restore(&s.msix).map_err(VirtioError::Device)?;
        let mut inner = self.lock();
        self.reset_function(&mut inner);
        if let Err(e) = self.core.restore(&mut inner.st, &s.core) {
            self.reset_function(&mut inner);
            return Err(e);
        }
        inner.config = config;
        inner.msix = msix;
        inner.isr = s.isr & 3;
        inner.config_vector = Self::vector(&inner, s.config_vector);
        for (q, &v) in s.queue_vectors.iter().enumerate() {
            let v = Self::vector(&inner, v);
            if let Some(slot) = inner.queue_vectors.get_mut(q) {
                *slot = v;
            }
        }
        self.sync_all_vectors(&mut inner);
        self.place_notifiers(&mut inner);
        Ok(())
    }
}

fn notify_addr(base: u64, q: usize) -> u64 {
    base.wrapping_add(NOTIFY).wrapping_add(q as u64 * u64::from(NOTIFY_MULTIPLIER))
}

impl BusDevice for VirtioPci {
    /// A configuration-space read (the PCI root passes offsets inside one dword).
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.config_read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.config_write(offset, data);
    }

    fn state(&self) -> DeviceState {
        DeviceState::VirtioPci(Box::new(VirtioPci::state(self)))
    }

    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::VirtioPci(s) => VirtioPci::restore(self, s).map_err(|e| RestoreError::Invalid { device: "virtio-pci", reason: e.to_string() }),
            other => Err(RestoreError::wrong_kind(other, "virtio-pci")),
        }
    }

    fn reset(&self) {
        let mut inner = self.lock();
        self.reset_function(&mut inner);
    }
}

impl PciFunction for VirtioPci {
    fn bar_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let mut inner = self.lock();
        let Some(offset) = Self::bar_offset(&inner, addr, data.len()) else { return false };
        self.bar_access_read(&mut inner, offset, data);
        true
    }

    fn bar_write(&self, addr: u64, data: &[u8]) -> bool {
        let mut inner = self.lock();
        let Some(offset) = Self::bar_offset(&inner, addr, data.len()) else { return false };
        self.bar_access_write(&mut inner, offset, data);
        true
    }
}
