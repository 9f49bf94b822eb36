//! Doorbells: device registers whose writes only say "something happened" (the value
//! does not matter), handled without a vCPU exit to skiff. KVM signals an eventfd for
//! each write (KVM_IOEVENTFD) and the guest runs on; skiff's event loop (vmm/event_loop.rs)
//! waits on the eventfds and rings the device. An exit that skiff would spend microseconds on costs
//! the vCPU only KVM's in-kernel signal. This is what virtio queue notifications use;
//! today the boot-marker port is one.
//!
//! A doorbell may reach its device a few microseconds after the write, on another
//! thread. `Doorbells::drain` is also called whenever every vCPU has stopped, so no
//! ring is lost to a reset or to the end of the run.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::bus::BusDevice;

/// One registered doorbell: the eventfd KVM signals and the device it rings.
pub struct Doorbell {
    pub event: EventFd,
    pub device: Arc<dyn BusDevice>,
    /// Offset into the device's range.
    pub offset: u64,
}

/// Every doorbell of a machine, and how often they rang.
pub struct Doorbells {
    bells: Vec<Doorbell>,
    rung: AtomicU64,
}

impl Doorbells {
    pub fn new(bells: Vec<Doorbell>) -> Self {
        Self { bells, rung: AtomicU64::new(0) }
    }

    /// A fresh non-blocking eventfd for a doorbell.
    pub fn eventfd() -> std::io::Result<EventFd> {
        EventFd::new(EFD_NONBLOCK)
    }

    /// Times a guest write rang a doorbell (writes KVM folded into one signal count
    /// once each: an eventfd adds them up).
    pub fn rung(&self) -> u64 {
        self.rung.load(Ordering::Relaxed)
    }

    /// Rings the device of every doorbell that was written since the last drain; returns
    /// how many writes that covered. Safe to call from several threads: each eventfd
    /// read takes its count atomically, so every write is delivered once.
    pub fn drain(&self) -> u64 {
        let mut total = 0;
        for b in &self.bells {
            // Non-blocking: an unsignalled eventfd returns EAGAIN at once.
            if let Ok(n) = b.event.read() {
                b.device.doorbell(b.offset);
                total += n;
            }
        }
        if total > 0 {
            self.rung.fetch_add(total, Ordering::Relaxed);
        }
        total
    }

    /// The eventfds, in order, for the event loop to watch.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self.bells.iter().map(|b| b.event.as_raw_fd()).collect()
    }

    /// Rings doorbell `i` if it was written (the event loop saw its fd readable).
    pub fn ring(&self, i: usize) -> u64 {
        let Some(b) = self.bells.get(i) else { return 0 };
        match b.event.read() {
            Ok(n) => {
                b.device.doorbell(b.offset);
                self.rung.fetch_add(n, Ordering::Relaxed);
                n
            }
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Bell(Mutex<Vec<u64>>);
    impl BusDevice for Bell {
        fn state(&self) -> crate::devices::state::DeviceState {
            crate::devices::state::DeviceState::None
        }
        fn restore(&self, _: &crate::devices::state::DeviceState) -> Result<(), crate::devices::state::RestoreError> {
            Ok(())
        }
        fn read(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&self, _: u64, _: &[u8]) {}
        fn doorbell(&self, offset: u64) {
            self.0.lock().unwrap().push(offset);
        }
    }

    #[test]
    fn every_write_is_counted_and_the_device_rung() {
        let dev = Arc::new(Bell::default());
        let bells = Doorbells::new(vec![
            Doorbell { event: Doorbells::eventfd().unwrap(), device: dev.clone(), offset: 0 },
            Doorbell { event: Doorbells::eventfd().unwrap(), device: dev.clone(), offset: 4 },
        ]);
        assert_eq!(bells.drain(), 0, "nothing rang yet");
        // What KVM does for three guest writes to the first and one to the second.
        for _ in 0..3 {
            bells.bells[0].event.write(1).unwrap();
        }
        bells.bells[1].event.write(1).unwrap();
        assert_eq!(bells.ring(0) + bells.ring(1), 4);
        assert_eq!(bells.rung(), 4);
        // A signal folds writes together: the device is rung once per drain.
        assert_eq!(*dev.0.lock().unwrap(), vec![0, 4]);
        assert_eq!(bells.drain(), 0, "drained");
        assert_eq!(bells.fds().len(), 2);
    }
}
