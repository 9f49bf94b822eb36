//! The I/O bus: every port-I/O and MMIO exit goes from KVM's decoded exit through
//! here to a device. A sorted range table, looked up by binary search; no allocation
//! and no bus-wide lock on the exit path (devices are `Sync` and lock what they must
//! themselves, so a hot device such as the PM timer needs no lock at all).
//!
//! A device may declare part of its range coalescable: writes there may wait in KVM's
//! coalesced ring (devices/coalesced.rs) until the next exit. `Buses` drains the ring
//! on every exit before dispatch, and before any read of a device with such a range.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::coalesced::{CoalescedRing, CoalescedWrite};
use super::doorbell::Doorbells;
use super::state::{DeviceState, RestoreError};

/// A device on a bus. `offset` is relative to the start of the range the device was
/// inserted at; `data` is the access (1, 2, 4 or 8 bytes, little-endian).
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);

    /// String I/O (`rep outs`): `data` holds `data.len() / size` accesses of `size`
    /// bytes each, all to the same offset. Devices that can take a whole buffer at
    /// once (the serial port) override this; the default is a bounded loop.
    fn write_string(&self, offset: u64, size: usize, data: &[u8]) {
        if size == 0 {
            return;
        }
        for chunk in data.chunks(size) {
            self.write(offset, chunk);
        }
    }

    /// A doorbell in the device's range was written (devices/doorbell.rs): the value
    /// is not known, only that the guest wrote. Devices that declare a doorbell
    /// range must not need the value; the default is a write of 0.
    fn doorbell(&self, offset: u64) {
        self.write(offset, &[0]);
    }

    /// The device's state (devices/state.rs), for a snapshot. No default: a device
    /// that forgot this would be missing from every snapshot.
    fn state(&self) -> DeviceState;

    /// Takes back a state `state` returned (from a snapshot file: checked here).
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError>;

    /// The machine is being reset (an in-place reboot): go back to power-up state.
    /// Battery-backed state (the CMOS RAM and clock) survives, as on a PC.
    fn reset(&self) {}

    /// String input (`rep ins`): fills `data` with `data.len() / size` reads.
    fn read_string(&self, offset: u64, size: usize, data: &mut [u8]) {
        if size == 0 {
            return;
        }
        for chunk in data.chunks_mut(size) {
            self.read(offset, chunk);
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} overlaps an existing device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("range {base:#x}+{len:#x} is not inside one device's range")]
    NotInDevice { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    /// Last address covered, inclusive (so a range may end at u64::MAX).
    last: u64,
    device: Arc<dyn BusDevice>,
    /// Part of the range is coalescable: flush the ring before reading the device.
    flush_on_read: bool,
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    /// Sorted by `base`, non-overlapping.
    entries: Vec<Entry>,
    /// Accesses no device claimed: reads return all ones, writes are dropped.
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
    /// Ranges whose writes may be deferred: (base, len), in insertion order.
    coalescable: Vec<(u64, u64)>,
    /// Deferred writes delivered from the coalesced ring.
    coalesced_writes: AtomicU64,
    /// Doorbell ranges (writes whose value the device ignores): (base, len).
    doorbells: Vec<(u64, u64)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device covering `[base, base + len)`.
    pub fn insert(&mut self, device: Arc<dyn BusDevice>, base: u64, len: u64) -> Result<(), BusError> {
        let last = len
            .checked_sub(1)
            .and_then(|l| base.checked_add(l))
            .ok_or(BusError::BadRange { base, len })?;
        let pos = self.entries.partition_point(|e| e.base < base);
        let clash = |e: &Entry| e.base <= last && base <= e.last;
        for neighbour in [pos.checked_sub(1), Some(pos)].into_iter().flatten() {
            if let Some(e) = self.entries.get(neighbour).filter(|e| clash(e)) {
                return Err(BusError::Overlap { base, len, other: e.base });
            }
        }
        self.entries.insert(pos, Entry { base, last, device, flush_on_read: false });
        Ok(())
    }

    /// Declares `[base, base + len)`, inside one device's range, coalescable: the
    /// device accepts that writes there arrive late (at the next exit of any vCPU),
    /// as long as it sees them before anything else the guest does to it after them.
    pub fn mark_coalescable(&mut self, base: u64, len: u64) -> Result<(), BusError> {
        let i = self.entry_containing(base, len)?;
        if let Some(entry) = self.entries.get_mut(i) {
            entry.flush_on_read = true;
        }
        self.coalescable.push((base, len));
        Ok(())
    }

    /// The index of the one device whose range holds all of `[base, base + len)`.
    fn entry_containing(&self, base: u64, len: u64) -> Result<usize, BusError> {
        let last = len
            .checked_sub(1)
            .and_then(|l| base.checked_add(l))
            .ok_or(BusError::BadRange { base, len })?;
        let pos = self.entries.partition_point(|e| e.base <= base);
        pos.checked_sub(1)
            .filter(|&i| self.entries.get(i).is_some_and(|e| last <= e.last))
            .ok_or(BusError::NotInDevice { base, len })
    }

    /// Declares `[base, base + len)`, inside one device's range, a doorbell: the
    /// device needs to know that the guest wrote there, not what (BusDevice::doorbell).
    /// skiff then has KVM signal an eventfd instead of exiting (devices/doorbell.rs).
    pub fn mark_doorbell(&mut self, base: u64, len: u64) -> Result<(), BusError> {
        self.entry_containing(base, len)?;
        self.doorbells.push((base, len));
        Ok(())
    }

    /// The doorbell ranges, each with its device and the offset into it.
    pub fn doorbells(&self) -> Vec<(u64, Arc<dyn BusDevice>, u64)> {
        self.doorbells
            .iter()
            .filter_map(|&(base, len)| self.lookup(base, len as usize).map(|(d, off)| (base, d.clone(), off)))
            .collect()
    }

    /// The ranges to register with KVM as coalesced zones.
    pub fn coalescable(&self) -> &[(u64, u64)] {
        &self.coalescable
    }

    /// Deferred writes delivered so far.
    pub fn coalesced_writes(&self) -> u64 {
        self.coalesced_writes.load(Ordering::Relaxed)
    }

    /// Delivers one write from the coalesced ring.
    fn write_coalesced(&self, w: &CoalescedWrite) {
        self.coalesced_writes.fetch_add(1, Ordering::Relaxed);
        self.write(w.addr, w.data());
    }

    /// Resets every device on the bus.
    pub fn reset_devices(&self) {
        for e in &self.entries {
            e.device.reset();
        }
    }

    /// The device covering `addr` and the offset into it, if the whole access of
    /// `len` bytes falls inside its range.
    #[inline]
    pub fn lookup(&self, addr: u64, len: usize) -> Option<(&Arc<dyn BusDevice>, u64)> {
        self.entry(addr, len).map(|e| (&e.device, addr - e.base))
    }

    #[inline]
    fn entry(&self, addr: u64, len: usize) -> Option<&Entry> {
        let pos = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(pos.checked_sub(1)?)?;
        let end = addr.checked_add((len as u64).saturating_sub(1))?;
        if end > entry.last {
            return None;
        }
        Some(entry)
    }

    /// Whether a read at `addr` must wait for the coalesced ring to drain.
    #[cfg(test)]
    fn read_needs_flush(&self, addr: u64, len: usize) -> bool {
        !self.coalescable.is_empty() && self.entry(addr, len).is_some_and(|e| e.flush_on_read)
    }

    /// Dispatches a read; returns whether a device claimed it.
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.read_after(addr, data, || {})
    }

    /// A read that first calls `flush` if the device has a coalescable range (one
    /// lookup for both).
    #[inline]
    fn read_after(&self, addr: u64, data: &mut [u8], flush: impl FnOnce()) -> bool {
        match self.entry(addr, data.len()) {
            Some(e) => {
                if e.flush_on_read {
                    flush();
                }
                e.device.read(addr - e.base, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a write; returns whether a device claimed it.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((dev, offset)) => {
                dev.write(offset, data);
                true
            }
            None => {
                self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Port string output: `count` accesses of `size` bytes in one buffer.
    pub fn write_string(&self, addr: u64, size: usize, data: &[u8]) -> bool {
        match self.lookup(addr, size) {
            Some((dev, offset)) => {
                dev.write_string(offset, size, data);
                true
            }
            None => {
                self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Port string input.
    pub fn read_string(&self, addr: u64, size: usize, data: &mut [u8]) -> bool {
        self.read_string_after(addr, size, data, || {})
    }

    fn read_string_after(&self, addr: u64, size: usize, data: &mut [u8], flush: impl FnOnce()) -> bool {
        match self.entry(addr, size) {
            Some(e) => {
                if e.flush_on_read {
                    flush();
                }
                e.device.read_string(addr - e.base, size, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn unclaimed(&self) -> (u64, u64) {
        (
            self.unclaimed_reads.load(Ordering::Relaxed),
            self.unclaimed_writes.load(Ordering::Relaxed),
        )
    }
}

/// Both address spaces of a machine, and the coalesced ring that feeds them.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
    /// Set once KVM took at least one coalesced zone.
    ring: OnceLock<CoalescedRing>,
    /// Set once KVM took at least one doorbell (ioeventfd).
    doorbells: OnceLock<Doorbells>,
}

impl Buses {
    /// Attaches the VM's coalesced ring (once); gives it back if one is attached.
    pub fn attach_ring(&self, ring: CoalescedRing) -> Result<(), CoalescedRing> {
        self.ring.set(ring)
    }

    /// Attaches the machine's registered doorbells (once).
    pub fn attach_doorbells(&self, bells: Doorbells) -> Result<(), Doorbells> {
        self.doorbells.set(bells)
    }

    /// The attached doorbells, for the event loop.
    pub fn doorbell_set(&self) -> Option<&Doorbells> {
        self.doorbells.get()
    }

    /// Rings every doorbell written so far (when the vCPUs have stopped).
    pub fn drain_doorbells(&self) -> u64 {
        self.doorbells.get().map_or(0, Doorbells::drain)
    }

    /// Guest writes that rang a doorbell instead of exiting.
    pub fn doorbells_rung(&self) -> u64 {
        self.doorbells.get().map_or(0, Doorbells::rung)
    }

    pub fn coalescing(&self) -> bool {
        self.ring.get().is_some()
    }

    /// Delivers every deferred write to its device, oldest first. Called after every
    /// KVM_RUN and at stop; without a ring, or with an empty one, it costs a load or two.
    #[inline]
    pub fn flush_coalesced(&self) -> u64 {
        match self.ring.get() {
            Some(ring) => ring.drain(|w| if w.pio { self.pio.write_coalesced(&w) } else { self.mmio.write_coalesced(&w) }),
            None => 0,
        }
    }

    /// A port read, after the ring is flushed if the device takes deferred writes.
    #[inline]
    pub fn pio_read(&self, port: u64, data: &mut [u8]) -> bool {
        self.pio.read_after(port, data, || {
            self.flush_coalesced();
        })
    }

    /// Port string input, flushed likewise.
    pub fn pio_read_string(&self, port: u64, size: usize, data: &mut [u8]) -> bool {
        self.pio.read_string_after(port, size, data, || {
            self.flush_coalesced();
        })
    }

    /// An MMIO read, flushed likewise.
    #[inline]
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.mmio.read_after(addr, data, || {
            self.flush_coalesced();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
        /// Reads and writes in order: ('r' | 'w', offset).
        order: Mutex<Vec<(char, u64)>>,
    }
    impl BusDevice for Recorder {
        fn state(&self) -> DeviceState {
            DeviceState::None
        }
        fn restore(&self, _: &DeviceState) -> Result<(), RestoreError> {
            Ok(())
        }
        fn read(&self, offset: u64, data: &mut [u8]) {
            self.order.lock().unwrap().push(('r', offset));
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.order.lock().unwrap().push(('w', offset));
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn coalescable_ranges_lie_inside_one_device() {
        let mut bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(dev.clone(), 0x70, 2).unwrap();
        bus.insert(dev.clone(), 0x80, 1).unwrap();
        assert_eq!(bus.mark_coalescable(0x71, 2), Err(BusError::NotInDevice { base: 0x71, len: 2 }));
        assert_eq!(bus.mark_coalescable(0x6f, 1), Err(BusError::NotInDevice { base: 0x6f, len: 1 }));
        assert_eq!(bus.mark_coalescable(0x81, 1), Err(BusError::NotInDevice { base: 0x81, len: 1 }));
        assert!(matches!(bus.mark_coalescable(0x70, 0), Err(BusError::BadRange { .. })));
        bus.mark_coalescable(0x70, 1).unwrap();
        bus.mark_coalescable(0x80, 1).unwrap();
        assert_eq!(bus.coalescable(), &[(0x70, 1), (0x80, 1)]);
        assert!(bus.read_needs_flush(0x71, 1), "a read anywhere in the device flushes");
        assert!(!Bus::new().read_needs_flush(0x71, 1));
        // Doorbells obey the same rule and find their device.
        assert_eq!(bus.mark_doorbell(0x7f, 2), Err(BusError::NotInDevice { base: 0x7f, len: 2 }));
        bus.mark_doorbell(0x71, 1).unwrap();
        let bells = bus.doorbells();
        assert_eq!(bells.len(), 1);
        assert_eq!((bells[0].0, bells[0].2), (0x71, 1));
    }

    /// Deferred writes reach the device before a later read of it, in order, and are
    /// counted; a read of a device without coalescable ranges does not flush.
    #[test]
    fn flush_before_reading_a_coalescing_device() {
        let mut buses = Buses::default();
        let rtc = Arc::new(Recorder::default());
        let other = Arc::new(Recorder::default());
        buses.pio.insert(rtc.clone(), 0x70, 2).unwrap();
        buses.pio.insert(other.clone(), 0x3f8, 8).unwrap();
        buses.mmio.insert(other.clone(), 0xd000_0000, 0x1000).unwrap();
        buses.pio.mark_coalescable(0x70, 1).unwrap();
        let ring = crate::devices::coalesced::CoalescedRing::anonymous().unwrap();
        assert!(ring.push(true, 0x70, &[0x0a]));
        assert!(ring.push(false, 0xd000_0010, &[1, 2, 3, 4]));
        assert!(ring.push(true, 0x70, &[0x0b]));
        assert!(buses.attach_ring(ring).is_ok());
        assert!(buses.coalescing());

        let mut d = [0u8; 1];
        assert!(buses.pio_read(0x3fd, &mut d));
        assert!(rtc.order.lock().unwrap().is_empty(), "no flush for a device without coalescable ranges");

        assert!(buses.pio_read(0x71, &mut d));
        assert_eq!(*rtc.order.lock().unwrap(), vec![('w', 0), ('w', 0), ('r', 1)]);
        assert_eq!(rtc.writes.lock().unwrap()[1], (0, vec![0x0b]));
        assert_eq!(other.writes.lock().unwrap()[0], (0x10, vec![1, 2, 3, 4]));
        assert_eq!(buses.pio.coalesced_writes(), 2);
        assert_eq!(buses.mmio.coalesced_writes(), 1);
        assert_eq!(buses.flush_coalesced(), 0);
    }

    #[test]
    fn lookup_edges_and_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 0x10).unwrap();
        // Overlaps on either side and containment are refused.
        assert!(matches!(bus.insert(a.clone(), 0x3f0, 9), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(a.clone(), 0x3ff, 2), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(a.clone(), 0x3f9, 1), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(a.clone(), 0x300, 0x200), Err(BusError::Overlap { .. })));
        assert_eq!(bus.insert(a.clone(), 0x10, 0), Err(BusError::BadRange { base: 0x10, len: 0 }));
        assert!(bus.insert(a.clone(), u64::MAX, 2).is_err());
        // Adjacent ranges are fine; a range may end at the top of the space.
        bus.insert(a.clone(), 0x3f0, 8).unwrap();
        bus.insert(a.clone(), u64::MAX, 1).unwrap();
        assert!(bus.lookup(u64::MAX, 1).is_some());

        assert_eq!(bus.lookup(0x3f8, 1).map(|(_, o)| o), Some(0));
        assert_eq!(bus.lookup(0x3ff, 1).map(|(_, o)| o), Some(7));
        assert!(bus.lookup(0x3ff, 2).is_none(), "access running off the end");
        assert!(bus.lookup(0x3f7, 1).is_some());
        assert!(bus.lookup(0x3e0, 1).is_none());
        assert!(bus.lookup(0x410, 1).is_none());
        assert_eq!(bus.lookup(0x40f, 1).map(|(_, o)| o), Some(0xf));
        assert!(bus.lookup(0, 1).is_none());
    }

    #[test]
    fn unclaimed_accesses() {
        let bus = Bus::new();
        let mut d = [0u8; 4];
        assert!(!bus.read(0x1234, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.write(0x1234, &[1]));
        assert_eq!(bus.unclaimed(), (1, 1));
    }

    #[test]
    fn string_io_splits_by_size() {
        let mut bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(dev.clone(), 0x80, 4).unwrap();
        assert!(bus.write_string(0x81, 2, &[1, 2, 3, 4, 5, 6]));
        let w = dev.writes.lock().unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], (1, vec![1, 2]));
        assert_eq!(w[2], (1, vec![5, 6]));
        drop(w);
        let mut buf = [0u8; 4];
        assert!(bus.read_string(0x83, 1, &mut buf));
        assert_eq!(buf, [3; 4]);
    }
}
