//! A split ring for any queue of a device (the [`Driver`] drives queue 0 alone), for
//! devices with several queues (net, vsock).

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;

pub struct Vq {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Vq {
    /// Queue `index` laid out at `base` (16 KiB: table, available ring, used ring).
    pub fn new(index: u16, size: u16, base: u64) -> Vq {
        Vq { index, size, desc: base, avail: base + 0x1000, used: base + 0x2000, next_desc: 0, avail_idx: 0, last_used: 0 }
    }

    /// Programs the queue and sets QueueReady.
    pub fn setup(&self, d: &Driver) {
        d.mem.write_slice(&[0u8; 0x3000], GuestAddress(self.desc)).unwrap();
        d.write(0x30, u32::from(self.index));
        d.write(0x38, u32::from(self.size));
        for (reg, addr) in [(0x80, self.desc), (0x90, self.avail), (0xa0, self.used)] {
            d.write(reg, addr as u32);
            d.write(reg + 4, (addr >> 32) as u32);
        }
        d.write(0x44, 1);
        assert_eq!(d.read(0x44), 1, "queue {} not ready", self.index);
    }

    /// The descriptor index the next chain starts at.
    pub fn next_head(&self) -> u16 {
        self.next_desc
    }

    pub fn chain(&mut self, d: &Driver, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (n, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let more = n + 1 < bufs.len();
            let flags = if writable { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 };
            d.put_desc(self.desc, i, addr, len, flags, self.next_desc);
        }
        head
    }

    pub fn make_available(&mut self, d: &Driver, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        d.mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        d.mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Chains `bufs`, makes the chain available and notifies.
    pub fn submit(&mut self, d: &Driver, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.chain(d, bufs);
        self.make_available(d, head);
        d.mmio.notify(self.index);
        head
    }

    /// The next used entry if there is one now.
    pub fn used(&mut self, d: &Driver) -> Option<(u32, u32)> {
        let idx: u16 = d.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let id: u32 = d.mem.read_obj(GuestAddress(self.used + 4 + 8 * slot)).unwrap();
        let len: u32 = d.mem.read_obj(GuestAddress(self.used + 8 + 8 * slot)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// The next used entry, running the device's backends until it comes (or `limit`).
    pub fn wait_used(&mut self, d: &Driver, limit: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(u) = self.used(d) {
                return Some(u);
            }
            if Instant::now() > deadline {
                return None;
            }
            d.poll_backends(Duration::from_millis(10));
        }
    }
}
