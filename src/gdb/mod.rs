//! A gdb stub (`--gdb unix:PATH` or `--gdb tcp:127.0.0.1:PORT`): the GDB remote
//! serial protocol from the `gdbstub` crate, on a thread of its own that talks to
//! the vCPUs only through their event channels (vcpu/thread.rs `DebugOp`), so no
//! vCPU fd is touched off its own thread. One client at a time; when it detaches
//! or its connection drops, breakpoints are removed and the guest runs on, and the
//! next client may connect.

pub mod arch;
pub mod target;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use gdbstub::stub::{DisconnectReason, GdbStub};
use vm_memory::GuestMemoryMmap;

use crate::vcpu::thread::DebugPort;
use target::{Conn, SkiffTarget, Waiter};

/// Where gdb connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GdbAddr {
    Unix(PathBuf),
    /// Loopback only: the stub gives whoever connects the whole guest.
    Tcp(SocketAddr),
}

impl std::str::FromStr for GdbAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("--gdb {s}: {why}");
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("no socket path after unix:"));
            }
            return Ok(GdbAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("give tcp:127.0.0.1:PORT"))?;
            let port: u16 = port.parse().map_err(|_| bad("the port is not a number from 0 to 65535"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = if host == "localhost" {
                IpAddr::from([127, 0, 0, 1])
            } else {
                host.parse().map_err(|_| bad("the host must be a loopback address such as 127.0.0.1"))?
            };
            if !ip.is_loopback() {
                return Err(bad("only loopback addresses (127.0.0.0/8, ::1) are served: gdb gets the whole guest"));
            }
            return Ok(GdbAddr::Tcp(SocketAddr::new(ip, port)));
        }
        Err(bad("give unix:PATH or tcp:127.0.0.1:PORT"))
    }
}

impl std::fmt::Display for GdbAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdbAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            GdbAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The listening socket, bound before the machine is built so that a bad address
/// is one line before any work. A Unix socket's file is removed when this goes.
pub struct GdbListener {
    inner: Listener,
    pub addr: GdbAddr,
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl GdbListener {
    pub fn bind(addr: &GdbAddr) -> Result<Self, String> {
        let inner = match addr {
            GdbAddr::Unix(path) => {
                let l = UnixListener::bind(path).map_err(|e| format!("--gdb {addr}: {e}"))?;
                Listener::Unix(l, path.clone())
            }
            GdbAddr::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(|e| format!("--gdb {addr}: {e}"))?),
        };
        let this = GdbListener { inner, addr: addr.clone() };
        let nonblocking = match &this.inner {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(|e| format!("--gdb {addr}: {e}"))?;
        Ok(this)
    }

    fn fd(&self) -> RawFd {
        match &self.inner {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// A client, if one is waiting (the listener is non-blocking).
    /// With a duplicate of the client's fd, for shutting the socket down from
    /// another thread while this one may be blocked reading it.
    fn accept(&self) -> std::io::Result<Option<(Conn, OwnedFd)>> {
        let r = match &self.inner {
            Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                let (fd, dup) = (s.as_raw_fd(), OwnedFd::from(s.try_clone()?));
                Ok((Conn { stream: Box::new(s), fd }, dup))
            }),
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                // Packets are small and answered one by one: no Nagle delay.
                s.set_nodelay(true)?;
                let (fd, dup) = (s.as_raw_fd(), OwnedFd::from(s.try_clone()?));
                Ok((Conn { stream: Box::new(s), fd }, dup))
            }),
        };
        match r {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for GdbListener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.inner {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The running stub; `stop` ends it (before the vCPU threads are joined).
pub struct GdbServer {
    shutdown: Arc<AtomicBool>,
    /// The connected client's socket, to shut down so a blocked read returns.
    client: Arc<Mutex<Option<RawFd>>>,
    thread: Option<JoinHandle<()>>,
}

impl GdbServer {
    /// Starts serving `listener`. With `wait`, every vCPU is halted before this
    /// returns, so the guest runs no instruction before gdb says so.
    pub fn start(listener: GdbListener, ports: Vec<DebugPort>, mem: GuestMemoryMmap, wait: bool) -> Result<Self, String> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut target = SkiffTarget::new(ports, mem, shutdown.clone());
        if wait {
            target.halt_all().map_err(|e| format!("--gdb-wait: {e}"))?;
            crate::output::stderr(&format!("skiff: waiting for gdb on {}\r\n", listener.addr));
        }
        let client = Arc::new(Mutex::new(None));
        let (flag, slot) = (shutdown.clone(), client.clone());
        let thread = std::thread::Builder::new()
            .name("skiff-gdb".into())
            .spawn(move || serve(listener, target, &flag, &slot))
            .map_err(|e| format!("creating the gdb thread: {e}"))?;
        Ok(GdbServer { shutdown, client, thread: Some(thread) })
    }

    /// Ends the stub: a client still attached is told the machine exited.
    pub fn stop(mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        // A client that is waiting for a stop gets the exit packet within one poll
        // slice; only one that is idle (the guest halted) needs its socket shut.
        for _ in 0..50 {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if let Ok(c) = self.client.lock()
            && let Some(fd) = *c
        {
            // SAFETY: shutdown(2) on the client socket's duplicate, open while it
            // is in this slot (the serving thread clears the slot, under this
            // lock, before it closes the duplicate).
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts one client after another until shutdown.
fn serve(listener: GdbListener, mut target: SkiffTarget, shutdown: &AtomicBool, client: &Mutex<Option<RawFd>>) {
    while !shutdown.load(Ordering::SeqCst) {
        let mut p = libc::pollfd { fd: listener.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
            continue;
        }
        let (conn, dup) = match listener.accept() {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                crate::output::stderr(&format!("skiff: gdb: accepting a client on {}: {e}\r\n", listener.addr));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if let Ok(mut c) = client.lock() {
            *c = Some(dup.as_raw_fd());
        }
        session(&mut target, conn);
        if let Ok(mut c) = client.lock() {
            *c = None;
        }
        drop(dup);
    }
}

/// One client, from connection to detach or disconnect; the guest runs on after.
fn session(target: &mut SkiffTarget, conn: Conn) {
    if let Err(e) = target.attach() {
        crate::output::stderr(&format!("skiff: gdb: {e}\r\n"));
        target.detach();
        return;
    }
    let ended = match GdbStub::new(conn).run_blocking::<Waiter>(target) {
        Ok(DisconnectReason::Disconnect) => "detached".to_string(),
        Ok(DisconnectReason::Kill) => "killed the session (the guest runs on)".to_string(),
        Ok(DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_)) => "the machine ended".to_string(),
        Err(e) if e.is_connection_error() || e.is_target_error() => format!("the connection ended ({e})"),
        Err(e) => format!("protocol error: {e}"),
    };
    target.detach();
    if !target.shutdown.load(Ordering::SeqCst) {
        crate::output::stderr(&format!("skiff: gdb: {ended}; the guest runs on\r\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unix_paths_or_loopback_tcp() {
        assert_eq!("unix:/tmp/g".parse::<GdbAddr>(), Ok(GdbAddr::Unix("/tmp/g".into())));
        assert_eq!("tcp:127.0.0.1:1234".parse::<GdbAddr>(), Ok(GdbAddr::Tcp("127.0.0.1:1234".parse().unwrap())));
        assert_eq!("tcp:localhost:9".parse::<GdbAddr>(), Ok(GdbAddr::Tcp("127.0.0.1:9".parse().unwrap())));
        assert_eq!("tcp:[::1]:9".parse::<GdbAddr>(), Ok(GdbAddr::Tcp("[::1]:9".parse().unwrap())));
        for bad in ["tcp:10.0.0.1:1234", "tcp:0.0.0.0:1", "tcp:127.0.0.1", "tcp:127.0.0.1:99999", "bogus", "unix:", "tcp:host:1"] {
            let e = bad.parse::<GdbAddr>().unwrap_err();
            assert!(e.starts_with(&format!("--gdb {bad}: ")) && !e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn a_unix_listener_removes_its_socket() {
        let path = std::env::temp_dir().join(format!("skiff-gdb-unit-{}", std::process::id()));
        let l = GdbListener::bind(&GdbAddr::Unix(path.clone())).unwrap();
        assert!(path.exists());
        assert!(GdbListener::bind(&GdbAddr::Unix(path.clone())).is_err(), "a path in use");
        drop(l);
        assert!(!path.exists());
    }
}
