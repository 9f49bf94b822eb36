//! The ACPI fixed-hardware power-management block named in the FADT: PM1 event
//! (status/enable), PM1 control (where `poweroff` lands as SLP_TYP=S5 with SLP_EN), and
//! the PM timer, a free-running 24-bit counter at 3.579545 MHz read from the host
//! clock without a lock (seed 001's hot timer port).

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;

use super::BusDevice;
use super::state::{DeviceState, RestoreError};
use crate::control::{Control, StopReason};
use crate::vmm::layout::{PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT, SLP_TYP_S5};

pub const PM_TIMER_HZ: u128 = 3_579_545;
/// PM1 control bits.
const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
/// PM1 status: write-one-to-clear.
const WAK_STS: u16 = 1 << 15;

const CNT_OFFSET: u64 = (PM1A_CNT_PORT - PM1A_EVT_PORT) as u64;
const TMR_OFFSET: u64 = (PM_TMR_PORT - PM1A_EVT_PORT) as u64;
/// The block's length from PM1a_EVT through the end of the timer.
pub const PM_BLOCK_LEN: u64 = TMR_OFFSET + 4;

pub struct PmBlock {
    control: Arc<Control>,
    status: AtomicU16,
    enable: AtomicU16,
    pm1_control: AtomicU16,
    epoch: Instant,
}

impl PmBlock {
    pub fn new(control: Arc<Control>) -> Self {
        Self {
            control,
            status: AtomicU16::new(0),
            enable: AtomicU16::new(0),
            // ACPI mode is always on: there is no SMI command port to switch it.
            pm1_control: AtomicU16::new(SCI_EN),
            epoch: Instant::now(),
        }
    }

    /// The timer's current 24-bit value.
    pub fn timer(&self) -> u32 {
        let ns = self.epoch.elapsed().as_nanos();
        ((ns * PM_TIMER_HZ / 1_000_000_000) & 0x00ff_ffff) as u32
    }
}

fn put(data: &mut [u8], value: u32, byte_offset: usize) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(byte_offset + i).copied().unwrap_or(0);
    }
}

fn get(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (dst, src) in b.iter_mut().zip(data) {
        *dst = *src;
    }
    u32::from_le_bytes(b)
}

impl BusDevice for PmBlock {
    fn state(&self) -> DeviceState {
        DeviceState::Pm(crate::devices::state::PmRegs {
            status: self.status.load(Ordering::Relaxed),
            enable: self.enable.load(Ordering::Relaxed),
            control: self.pm1_control.load(Ordering::Relaxed),
        })
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        let DeviceState::Pm(regs) = state else { return Err(RestoreError::wrong_kind(state, "pm")) };
        self.status.store(regs.status, Ordering::Relaxed);
        self.enable.store(regs.enable, Ordering::Relaxed);
        // As a guest write would leave it: SCI_EN on, SLP_EN never latched.
        self.pm1_control.store((regs.control & !SLP_EN) | SCI_EN, Ordering::Relaxed);
        Ok(())
    }
    fn reset(&self) {
        self.status.store(0, Ordering::Relaxed);
        self.enable.store(0, Ordering::Relaxed);
        self.pm1_control.store(SCI_EN, Ordering::Relaxed);
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let v = self.status.load(Ordering::Relaxed) as u32
                    | (self.enable.load(Ordering::Relaxed) as u32) << 16;
                put(data, v, offset as usize);
            }
            CNT_OFFSET..=0x5 => {
                let v = self.pm1_control.load(Ordering::Relaxed) as u32;
                put(data, v, (offset - CNT_OFFSET) as usize);
            }
            TMR_OFFSET..=0xb => put(data, self.timer(), (offset - TMR_OFFSET) as usize),
            _ => data.fill(0),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let v = get(data);
        match (offset, data.len()) {
            (0, _) => {
                // Status bits are write-one-to-clear; a 4-byte write also sets enable.
                self.status.fetch_and(!(v as u16), Ordering::Relaxed);
                if data.len() == 4 {
                    self.enable.store((v >> 16) as u16, Ordering::Relaxed);
                }
            }
            (2, _) => self.enable.store(v as u16, Ordering::Relaxed),
            (CNT_OFFSET, _) => {
                let v = v as u16;
                // SCI_EN stays set; SLP_EN is write-only.
                self.pm1_control.store((v & !SLP_EN) | SCI_EN, Ordering::Relaxed);
                if v & SLP_EN != 0 {
                    let slp_typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                    if slp_typ == SLP_TYP_S5 as u16 {
                        self.control.request_stop(StopReason::Poweroff);
                    } else {
                        // Other sleep states are not offered (no \_S1.._S4 in the DSDT);
                        // waking at once is what a guest that tries sees.
                        self.status.fetch_or(WAK_STS, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poweroff_on_s5() {
        let c = Arc::new(Control::new());
        let pm = PmBlock::new(c.clone());
        let mut cnt = [0u8; 2];
        pm.read(CNT_OFFSET, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & SCI_EN, SCI_EN);
        // SLP_TYP=5 without SLP_EN does nothing.
        pm.write(CNT_OFFSET, &((5u16 << 10) | 1).to_le_bytes());
        assert!(!c.stopping());
        // S1 with SLP_EN: not a poweroff.
        pm.write(CNT_OFFSET, &((1u16 << 10) | SLP_EN).to_le_bytes());
        assert!(!c.stopping());
        pm.write(CNT_OFFSET, &((5u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(c.reason(), Some(StopReason::Poweroff));
    }

    #[test]
    fn timer_runs_at_acpi_rate() {
        let pm = PmBlock::new(Arc::new(Control::new()));
        let mut a = [0u8; 4];
        let started = std::time::Instant::now();
        pm.read(TMR_OFFSET, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut b = [0u8; 4];
        pm.read(TMR_OFFSET, &mut b);
        let elapsed = started.elapsed().as_secs_f64();
        // The 24-bit counter wraps every 4.7 s: a longer stall would hide ticks.
        assert!(elapsed < 4.0, "the test thread stalled {elapsed} s");
        let delta = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a)) & 0xff_ffff;
        // At least the 20 ms slept (71,591 ticks), at most the time that really
        // passed (however late this thread was scheduled again), both at 3.579545 MHz.
        let most = (elapsed * 3_579_545.0) as u32 + 100;
        assert!((71_000..=most).contains(&delta), "delta {delta}, {elapsed} s passed");
        assert_eq!(u32::from_le_bytes(b) & 0xff00_0000, 0);
    }

    #[test]
    fn status_write_one_to_clear() {
        let pm = PmBlock::new(Arc::new(Control::new()));
        pm.status.store(WAK_STS | 1, Ordering::Relaxed);
        pm.write(0, &WAK_STS.to_le_bytes());
        assert_eq!(pm.status.load(Ordering::Relaxed), 1);
        pm.write(2, &0x0100u16.to_le_bytes());
        let mut v = [0u8; 4];
        pm.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 1 | (0x0100 << 16));
    }
}
