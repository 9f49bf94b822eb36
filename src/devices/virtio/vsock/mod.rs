//! virtio-vsock (device ID 19): stream sockets between the guest and host programs,
//! implemented in skiff (no /dev/vhost-vsock needed), with Firecracker's host-side
//! convention so its users' tools work unchanged:
//!
//! - the host connects to the Unix socket `uds` (skiff listens there) and writes
//!   `CONNECT <port>\n`; skiff asks the guest (REQUEST to `port`) and, once the guest
//!   accepts, answers `OK <host port>\n` (the port skiff assigned to the host's end)
//!   and the stream is the connection;
//! - a guest connection to host (CID 2) port P goes to the Unix socket `uds_P`; one
//!   that nobody listens on (or whose backlog is full) is refused with RST.
//!
//! Queues: 0 receive (to the guest), 1 transmit (from the guest), 2 events. Receive
//! and event chains are held until there is something to put in them, as
//! virtio-net's are. Control packets (RESPONSE, RST, SHUTDOWN, credit) go first;
//! then host data is read straight from the host socket into the guest's buffer, for
//! connections that have data and credit, round-robin, at most [`PUMP_BUDGET`] packets
//! a wake-up. Host sockets are watched edge-triggered in the device's own epoll set.
//!
//! Flow control per the virtio spec: skiff never sends the guest more than its
//! advertised buffer minus what is unacknowledged, asks for credit (CREDIT_REQUEST)
//! when it has none, and tells the guest its own fwd_cnt when a quarter of its
//! [`conn::CONN_BUF`] was freed or when asked. A guest that sends past the credit
//! skiff gave is reset.
//!
//! Ends: SHUTDOWN from the guest shuts the host socket's write side (SEND) or stops
//! reading it (RCV), both closes it and answers RST; host EOF is SHUTDOWN(SEND) to the
//! guest; a host peer that vanished (a write or read error) is RST. A device reset
//! closes every host socket (EOF or ECONNRESET for host programs). Connections are
//! not saved in a snapshot: after a restore the guest gets
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drops its connections (as with
//! Firecracker); new ones work.

pub mod conn;
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::{Chain, host_slices, read_stream, write_stream};
use super::poller::Poller;
use super::{Completion, DeviceState, Handled, Outcome, VirtioDevice, VirtioError};
use conn::{CONN_BUF, Conn, Phase};
use packet::*;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];
/// Packets put in receive buffers per wake-up of the event loop.
pub const PUMP_BUDGET: usize = 256;
/// Host connections accepted per wake-up.
const ACCEPT_BUDGET: usize = 64;
/// Connections at most (new ones beyond are refused).
pub const MAX_CONNS: usize = 1024;
/// The largest payload of one packet, either way (Linux's own limit).
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// First port skiff gives the host's end of a host-initiated connection.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const EVENT_TRANSPORT_RESET: u32 = 0;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_KICK: u64 = 1;
const FIRST_CONN_TOKEN: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("--vsock uds={0}: in use (another program listens there)")]
    InUse(String),
    #[error("--vsock uds={0}: exists and is not a socket")]
    NotSocket(String),
    #[error("--vsock uds={0}: {1}")]
    Io(String, std::io::Error),
}

/// Counters of the device's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockCounters {
    pub opened: u64,
    pub reset: u64,
    /// Guest packets dropped: wrong CIDs, a bad length.
    pub dropped: u64,
}

pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    poller: Poller,
    kick: EventFd,
    conns: HashMap<u64, Conn>,
    /// (local port, guest port) -> connection token.
    by_ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    rx: VecDeque<Chain>,
    events: VecDeque<Chain>,
    /// Header-only packets for the guest, in order.
    control: VecDeque<Header>,
    /// The last pump stopped for want of receive buffers.
    rx_starved: bool,
    /// The listener may hold connections not yet accepted.
    accept_pending: bool,
    reset_event_pending: bool,
    mem: Option<GuestMemoryMmap>,
    pub counters: VsockCounters,
}

impl Vsock {
    /// Listens on `uds` (a stale socket file nobody listens on is replaced).
    pub fn new(cid: u32, uds: &Path) -> Result<Vsock, VsockError> {
        let shown = uds.display().to_string();
        let io = |e| VsockError::Io(shown.clone(), e);
        if let Ok(meta) = std::fs::symlink_metadata(uds) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotSocket(shown));
            }
            if std::os::unix::net::UnixStream::connect(uds).is_ok() {
                return Err(VsockError::InUse(shown));
            }
            std::fs::remove_file(uds).map_err(io)?;
        }
        let listener = UnixListener::bind(uds).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let poller = Poller::new(64).map_err(io)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(io)?;
        poller.add(listener.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_LISTENER).map_err(io)?;
        poller.add(kick.as_raw_fd(), EventSet::IN, TOKEN_KICK).map_err(io)?;
        Ok(Vsock {
            cid: u64::from(cid),
            uds: uds.to_path_buf(),
            listener,
            poller,
            kick,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rx: VecDeque::new(),
            events: VecDeque::new(),
            control: VecDeque::new(),
            rx_starved: false,
            accept_pending: false,
            reset_event_pending: false,
            mem: None,
            counters: VsockCounters::default(),
        })
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A header from the host's end of `c` to the guest's.
    fn header(cid: u64, c: &Conn, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt: c.fwd_cnt,
        }
    }

    /// An RST answering a guest packet that has no connection.
    fn rst_for(&mut self, h: &Header) {
        if h.op == OP_RST {
            return;
        }
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// A header-only packet for connection `token`'s guest end, after those queued.
    fn queue(&mut self, token: u64, op: u16, flags: u32) {
        let cid = self.cid;
        if let Some(c) = self.conns.get_mut(&token) {
            c.fwd_cnt_sent = c.fwd_cnt;
            let h = Self::header(cid, c, op, flags, 0);
            self.control.push_back(h);
        }
    }

    fn add_conn(&mut self, c: Conn) -> Option<u64> {
        if self.conns.len() >= MAX_CONNS {
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.poller.add(c.fd(), ev, token).ok()?;
        if c.phase != Phase::HostHandshake {
            self.by_ports.insert((c.local_port, c.peer_port), token);
        }
        self.conns.insert(token, c);
        self.counters.opened += 1;
        Some(token)
    }

    /// Ends a connection: its host socket is closed (EOF or ECONNRESET for the host).
    fn remove(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            self.poller.remove(c.fd());
            self.by_ports.remove(&(c.local_port, c.peer_port));
        }
    }

    fn reset_conn(&mut self, token: u64) {
        self.queue(token, OP_RST, 0);
        self.remove(token);
        self.counters.reset += 1;
    }

    /// A port for the host's end of a host-initiated connection, not in use.
    fn local_port(&mut self, peer: u32) -> u32 {
        // At most MAX_CONNS ports are taken, so this ends within MAX_CONNS + 1 tries.
        for _ in 0..=MAX_CONNS {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_ports.contains_key(&(p, peer)) {
                return p;
            }
        }
        self.next_local_port
    }

    /// One packet from the guest.
    fn on_guest_packet(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.counters.dropped += 1;
            return;
        }
        if h.kind != TYPE_STREAM {
            self.rst_for(&h);
            return;
        }
        let Some(&token) = self.by_ports.get(&(h.dst_port, h.src_port)) else {
            if h.op == OP_REQUEST {
                self.guest_connects(&h);
            } else {
                self.rst_for(&h);
            }
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else { return };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.credit() > 0 {
            c.credit_requested = false;
        }
        match (h.op, c.phase) {
            (OP_RESPONSE, Phase::AwaitResponse) => {
                c.phase = Phase::Established;
                let line = format!("OK {}\n", c.local_port);
                // The socket's buffer is empty at this point: the line fits whole.
                if std::io::Write::write(&mut c.stream, line.as_bytes()).ok() != Some(line.len()) {
                    self.reset_conn(token);
                }
            }
            (OP_RW, Phase::Established) => {
                if c.guest_done_sending || c.send_to_host(payload).is_err() {
                    self.reset_conn(token);
                } else if c.owes_credit_update() {
                    self.queue(token, OP_CREDIT_UPDATE, 0);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.queue(token, OP_CREDIT_UPDATE, 0),
            (OP_SHUTDOWN, Phase::Established) => {
                c.guest_done_sending |= h.flags & SHUTDOWN_SEND != 0;
                c.guest_done_receiving |= h.flags & SHUTDOWN_RCV != 0;
                let flushed = c.flush_to_host();
                if flushed.is_err() || (c.guest_done_sending && c.guest_done_receiving) {
                    // Both directions done: the connection is over (the guest waits for RST).
                    self.reset_conn(token);
                }
            }
            (OP_RST, _) => self.remove(token),
            _ => self.reset_conn(token),
        }
    }

    /// The guest connects to host port `h.dst_port`: the Unix socket `uds_PORT`.
    fn guest_connects(&mut self, h: &Header) {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let Ok(stream) = conn::connect_now(Path::new(&path)) else {
            self.rst_for(h);
            return;
        };
        let mut c = Conn::new(stream, Phase::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match self.add_conn(c) {
            Some(token) => self.queue(token, OP_RESPONSE, 0),
            None => self.rst_for(h),
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        // Ports are assigned once the CONNECT line names the guest's.
                        let _ = self.add_conn(Conn::new(stream, Phase::HostHandshake, 0, 0));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.accept_pending = false;
                    return;
                }
            }
        }
        let _ = self.kick.write(1); // more may wait: next turn
    }

    /// A host socket's edge.
    fn host_event(&mut self, token: u64, ev: EventSet) {
        let Some(c) = self.conns.get_mut(&token) else { return };
        if c.phase == Phase::HostHandshake {
            match c.read_connect_line() {
                Ok(Some(port)) => {
                    let local = self.local_port(port);
                    if let Some(c) = self.conns.get_mut(&token) {
                        c.local_port = local;
                        c.peer_port = port;
                        c.phase = Phase::AwaitResponse;
                    }
                    self.by_ports.insert((local, port), token);
                    self.queue(token, OP_REQUEST, 0);
                }
                Ok(None) => {}
                Err(conn::Broken) => self.remove(token),
            }
            return;
        }
        if ev.contains(EventSet::IN) || ev.contains(EventSet::HANG_UP) || ev.contains(EventSet::READ_HANG_UP) {
            c.readable = true;
        }
        if ev.contains(EventSet::OUT) && !c.to_host.is_empty() {
            if c.flush_to_host().is_err() {
                self.reset_conn(token);
                return;
            }
            if c.owes_credit_update() {
                self.queue(token, OP_CREDIT_UPDATE, 0);
            }
        }
        if ev.contains(EventSet::ERROR) {
            self.reset_conn(token);
        }
    }

    /// Fills held receive buffers: control packets first, then host data.
    fn pump(&mut self) -> Vec<Completion> {
        let mut done = Vec::new();
        let Some(mem) = self.mem.clone() else { return done };
        self.rx_starved = false;
        let mut order: Vec<u64> = self.conns.keys().copied().collect();
        order.sort_unstable();
        let mut budget = PUMP_BUDGET;
        while budget > 0 {
            if let Some(h) = self.control.front().copied() {
                let Some(chain) = self.rx.pop_front() else {
                    self.rx_starved = true;
                    return done;
                };
                self.control.pop_front();
                let ok = write_stream(&mem, chain.writable(), 0, &h.encode());
                done.push(Completion { queue: RX_QUEUE, head: chain.head, outcome: Outcome { used_len: if ok { HDR_LEN as u32 } else { 0 }, bytes: 0, refused: !ok } });
                budget -= 1;
                continue;
            }
            let mut progressed = false;
            for &token in &order {
                if budget == 0 {
                    break;
                }
                match self.read_host(token, &mem) {
                    Some(Some(c)) => {
                        done.push(c);
                        budget -= 1;
                        progressed = true;
                    }
                    Some(None) => progressed |= !self.control.is_empty(),
                    None => {
                        self.rx_starved = true;
                        return done;
                    }
                }
            }
            if !progressed && self.control.is_empty() {
                return done;
            }
        }
        let _ = self.kick.write(1); // budget spent: the rest on the next turn
        done
    }

    /// One packet of host data for connection `token`: Some(Some) one sent, Some(None)
    /// nothing to send now, None no receive buffer.
    fn read_host(&mut self, token: u64, mem: &GuestMemoryMmap) -> Option<Option<Completion>> {
        let Some(c) = self.conns.get_mut(&token) else { return Some(None) };
        if c.phase != Phase::Established || !c.readable || c.host_eof || c.guest_done_receiving {
            return Some(None);
        }
        let credit = c.credit();
        if credit == 0 {
            if !c.credit_requested {
                c.credit_requested = true;
                self.queue(token, OP_CREDIT_REQUEST, 0);
            }
            return Some(None);
        }
        let chain = self.rx.front()?;
        let room = chain.writable_len().saturating_sub(HDR_LEN as u64);
        let take = room.min(u64::from(credit)).min(u64::from(MAX_PAYLOAD));
        let Some(iov) = host_slices(mem, chain.writable(), HDR_LEN as u64, take) else { return Some(None) };
        match c.read_into(&iov) {
            Ok(0) => {
                c.host_eof = true;
                c.readable = false;
                self.queue(token, OP_SHUTDOWN, SHUTDOWN_SEND);
                Some(None)
            }
            Ok(n) => {
                let chain = self.rx.pop_front()?;
                let cid = self.cid;
                let c = self.conns.get_mut(&token)?;
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.fwd_cnt_sent = c.fwd_cnt;
                let h = Self::header(cid, c, OP_RW, 0, n as u32);
                write_stream(mem, chain.writable(), 0, &h.encode());
                let len = (HDR_LEN + n) as u32;
                Some(Some(Completion { queue: RX_QUEUE, head: chain.head, outcome: Outcome { used_len: len, bytes: n as u64, refused: false } }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.readable = false;
                Some(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Some(None),
            Err(_) => {
                self.reset_conn(token);
                Some(None)
            }
        }
    }

    fn wants_pump(&self) -> bool {
        !self.control.is_empty() || self.rx_starved
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0 // stream sockets only (no SEQPACKET)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.cid.to_le_bytes();
        data.fill(0);
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        for (d, s) in data.iter_mut().zip(c.get(from..).unwrap_or(&[])) {
            *d = *s;
        }
    }

    fn reset(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.remove(t);
        }
        self.rx.clear();
        self.events.clear();
        self.control.clear();
        self.rx_starved = false;
        self.reset_event_pending = false;
        let _ = self.kick.read();
    }

    fn ready_for_more(&self, index: u16) -> bool {
        match index {
            RX_QUEUE => self.rx.len() < usize::from(QUEUE_SIZES[0]),
            EVENT_QUEUE => self.events.len() < usize::from(QUEUE_SIZES[2]),
            _ => true,
        }
    }

    fn handle_chain(&mut self, index: u16, chain: Chain, mem: &GuestMemoryMmap) -> Handled {
        if self.mem.is_none() {
            self.mem = Some(mem.clone());
        }
        match index {
            RX_QUEUE => {
                if chain.readable().next().is_some() || chain.writable_len() < HDR_LEN as u64 {
                    return Handled::Done(Outcome::refused(0));
                }
                self.rx.push_back(chain);
                if self.wants_pump() {
                    let _ = self.kick.write(1);
                }
                Handled::Queued
            }
            TX_QUEUE => {
                let mut hdr = [0u8; HDR_LEN];
                if chain.writable().next().is_some() || !read_stream(mem, chain.readable(), 0, &mut hdr) {
                    self.counters.dropped += 1;
                    return Handled::Done(Outcome::refused(0));
                }
                let h = Header::decode(&hdr);
                let body = chain.readable_len() - HDR_LEN as u64;
                if h.len > MAX_PAYLOAD || u64::from(h.len) > body {
                    self.counters.dropped += 1;
                    self.rst_for(&h);
                    let _ = self.kick.write(1);
                    return Handled::Done(Outcome::refused(0));
                }
                let mut payload = vec![0u8; h.len as usize];
                if !read_stream(mem, chain.readable(), HDR_LEN as u64, &mut payload) {
                    return Handled::Done(Outcome::refused(0));
                }
                self.on_guest_packet(h, &payload);
                if self.wants_pump() || !self.conns.is_empty() {
                    let _ = self.kick.write(1); // replies, or credit that frees host data
                }
                Handled::Done(Outcome { used_len: 0, bytes: u64::from(h.len), refused: false })
            }
            EVENT_QUEUE => {
                if chain.readable().next().is_some() || chain.writable_len() < 4 {
                    return Handled::Done(Outcome::refused(0));
                }
                if self.reset_event_pending {
                    self.reset_event_pending = false;
                    let ok = write_stream(mem, chain.writable(), 0, &EVENT_TRANSPORT_RESET.to_le_bytes());
                    return Handled::Done(Outcome { used_len: if ok { 4 } else { 0 }, bytes: 0, refused: !ok });
                }
                self.events.push_back(chain);
                Handled::Queued
            }
            _ => Handled::Done(Outcome::refused(0)),
        }
    }

    fn held(&self, index: u16) -> u16 {
        match index {
            RX_QUEUE => self.rx.len() as u16,
            EVENT_QUEUE => self.events.len() as u16,
            _ => 0,
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.poller.fd()]
    }

    fn backend_ready(&mut self, _i: usize) -> Vec<Completion> {
        let mut accept = self.accept_pending;
        for (token, ev) in self.poller.ready() {
            match token {
                TOKEN_LISTENER => accept = true,
                TOKEN_KICK => {
                    let _ = self.kick.read();
                }
                t => self.host_event(t, ev),
            }
        }
        if accept {
            self.accept_pending = true;
            self.accept();
        }
        self.pump()
    }

    fn state(&self) -> DeviceState {
        DeviceState::Vsock { cid: self.cid }
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError> {
        match state {
            DeviceState::Vsock { cid } if *cid == self.cid => {
                // The guest's connections did not survive: it is told to drop them.
                self.reset_event_pending = true;
                Ok(())
            }
            DeviceState::Vsock { cid } => Err(VirtioError::Device(format!("the snapshot's vsock had guest CID {cid}, this one {}", self.cid))),
            other => Err(VirtioError::Device(format!("a vsock device cannot take {other:?}"))),
        }
    }
}
