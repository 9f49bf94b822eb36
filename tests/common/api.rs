//! A small HTTP/1.1 client for skiff's control API socket (tests only): one request
//! per connection, the status code and body back.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Sends one request and returns (status, body).
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write request");
    s.write_all(body.as_bytes()).expect("write body");
    read_response(&mut s)
}

/// Reads one response: the head, then as many body bytes as Content-Length says (the
/// server keeps the connection open after it).
fn read_response(s: &mut UnixStream) -> (u16, String) {
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&reply[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if reply.len() >= end + 4 + len {
                let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"));
                return (status, String::from_utf8_lossy(&reply[end + 4..end + 4 + len]).into_owned());
            }
        }
        let n = s.read(&mut buf).expect("read response");
        assert!(n > 0, "the API closed the connection mid-response: {:?}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
}

/// Waits until the socket accepts connections (skiff binds it before building).
pub fn wait_for_socket(sock: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "{} never accepted a connection", sock.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn pause(sock: &Path) {
    let (code, body) = request(sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(code, 204, "pause: {body}");
}

pub fn resume(sock: &Path) {
    let (code, body) = request(sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(code, 204, "resume: {body}");
}

/// `PUT /snapshot/create` of a full snapshot; returns (status, body).
pub fn snapshot(sock: &Path, snap: &Path, mem: &Path) -> (u16, String) {
    let body = format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "Full"}}"#, snap.display(), mem.display());
    request(sock, "PUT", "/snapshot/create", Some(&body))
}
