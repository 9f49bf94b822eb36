//! Raw terminal mode for the guest console, restored when the guard drops and also
//! when skiff is ended by a signal.

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
        install_restore_on_signal();
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

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    restore();
    // SAFETY: resetting to the default action and re-raising ends the process with the
    // signal's usual status.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_restore_on_signal() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: the handler only calls async-signal-safe functions (tcsetattr,
        // signal, raise) plus an uncontended try_lock.
        unsafe { libc::signal(sig, on_fatal_signal as *const () as libc::sighandler_t) };
    }
}
