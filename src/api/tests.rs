//! The server driven through a real socket: raw HTTP in, exact status lines and JSON
//! out, with well-behaved, slow, idle, greedy and vanishing clients.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::dispatch::mock::MockController;
use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("skiff-api-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Blocks until `fd` is readable or the test's deadline passes.
fn wait_readable(fd: i32, deadline: Instant) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0)).unwrap();
    let ms = deadline.saturating_duration_since(Instant::now()).as_millis() as i32;
    let mut ev = [EpollEvent::default(); 1];
    epoll.wait(ms, &mut ev).unwrap() == 1
}

/// The server on a thread of its own, with an epoll loop like the VMM's, answering
/// through the mock controller until stopped.
struct Running {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<MockController>>,
    _dir: TempDir,
}

impl Running {
    fn start(name: &str) -> Self {
        let dir = TempDir::new(name);
        let path = dir.sock();
        let mut server = ApiServer::bind(&path).unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let stop_fd = stop.try_clone().unwrap();
        let thread = std::thread::spawn(move || {
            let mut ctl = MockController::default();
            let epoll = Epoll::new().unwrap();
            epoll.ctl(ControlOperation::Add, server.fd(), EpollEvent::new(EventSet::IN, 0)).unwrap();
            epoll.ctl(ControlOperation::Add, stop_fd.as_raw_fd(), EpollEvent::new(EventSet::IN, 1)).unwrap();
            let mut evs = [EpollEvent::default(); 2];
            loop {
                let n = epoll.wait(-1, &mut evs).unwrap();
                for ev in evs.iter().take(n) {
                    if ev.data() == 1 {
                        return ctl;
                    }
                    for inc in server.take_requests() {
                        let r = dispatch(&inc.request, &mut ctl);
                        server.respond(inc.token, r);
                    }
                }
            }
        });
        Running { path, stop, thread: Some(thread), _dir: dir }
    }

    /// Stops the server (dropping it) and returns what the controller was asked.
    fn stop(mut self) -> Vec<String> {
        self.stop.write(1).unwrap();
        self.thread.take().unwrap().join().unwrap().calls
    }

    fn client(&self) -> Client {
        Client::new(&self.path)
    }

    fn ask(&self, raw: &str) -> Resp {
        let mut c = self.client();
        c.send(raw);
        c.response()
    }
}

#[derive(Debug, PartialEq)]
struct Resp {
    status: String,
    headers: String,
    body: String,
}

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn new(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        Client { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &str) {
        self.s.write_all(raw.as_bytes()).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        // A server that closes with our bytes unread makes the end a reset, not EOF.
        let n = match self.s.read(&mut chunk) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            r => r.expect("no answer within the timeout"),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one whole response (headers, then Content-Length bytes of body).
    fn response(&mut self) -> Resp {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(self.fill() > 0, "connection closed before a response: {:?}", String::from_utf8_lossy(&self.buf));
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
        let len: usize = headers
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        while self.buf.len() < end + 4 + len {
            assert!(self.fill() > 0, "connection closed inside a body");
        }
        let body = String::from_utf8(self.buf[end + 4..end + 4 + len].to_vec()).unwrap();
        let r = Resp { status: status.to_string(), headers: headers.to_string(), body };
        self.buf.drain(..end + 4 + len);
        r
    }

    /// True if the server closed the connection (after any data already read).
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill() == 0
    }
}

fn req(method: &str, path: &str, body: &str) -> String {
    if body.is_empty() {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    } else {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    }
}

fn fault(m: &str) -> String {
    serde_json::json!({ "fault_message": m }).to_string()
}

const PAUSE: &str = r#"{"state":"Paused"}"#;
const INFO_RUNNING: &str = r#"{"id":"vm0","state":"Running","vmm_version":"0.1.0","app_name":"skiff"}"#;

#[test]
fn every_endpoint_answers_as_firecracker_does() {
    let srv = Running::start("endpoints");
    let r = srv.ask(&req("GET", "/", ""));
    assert_eq!((r.status.as_str(), r.body.as_str()), ("HTTP/1.1 200 ", INFO_RUNNING));
    assert!(r.headers.contains("Server: skiff\r\n") && r.headers.contains("Content-Type: application/json\r\n"), "{}", r.headers);
    let r = srv.ask(&req("PATCH", "/vm", PAUSE));
    assert_eq!((r.status.as_str(), r.body.as_str()), ("HTTP/1.1 204 ", ""));
    assert!(!r.headers.contains("Content-Length"), "{}", r.headers);
    let r = srv.ask(&req("GET", "/", ""));
    assert_eq!(r.body, INFO_RUNNING.replace("Running", "Paused"));
    let create = r#"{"snapshot_path":"/tmp/s","mem_file_path":"/tmp/m","snapshot_type":"Full"}"#;
    assert_eq!(srv.ask(&req("PUT", "/snapshot/create", create)).status, "HTTP/1.1 204 ");
    let load = r#"{"snapshot_path":"/tmp/s","mem_backend":{"backend_path":"/tmp/m","backend_type":"File"},"resume_vm":true}"#;
    assert_eq!(srv.ask(&req("PUT", "/snapshot/load", load)).status, "HTTP/1.1 204 ");
    assert_eq!(srv.ask(&req("PATCH", "/vm", r#"{"state":"Resumed"}"#)).status, "HTTP/1.1 204 ");
    assert_eq!(srv.ask(&req("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#)).status, "HTTP/1.1 204 ");
    assert_eq!(srv.ask(&req("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#)).status, "HTTP/1.1 204 ");
    let r = srv.ask(&req("GET", "/machine-config", ""));
    assert_eq!((r.status.as_str(), r.body.as_str()), ("HTTP/1.1 200 ", r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":false}"#));
    let r = srv.ask(&req("GET", "/stats", ""));
    assert_eq!((r.status.as_str(), r.body.as_str()), ("HTTP/1.1 200 ", r#"{"exits":{"io":12}}"#));
    // An HTTP/1.0 client is answered in HTTP/1.0; an absolute URI names the same path.
    let r = srv.ask("GET http://localhost/ HTTP/1.0\r\n\r\n");
    assert_eq!((r.status.as_str(), r.body.as_str()), ("HTTP/1.0 200 ", INFO_RUNNING));
    assert_eq!(
        srv.stop(),
        ["info", "pause", "info", "create /tmp/s /tmp/m Full", "load /tmp/s /tmp/m resume=true", "resume", "ctrl-alt-del", "machine-config", "stats", "info"]
    );
}

#[test]
fn each_error_has_its_status_line_and_fault_message() {
    let srv = Running::start("errors");
    let cases: &[(String, &str, String)] = &[
        (
            req("PATCH", "/vm", r#"{"state":"Paused","bogus":1}"#),
            "HTTP/1.1 400 ",
            fault("bad JSON body: unknown field `bogus`, expected `state` at line 1 column 25"),
        ),
        (req("PATCH", "/vm", r#"{"state":"#), "HTTP/1.1 400 ", fault("bad JSON body: EOF while parsing a value at line 1 column 9")),
        (
            req("PATCH", "/vm", r#"{"state":true}"#),
            "HTTP/1.1 400 ",
            fault("bad JSON body: invalid type: boolean `true`, expected string or map at line 1 column 10"),
        ),
        (req("PATCH", "/vm", ""), "HTTP/1.1 400 ", fault("PATCH /vm needs a JSON body")),
        (req("GET", "/vm", ""), "HTTP/1.1 405 ", fault("/vm takes PATCH, not GET")),
        (req("DELETE", "/snapshot/create", ""), "HTTP/1.1 405 ", fault("/snapshot/create takes PUT, not DELETE")),
        (req("GET", "/balloon", ""), "HTTP/1.1 404 ", fault("no such resource: /balloon")),
        (
            req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
            "HTTP/1.1 400 ",
            fault("bad JSON body: unknown variant `InstanceStart`, expected `SendCtrlAltDel` or `FlushMetrics` at line 1 column 30"),
        ),
        (
            req("PUT", "/snapshot/create", r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#),
            "HTTP/1.1 400 ",
            fault(r#"pause the VM first (PATCH /vm {"state": "Paused"})"#),
        ),
    ];
    for (raw, status, body) in cases {
        let r = srv.ask(raw);
        assert_eq!((r.status.as_str(), r.body.as_str()), (*status, body.as_str()), "for {raw:?}");
    }
    let r = srv.ask(&req("GET", "/vm", ""));
    assert!(r.headers.contains("Allow: PATCH\r\n"), "{}", r.headers);
    // Not HTTP at all: 400, then the connection is closed (no request boundary left).
    for garbage in ["HELLO\r\n\r\n", "OPTIONS / HTTP/1.1\r\n\r\n", "GET / HTTP/2.0\r\n\r\n", "GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"] {
        let mut c = srv.client();
        c.send(garbage);
        let r = c.response();
        assert_eq!(r.status, "HTTP/1.1 400 ", "for {garbage:?}");
        let msg: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(msg["fault_message"].as_str().unwrap().starts_with("bad HTTP request: "), "{}", r.body);
        assert!(c.closed(), "for {garbage:?}");
    }
    let mut c = srv.client();
    c.send(&format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000)));
    assert_eq!(c.response().body, fault("bad HTTP request: a header line is too long"));
    assert!(c.closed());
    // None of that reached the VMM but the one refused snapshot.
    assert_eq!(srv.stop(), ["create refused"]);
}

#[test]
fn a_request_split_across_writes_is_read_whole() {
    let srv = Running::start("split");
    let raw = req("PATCH", "/vm", PAUSE);
    let mut c = srv.client();
    // Cut inside the method, the request line, a header and the body; after each
    // piece a round trip on another connection proves the server ran meanwhile.
    let cuts = [3, 12, 40, raw.len() - 5, raw.len()];
    let mut at = 0;
    for cut in cuts {
        c.send(&raw[at..cut]);
        at = cut;
        if cut < raw.len() {
            assert_eq!(srv.ask(&req("GET", "/machine-config", "")).status, "HTTP/1.1 200 ");
        }
    }
    assert_eq!(c.response().status, "HTTP/1.1 204 ");
    let calls = srv.stop();
    assert_eq!(calls.iter().filter(|c| *c == "pause").count(), 1, "{calls:?}");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let srv = Running::start("pipeline");
    let mut c = srv.client();
    c.send(&format!("{}{}{}", req("PATCH", "/vm", PAUSE), req("GET", "/nope", ""), req("GET", "/", "")));
    assert_eq!(c.response().status, "HTTP/1.1 204 ");
    assert_eq!(c.response().status, "HTTP/1.1 404 ");
    assert_eq!(c.response().body, INFO_RUNNING.replace("Running", "Paused"));
    // The connection stays open for more.
    c.send(&req("GET", "/stats", ""));
    assert_eq!(c.response().status, "HTTP/1.1 200 ");
    assert_eq!(srv.stop(), ["pause", "info", "stats"]);
}

#[test]
fn idle_and_vanishing_clients_change_nothing() {
    let srv = Running::start("idle");
    let idle = srv.client();
    // Half a request, then gone; a request line alone, then gone.
    let mut half = srv.client();
    let raw = req("PUT", "/snapshot/load", r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#);
    half.send(&raw[..raw.len() - 10]);
    drop(half);
    let mut line = srv.client();
    line.send("PATCH /vm HTTP/1.1\r\n");
    drop(line);
    // A client that closes its sending side after a whole request is still answered.
    let mut shut = srv.client();
    shut.send(&req("GET", "/machine-config", ""));
    shut.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(shut.response().status, "HTTP/1.1 200 ");
    assert!(shut.closed());
    assert_eq!(srv.ask(&req("GET", "/", "")).body, INFO_RUNNING);
    drop(idle);
    assert_eq!(srv.ask(&req("GET", "/stats", "")).status, "HTTP/1.1 200 ");
    assert_eq!(srv.stop(), ["machine-config", "info", "stats"]);
}

#[test]
fn a_huge_body_is_refused_with_413_and_the_connection_closed() {
    let srv = Running::start("huge");
    // Announced too large: refused before a byte of it is read.
    let mut c = srv.client();
    c.send("PUT /snapshot/create HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n{\"snapshot_path\":");
    let r = c.response();
    assert_eq!((r.status.as_str(), r.body.as_str()), ("HTTP/1.1 413 ", fault("request body of 1000000 bytes is larger than the limit of 65536").as_str()));
    assert!(c.closed());
    // Actually sent: the writer gets an error once the server closes, nothing hangs.
    let c = srv.client();
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let body = vec![b' '; 4 << 20];
        let _ = w.write_all(format!("PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
        w.write_all(&body).is_err()
    });
    let mut c = c;
    assert_eq!(c.response().status, "HTTP/1.1 413 ");
    assert!(writer.join().unwrap(), "the 4 MiB body should not have been taken whole");
    // Just at the limit is fine (and then refused as JSON).
    let body = format!("{{\"state\":\"Paused\"{}}}", " ".repeat(MAX_BODY - 18));
    assert_eq!(body.len(), MAX_BODY);
    assert_eq!(srv.ask(&req("PATCH", "/vm", &body)).status, "HTTP/1.1 204 ");
    assert_eq!(srv.stop(), ["pause"]);
}

#[test]
fn passed_file_descriptors_are_not_kept() {
    use dbs_uhttp::ScmSocket;
    let srv = Running::start("fds");
    let (mut r, w) = std::io::pipe().unwrap();
    let c = srv.client();
    let raw = req("GET", "/", "");
    c.s.send_with_fd(raw.as_bytes(), w.as_raw_fd()).unwrap();
    drop(w);
    let mut c = c;
    assert_eq!(c.response().status, "HTTP/1.1 200 ");
    // Our copy of the write end is closed: EOF now means skiff holds none either.
    assert!(wait_readable(r.as_raw_fd(), Instant::now() + TIMEOUT));
    assert_eq!(r.read(&mut [0u8; 1]).unwrap(), 0);
    srv.stop();
}

#[test]
fn a_full_house_evicts_the_longest_idle_client() {
    let srv = Running::start("full");
    let mut idle: Vec<Client> = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(srv.client());
        // A round trip on each keeps the accept order, so the first is the oldest.
        let last = idle.last_mut().unwrap();
        last.send(&req("GET", "/stats", ""));
        assert_eq!(last.response().status, "HTTP/1.1 200 ");
    }
    let r = srv.ask(&req("GET", "/", ""));
    assert_eq!(r.status, "HTTP/1.1 200 ");
    assert!(idle[0].closed(), "the oldest idle client should have been closed");
    idle[1].send(&req("GET", "/stats", ""));
    assert_eq!(idle[1].response().status, "HTTP/1.1 200 ");
    srv.stop();
}

/// A server driven by hand, in this thread: requests taken and answered when the test says.
fn drive(server: &mut ApiServer, want: usize) -> Vec<Incoming> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.len() < want {
        assert!(wait_readable(server.fd(), deadline), "only {} of {want} requests arrived", got.len());
        got.extend(server.take_requests());
    }
    got
}

#[test]
fn answers_go_out_in_request_order_whatever_order_they_are_given_in() {
    let dir = TempDir::new("order");
    let mut server = ApiServer::bind(&dir.sock()).unwrap();
    let mut c = Client::new(&dir.sock());
    c.send(&format!("{}{}", req("GET", "/", ""), req("GET", "/stats", "")));
    let got = drive(&mut server, 2);
    assert_eq!((&got[0].request, &got[1].request), (&ApiRequest::Info, &ApiRequest::Stats));
    server.respond(got[1].token, ApiResponse::json(&"second"));
    // Nothing may go out yet: the first is still owed.
    c.s.set_nonblocking(true).unwrap();
    assert_eq!(c.s.read(&mut [0u8; 1]).unwrap_err().kind(), ErrorKind::WouldBlock);
    c.s.set_nonblocking(false).unwrap();
    server.respond(got[0].token, ApiResponse::json(&"first"));
    assert_eq!(c.response().body, "\"first\"");
    assert_eq!(c.response().body, "\"second\"");
    // A token answered twice, or whose client has gone, is ignored.
    server.respond(got[0].token, ApiResponse::json(&"again"));
    drop(c);
    server.respond(got[1].token, ApiResponse::no_content());
}

#[test]
fn when_every_client_is_owed_an_answer_a_new_one_gets_503() {
    let dir = TempDir::new("busy");
    let mut server = ApiServer::bind(&dir.sock()).unwrap();
    let mut clients = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut c = Client::new(&dir.sock());
        c.send(&req("GET", "/", ""));
        pending.extend(drive(&mut server, 1));
        clients.push(c);
    }
    assert_eq!(server.connections(), MAX_CONNECTIONS);
    let mut extra = Client::new(&dir.sock());
    let deadline = Instant::now() + TIMEOUT;
    while !wait_readable(extra.s.as_raw_fd(), Instant::now()) {
        assert!(wait_readable(server.fd(), deadline));
        assert!(server.take_requests().is_empty());
    }
    let r = extra.response();
    assert_eq!((r.status.as_str(), r.body.as_str()), ("HTTP/1.1 503 ", fault("too many open connections").as_str()));
    assert!(extra.closed());
    // The others still get their answers.
    for (inc, c) in pending.into_iter().zip(clients.iter_mut()) {
        server.respond(inc.token, ApiResponse::no_content());
        assert_eq!(c.response().status, "HTTP/1.1 204 ");
    }
}

#[test]
fn a_client_that_pipelines_without_limit_is_read_only_as_far_as_it_is_answered() {
    let dir = TempDir::new("greedy");
    let mut server = ApiServer::bind(&dir.sock()).unwrap();
    let mut c = Client::new(&dir.sock());
    c.send(&req("GET", "/", "").repeat(100));
    let first = drive(&mut server, 16);
    // Unanswered, the server stops reading this client: its fd goes quiet.
    let mut more = Vec::new();
    while wait_readable(server.fd(), Instant::now() + Duration::from_millis(50)) {
        more.extend(server.take_requests());
    }
    assert!(first.len() + more.len() < 100, "read all 100 without answering any");
    let mut answered = 0;
    for inc in first.into_iter().chain(more) {
        server.respond(inc.token, ApiResponse::no_content());
        answered += 1;
    }
    while answered < 100 {
        for inc in drive(&mut server, 1) {
            server.respond(inc.token, ApiResponse::no_content());
            answered += 1;
        }
    }
    for _ in 0..100 {
        assert_eq!(c.response().status, "HTTP/1.1 204 ");
    }
}

#[test]
fn the_socket_is_0600_from_the_start_and_removed_on_drop() {
    let dir = TempDir::new("mode");
    let path = dir.sock();
    // Under the usual umask (022) a plain bind would make it 0755: 0600 shows the
    // mode was set on the socket before the file existed.
    let server = ApiServer::bind(&path).unwrap();
    let mode = std::fs::symlink_metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    drop(server);
    assert!(!path.exists());
}

#[test]
fn a_live_socket_is_in_use_a_stale_one_is_replaced_a_file_is_left_alone() {
    let dir = TempDir::new("bind");
    let path = dir.sock();
    let first = ApiServer::bind(&path).unwrap();
    let e = ApiServer::bind(&path).err().unwrap().to_string();
    assert_eq!(e, format!("api socket {}: in use (another process is serving it)", path.display()));
    assert!(!e.contains('\n'));
    // The refused bind did not take the live server's file away.
    assert!(UnixStream::connect(&path).is_ok());
    drop(first);

    // Stale: a socket file with no listener behind it.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut s = ApiServer::bind(&path).unwrap();
    let mut c = Client::new(&path);
    c.send(&req("GET", "/", ""));
    let got = drive(&mut s, 1);
    s.respond(got[0].token, ApiResponse::no_content());
    assert_eq!(c.response().status, "HTTP/1.1 204 ");
    drop(s);
    assert!(!path.exists());

    std::fs::write(&path, b"precious").unwrap();
    let e = ApiServer::bind(&path).err().unwrap().to_string();
    assert_eq!(e, format!("api socket {}: exists and is not a socket; refusing to replace it", path.display()));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    let long = dir.0.join("x".repeat(120));
    let e = ApiServer::bind(&long).err().unwrap().to_string();
    assert!(e.contains("1 to 107 bytes") && !e.contains('\n'), "{e}");
}

#[test]
fn a_socket_replaced_after_bind_is_not_removed_by_drop() {
    let dir = TempDir::new("replaced");
    let path = dir.sock();
    let server = ApiServer::bind(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"someone else's").unwrap();
    drop(server);
    assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
}

#[test]
fn many_clients_at_once_are_all_answered() {
    let srv = Running::start("many");
    let path = srv.path.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(&path);
                for _ in 0..50 {
                    c.send(&req("GET", "/machine-config", ""));
                    assert_eq!(c.response().status, "HTTP/1.1 200 ");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(srv.stop().len(), 400);
}

#[test]
fn random_input_never_panics_or_hangs_the_server() {
    let srv = Running::start("fuzz");
    const PIECES: &[&[u8]] = &[
        b"GET", b"PUT", b"PATCH", b"DELETE", b"get", b" ", b"  ", b"/", b"/vm", b"/actions", b"/snapshot/load", b"http://x/",
        b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"Content-Length: ", b"Content-Length:",
        b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"0", b"7", b"18", b"65537", b"4294967296", b"-1", b"{",
        b"}", b"\"state\"", b":", b"\"Paused\"", b"\x00", b"\xff\xfe", b"\xc3\x28", b"%00", b"?a=b", b"#",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for case in 0..400 {
        let mut input = Vec::new();
        for _ in 0..next() % 24 {
            match next() % 8 {
                0 => input.extend((0..next() % 64).map(|_| next() as u8)),
                _ => input.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]),
            }
        }
        let mut c = srv.client();
        let _ = c.s.write_all(&input);
        let _ = c.s.shutdown(std::net::Shutdown::Write);
        // The server answers what it can and then closes: reading ends, no hang.
        let deadline = Instant::now() + TIMEOUT;
        while c.fill() > 0 {
            assert!(Instant::now() < deadline, "case {case}: {input:?}");
        }
    }
    assert_eq!(srv.ask(&req("GET", "/", "")).status, "HTTP/1.1 200 ");
    srv.stop();
}

#[test]
fn a_large_answer_to_a_slow_reader_goes_out_in_pieces_without_blocking() {
    let dir = TempDir::new("slow");
    let mut server = ApiServer::bind(&dir.sock()).unwrap();
    let mut c = Client::new(&dir.sock());
    c.send(&format!("{}{}", req("GET", "/stats", ""), req("GET", "/", "")));
    let got = drive(&mut server, 2);
    // 4 MiB cannot fit in the socket: respond() writes what fits and returns.
    let big = "x".repeat(4 << 20);
    server.respond(got[0].token, ApiResponse::json(&big));
    server.respond(got[1].token, ApiResponse::no_content());
    let reader = std::thread::spawn(move || {
        let a = c.response();
        let b = c.response();
        (a.body.len(), b.status)
    });
    let deadline = Instant::now() + TIMEOUT;
    while !reader.is_finished() {
        assert!(Instant::now() < deadline);
        // Readable again each time the client made room.
        if wait_readable(server.fd(), Instant::now() + Duration::from_millis(100)) {
            assert!(server.take_requests().is_empty());
        }
    }
    assert_eq!(reader.join().unwrap(), (big.len() + 2, "HTTP/1.1 204 ".to_string()));
}
