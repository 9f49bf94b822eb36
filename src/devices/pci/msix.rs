//! MSI-X: the vector table (16 bytes an entry: address low, address high, data,
//! vector control) and the pending-bit array, with the capability's two control bits
//! (MSI-X Enable, Function Mask). A vector is masked by its own mask bit, the function
//! mask, or MSI-X being off; a message raised while masked sets its pending bit and is
//! delivered when the vector is unmasked. This module only keeps that state: the
//! transport asks it what to do and delivers (virtio/pci.rs).

use crate::devices::virtio::state::{MsixEntryState, MsixState};

/// One table entry's size.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: masked.
const ENTRY_MASKED: u32 = 1;
/// Message Control bits the guest writes.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Most vectors one function may have (the table size field is 11 bits).
pub const MAX_VECTORS: usize = 2048;

/// An MSI message: where the device writes, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

pub struct Msix {
    s: MsixState,
}

impl Msix {
    /// `n` vectors (1..=2048), each masked, MSI-X off: the state at reset.
    pub fn new(n: usize) -> Self {
        let n = n.clamp(1, MAX_VECTORS);
        let entry = MsixEntryState { control: ENTRY_MASKED, ..Default::default() };
        Msix { s: MsixState { enabled: false, function_masked: false, table: vec![entry; n], pending: vec![false; n] } }
    }

    pub fn len(&self) -> usize {
        self.s.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.s.table.is_empty()
    }

    /// The Message Control word: table size - 1 and the two control bits.
    pub fn control(&self) -> u16 {
        let mut c = (self.len() - 1) as u16;
        if self.s.enabled {
            c |= CONTROL_ENABLE;
        }
        if self.s.function_masked {
            c |= CONTROL_FUNCTION_MASK;
        }
        c
    }

    pub fn enabled(&self) -> bool {
        self.s.enabled
    }

    /// The guest wrote Message Control.
    pub fn set_control(&mut self, v: u16) {
        self.s.enabled = v & CONTROL_ENABLE != 0;
        self.s.function_masked = v & CONTROL_FUNCTION_MASK != 0;
    }

    /// Whether vector `v` may not send now (a vector that does not exist never may).
    pub fn masked(&self, v: usize) -> bool {
        match self.s.table.get(v) {
            Some(e) => !self.s.enabled || self.s.function_masked || e.control & ENTRY_MASKED != 0,
            None => true,
        }
    }

    pub fn message(&self, v: usize) -> Option<MsiMessage> {
        let e = self.s.table.get(v)?;
        Some(MsiMessage { addr: u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32), data: e.data })
    }

    pub fn pending(&self, v: usize) -> bool {
        self.s.pending.get(v).copied().unwrap_or(false)
    }

    pub fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(p) = self.s.pending.get_mut(v) {
            *p = on;
        }
    }

    /// A table read: 4 or 8 bytes, aligned; anything else (or past the table) reads 0.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let dwords = match data.len() {
            4 | 8 if offset.is_multiple_of(data.len() as u64) => data.len() / 4,
            _ => return,
        };
        for (i, chunk) in data.chunks_mut(4).enumerate().take(dwords) {
            let at = offset + 4 * i as u64;
            if let Some(v) = self.table_dword(at) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    fn table_dword(&self, at: u64) -> Option<u32> {
        let e = self.s.table.get(usize::try_from(at / ENTRY_SIZE).ok()?)?;
        Some(match at % ENTRY_SIZE {
            0 => e.addr_lo,
            4 => e.addr_hi,
            8 => e.data,
            _ => e.control,
        })
    }

    /// A table write (4 or 8 bytes, aligned). Returns the vector it touched.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return None;
        }
        let mut touched = None;
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let v = u32::from_le_bytes(<[u8; 4]>::try_from(chunk).ok()?);
            let index = usize::try_from(at / ENTRY_SIZE).ok()?;
            let e = self.s.table.get_mut(index)?;
            match at % ENTRY_SIZE {
                0 => e.addr_lo = v & !3,
                4 => e.addr_hi = v,
                8 => e.data = v,
                _ => e.control = v & ENTRY_MASKED,
            }
            touched = Some(index);
        }
        touched
    }

    /// A pending-bit array read: 4 or 8 bytes, aligned (writes to it are ignored).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize).saturating_add(i).saturating_mul(8);
            for bit in 0..8 {
                if self.pending(first.saturating_add(bit)) {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    /// Bytes the pending-bit array takes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.len() as u64).div_ceil(64) * 8
    }

    pub fn state(&self) -> MsixState {
        self.s.clone()
    }

    /// Takes back a snapshot's MSI-X state (its table must be this one's size).
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        if s.table.len() != self.len() || s.pending.len() != self.len() {
            return Err(format!("MSI-X table of {} vectors, this function has {}", s.table.len(), self.len()));
        }
        self.s = s.clone();
        for e in &mut self.s.table {
            e.addr_lo &= !3;
            e.control &= ENTRY_MASKED;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(m: &Msix, at: u64) -> u32 {
        let mut b = [0u8; 4];
        m.table_read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn table_entries_read_back_and_reset_masked() {
        let mut m = Msix::new(3);
        assert_eq!(m.control(), 2);
        assert_eq!(read(&m, 12), 1, "masked at reset");
        assert_eq!(m.table_write(16, &0xfee0_100fu32.to_le_bytes()), Some(1));
        m.table_write(20, &7u32.to_le_bytes());
        m.table_write(24, &0x4041u32.to_le_bytes());
        m.table_write(28, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read(&m, 16), 0xfee0_100c, "address is dword aligned");
        assert_eq!(read(&m, 28), 1, "only the mask bit is kept");
        assert_eq!(m.message(1), Some(MsiMessage { addr: 0x7_fee0_100c, data: 0x4041 }));
        // An 8-byte access covers two dwords.
        m.table_write(32, &0x0000_0001_fee0_2000u64.to_le_bytes());
        let mut q = [0u8; 8];
        m.table_read(32, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0000_0001_fee0_2000);
    }

    #[test]
    fn hostile_table_accesses_are_ignored() {
        let mut m = Msix::new(2);
        assert_eq!(m.table_write(32, &[1, 2, 3, 4]), None, "past the table");
        assert_eq!(m.table_write(u64::MAX - 3, &[1, 2, 3, 4]), None);
        assert_eq!(m.table_write(2, &[1, 2, 3, 4]), None, "misaligned");
        assert_eq!(m.table_write(0, &[1, 2]), None, "2 bytes");
        assert_eq!(m.table_write(8, &[0; 8]), Some(0));
        let mut b = [0xaau8; 4];
        m.table_read(u64::MAX - 3, &mut b);
        assert_eq!(b, [0; 4]);
        let mut one = [0xaau8; 1];
        m.table_read(0, &mut one);
        assert_eq!(one, [0]);
        assert!(m.masked(7) && m.message(7).is_none() && !m.pending(7));
        m.set_pending(7, true);
        m.pba_read(u64::MAX - 7, &mut [0u8; 8]);
        assert!(m.restore(&Msix::new(3).state()).is_err());
    }

    #[test]
    fn masks_enable_and_pending_bits() {
        let mut m = Msix::new(70);
        assert_eq!(m.pba_size(), 16);
        m.table_write(12, &0u32.to_le_bytes());
        assert!(m.masked(0), "MSI-X is off");
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.masked(0), "function mask");
        assert_eq!(m.control(), 69 | CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.set_control(CONTROL_ENABLE);
        assert!(!m.masked(0));
        assert!(m.masked(1), "its own mask bit");
        m.set_pending(1, true);
        m.set_pending(65, true);
        let mut b = [0u8; 8];
        m.pba_read(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 2);
        let mut d = [0u8; 4];
        m.pba_read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 2);
        let s = m.state();
        let mut back = Msix::new(70);
        back.restore(&s).unwrap();
        assert_eq!(back.state(), s);
    }
}
