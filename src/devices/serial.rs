//! The 16550 UART at COM1 (vm-superio's model), wired to skiff's stdin/stdout, with
//! its interrupt delivered through an irqfd (no user-space interrupt injection).

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// Raises the serial interrupt by writing the irqfd KVM listens on.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest output goes, with the moment of its first byte recorded (the kernel's
/// first console output, for boot timing).
pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    pub first_byte: Arc<OnceLock<Instant>>,
    pub bytes: Arc<AtomicU64>,
}

impl ConsoleOut {
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self { sink, first_byte: Arc::default(), bytes: Arc::default() }
    }

    /// Moves the output out, leaving one that discards (used while the UART model is
    /// rebuilt at a reset).
    fn take(&mut self) -> Self {
        let sink = std::mem::replace(&mut self.sink, Box::new(io::sink()));
        Self { sink, first_byte: self.first_byte.clone(), bytes: self.bytes.clone() }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            self.first_byte.get_or_init(Instant::now);
            self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        self.sink.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

pub struct SerialDevice {
    uart: Mutex<Serial<IrqTrigger, NoEvents, ConsoleOut>>,
    /// The interrupt line, for rebuilding the UART at a reset.
    irq: EventFd,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOut) -> io::Result<Self> {
        let line = irq.try_clone()?;
        Ok(Self { uart: Mutex::new(Serial::new(IrqTrigger(line), out)), irq })
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive
    /// FIFO (the caller retries the rest later).
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    fn offset(offset: u64) -> u8 {
        // The device covers 8 ports, so the offset always fits.
        (offset & 7) as u8
    }
}

impl BusDevice for SerialDevice {
    /// Back to the UART's power-up registers (and an empty FIFO); output continues to
    /// the same place.
    fn reset(&self) {
        let Ok(line) = self.irq.try_clone() else { return };
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let out = uart.writer_mut().take();
        // The default state is always valid, so this cannot fail.
        if let Ok(fresh) = Serial::from_state(&Default::default(), IrqTrigger(line), NoEvents, out) {
            *uart = fresh;
        }
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let v = uart.read(Self::offset(offset));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.write_string(offset, 1, data.get(..1).unwrap_or(&[]));
    }

    /// `rep outsb` to the transmit register hands the whole buffer over under one lock
    /// and one flush.
    fn write_string(&self, offset: u64, size: usize, data: &[u8]) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let off = Self::offset(offset);
        for chunk in data.chunks(size.max(1)) {
            if let Some(&b) = chunk.first() {
                // The only error is a failed interrupt trigger; the byte is taken anyway.
                let _ = uart.write(off, b);
            }
        }
        let _ = uart.writer_mut().flush();
    }
}

/// Copies host stdin into the serial port until stdin closes. Runs on its own thread;
/// waits for FIFO room instead of dropping input.
pub fn spawn_stdin_pump(serial: Arc<SerialDevice>) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("skiff-stdin".into()).spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut stdin = io::stdin().lock();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let taken = serial.enqueue_input(rest);
                rest = rest.get(taken..).unwrap_or(&[]);
                if !rest.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_string_and_receive() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let out = ConsoleOut::new(Box::new(Shared(buf.clone())));
        let first = out.first_byte.clone();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(evt.try_clone().unwrap(), out).unwrap();
        dev.write_string(0, 1, b"hello");
        dev.write(0, b"!");
        assert_eq!(&*buf.lock().unwrap(), b"hello!");
        assert!(first.get().is_some());
        // Enable the receive interrupt (IER bit 0), then feed input.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(evt.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rx = [0u8];
        dev.read(0, &mut rx);
        assert_eq!(rx[0], b'a');

        // A reset empties the FIFO and clears IER; output still reaches the console.
        dev.reset();
        let mut ier = [0xffu8];
        dev.read(1, &mut ier);
        assert_eq!(ier[0], 0);
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "no data after reset");
        dev.write(0, b"?");
        assert_eq!(&*buf.lock().unwrap(), b"hello!?");
    }
}
