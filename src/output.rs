//! skiff's own messages and reports, written so that where they go cannot hurt the
//! process: a closed pipe (EPIPE) is an error value, never a panic (the release
//! profile aborts on panic), and a pipe or terminal nobody reads makes a write give
//! up after [`STALL`] instead of blocking a stop forever. `println!`/`eprintln!` do
//! neither, so skiff does not use them (clippy's `print_stdout`/`print_stderr` lints
//! are denied crate-wide).
//!
//! The guest's console is not written here: it has its own writer thread
//! (devices/serial.rs), so a blocked console blocks only the guest.

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long one message may wait for its reader to make room.
pub const STALL: Duration = Duration::from_secs(1);

/// Serializes messages, so lines from different threads do not interleave.
static STDERR: Mutex<()> = Mutex::new(());
/// Set once a message to stderr gave up waiting: later ones do not wait again (only
/// what fits right away is written), so a stop with many lines to say is not slowed
/// by a second per line.
static STDERR_STALLED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stderr as one message; errors (closed, not read) are dropped,
/// since stderr is where they would be reported.
pub fn stderr(text: &str) {
    let _serial = STDERR.lock().unwrap_or_else(|e| e.into_inner());
    let stall = if STDERR_STALLED.load(Ordering::Relaxed) { Duration::ZERO } else { STALL };
    if let Err(e) = write_fd(libc::STDERR_FILENO, text.as_bytes(), stall)
        && e.kind() == io::ErrorKind::TimedOut
    {
        STDERR_STALLED.store(true, Ordering::Relaxed);
    }
}

/// Writes `text` to stdout, waiting at most [`STALL`] for the reader at a time.
pub fn stdout(text: &str) -> io::Result<()> {
    write_fd(libc::STDOUT_FILENO, text.as_bytes(), STALL)
}

/// Writes all of `bytes` to `fd`, in pieces no larger than a pipe's atomic write, each
/// after poll() says there is room: a blocking fd then never blocks the write itself.
/// Gives up with `TimedOut` when the reader makes no room for `stall`.
pub fn write_fd(fd: RawFd, bytes: &[u8], stall: Duration) -> io::Result<()> {
    const PIECE: usize = 4096; // PIPE_BUF on Linux: a pipe with room takes this at once
    let mut rest = bytes;
    let mut since = Instant::now();
    while !rest.is_empty() {
        let left = stall.saturating_sub(since.elapsed());
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "nobody reads it"));
        }
        let piece = rest.get(..PIECE).unwrap_or(rest);
        // SAFETY: writes from a live slice of `piece.len()` bytes.
        let n = unsafe { libc::write(fd, piece.as_ptr().cast(), piece.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"));
        }
        rest = rest.get(n as usize..).unwrap_or(&[]);
        since = Instant::now();
    }
    Ok(())
}

/// stdout as a plain blocking writer (no std lock, no buffer), for the console's
/// writer thread: it may block in write() for as long as the reader wants.
pub struct RawStdout;

impl io::Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: writes from a live slice of `buf.len()` bytes to fd 1.
            let n = unsafe { libc::write(libc::STDOUT_FILENO, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    }

    fn close(fd: RawFd) {
        // SAFETY: closes an fd this test opened.
        unsafe { libc::close(fd) };
    }

    #[test]
    fn a_closed_pipe_is_an_error_not_a_panic() {
        let (r, w) = pipe();
        close(r);
        let e = write_fd(w, b"hello\n", STALL).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE), "{e}");
        close(w);
    }

    #[test]
    fn a_pipe_nobody_reads_gives_up() {
        let (r, w) = pipe();
        let t = Instant::now();
        let big = vec![b'x'; 1 << 20];
        let e = write_fd(w, &big, Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        close(r);
        close(w);
    }

    #[test]
    fn everything_arrives_when_read() {
        let (r, w) = pipe();
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                // SAFETY: reads into a live buffer.
                let n = unsafe { libc::read(r, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n as usize]);
            }
            close(r);
            got
        });
        write_fd(w, &big, STALL).unwrap();
        close(w);
        assert_eq!(reader.join().unwrap(), big);
    }
}
