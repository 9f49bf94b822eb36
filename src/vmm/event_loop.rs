//! The one event loop for everything that is not a vCPU: doorbells and virtio queue
//! notifications (ioeventfds), device backend completions, the profiler's timer, and a
//! wake-up eventfd that stop requests and signal handlers write (control.rs). It
//! blocks in epoll_wait until one of them is ready: nothing polls on a tick.
//!
//! Signals reach it through that wake-up eventfd, written by the handlers main.rs
//! installs, rather than a signalfd: a second SIGTERM must still end skiff at once
//! when the loop itself is stuck, which only a handler can do.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

/// What a ready fd means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A stop request or a signal (control.rs): look at the machine's control.
    Wake,
    /// The profiler's 100 Hz timer: kick every vCPU for a sample.
    ProfileTick,
    /// Doorbell `i` of the port bus (devices/doorbell.rs).
    Doorbell(usize),
    /// Queue `queue` of virtio device `device` was notified (ioeventfd).
    Queue { device: usize, queue: u16 },
    /// Backend fd `index` of virtio device `device` is ready (completions).
    Backend { device: usize, index: usize },
    /// Host input for the guest's serial port.
    Stdin,
    /// The guest emptied the serial port's receive FIFO.
    SerialRoom,
    /// The control API's socket has work (api/server.rs).
    Api,
}

/// The process's wake-up eventfd: created once, never closed, because a signal
/// handler may write to it at any moment (a closed fd number could be reused).
static WAKE: OnceLock<EventFd> = OnceLock::new();

pub struct EventLoop {
    epoll: Epoll,
    /// The wake-up eventfd this loop consumes: the process's, except in unit tests,
    /// which run in parallel in one process and must not see each other's wake-ups.
    wake: &'static EventFd,
    sources: Vec<Source>,
    timer: Option<TimerFd>,
    events: Vec<EpollEvent>,
}

impl EventLoop {
    pub fn new() -> std::io::Result<Self> {
        let wake = match WAKE.get() {
            Some(w) => w,
            None => {
                let fd = EventFd::new(EFD_NONBLOCK)?;
                WAKE.get_or_init(|| fd)
            }
        };
        crate::control::set_wake_fd(wake.as_raw_fd());
        let lp = Self::with_wake(wake)?;
        // A request made before the loop existed (a signal during the build) is not lost.
        crate::control::wake_event_loop();
        Ok(lp)
    }

    fn with_wake(wake: &'static EventFd) -> std::io::Result<Self> {
        let mut lp = EventLoop { epoll: Epoll::new()?, wake, sources: Vec::new(), timer: None, events: vec![EpollEvent::default(); 64] };
        lp.add(wake.as_raw_fd(), Source::Wake)?;
        Ok(lp)
    }

    /// Watches `fd` (kept open by its owner for as long as the loop lives). A source
    /// watched again after [`Self::remove`] keeps its token, so the table never grows.
    pub fn add(&mut self, fd: RawFd, source: Source) -> std::io::Result<()> {
        let token = match self.sources.iter().position(|s| *s == source) {
            Some(i) => i,
            None => self.sources.len(),
        };
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token as u64))?;
        if token == self.sources.len() {
            self.sources.push(source);
        }
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn remove(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Starts the profiler's periodic tick.
    pub fn add_profile_tick(&mut self, every: Duration) -> std::io::Result<()> {
        let mut timer = TimerFd::new()?;
        timer.reset(every, Some(every))?;
        self.add(timer.as_raw_fd(), Source::ProfileTick)?;
        self.timer = Some(timer);
        Ok(())
    }

    /// Blocks until something is ready (or `timeout`, if given); returns what. The
    /// wake-up and timer fds are consumed here; the others by their handlers.
    pub fn wait(&mut self, timeout: Option<Duration>) -> std::io::Result<Vec<Source>> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let n = match self.epoll.wait(ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let mut ready = Vec::with_capacity(n);
        for ev in self.events.iter().take(n) {
            let Some(&source) = usize::try_from(ev.data()).ok().and_then(|i| self.sources.get(i)) else { continue };
            match source {
                Source::Wake => {
                    let _ = self.wake.read();
                }
                Source::ProfileTick => {
                    if let Some(t) = self.timer.as_mut() {
                        let _ = t.wait();
                    }
                }
                _ => {}
            }
            ready.push(source);
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_fd_is_reported_with_its_source_and_wake_ups_are_consumed() {
        // A private wake-up eventfd: other tests in this process wake the global one.
        let wake: &'static EventFd = Box::leak(Box::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut lp = EventLoop::with_wake(wake).unwrap();
        let bell = EventFd::new(EFD_NONBLOCK).unwrap();
        lp.add(bell.as_raw_fd(), Source::Doorbell(3)).unwrap();
        wake.write(1).unwrap();
        assert_eq!(lp.wait(Some(Duration::from_millis(100))).unwrap(), vec![Source::Wake]);
        assert!(lp.wait(Some(Duration::from_millis(10))).unwrap().is_empty(), "the wake-up was consumed");
        bell.write(1).unwrap();
        wake.write(1).unwrap();
        let mut got = lp.wait(Some(Duration::from_millis(100))).unwrap();
        got.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(got, vec![Source::Doorbell(3), Source::Wake]);
    }
}
