//! Small PC devices: the 0xcf9 reset control register, the POST-code port 0x80,
//! and skiff's boot-marker port.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::BusDevice;
use super::state::{DeviceState, RestoreError};
use crate::control::{Control, StopReason};

/// The PCI reset control register at 0xcf9: writing bit 2 (RST_CPU) resets the
/// machine; bit 1 (SYS_RST) picks hard over soft, which is the same thing here.
pub struct ResetControl {
    control: Arc<Control>,
    value: AtomicU8,
    source: &'static str,
}

impl ResetControl {
    pub fn new(control: Arc<Control>, source: &'static str) -> Self {
        Self { control, value: AtomicU8::new(0), source }
    }
}

impl BusDevice for ResetControl {
    fn state(&self) -> DeviceState {
        DeviceState::ResetControl { value: self.value.load(Ordering::Relaxed) }
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            // RST_CPU is never kept (a write of it resets at once).
            DeviceState::ResetControl { value } => {
                self.value.store(value & !0x04, Ordering::Relaxed);
                Ok(())
            }
            other => Err(RestoreError::wrong_kind(other, "reset-control")),
        }
    }
    fn reset(&self) {
        self.value.store(0, Ordering::Relaxed);
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value.load(Ordering::Relaxed);
        }
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        self.value.store(v & !0x04, Ordering::Relaxed);
        if v & 0x04 != 0 {
            self.control.request_stop(StopReason::Reboot(self.source));
        }
    }
}

/// Port 0x80: firmware and kernels write progress codes (and Linux's `outb_p` writes
/// it as a delay). The last code is kept for diagnostics.
#[derive(Default)]
pub struct PostPort {
    pub last: AtomicU8,
}

impl BusDevice for PostPort {
    fn state(&self) -> DeviceState {
        DeviceState::PostPort { last: self.last.load(Ordering::Relaxed) }
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::PostPort { last } => {
                self.last.store(*last, Ordering::Relaxed);
                Ok(())
            }
            other => Err(RestoreError::wrong_kind(other, "post-port")),
        }
    }
    fn reset(&self) {
        self.last.store(0, Ordering::Relaxed);
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(self.last.load(Ordering::Relaxed));
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            self.last.store(b, Ordering::Relaxed);
        }
    }
}

/// skiff's boot-marker port: the default guest's /init writes a byte here first
/// thing, and skiff notes the time (the boot reached user space): the first boot's
/// time, and the latest boot's (cleared at every in-place reset).
#[derive(Default)]
pub struct BootMarker {
    pub reached: Arc<OnceLock<Instant>>,
    pub this_boot: Mutex<Option<Instant>>,
}

impl BusDevice for BootMarker {
    fn state(&self) -> DeviceState {
        DeviceState::BootMarker
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::BootMarker => Ok(()),
            other => Err(RestoreError::wrong_kind(other, "boot-marker")),
        }
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {
        let now = Instant::now();
        self.reached.get_or_init(|| now);
        self.this_boot.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(now);
    }
    fn reset(&self) {
        *self.this_boot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl BootMarker {
    /// When the current boot reached the marker, if it has.
    pub fn this_boot(&self) -> Option<Instant> {
        *self.this_boot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cf9_needs_rst_cpu_bit() {
        let c = Arc::new(Control::new());
        let dev = ResetControl::new(c.clone(), "0xcf9");
        dev.write(0, &[0x02]);
        let mut v = [0u8];
        dev.read(0, &mut v);
        assert_eq!(v[0], 0x02);
        assert!(!c.stopping());
        dev.write(0, &[0x06]);
        assert_eq!(c.reason(), Some(StopReason::Reboot("0xcf9")));
    }

    #[test]
    fn marker_records_first_write_only() {
        let m = BootMarker::default();
        assert!(m.reached.get().is_none());
        m.write(0, &[0x7b]);
        let t = *m.reached.get().unwrap();
        m.write(0, &[0x7b]);
        assert_eq!(*m.reached.get().unwrap(), t);
        assert_eq!(m.this_boot(), Some(t));
        m.reset();
        assert_eq!(m.this_boot(), None, "a reset starts a new boot");
        m.write(0, &[0x7b]);
        assert!(m.this_boot().is_some_and(|b| b >= t));
        assert_eq!(*m.reached.get().unwrap(), t, "the first boot's time stays");
    }
}
