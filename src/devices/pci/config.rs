//! A type-0 PCI configuration space (256 bytes): the standard header, a capability
//! list, BARs (sizing by writing all ones, relocation) and the command register.
//! Every byte has a write mask, so a guest write changes only what the device lets it
//! change; BAR sizing falls out of the masks (the size bits are read-only zeros).

/// Bytes of configuration space reached through mechanism #1.
pub const CONFIG_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG: usize = 0x09;
pub const CACHE_LINE: usize = 0x0c;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// Where the capability list starts (the header ends at 0x40).
const FIRST_CAP: usize = 0x40;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAP_LIST: u16 = 1 << 4;
/// BAR low bits: 64-bit memory (type 0b10 in bits 2:1), prefetchable (bit 3).
const BAR_MEM64: u32 = 0b100;
const BAR_PREFETCH: u32 = 0b1000;

/// What identifies a function.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem_id: u16,
}

/// A 64-bit memory BAR (the only kind skiff's functions have).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    /// A power of two, at least 16 bytes and below 4 GiB.
    pub size: u64,
    pub prefetchable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the capability list is full")]
    Full,
    #[error("bad BAR: {0}")]
    BadBar(&'static str),
}

#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    bars: Vec<Bar>,
    /// The last capability's offset (where the next one is linked from).
    last_cap: Option<usize>,
    next_free: usize,
}

impl ConfigSpace {
    pub fn new(h: Header) -> Self {
        let mut c = ConfigSpace { bytes: [0; CONFIG_SIZE], wmask: [0; CONFIG_SIZE], bars: Vec::new(), last_cap: None, next_free: FIRST_CAP };
        c.set_u16(VENDOR_ID, h.vendor);
        c.set_u16(DEVICE_ID, h.device);
        c.set_u8(REVISION, h.revision);
        c.set_u8(CLASS_PROG, h.class as u8);
        c.set_u16(CLASS_PROG + 1, (h.class >> 8) as u16);
        c.set_u16(SUBSYSTEM_VENDOR, h.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, h.subsystem_id);
        let command = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE | (1 << 6) | (1 << 8);
        c.set_mask(COMMAND, &command.to_le_bytes());
        c.set_mask(CACHE_LINE, &[0xff, 0xff]); // cache line size, latency timer
        c.set_mask(INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Lets the guest write the bits of `mask` at `offset`.
    pub fn set_mask(&mut self, offset: usize, mask: &[u8]) {
        if let Some(m) = self.wmask.get_mut(offset..offset + mask.len()) {
            m.copy_from_slice(mask);
        }
    }

    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.set_bytes(offset, &[v]);
    }
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }
    fn set_bytes(&mut self, offset: usize, v: &[u8]) {
        if let Some(b) = self.bytes.get_mut(offset..offset + v.len()) {
            b.copy_from_slice(v);
        }
    }

    pub fn u8_at(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.u8_at(offset), self.u8_at(offset + 1)])
    }
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from(self.u16_at(offset)) | (u32::from(self.u16_at(offset + 2)) << 16)
    }

    /// A guest read: any size at any offset; bytes beyond the space read as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.u8_at(offset.saturating_add(i));
        }
    }

    /// A guest write, through the write masks; bytes beyond the space are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset.saturating_add(i);
            if let (Some(b), Some(&m)) = (self.bytes.get_mut(at), self.wmask.get(at)) {
                *b = (*b & !m) | (v & m);
            }
        }
    }

    /// Declares BAR `index` (and `index + 1`, its high half) a 64-bit memory BAR.
    pub fn add_bar(&mut self, bar: Bar) -> Result<(), ConfigError> {
        if bar.index > 4 || self.bars.iter().any(|b| b.index.abs_diff(bar.index) < 2) {
            return Err(ConfigError::BadBar("index taken or no room for the high half"));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 || bar.size > 1 << 31 {
            return Err(ConfigError::BadBar("size"));
        }
        let at = BAR0 + 4 * bar.index;
        let flags = BAR_MEM64 | if bar.prefetchable { BAR_PREFETCH } else { 0 };
        self.set_u32(at, flags);
        self.set_mask(at, &((!(bar.size - 1) as u32) & !0xf).to_le_bytes());
        self.set_mask(at + 4, &[0xff; 4]);
        self.bars.push(bar);
        Ok(())
    }

    /// Places BAR `index` at `addr` (as firmware does); the size's alignment is kept.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars.iter().find(|b| b.index == index).copied() else { return };
        let at = BAR0 + 4 * index;
        let low = (self.u32_at(at) & 0xf) | (addr as u32 & !(bar.size as u32 - 1) & !0xf);
        self.set_u32(at, low);
        self.set_u32(at + 4, (addr >> 32) as u32);
    }

    /// Where BAR `index` is now: (address, size), if it exists.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let at = BAR0 + 4 * index;
        let addr = u64::from(self.u32_at(at) & !0xf) | (u64::from(self.u32_at(at + 4)) << 32);
        Some((addr, bar.size))
    }

    pub fn memory_enabled(&self) -> bool {
        self.u16_at(COMMAND) & COMMAND_MEMORY != 0
    }

    /// Appends a capability: `body` follows the ID and next-pointer bytes, `wmask` (as
    /// long as `body` or shorter) says what the guest may write in it. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> Result<usize, ConfigError> {
        let at = self.next_free;
        let end = at.checked_add(2 + body.len()).filter(|&e| e <= CONFIG_SIZE).ok_or(ConfigError::Full)?;
        self.set_u8(at, id);
        self.set_u8(at + 1, 0);
        self.set_bytes(at + 2, body);
        self.set_mask(at + 2, wmask);
        match self.last_cap {
            Some(prev) => self.set_u8(prev + 1, at as u8),
            None => {
                self.set_u8(CAPABILITIES, at as u8);
                self.set_u16(STATUS, self.u16_at(STATUS) | STATUS_CAP_LIST);
            }
        }
        self.last_cap = Some(at);
        self.next_free = end.next_multiple_of(4);
        Ok(at)
    }

    /// The whole space, for a snapshot.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes back a snapshot's bytes: only what the guest could have written may differ
    /// from this device's own (anything else is another device's snapshot, or forged).
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), String> {
        if saved.len() != CONFIG_SIZE {
            return Err(format!("configuration space of {} bytes, not {CONFIG_SIZE}", saved.len()));
        }
        for ((&s, &b), &m) in saved.iter().zip(&self.bytes).zip(&self.wmask) {
            if (s ^ b) & !m != 0 {
                return Err("a read-only configuration byte differs".into());
            }
        }
        self.bytes.copy_from_slice(saved);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let h = Header { vendor: 0x1af4, device: 0x1042, revision: 1, class: 0x01_00_00, subsystem_vendor: 0x1af4, subsystem_id: 2 };
        let mut c = ConfigSpace::new(h);
        c.add_bar(Bar { index: 0, size: 0x8000, prefetchable: false }).unwrap();
        c
    }

    fn dword(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_fields_read_back_and_read_only_ones_stay() {
        let mut c = space();
        assert_eq!(dword(&c, 0), 0x1042_1af4);
        assert_eq!(dword(&c, 8), 0x0100_0001);
        assert_eq!(dword(&c, 0x2c), 0x0002_1af4);
        c.write(0, &[0xff; 4]);
        c.write(8, &[0xff; 4]);
        assert_eq!(dword(&c, 0), 0x1042_1af4);
        assert_eq!(dword(&c, 8), 0x0100_0001);
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16_at(COMMAND), 0x0547);
        assert!(c.memory_enabled());
        c.write(COMMAND, &[0]);
        assert!(!c.memory_enabled());
        // Odd sizes and offsets, and past the end.
        let mut b = [0u8; 3];
        c.read(1, &mut b);
        assert_eq!(b, [0x1a, 0x42, 0x10]);
        c.read(254, &mut b);
        assert_eq!(b, [0, 0, 0]);
        c.write(255, &[1, 2, 3]);
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mut c = space();
        c.set_bar_address(0, 0xe000_8000);
        assert_eq!(c.bar(0), Some((0xe000_8000, 0x8000)));
        assert_eq!(dword(&c, BAR0), 0xe000_8004, "64-bit, not prefetchable");
        // Linux sizes each half: all ones in, the size mask out.
        c.write(BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(dword(&c, BAR0), 0xffff_8004);
        c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(dword(&c, BAR0 + 4), u32::MAX);
        // Relocation: a misaligned address keeps the size's alignment.
        c.write(BAR0, &0xe123_4567u32.to_le_bytes());
        c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar(0), Some((0x1_e123_0000, 0x8000)));
        // BAR 2..5 do not exist: all zero, not writable.
        c.write(BAR0 + 8, &u32::MAX.to_le_bytes());
        assert_eq!(dword(&c, BAR0 + 8), 0);
        assert!(c.add_bar(Bar { index: 1, size: 0x1000, prefetchable: false }).is_err());
        assert!(c.add_bar(Bar { index: 5, size: 0x1000, prefetchable: false }).is_err());
        assert!(c.add_bar(Bar { index: 2, size: 0x1001, prefetchable: false }).is_err());
        c.add_bar(Bar { index: 2, size: 0x1000, prefetchable: true }).unwrap();
        assert_eq!(dword(&c, BAR0 + 8), 0xc);
    }

    /// Walks the list as Linux's pci_find_capability does (bounded by 48 hops).
    fn walk(c: &ConfigSpace) -> Vec<(u8, usize)> {
        let mut found = Vec::new();
        if c.u16_at(STATUS) & STATUS_CAP_LIST == 0 {
            return found;
        }
        let mut pos = usize::from(c.u8_at(CAPABILITIES));
        for _ in 0..48 {
            if pos < 0x40 {
                break;
            }
            pos &= !3;
            found.push((c.u8_at(pos), pos));
            pos = usize::from(c.u8_at(pos + 1));
        }
        found
    }

    #[test]
    fn capability_chain_walks_as_linux_walks_it() {
        let mut c = space();
        assert!(walk(&c).is_empty());
        let a = c.add_capability(0x09, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).unwrap();
        let b = c.add_capability(0x11, &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0xc0]).unwrap();
        assert_eq!(walk(&c), vec![(0x09, a), (0x11, b)]);
        assert_eq!(a, 0x40);
        assert_eq!(b % 4, 0);
        // Only the masked bits of a capability are writable; its header never is.
        c.write(b, &[0xff; 4]);
        assert_eq!(c.u32_at(b), 0xc003_0011);
        // The list ends when the space does.
        while c.add_capability(0x09, &[0; 14], &[]).is_ok() {}
        assert_eq!(c.add_capability(0x09, &[0; 14], &[]), Err(ConfigError::Full));
        assert!(walk(&c).len() < 48);
    }

    #[test]
    fn restore_takes_only_writable_differences() {
        let mut c = space();
        c.write(COMMAND, &[0x06]);
        c.write(BAR0, &0xe000_0000u32.to_le_bytes());
        let saved = c.bytes().to_vec();
        let mut fresh = space();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.bytes(), &saved[..]);
        let mut forged = saved.clone();
        forged[0] = 0;
        assert!(space().restore(&forged).is_err());
        assert!(space().restore(&saved[..10]).is_err());
    }
}
