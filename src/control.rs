//! How anything in the machine (a device, a vCPU) asks the machine to stop, and how
//! the vCPUs are told. The first request wins; later ones are ignored until the VMM
//! handles it (an in-place reboot re-arms the machine; anything else ends it).

use std::sync::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, Ordering};

/// Why the machine stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5, or KVM's system-event shutdown).
    Poweroff,
    /// The guest asked for a reset; the string names the path (i8042, 0xcf9, ...).
    Reboot(&'static str),
    /// Something went wrong that skiff cannot continue from; the text says what.
    Error(String),
    /// The guest wrote this value to the exit device (`--exit-device`, QEMU's
    /// isa-debug-exit): skiff ends with status (value << 1) | 1 after a clean stop.
    GuestExit(u32),
}

impl StopReason {
    /// The process exit status a [`StopReason::GuestExit`] of `value` gives: (value <<
    /// 1) | 1, of which a process status keeps the low 8 bits (as QEMU's does).
    pub fn guest_exit_status(value: u32) -> u8 {
        ((value << 1) | 1) as u8
    }
}

/// The signal number that asked skiff to stop (0: none), set from a signal handler
/// and turned into a stop request by the VMM's watcher.
pub static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The event loop's wake-up eventfd (-1 until the loop exists). Signal handlers and
/// stop requests write to it, so the loop learns of them at once instead of polling.
/// A raw fd in an atomic because a signal handler may use nothing else.
static WAKE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Makes `fd` (an eventfd owned by the event loop, open for the rest of the process)
/// the one [`wake_event_loop`] writes to.
pub fn set_wake_fd(fd: std::os::fd::RawFd) {
    WAKE_FD.store(fd, Ordering::SeqCst);
}

/// Wakes the event loop (async-signal-safe: one atomic load and one write(2)).
pub fn wake_event_loop() {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd the loop keeps open
        // for the life of the process; a failure (counter full) still leaves it readable.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// Set from SIGUSR1's handler: every vCPU cross-checks skiff's page walker against
/// KVM_TRANSLATE on its current address space (vcpu/translate_check.rs).
pub static CHECK_TRANSLATE_SIGNAL: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
pub struct Control {
    stopping: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    stopped: Condvar,
    /// Called once when the first stop request arrives, to kick the vCPUs out of
    /// KVM_RUN. Set by the VMM after the vCPU threads exist.
    kicker: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// What a vCPU saw when the machine stopped in a way worth explaining (a triple
    /// fault that ends the run): registers and the instruction at CS:RIP.
    diagnostic: Mutex<Option<String>>,
    /// Bumped for each translator self-check request; each vCPU runs one check per
    /// bump at its next kick.
    translate_checks: std::sync::atomic::AtomicU32,
}

impl Control {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cheap check for the vCPU loop.
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn request_stop(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_some() {
                return;
            }
            *r = Some(reason);
            self.stopping.store(true, Ordering::Release);
        }
        self.stopped.notify_all();
        self.kick();
        wake_event_loop();
    }

    /// Stops the machine with an error, whatever stop was requested before: a reboot
    /// or poweroff in progress cannot go on soundly once this happened (a vCPU thread
    /// gone, a reboot storm). An earlier error stays (it came first).
    pub fn request_fatal(&self, text: String) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*r, Some(StopReason::Error(_))) {
                return;
            }
            *r = Some(StopReason::Error(text));
            self.stopping.store(true, Ordering::Release);
        }
        self.stopped.notify_all();
        self.kick();
        wake_event_loop();
    }

    /// Blocks until a stop has been requested.
    pub fn wait_stopping(&self) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        while r.is_none() {
            r = self.stopped.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Removes the kicker (the threads it signals are about to be joined) and kicks
    /// them one last time, so none stays in KVM_RUN. No kick can reach a joined thread.
    pub fn retire_kicker(&self) {
        let mut k = self.kicker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kick) = k.take() {
            kick();
        }
    }

    /// After an in-place reset: clears a Reboot request so the machine runs again.
    /// Returns false (and keeps the request) if it is anything else, e.g. a stop
    /// signal that arrived during the reset.
    pub fn rearm_after_reboot(&self) -> bool {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*r, Some(StopReason::Reboot(_))) {
            *r = None;
            self.stopping.store(false, Ordering::Release);
            true
        } else {
            false
        }
    }

    pub fn kick(&self) {
        if let Some(kick) = self.kicker.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            kick();
        }
    }

    pub fn set_kicker(&self, kicker: Box<dyn Fn() + Send>) {
        *self.kicker.lock().unwrap_or_else(|e| e.into_inner()) = Some(kicker);
        // A stop may have been requested before the kicker existed.
        if self.stopping() {
            self.kick();
        }
    }

    pub fn set_diagnostic(&self, text: String) {
        self.diagnostic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(text);
    }

    pub fn take_diagnostic(&self) -> Option<String> {
        self.diagnostic.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Asks every vCPU for a translator self-check and kicks them.
    pub fn request_translate_check(&self) {
        self.translate_checks.fetch_add(1, Ordering::AcqRel);
        self.kick();
    }

    pub fn translate_checks(&self) -> u32 {
        self.translate_checks.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn first_request_wins_and_kicks_once() {
        let c = Control::new();
        let kicks = Arc::new(AtomicUsize::new(0));
        let k = kicks.clone();
        c.set_kicker(Box::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(!c.stopping());
        c.request_stop(StopReason::Poweroff);
        c.request_stop(StopReason::Reboot("i8042"));
        assert!(c.stopping());
        assert_eq!(c.reason(), Some(StopReason::Poweroff));
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        c.wait_stopping();
        assert!(!c.rearm_after_reboot(), "a poweroff is not re-armed");
        assert!(c.stopping());
    }

    #[test]
    fn a_fatal_stop_overrides_a_reboot_not_an_error() {
        let c = Control::new();
        c.request_stop(StopReason::Reboot("i8042"));
        c.request_fatal("vCPU 1's thread panicked".into());
        assert_eq!(c.reason(), Some(StopReason::Error("vCPU 1's thread panicked".into())));
        assert!(!c.rearm_after_reboot(), "no reboot after a fatal stop");
        c.request_fatal("later".into());
        assert_eq!(c.reason(), Some(StopReason::Error("vCPU 1's thread panicked".into())));
        let c = Control::new();
        c.request_fatal("storm".into());
        assert!(c.stopping());
        c.wait_stopping();
    }

    #[test]
    fn reboot_rearms_and_kicker_retires() {
        let c = Control::new();
        let kicks = Arc::new(AtomicUsize::new(0));
        let k = kicks.clone();
        c.set_kicker(Box::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }));
        c.request_stop(StopReason::Reboot("i8042"));
        c.retire_kicker();
        assert_eq!(kicks.load(Ordering::SeqCst), 2, "the request's kick and the last one");
        c.kick();
        assert_eq!(kicks.load(Ordering::SeqCst), 2, "no kicks after retiring");
        assert!(c.rearm_after_reboot());
        assert!(!c.stopping());
        assert_eq!(c.reason(), None);
        c.request_stop(StopReason::Poweroff);
        assert_eq!(c.reason(), Some(StopReason::Poweroff));
    }
}
