//! Tests that drive the transport through its registers, as the guest's driver does,
//! with a split ring laid out in guest memory by [`Driver`].

mod block;
mod hostile;
mod net;
mod vsock;
mod ring;
mod rng;
mod transport;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{VirtioDevice, VirtioMmio};
use crate::devices::BusDevice;

pub const RAM: usize = 4 << 20;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;
/// Where tests put request buffers.
pub const DATA: u64 = 0x10_0000;

pub const ACK: u32 = 1;
pub const DRIVER: u32 = 2;
pub const DRIVER_OK: u32 = 4;
pub const FEATURES_OK: u32 = 8;
pub const NEEDS_RESET: u32 = 0x40;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
pub const VERSION_1: u64 = 1 << 32;
pub const EVENT_IDX: u64 = 1 << 29;
pub const INDIRECT: u64 = 1 << 28;

/// A driver in miniature: one queue (queue 0) at DESC/AVAIL/USED.
pub struct Driver {
    pub mmio: VirtioMmio,
    pub mem: GuestMemoryMmap,
    pub irq: EventFd,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mmio = VirtioMmio::new(device, mem.clone(), irq.try_clone().unwrap()).unwrap();
        Driver { mmio, mem, irq, size: 0, next_desc: 0, avail_idx: 0, last_used: 0 }
    }

    pub fn read(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&self, offset: u64, v: u32) {
        self.mmio.write(offset, &v.to_le_bytes());
    }

    pub fn status(&self) -> u32 {
        self.read(0x70)
    }

    pub fn device_features(&self) -> u64 {
        self.write(0x14, 0);
        let lo = self.read(0x10);
        self.write(0x14, 1);
        u64::from(lo) | (u64::from(self.read(0x10)) << 32)
    }

    /// ACKNOWLEDGE, DRIVER, the features, FEATURES_OK; returns the status read back.
    pub fn negotiate(&self, features: u64) -> u32 {
        self.write(0x70, ACK);
        self.write(0x70, ACK | DRIVER);
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.write(0x70, ACK | DRIVER | FEATURES_OK);
        self.status()
    }

    /// Programs queue 0 and sets QueueReady.
    pub fn setup_queue(&mut self, size: u32, desc: u64, avail: u64, used: u64) {
        self.write(0x30, 0);
        self.write(0x38, size);
        for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(0x44, 1);
        self.size = size as u16;
    }

    /// The whole start-up of a driver; panics if the device refuses.
    pub fn start(&mut self, features: u64, size: u16) {
        assert_ne!(self.negotiate(features) & FEATURES_OK, 0, "features {features:#x} refused");
        // Fresh rings, as a driver allocates them.
        self.mem.write_slice(&[0u8; 0x2000], GuestAddress(AVAIL)).unwrap();
        self.setup_queue(u32::from(size), DESC, AVAIL, USED);
        assert_eq!(self.read(0x44), 1, "queue not ready");
        self.write(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        self.next_desc = 0;
        self.avail_idx = 0;
        self.last_used = 0;
    }

    pub fn put_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + u64::from(i) * 16);
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes `head` available (without notifying).
    pub fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Chains `bufs` (address, length, device-writable) in fresh descriptors; returns the head.
    pub fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (n, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let more = n + 1 < bufs.len();
            let flags = if writable { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 };
            self.put_desc(DESC, i, addr, len, flags, self.next_desc);
        }
        head
    }

    /// Chains `bufs`, makes the chain available and notifies queue 0.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.chain(bufs);
        self.make_available(head);
        self.mmio.notify(0);
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The next used entry (id, len), running the device's backends until it comes;
    /// None after 5 s.
    pub fn wait_used(&mut self) -> Option<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx() == self.last_used {
            if Instant::now() > deadline {
                return None;
            }
            self.poll_backends(Duration::from_millis(10));
        }
        let slot = u64::from(self.last_used % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(USED + 8 + 8 * slot)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Waits up to `timeout` for a backend fd, then runs the readable ones.
    pub fn poll_backends(&self, timeout: Duration) {
        let fds: Vec<RawFd> = self.mmio.backend_fds();
        let mut pfds: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: `pfds` is a live array of pollfd of the given length.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout.as_millis() as i32) };
        for (i, p) in pfds.iter().enumerate() {
            if p.revents & libc::POLLIN != 0 {
                self.mmio.backend_ready(i);
            }
        }
    }

    /// Whether the interrupt was raised since the last call.
    pub fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn fill(&self, addr: u64, len: usize, value: u8) {
        self.mem.write_slice(&vec![value; len], GuestAddress(addr)).unwrap();
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// A file under the temp dir, removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, len: u64) -> TempFile {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("skiff-virtio-{}-{n}-{name}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
