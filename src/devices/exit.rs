//! The exit-status device (`--exit-device`), compatible with QEMU's isa-debug-exit: a
//! guest write of V to its port ends the machine, and skiff exits with status
//! (V << 1) | 1, after the same clean stop as a poweroff (console drained, terminal
//! restored, `--stats` printed). Test kernels use it to hand their verdict to the
//! process that ran them.

use std::sync::Arc;

use super::BusDevice;
use super::state::{DeviceState, RestoreError};
use crate::control::{Control, StopReason};

pub struct ExitDevice {
    control: Arc<Control>,
    /// How many bytes of a write make the value (1, 2 or 4): the device's I/O size.
    size: usize,
}

impl ExitDevice {
    pub fn new(control: Arc<Control>, size: u8) -> Self {
        Self { control, size: usize::from(size).clamp(1, 4) }
    }
}

impl BusDevice for ExitDevice {
    fn state(&self) -> DeviceState {
        DeviceState::ExitDevice
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::ExitDevice => Ok(()),
            other => Err(RestoreError::wrong_kind(other, "exit-device")),
        }
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// A write at the device's first port of any width: its low `size` bytes are V
    /// (little-endian). Writes to the other ports of its range are ignored.
    fn write(&self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        let mut bytes = [0u8; 4];
        for (dst, src) in bytes.iter_mut().zip(data.iter().take(self.size)) {
            *dst = *src;
        }
        self.control.request_stop(StopReason::GuestExit(u32::from_le_bytes(bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_stops_the_machine_with_its_value() {
        let c = Arc::new(Control::new());
        let d = ExitDevice::new(c.clone(), 1);
        d.write(1, &[5]);
        assert_eq!(c.reason(), None, "only the first port ends the machine");
        d.write(0, &[0x34, 0x12]);
        assert_eq!(c.reason(), Some(StopReason::GuestExit(0x34)), "size 1 takes one byte");
        assert_eq!(StopReason::guest_exit_status(0x34), 0x69);
        let c = Arc::new(Control::new());
        ExitDevice::new(c.clone(), 4).write(0, &[0x01, 0x02, 0x03, 0x04]);
        assert_eq!(c.reason(), Some(StopReason::GuestExit(0x0403_0201)));
        assert_eq!(StopReason::guest_exit_status(0), 1);
        assert_eq!(StopReason::guest_exit_status(0x80), 1, "the low 8 bits of (0x80 << 1) | 1");
        let mut buf = [0xffu8; 2];
        ExitDevice::new(c, 2).read(0, &mut buf);
        assert_eq!(buf, [0, 0]);
    }
}
