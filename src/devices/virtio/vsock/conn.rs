//! One vsock connection: the host's Unix stream behind it, where it stands, and the
//! credit accounting of both directions (virtio 1.2, 5.10.6.3).
//!
//! Towards the guest, skiff may have at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`
//! bytes outstanding. Towards the host, the guest may have at most [`CONN_BUF`] bytes
//! that skiff has not yet written to the host socket: they wait in `to_host`, which
//! therefore never holds more (a guest that sends past its credit is reset).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::devices::virtio::chain::HostSlice;

/// The connection cannot go on: the guest overran its credit, the host went away, or
/// the host's CONNECT line was not one.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken;

/// Receive buffer skiff advertises per connection (buf_alloc).
pub const CONN_BUF: u32 = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The host connected and has not yet finished its `CONNECT <port>\n` line.
    HostHandshake,
    /// skiff sent the guest a REQUEST for the host; waiting for its RESPONSE.
    AwaitResponse,
    Established,
}

pub struct Conn {
    pub stream: UnixStream,
    pub phase: Phase,
    /// The host side's port (the one the guest connected to, or one skiff assigned).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    pub tx_cnt: u32,
    /// Payload bytes from the guest written to the host socket.
    pub fwd_cnt: u32,
    /// fwd_cnt as the guest last heard it.
    pub fwd_cnt_sent: u32,
    /// From the guest, not yet taken by the host socket.
    pub to_host: VecDeque<u8>,
    /// The host socket may have data (edge seen, not read down to EAGAIN).
    pub readable: bool,
    /// The host sent EOF (told to the guest as SHUTDOWN SEND).
    pub host_eof: bool,
    /// The guest will send no more: the host's write side is shut once `to_host` is empty.
    pub guest_done_sending: bool,
    /// The guest will receive no more: nothing more is read from the host.
    pub guest_done_receiving: bool,
    /// A CREDIT_REQUEST was sent and not yet answered.
    pub credit_requested: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, phase: Phase, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            phase,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            readable: true,
            host_eof: false,
            guest_done_sending: false,
            guest_done_receiving: false,
            credit_requested: false,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Bytes skiff may still send the guest.
    pub fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Whether the guest should hear of fwd_cnt now (a quarter of the buffer was freed).
    pub fn owes_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CONN_BUF / 4
    }

    /// Guest data for the host: written now as far as the socket takes it, the rest
    /// kept in order. Err when the guest overran its credit or the host is gone.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), Broken> {
        if self.to_host.len() + data.len() > CONN_BUF as usize {
            return Err(Broken);
        }
        self.to_host.extend(data);
        self.flush_to_host()
    }

    /// Writes what waits for the host, until the socket is full. Err: the host is gone.
    pub fn flush_to_host(&mut self) -> Result<(), Broken> {
        // Each round writes something or ends; bounded by CONN_BUF bytes.
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(Broken),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Broken),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Reads host data straight into guest memory: Ok(0) is EOF, Err(WouldBlock) none now.
    pub fn read_into(&mut self, iov: &[HostSlice]) -> std::io::Result<usize> {
        let v: Vec<libc::iovec> = iov.iter().map(|s| libc::iovec { iov_base: s.ptr.cast(), iov_len: s.len }).collect();
        let n = v.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: each iovec is mapped guest RAM (chain::host_slices) kept mapped by the
        // caller's GuestMemoryMmap; readv writes at most their lengths.
        let r = unsafe { libc::readv(self.fd(), v.as_ptr(), n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// The host's `CONNECT <port>\n`: Ok(Some(port)) once the whole line is read (and
    /// nothing after it), Ok(None) not yet, Err a bad line or a closed socket.
    pub fn read_connect_line(&mut self) -> Result<Option<u32>, Broken> {
        let mut peek = [0u8; 32];
        // SAFETY: recv into a live buffer of its length; MSG_PEEK leaves the bytes.
        let n = unsafe { libc::recv(self.fd(), peek.as_mut_ptr().cast(), peek.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if n == 0 {
            return Err(Broken);
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(Broken) };
        }
        let seen = peek.get(..n as usize).ok_or(Broken)?;
        let Some(end) = seen.iter().position(|b| *b == b'\n') else {
            return if seen.len() == peek.len() { Err(Broken) } else { Ok(None) };
        };
        let mut line = vec![0u8; end + 1];
        self.stream.read_exact(&mut line).map_err(|_| Broken)?;
        let text = std::str::from_utf8(line.get(..end).ok_or(Broken)?).map_err(|_| Broken)?;
        let port = text.strip_prefix("CONNECT ").ok_or(Broken)?.trim().parse::<u32>().map_err(|_| Broken)?;
        Ok(Some(port))
    }
}

/// Connects to the Unix socket `path` without waiting: a listener whose backlog is
/// full counts as refusing (the event loop never blocks on a host program).
pub fn connect_now(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket call; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: connect with a live sockaddr_un of the given size.
    if unsafe { libc::connect(owned.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}
