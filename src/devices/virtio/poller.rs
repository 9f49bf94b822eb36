//! A device's own epoll set, watched by the machine's event loop as one backend fd.
//!
//! The event loop takes a device's backend fds once, when the machine is built, and
//! watches them level-triggered. A network device needs more than that: its TAP must
//! not be watched while the guest has posted no receive buffers (a readable TAP with
//! nowhere to put the frame would wake the loop forever), and a vsock device opens and
//! closes Unix connections as the guest and the host come and go. So each such device
//! keeps an epoll set of its own, whose fd is readable while any member is ready, and
//! changes its members as it likes; the event loop sees one fixed fd.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub struct Poller {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl Poller {
    /// `capacity`: the most events one [`Self::ready`] returns (the rest wait for the next).
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        Ok(Poller { epoll: Epoll::new()?, events: vec![EpollEvent::default(); capacity.max(1)] })
    }

    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Watches `fd` for `events` (EventSet::EDGE_TRIGGERED allowed), reported as `token`.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stops watching `fd` (closing it does that too).
    pub fn remove(&self, fd: RawFd) {
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// The members ready now, without waiting: (token, events).
    pub fn ready(&mut self) -> Vec<(u64, EventSet)> {
        let n = self.epoll.wait(0, &mut self.events).unwrap_or(0);
        self.events.iter().take(n).map(|e| (e.data(), e.event_set())).collect()
    }
}
