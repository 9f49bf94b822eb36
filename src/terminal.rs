//! Raw terminal mode for the guest console, restored when the guard drops, and the
//! signals that stop skiff cleanly.

use std::sync::Mutex;

/// The terminal settings to put back, shared with the signal handler.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

pub struct RawMode;

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal. Keystrokes (Ctrl-C included) go to
    /// the guest.
    pub fn enter_if_tty() -> Option<RawMode> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid tty fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        let mut raw = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so guest "\n" still returns the carriage.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: valid fd and a fully initialized termios.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        Some(RawMode)
    }
}

fn restore() {
    if let Ok(saved) = SAVED.try_lock()
        && let Some(t) = saved.as_ref()
    {
        // SAFETY: restoring settings read earlier from the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the terminal before a panic's message (the release profile aborts on
/// panic, so no guard would run).
pub fn restore_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        default(info);
    }));
}

/// How long after the first stop signal further ones are the same request. GNU
/// `timeout` signals the child and then its whole process group, and a shell may pass
/// one Ctrl-C to several processes: these repeats come within milliseconds.
const GRACE_NS: u64 = 2_000_000_000;

/// CLOCK_MONOTONIC at the first stop signal, in ns (0: none yet).
static FIRST_STOP_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime is async-signal-safe and fills the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// First SIGTERM/SIGHUP/SIGINT: ask skiff to stop cleanly (in whatever phase it is), so
/// statistics and profiles are still written and the terminal restored on the normal
/// path. Another within [`GRACE_NS`] is the same request. One after that (the clean
/// stop did not end skiff): restore the terminal and die of the signal at once.
extern "C" fn on_stop_signal(sig: libc::c_int) {
    use std::sync::atomic::Ordering;
    let now = monotonic_ns().max(1);
    match FIRST_STOP_NS.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => {
            skiff::control::STOP_SIGNAL.store(sig, Ordering::SeqCst);
            skiff::control::wake_event_loop();
        }
        Err(first) if now.saturating_sub(first) < GRACE_NS => {}
        Err(_) => {
            restore();
            // SAFETY: resetting to the default action and re-raising ends the process
            // with the signal's usual status.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
        }
    }
}

extern "C" fn on_check_translate_signal(_: libc::c_int) {
    skiff::control::CHECK_TRANSLATE_SIGNAL.store(true, std::sync::atomic::Ordering::SeqCst);
    skiff::control::wake_event_loop();
}

/// Installs the stop-signal handlers, first thing in main (Ctrl-C reaches the guest
/// instead when the console is in raw mode, since the terminal then sends no SIGINT).
pub fn install_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only uses atomics and async-signal-safe calls
        // (clock_gettime, tcsetattr, signal, raise) plus an uncontended try_lock.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    // SIGUSR1: the page walker's self-check against KVM_TRANSLATE on every vCPU.
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_check_translate_signal as *const () as libc::sighandler_t) };
}
