//! The API's HTTP/1.1 server on a Unix socket, made to sit in the VMM's event loop.
//!
//! HTTP itself (request line, headers, bodies, response encoding) is dbs-uhttp's
//! `HttpConnection`, the published fork of Firecracker's micro_http. Its multi-client
//! `HttpServer` is not used: on a request that arrives in pieces it sleeps and then
//! answers 500, and it can block in `requests()`. Here one epoll set of our own holds
//! the listener and every client, level-triggered, and [`ApiServer::take_requests`]
//! only ever waits on it with a zero timeout, so a slow, idle or hostile client never
//! holds up the event loop. Everything is bounded: connections, body size, requests
//! read but not yet answered per connection, reads per wake-up.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dbs_uhttp::{
    Body, ConnectionError, HttpConnection, HttpHeaderError, MediaType, Method, Request, RequestError, Response, ScmSocket,
    StatusCode, SysError, Version,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::dispatch::{ApiResponse, Status};
use super::request::{ApiRequest, parse};

/// Largest request body accepted (413 above it).
pub const MAX_BODY: usize = 64 * 1024;
/// Clients at once; one more evicts the longest-idle client that is owed nothing.
pub const MAX_CONNECTIONS: usize = 64;
/// Requests read from one client and not yet answered before skiff stops reading it.
const MAX_OUTSTANDING: u64 = 16;
/// Reads of at most 1 KiB (the parser's buffer) per client per wake-up, for fairness.
const READS_PER_EVENT: usize = 80;
const ACCEPTS_PER_EVENT: usize = 16;
const EVENTS_PER_CALL: usize = 32;
const BACKLOG: libc::c_int = 32;
/// How long to stop accepting after the process ran out of fds (instead of spinning).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const LISTENER: u64 = u64::MAX;
const RETRY_TIMER: u64 = u64::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("api socket {0}: in use (another process is serving it)")]
    InUse(PathBuf),
    #[error("api socket {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("api socket {path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
}

/// Names the request a response answers. Opaque; a token whose client has gone is
/// accepted and its response dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    conn: u64,
    seq: u64,
    version: Version,
}

/// A parsed request for the VMM, and the token to answer it with.
#[derive(Debug)]
pub struct Incoming {
    pub token: Token,
    pub request: ApiRequest,
}

pub struct ApiServer {
    listener: UnixListener,
    epoll: Epoll,
    retry: TimerFd,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    // Last, so the file goes only after the socket is closed.
    _file: SocketFile,
}

impl ApiServer {
    /// Creates the socket at `path`, mode 0600 from the start. A stale socket (no
    /// one listening) is replaced; a live one, or anything that is not a socket, is
    /// refused and left alone.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let err = |what: &'static str| move |source| ServerError::Io { path: path.to_path_buf(), what, source };
        let epoll = Epoll::new().map_err(err("epoll"))?;
        let retry = TimerFd::new().map_err(|e| err("timerfd")(io::Error::from_raw_os_error(e.errno())))?;
        clear_stale(path)?;
        let listener = listen_0600(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRINUSE) => ServerError::InUse(path.to_path_buf()),
            _ => err("bind")(e),
        })?;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(err("stat after bind")(e));
            }
        };
        let file = SocketFile { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino() };
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER)).map_err(err("epoll_ctl"))?;
        epoll.ctl(ControlOperation::Add, retry.as_raw_fd(), EpollEvent::new(EventSet::IN, RETRY_TIMER)).map_err(err("epoll_ctl"))?;
        Ok(ApiServer { listener, epoll, retry, conns: HashMap::new(), next_conn: 0, _file: file })
    }

    /// The fd to watch for input in the event loop: readable whenever
    /// [`Self::take_requests`] has something to do.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Does the socket work that is ready (accepting, reading, writing; a bounded
    /// amount, never waiting) and returns the requests that arrived. Bad requests
    /// are answered here and never returned.
    pub fn take_requests(&mut self) -> Vec<Incoming> {
        let mut events = [EpollEvent::default(); EVENTS_PER_CALL];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        let mut out = Vec::new();
        for ev in events.iter().take(n) {
            match ev.data() {
                LISTENER => self.accept_some(),
                RETRY_TIMER => {
                    let _ = self.retry.wait();
                    let ev = EpollEvent::new(EventSet::IN, LISTENER);
                    let _ = self.epoll.ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev);
                }
                id => self.client_event(id, ev.event_set(), &mut out),
            }
        }
        out
    }

    /// Sends the response to the request `token` names. Responses go out in the
    /// order the client sent its requests, whatever order they are given in.
    pub fn respond(&mut self, token: Token, response: ApiResponse) {
        let Some(conn) = self.conns.get_mut(&token.conn) else { return };
        if token.seq < conn.next_to_send || token.seq >= conn.next_seq {
            return;
        }
        conn.ready.entry(token.seq).or_insert_with(|| to_http(response, token.version));
        self.settle(token.conn);
    }

    /// Clients connected now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn accept_some(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((sock, _)) => self.admit(sock),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) => {}
                Err(_) => {
                    // Out of fds or memory: the connection stays queued, and a
                    // level-triggered listener would wake the loop for it at once,
                    // again and again. Look again a little later.
                    let _ = self.epoll.ctl(ControlOperation::Delete, self.listener.as_raw_fd(), EpollEvent::default());
                    let _ = self.retry.reset(ACCEPT_RETRY, None);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, sock: UnixStream) {
        if sock.set_nonblocking(true).is_err() {
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS && !self.evict_idle() {
            // Every client is owed an answer: this one gets a best-effort 503.
            let mut s = Stream { sock, blocked: Arc::default() };
            let mut buf = Vec::new();
            let busy = ApiResponse::fault(Status::ServiceUnavailable, "too many open connections".into());
            if to_http(busy, Version::Http11).write_all(&mut buf).is_ok() {
                let _ = s.write(&buf);
            }
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        let fd = sock.as_raw_fd();
        if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id)).is_err() {
            return;
        }
        let blocked = Arc::new(AtomicBool::new(false));
        let mut http = HttpConnection::new(Stream { sock, blocked: blocked.clone() });
        http.set_payload_max_size(MAX_BODY);
        let conn = Conn {
            http,
            fd,
            blocked,
            next_seq: 0,
            next_to_send: 0,
            ready: BTreeMap::new(),
            read_eof: false,
            closing: false,
            broken: false,
            interest: EventSet::IN,
            last_active: Instant::now(),
        };
        self.conns.insert(id, conn);
    }

    /// Closes the client idle longest among those owed nothing; false if none is.
    fn evict_idle(&mut self) -> bool {
        let victim =
            self.conns.iter().filter(|(_, c)| c.outstanding() == 0 && !c.http.pending_write()).min_by_key(|(_, c)| c.last_active).map(|(id, _)| *id);
        match victim {
            Some(id) => {
                self.drop_conn(id);
                true
            }
            None => false,
        }
    }

    fn client_event(&mut self, id: u64, events: EventSet, out: &mut Vec<Incoming>) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        conn.last_active = Instant::now();
        let gone = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        // On a hang-up, complete requests still in the socket are read (and done)
        // before the connection goes: a client may send and close without waiting.
        if events.contains(EventSet::IN) || gone {
            conn.read_some(id, out);
        }
        if gone {
            self.drop_conn(id);
        } else {
            self.settle(id);
        }
    }

    /// Sends what can be sent, then closes the connection if it is finished, or
    /// watches it for what it waits for next.
    fn settle(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        conn.release();
        conn.flush();
        if conn.broken || ((conn.closing || conn.read_eof) && conn.outstanding() == 0 && !conn.http.pending_write()) {
            self.drop_conn(id);
            return;
        }
        // Replies first: a client that does not read its answers is not read either.
        let want = if conn.http.pending_write() {
            EventSet::OUT
        } else if !conn.closing && !conn.read_eof && conn.outstanding() < MAX_OUTSTANDING {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        if want != conn.interest {
            match self.epoll.ctl(ControlOperation::Modify, conn.fd, EpollEvent::new(want, id)) {
                Ok(()) => conn.interest = want,
                Err(_) => self.drop_conn(id),
            }
        }
    }

    fn drop_conn(&mut self, id: u64) {
        if let Some(conn) = self.conns.remove(&id) {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.fd, EpollEvent::default());
        }
    }
}

/// One client.
struct Conn {
    http: HttpConnection<Stream>,
    fd: RawFd,
    /// Set by [`Stream::write`] when the socket is full.
    blocked: Arc<AtomicBool>,
    /// The number the next request read gets.
    next_seq: u64,
    /// The request whose response goes out next.
    next_to_send: u64,
    /// Responses given but waiting for an earlier one.
    ready: BTreeMap<u64, Response>,
    /// The client sent all it will send.
    read_eof: bool,
    /// Unreadable input (bad framing, too large): answer what came, then close.
    closing: bool,
    /// Writing failed: the client cannot be answered.
    broken: bool,
    interest: EventSet,
    last_active: Instant,
}

impl Conn {
    fn outstanding(&self) -> u64 {
        self.next_seq - self.next_to_send
    }

    fn read_some(&mut self, id: u64, out: &mut Vec<Incoming>) {
        for _ in 0..READS_PER_EVENT {
            if self.closing || self.read_eof || self.outstanding() >= MAX_OUTSTANDING {
                return;
            }
            let r = self.http.try_read();
            // Requests completed by this read come first, even if it then hit an error.
            while let Some(req) = self.http.pop_parsed_request() {
                self.take(id, req, out);
            }
            match r {
                Ok(()) => {}
                Err(ConnectionError::StreamReadError(e)) if e.errno() == libc::EAGAIN => return,
                Err(ConnectionError::StreamReadError(e)) if e.errno() == libc::EINTR => {}
                Err(ConnectionError::ConnectionClosed) => self.read_eof = true,
                Err(ConnectionError::ParseError(RequestError::SizeLimitExceeded(limit, size))) => {
                    let m = format!("request body of {size} bytes is larger than the limit of {limit}");
                    self.refuse(Status::PayloadTooLarge, m);
                }
                Err(ConnectionError::ParseError(RequestError::HeaderError(HttpHeaderError::SizeLimitExceeded(_)))) => {
                    self.refuse(Status::BadRequest, "bad HTTP request: a header line is too long".into());
                }
                Err(ConnectionError::ParseError(e)) => {
                    let m: String = format!("bad HTTP request: {e}").chars().take(200).collect();
                    self.refuse(Status::BadRequest, m);
                }
                Err(_) => self.closing = true,
            }
        }
    }

    /// Gives a request a place in the reply order, and either returns it for the
    /// VMM or answers it at once.
    fn take(&mut self, id: u64, req: Request, out: &mut Vec<Incoming>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let version = req.http_version();
        // Method names are ASCII constants.
        let method = std::str::from_utf8(req.method().raw()).unwrap_or("?");
        let body = req.body.as_ref().map_or(&[][..], |b| b.raw());
        match parse(method, req.uri().get_abs_path(), body) {
            Ok(request) => out.push(Incoming { token: Token { conn: id, seq, version }, request }),
            Err(r) => {
                self.ready.insert(seq, to_http(r, version));
            }
        }
    }

    /// Answers input that cannot be parsed, after everything before it, and closes:
    /// the byte stream cannot be trusted to be at a request boundary any more.
    fn refuse(&mut self, status: Status, message: String) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ready.insert(seq, to_http(ApiResponse::fault(status, message), Version::Http11));
        self.closing = true;
    }

    /// Queues the responses that are next in order.
    fn release(&mut self) {
        while let Some(r) = self.ready.remove(&self.next_to_send) {
            self.http.enqueue_response(r);
            self.next_to_send += 1;
        }
    }

    /// Writes until done or the socket is full.
    fn flush(&mut self) {
        while !self.broken && self.http.pending_write() {
            self.blocked.store(false, Ordering::Relaxed);
            match self.http.try_write() {
                Ok(()) if self.blocked.load(Ordering::Relaxed) => return,
                Ok(()) => {}
                Err(_) => self.broken = true,
            }
        }
    }
}

/// A client socket as the HTTP library sees it.
struct Stream {
    sock: UnixStream,
    blocked: Arc<AtomicBool>,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: sends from a live slice of `buf.len()` bytes on a socket this struct
        // owns. MSG_NOSIGNAL: a client that went away is an error here, not SIGPIPE.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            // The library treats every write error but EINTR as a closed client: a
            // full socket is reported as EINTR, and as full through `blocked`.
            self.blocked.store(true, Ordering::Relaxed);
            return Err(io::ErrorKind::Interrupted.into());
        }
        Err(e)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ScmSocket for Stream {
    fn socket_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// A plain read: file descriptors a client passes (SCM_RIGHTS) are closed by
    /// the kernel instead of piling up in skiff until a request completes.
    unsafe fn recv_with_fds(&self, iovecs: &mut [libc::iovec], _fds: &mut [RawFd]) -> Result<(usize, usize), SysError> {
        let count = libc::c_int::try_from(iovecs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the caller (the library) passes iovecs that describe its own live,
        // writable buffer; readv writes only within them.
        let n = unsafe { libc::readv(self.sock.as_raw_fd(), iovecs.as_ptr(), count) };
        match usize::try_from(n) {
            Ok(n) => Ok((n, 0)),
            Err(_) => Err(SysError::last()),
        }
    }
}

fn to_http(r: ApiResponse, version: Version) -> Response {
    let code = match r.status {
        Status::Ok => StatusCode::OK,
        Status::NoContent => StatusCode::NoContent,
        Status::BadRequest => StatusCode::BadRequest,
        Status::NotFound => StatusCode::NotFound,
        Status::MethodNotAllowed => StatusCode::MethodNotAllowed,
        Status::PayloadTooLarge => StatusCode::PayloadTooLarge,
        Status::InternalServerError => StatusCode::InternalServerError,
        Status::ServiceUnavailable => StatusCode::ServiceUnavailable,
    };
    let mut resp = Response::new(version, code);
    resp.set_server("skiff");
    if let Some(body) = r.body {
        resp.set_content_type(MediaType::ApplicationJson);
        resp.set_body(Body::new(body));
    }
    if !r.allow.is_empty() {
        resp.set_allow(r.allow.iter().filter_map(|m| Method::try_from(m.as_bytes()).ok()).collect());
    }
    resp
}

/// The socket file this server made; removed on drop unless something else has
/// replaced it meanwhile.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes a socket nobody listens on; refuses a live one or a non-socket.
fn clear_stale(path: &Path) -> Result<(), ServerError> {
    let io = |what: &'static str| move |source| ServerError::Io { path: path.to_path_buf(), what, source };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("stat")(e)),
        Ok(m) if !m.file_type().is_socket() => Err(ServerError::NotASocket(path.to_path_buf())),
        Ok(_) => {
            if is_live(path).map_err(io("probing the existing socket"))? {
                return Err(ServerError::InUse(path.to_path_buf()));
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io("removing the stale socket")(e)),
                _ => Ok(()),
            }
        }
    }
}

/// Whether something listens on the socket at `path`. Non-blocking, so a listener
/// with a full backlog (live, just busy) cannot stall skiff's start.
fn is_live(path: &Path) -> io::Result<bool> {
    let (addr, len) = sockaddr(path)?;
    let sock = unix_socket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, alive for the call.
    let r = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), len) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(true),
        Some(libc::ECONNREFUSED | libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

fn listen_0600(path: &Path) -> io::Result<UnixListener> {
    let (addr, len) = sockaddr(path)?;
    let sock = unix_socket()?;
    // bind gives the new file the socket inode's mode less the umask: making that
    // 0600 first means the file is never reachable by others, with no process-wide
    // umask change racing other threads' files.
    // SAFETY: fchmod on an fd we own.
    if unsafe { libc::fchmod(sock.as_raw_fd(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, alive for the call.
    if unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(sock.as_raw_fd(), BACKLOG) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(sock))
}

/// A non-blocking, close-on-exec Unix stream socket.
fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a socket path must be 1 to 107 bytes, without NUL"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // At most 110: fits.
    Ok((addr, len as libc::socklen_t))
}
