//! The 16550 UART at COM1 (vm-superio's model), wired to skiff's stdin/stdout, with
//! its interrupt delivered through an irqfd (no user-space interrupt injection).
//!
//! Guest output goes through a bounded queue to a writer thread, the only place that
//! writes the console: a console nobody reads blocks the writer thread, then (the
//! queue full) the guest's vCPUs, and never anything a stop needs. A vCPU waits for
//! room after it has released the UART's lock, and stops waiting as soon as the
//! machine is stopping, so nothing the guest wrote is dropped and a stop never waits
//! on the console. A console that cannot be written at all (a closed pipe, an I/O
//! error) is what a production VMM treats it as: the guest keeps running and its
//! further output is discarded, with one line on stderr saying so.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use super::state::{DeviceState, RestoreError};
use crate::control::Control;

/// Raises the serial interrupt by writing the irqfd KVM listens on.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals an eventfd when the guest has read the receive FIFO empty: the event loop
/// then feeds it the host input that did not fit before (no polling for room).
pub struct RoomSignal(EventFd);

impl SerialEvents for RoomSignal {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// Guest output queued beyond this makes the writing vCPU wait for room.
pub const QUEUE_CAP: usize = 64 << 10;
/// What the queue may hold at most: a vCPU queues one exit's output (at most a page
/// of string I/O) before it waits, and does not wait while the machine stops. Past
/// this, output is discarded and counted (a safety net, not a path taken).
const QUEUE_HARD_CAP: usize = 4 * QUEUE_CAP;
/// The most the writer thread takes out of the queue for one write.
const WRITE_CHUNK: usize = 16 << 10;
/// How often a vCPU waiting for room looks at whether the machine is stopping.
const ROOM_POLL: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Queue {
    bytes: VecDeque<u8>,
    /// The writer thread is in write() with bytes already taken from `bytes`.
    writing: bool,
    /// Bytes the console has taken (progress, for the drain at the end).
    written: u64,
    /// The console failed; from then on output is discarded.
    failed: bool,
    /// Output discarded (console failed, or the hard cap reached).
    discarded: u64,
    /// The writer thread ends once the queue is empty.
    closing: bool,
    /// A drain gave up on this console: later ones do not wait again.
    abandoned: bool,
}

/// The console's queue and its writer thread, shared by the UART (through
/// [`ConsoleOut`]) and the VMM (to drain it at the end).
pub struct Console {
    queue: Mutex<Queue>,
    /// Signalled by the writer when it made room or failed.
    room: Condvar,
    /// Signalled by producers when there is something to write, and at close.
    work: Condvar,
}

impl Console {
    /// Starts the writer thread on `sink`.
    pub fn start(sink: Box<dyn Write + Send>) -> io::Result<Arc<Console>> {
        let console = Arc::new(Console { queue: Mutex::default(), room: Condvar::new(), work: Condvar::new() });
        let c = console.clone();
        std::thread::Builder::new().name("skiff-console".into()).spawn(move || c.writer(sink))?;
        Ok(console)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn writer(&self, mut sink: Box<dyn Write + Send>) {
        let mut chunk = Vec::with_capacity(WRITE_CHUNK);
        loop {
            {
                let mut q = self.lock();
                while q.bytes.is_empty() && !q.closing {
                    q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                if q.bytes.is_empty() {
                    return;
                }
                let n = q.bytes.len().min(WRITE_CHUNK);
                chunk.clear();
                chunk.extend(q.bytes.drain(..n));
                q.writing = true;
            }
            // No lock is held while the console takes its time.
            let result = sink.write_all(&chunk).and_then(|()| sink.flush());
            let failed = {
                let mut q = self.lock();
                q.writing = false;
                match &result {
                    Ok(()) => q.written += chunk.len() as u64,
                    Err(_) => {
                        q.failed = true;
                        q.discarded += (chunk.len() + q.bytes.len()) as u64;
                        q.bytes.clear();
                    }
                }
                result.err()
            };
            self.room.notify_all();
            if let Some(e) = failed {
                crate::output::stderr(&format!(
                    "\r\nskiff: writing the guest console to stdout: {e}; the guest runs on and its further output is discarded\r\n"
                ));
                // Nothing more will be written: discard whatever comes, until closed.
                let mut q = self.lock();
                while !q.closing {
                    q.discarded += q.bytes.len() as u64;
                    q.bytes.clear();
                    q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                return;
            }
        }
    }

    /// Queues guest output without waiting (the caller may hold the UART's lock).
    fn push(&self, buf: &[u8]) {
        let mut q = self.lock();
        if q.failed || q.bytes.len() + buf.len() > QUEUE_HARD_CAP {
            q.discarded += buf.len() as u64;
            return;
        }
        q.bytes.extend(buf);
    }

    /// Wakes the writer thread for what was queued.
    fn kick_writer(&self) {
        self.work.notify_one();
    }

    /// Waits (with no other lock held) until the queue is below its cap, or until
    /// `stopping` says the machine is stopping.
    fn wait_for_room(&self, stopping: impl Fn() -> bool) {
        let mut q = self.lock();
        while !q.failed && q.bytes.len() > QUEUE_CAP && !stopping() {
            q = self.room.wait_timeout(q, ROOM_POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits until everything queued is written, as long as the console keeps taking
    /// bytes: gives up when it takes none for `stall`. Returns how many bytes are left
    /// unwritten (0: all of it; discarded output counts too).
    pub fn drain(&self, stall: Duration) -> u64 {
        let mut q = self.lock();
        let mut last = (q.written, Instant::now());
        loop {
            if q.failed || (q.bytes.is_empty() && !q.writing) {
                return q.discarded;
            }
            if q.abandoned {
                return q.discarded + q.bytes.len() as u64;
            }
            if q.written != last.0 {
                last = (q.written, Instant::now());
            }
            let left = stall.saturating_sub(last.1.elapsed());
            if left.is_zero() {
                q.abandoned = true;
                return q.discarded + q.bytes.len() as u64;
            }
            self.work.notify_one();
            q = self.room.wait_timeout(q, left.min(ROOM_POLL)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Ends the writer thread once the queue is empty (at once if the console failed;
    /// a writer blocked in write() ends with the process).
    pub fn close(&self) {
        self.lock().closing = true;
        self.work.notify_all();
    }
}

/// The UART's output: into the console's queue, with the moment of its first byte
/// recorded (the kernel's first console output, for boot timing).
pub struct ConsoleOut {
    console: Arc<Console>,
    pub first_byte: Arc<OnceLock<Instant>>,
    pub bytes: Arc<AtomicU64>,
}

impl ConsoleOut {
    pub fn new(console: Arc<Console>) -> Self {
        Self { console, first_byte: Arc::default(), bytes: Arc::default() }
    }

    /// Another handle on the same output (the UART model is rebuilt at a reset).
    pub fn handle(&self) -> Self {
        Self { console: self.console.clone(), first_byte: self.first_byte.clone(), bytes: self.bytes.clone() }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            self.first_byte.get_or_init(Instant::now);
            self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.console.push(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.console.kick_writer();
        Ok(())
    }
}

type Uart = Serial<IrqTrigger, RoomSignal, ConsoleOut>;

pub struct SerialDevice {
    uart: Mutex<Uart>,
    /// The interrupt line, for rebuilding the UART at a reset.
    irq: EventFd,
    /// Written when the guest emptied the receive FIFO (see [`RoomSignal`]).
    room: EventFd,
    console: Arc<Console>,
    /// Whether the machine is stopping: a vCPU then stops waiting for console room.
    control: Arc<Control>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOut, control: Arc<Control>) -> io::Result<Self> {
        let line = irq.try_clone()?;
        let console = out.console.clone();
        let room = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        let uart = Serial::with_events(IrqTrigger(line), RoomSignal(room.try_clone()?), out);
        Ok(Self { uart: Mutex::new(uart), irq, room, console, control })
    }

    /// The eventfd written when the guest emptied the receive FIFO.
    pub fn room(&self) -> &EventFd {
        &self.room
    }

    /// A UART model with `regs`, on the same interrupt line, room signal and output.
    fn rebuilt(&self, uart: &mut Uart, regs: &vm_superio::serial::SerialState) -> Result<Uart, String> {
        let line = self.irq.try_clone().map_err(|e| format!("interrupt line: {e}"))?;
        let room = self.room.try_clone().map_err(|e| format!("room signal: {e}"))?;
        let out = uart.writer_mut().handle();
        // vm-superio refuses a receive FIFO longer than the UART's.
        Serial::from_state(regs, IrqTrigger(line), RoomSignal(room), out).map_err(|e| format!("{e:?}"))
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
    fn state(&self) -> DeviceState {
        let s = self.uart.lock().unwrap_or_else(|e| e.into_inner()).state();
        DeviceState::Serial(crate::devices::state::SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        let DeviceState::Serial(r) = state else { return Err(RestoreError::wrong_kind(state, "serial")) };
        let regs = vm_superio::serial::SerialState {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer.clone(),
        };
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        *uart = self.rebuilt(&mut uart, &regs).map_err(|reason| RestoreError::Invalid { device: "serial", reason })?;
        Ok(())
    }
    /// Back to the UART's power-up registers (and an empty FIFO); output continues to
    /// the same place.
    fn reset(&self) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        // The default state is always valid; only a failed fd dup can fail here.
        if let Ok(fresh) = self.rebuilt(&mut uart, &Default::default()) {
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
    /// and one flush. Then, with the lock released, the vCPU waits while the console
    /// is behind (the guest blocks on a console nobody reads; a stop ends the wait).
    fn write_string(&self, offset: u64, size: usize, data: &[u8]) {
        {
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
        self.console.wait_for_room(|| self.control.stopping());
    }
}

/// Host input for the guest's UART, fed from the event loop: stdin is read when it is
/// readable and the receive FIFO has room for it; what does not fit waits until the
/// guest has read the FIFO empty (the room signal), and stdin is not read meanwhile.
pub struct StdinFeed {
    serial: Arc<SerialDevice>,
    /// Read from stdin, not yet taken by the UART.
    pending: Vec<u8>,
    eof: bool,
}

impl StdinFeed {
    pub fn new(serial: Arc<SerialDevice>) -> Self {
        Self { serial, pending: Vec::new(), eof: false }
    }

    /// stdin is readable: reads once and feeds the UART. Returns whether to go on
    /// watching stdin (not at its end, nor while input waits for room).
    pub fn on_stdin(&mut self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        let mut buf = [0u8; 256];
        // SAFETY: reads at most `buf.len()` bytes into the live local buffer.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) => self.eof = true,
            Ok(n) => self.pending.extend_from_slice(buf.get(..n).unwrap_or(&[])),
            Err(_) => {
                let e = io::Error::last_os_error().kind();
                // A spurious wake-up; anything else ends the input as EOF would.
                if !matches!(e, io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) {
                    self.eof = true;
                }
            }
        }
        self.push();
        !self.eof && self.pending.is_empty()
    }

    /// The guest emptied the FIFO: feeds what waits. Returns whether stdin can be
    /// watched again.
    pub fn on_room(&mut self) -> bool {
        let _ = self.serial.room.read();
        self.push();
        !self.eof && self.pending.is_empty()
    }

    fn push(&mut self) {
        let taken = self.serial.enqueue_input(&self.pending);
        self.pending.drain(..taken.min(self.pending.len()));
    }
}

/// Copies host stdin into the serial port until stdin closes, on a thread of its own:
/// for a stdin epoll cannot watch (a regular file, /dev/null). Waits for FIFO room
/// instead of dropping input.
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
    use crate::control::StopReason;

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

    fn device(sink: Box<dyn Write + Send>) -> (SerialDevice, Arc<Console>, Arc<OnceLock<Instant>>, EventFd, Arc<Control>) {
        let console = Console::start(sink).unwrap();
        let out = ConsoleOut::new(console.clone());
        let first = out.first_byte.clone();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let control = Arc::new(Control::new());
        let dev = SerialDevice::new(evt.try_clone().unwrap(), out, control.clone()).unwrap();
        (dev, console, first, evt, control)
    }

    #[test]
    fn transmit_string_and_receive() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (dev, console, first, evt, _control) = device(Box::new(Shared(buf.clone())));
        dev.write_string(0, 1, b"hello");
        dev.write(0, b"!");
        assert_eq!(console.drain(Duration::from_secs(5)), 0);
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
        assert_eq!(console.drain(Duration::from_secs(5)), 0);
        assert_eq!(&*buf.lock().unwrap(), b"hello!?");
        console.close();
    }

    /// A console whose every write blocks until released (a pipe nobody reads).
    struct Stuck(std::sync::mpsc::Receiver<()>);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` on a thread; whether it finished within `secs`.
    fn finishes_within(secs: u64, f: impl FnOnce() + Send + 'static) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(secs)).is_ok()
    }

    #[test]
    fn a_console_nobody_reads_blocks_the_guest_not_the_stop() {
        let (_release, blocked) = std::sync::mpsc::channel();
        let (dev, console, _, _, control) = device(Box::new(Stuck(blocked)));
        let dev = Arc::new(dev);
        // The guest writes more than the queue takes: its vCPU waits for room.
        let vcpu = {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for _ in 0..(2 * QUEUE_CAP / 4096) {
                    dev.write_string(0, 1, &[b'x'; 4096]);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!vcpu.is_finished(), "the guest should block on a full console");
        // The console is written with no lock held: the UART stays usable (host input,
        // register reads) while the vCPU waits and the writer is stuck in write().
        let d = dev.clone();
        assert!(finishes_within(5, move || {
            d.enqueue_input(b"a");
            let mut lsr = [0u8];
            d.read(5, &mut lsr);
        }), "the UART's lock is held while the console is written");
        // A stop ends the wait at once; nothing was dropped on the way.
        control.request_stop(StopReason::Poweroff);
        let t = Instant::now();
        assert!(finishes_within(5, move || vcpu.join().unwrap()), "the vCPU still waits on the console after a stop");
        // The wait looks every ROOM_POLL (10 ms); the bound leaves room for a loaded
        // host's scheduling, not for a missed stop (which finishes_within catches).
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(console.lock().discarded, 0);
        // The drain gives up on a console that takes nothing, and says how much is left.
        let t = Instant::now();
        let left = console.drain(Duration::from_millis(300));
        assert!(left > QUEUE_CAP as u64, "{left}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // And does not wait a second time.
        let t = Instant::now();
        assert_eq!(console.drain(Duration::from_secs(10)), left);
        // The wait looks every ROOM_POLL (10 ms); the bound leaves room for a loaded
        // host's scheduling, not for a missed stop (which finishes_within catches).
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn a_closed_console_discards_and_the_guest_runs_on() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::EPIPE))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (dev, console, _, _, _control) = device(Box::new(Closed));
        let dev = Arc::new(dev);
        let d = dev.clone();
        assert!(finishes_within(10, move || {
            for _ in 0..(4 * QUEUE_CAP / 4096) {
                d.write_string(0, 1, &[b'x'; 4096]);
            }
        }), "the guest blocked on a closed console");
        assert!(console.drain(Duration::from_secs(1)) > 0);
        console.close();
    }
}
