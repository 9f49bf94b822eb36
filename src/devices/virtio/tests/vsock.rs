//! virtio-vsock with a mock guest driver on the device's queues and real host programs
//! on its Unix sockets: Firecracker's CONNECT/OK handshake, guest connections to
//! `uds_PORT`, 1 MiB each way under credit flow control, 100 connections at once,
//! half-close, a host peer that vanishes, hostile packets, reset and restore.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::ring::Vq;
use super::*;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::vsock::packet::*;

const CID: u64 = 3;
const RXBUF: u64 = 0x20_0000;
const TXBUF: u64 = 0x30_0000;
const BUF: u32 = 4096;
/// The guest's own receive buffer per connection (what it advertises).
const GUEST_BUF: u32 = 64 << 10;

struct Guest {
    d: Driver,
    rx: Vq,
    tx: Vq,
    ev: Vq,
    uds: PathBuf,
}

fn uds(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("skiff-vsock-{}-{name}", std::process::id()))
}

impl Guest {
    fn start(name: &str) -> Guest {
        let path = uds(name);
        let d = Driver::new(Box::new(Vsock::new(CID as u32, &path).unwrap()));
        assert_ne!(d.negotiate(VERSION_1) & FEATURES_OK, 0);
        let (rx, tx, ev) = (Vq::new(0, 256, 0x10_0000), Vq::new(1, 256, 0x10_4000), Vq::new(2, 16, 0x10_8000));
        rx.setup(&d);
        tx.setup(&d);
        ev.setup(&d);
        d.write(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(d.read(0x100), CID as u32, "guest_cid in config space");
        let mut g = Guest { d, rx, tx, ev, uds: path };
        for _ in 0..128 {
            g.post_rx();
        }
        g.ev.submit(&g.d, &[(0x1f_0000, 8, true)]);
        g
    }

    fn post_rx(&mut self) {
        let at = RXBUF + u64::from(self.rx.next_head()) * u64::from(BUF);
        self.rx.submit(&self.d, &[(at, BUF, true)]);
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        // Zero fields get a well-behaved guest's values.
        let src_cid = if h.src_cid == 0 { CID } else { h.src_cid };
        let kind = if h.kind == 0 { TYPE_STREAM } else { h.kind };
        let h = Header { len: payload.len() as u32, src_cid, dst_cid: HOST_CID, kind, ..h };
        self.d.mem.write_slice(&h.encode(), GuestAddress(TXBUF)).unwrap();
        self.d.mem.write_slice(payload, GuestAddress(TXBUF + HDR_LEN as u64)).unwrap();
        self.tx.submit(&self.d, &[(TXBUF, HDR_LEN as u32, false), (TXBUF + HDR_LEN as u64, payload.len() as u32, false)]);
        assert!(self.tx.wait_used(&self.d, Duration::from_secs(2)).is_some());
    }

    /// The next packet for the guest (its buffer posted again).
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (id, len) = self.rx.wait_used(&self.d, Duration::from_secs(5))?;
        let at = RXBUF + u64::from(id) * u64::from(BUF);
        let mut hb = [0u8; HDR_LEN];
        self.d.mem.read_slice(&mut hb, GuestAddress(at)).unwrap();
        let h = Header::decode(&hb);
        assert_eq!(len as usize, HDR_LEN + h.len as usize);
        let data = self.d.bytes(at + HDR_LEN as u64, h.len as usize);
        self.post_rx();
        Some((h, data))
    }

    fn reply(&mut self, to: &Header, op: u16, flags: u32, fwd_cnt: u32, payload: &[u8]) {
        let h = Header { src_port: to.dst_port, dst_port: to.src_port, op, flags, buf_alloc: GUEST_BUF, fwd_cnt, ..Header::default() };
        self.send(h, payload);
    }
}

fn data(len: usize, seed: u32) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed).to_le_bytes()[3]).collect()
}

/// The host connects and the guest accepts: (host stream, the REQUEST header).
fn host_connects(g: &mut Guest, port: u32) -> (UnixStream, Header) {
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = g.recv().expect("no REQUEST");
    assert_eq!((req.op, req.src_cid, req.dst_cid, req.dst_port), (OP_REQUEST, HOST_CID, CID, port));
    g.reply(&req, OP_RESPONSE, 0, 0, &[]);
    (host, req)
}

/// The `OK <port>\n` line, byte by byte (nothing after it is taken).
fn read_ok_line(host: &UnixStream) -> String {
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 40 {
        (&*host).read_exact(&mut b).expect("no OK line");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn host_connects_and_a_mebibyte_goes_each_way_under_credit() {
    let mut g = Guest::start("mib");
    let (host, req) = host_connects(&mut g, 1234);
    assert_eq!(read_ok_line(&host), format!("OK {}\n", req.src_port));
    let sent = data(1 << 20, 1);
    let back = data(1 << 20, 2);
    let (sent2, back2) = (sent.clone(), back.clone());
    let mut h2 = host.try_clone().unwrap();
    let writer = std::thread::spawn(move || h2.write_all(&sent2).unwrap());
    let mut h3 = host.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; back2.len()];
        h3.read_exact(&mut got).unwrap();
        got == back2
    });
    // Guest: take host data, acknowledging as it "reads" (fwd_cnt), and send its own
    // in 16 KiB packets within the device's credit.
    let mut got = Vec::new();
    let mut fwd: u32 = 0;
    let mut out = 0usize;
    let (mut dev_alloc, mut dev_fwd) = (0u32, 0u32);
    while got.len() < sent.len() || out < back.len() {
        while out < back.len() && (out as u32).wrapping_sub(dev_fwd) + 16384 <= dev_alloc {
            let end = (out + 16384).min(back.len());
            g.reply(&req, OP_RW, 0, fwd, &back[out..end]);
            out = end;
        }
        let (h, payload) = g.recv().expect("stalled");
        dev_alloc = h.buf_alloc;
        dev_fwd = h.fwd_cnt;
        match h.op {
            OP_RW => {
                got.extend(payload);
                fwd = got.len() as u32;
                assert!(got.len() <= sent.len());
                if fwd % (GUEST_BUF / 2) < 4096 {
                    g.reply(&req, OP_CREDIT_UPDATE, 0, fwd, &[]);
                }
            }
            OP_CREDIT_REQUEST => g.reply(&req, OP_CREDIT_UPDATE, 0, fwd, &[]),
            OP_CREDIT_UPDATE => {}
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(crc32fast::hash(&got), crc32fast::hash(&sent));
    writer.join().unwrap();
    assert!(reader.join().unwrap(), "the host got other bytes than the guest sent");
}

#[test]
fn guest_connects_half_closes_and_is_refused_where_nobody_listens() {
    let mut g = Guest::start("gc");
    // Nobody on uds_7000: RST.
    let req = Header { src_port: 50, dst_port: 7000, op: OP_REQUEST, buf_alloc: GUEST_BUF, ..Header::default() };
    g.send(req, &[]);
    let (h, _) = g.recv().unwrap();
    assert_eq!((h.op, h.dst_port, h.src_port), (OP_RST, 50, 7000));
    // A listener on uds_5000.
    let mut path = g.uds.clone().into_os_string();
    path.push("_5000");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    g.send(Header { src_port: 51, dst_port: 5000, ..req }, &[]);
    let (resp, _) = g.recv().unwrap();
    assert_eq!((resp.op, resp.src_port, resp.dst_port), (OP_RESPONSE, 5000, 51));
    let (mut host, _) = listener.accept().unwrap();
    let to = Header { src_port: 5000, dst_port: 51, ..resp };
    g.reply(&to, OP_RW, 0, 0, b"hello host");
    let mut b = [0u8; 10];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");
    // The guest is done sending: the host reads EOF, and can still send.
    g.reply(&to, OP_SHUTDOWN, SHUTDOWN_SEND, 0, &[]);
    assert_eq!(host.read(&mut b).unwrap(), 0, "EOF after the guest's SHUTDOWN(SEND)");
    host.write_all(b"still here").unwrap();
    let (h, d) = g.recv().unwrap();
    assert_eq!((h.op, &d[..]), (OP_RW, &b"still here"[..]));
    // The host closes: SHUTDOWN(SEND) to the guest; the guest closes: RST.
    drop(host);
    let (h, _) = g.recv().unwrap();
    assert_eq!((h.op, h.flags & SHUTDOWN_SEND), (OP_SHUTDOWN, SHUTDOWN_SEND));
    g.reply(&to, OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV, 10, &[]);
    let (h, _) = g.recv().unwrap();
    assert_eq!(h.op, OP_RST);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_hundred_connections_at_once() {
    let mut g = Guest::start("many");
    let hosts: Vec<UnixStream> = (0..100)
        .map(|i| {
            let mut s = UnixStream::connect(&g.uds).unwrap();
            s.write_all(format!("CONNECT {}\n", 2000 + i).as_bytes()).unwrap();
            s
        })
        .collect();
    let mut reqs = Vec::new();
    while reqs.len() < 100 {
        let (h, _) = g.recv().expect("missing REQUESTs");
        assert_eq!(h.op, OP_REQUEST);
        reqs.push(h);
    }
    for r in &reqs {
        g.reply(r, OP_RESPONSE, 0, 0, &[]);
        g.reply(r, OP_RW, 0, 0, format!("to {}", r.dst_port).as_bytes());
    }
    for (i, h) in hosts.iter().enumerate() {
        let line = read_ok_line(h);
        assert!(line.starts_with("OK "), "{line}");
        let mut b = [0u8; 7];
        (&*h).read_exact(&mut b).unwrap();
        assert_eq!(&b, format!("to {}", 2000 + i).as_bytes());
    }
}

#[test]
fn a_vanished_host_peer_ends_the_connection_and_skiff_goes_on() {
    let mut g = Guest::start("gone");
    let (host, req) = host_connects(&mut g, 99);
    read_ok_line(&host);
    (&host).write_all(&data(10_000, 3)).unwrap();
    drop(host);
    // The data that was sent, then SHUTDOWN; the guest's next write gets RST.
    let mut n = 0;
    loop {
        let (h, d) = g.recv().unwrap();
        if h.op == OP_SHUTDOWN {
            break;
        }
        n += d.len();
    }
    assert_eq!(n, 10_000);
    g.reply(&req, OP_RW, 0, 10_000, b"anyone?");
    let (h, _) = g.recv().unwrap();
    assert_eq!(h.op, OP_RST);
    // New connections work.
    let (host, _) = host_connects(&mut g, 100);
    assert!(read_ok_line(&host).starts_with("OK "));
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_the_device_goes_on() {
    let mut g = Guest::start("hostile");
    // A readable receive buffer, a transmit chain shorter than a header, a writable one.
    g.rx.submit(&g.d, &[(RXBUF + 0x8_0000, 4096, false)]);
    assert_eq!(g.rx.wait_used(&g.d, Duration::from_secs(1)).map(|u| u.1), Some(0), "refused at once");
    g.tx.submit(&g.d, &[(TXBUF, 20, false)]);
    assert!(g.tx.wait_used(&g.d, Duration::from_secs(1)).is_some());
    g.tx.submit(&g.d, &[(TXBUF, 64, true)]);
    assert!(g.tx.wait_used(&g.d, Duration::from_secs(1)).is_some());
    // A length past the chain, a foreign source CID, an unknown connection, a bad type.
    let h = Header { src_cid: CID, dst_cid: HOST_CID, src_port: 1, dst_port: 2, len: 60_000, kind: TYPE_STREAM, op: OP_RW, ..Header::default() };
    g.d.mem.write_slice(&h.encode(), GuestAddress(TXBUF)).unwrap();
    g.tx.submit(&g.d, &[(TXBUF, HDR_LEN as u32 + 10, false)]);
    assert!(g.tx.wait_used(&g.d, Duration::from_secs(1)).is_some());
    g.send(Header { src_cid: 77, op: OP_REQUEST, ..h }, &[]);
    g.send(Header { op: OP_RW, src_port: 9, dst_port: 9, ..h }, b"x");
    g.send(Header { kind: 9, op: OP_REQUEST, src_port: 10, ..h }, &[]);
    let mut rsts = 0;
    while let Some((h, _)) = g.recv() {
        assert_eq!(h.op, OP_RST);
        rsts += 1;
        if rsts == 3 {
            break;
        }
    }
    assert_eq!(g.d.status() & NEEDS_RESET, 0);
    let (host, _) = host_connects(&mut g, 5);
    assert!(read_ok_line(&host).starts_with("OK "));
}

#[test]
fn reset_closes_host_sockets_and_restore_tells_the_guest() {
    let mut g = Guest::start("reset");
    let (host, _) = host_connects(&mut g, 1);
    read_ok_line(&host);
    let st = g.d.mmio.state();
    assert_eq!(st.queues[2].next_avail, 0, "the held event buffer goes back to the ring");
    g.d.write(0x70, 0); // the driver resets the device
    let mut b = [0u8; 1];
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!((&host).read(&mut b).unwrap(), 0, "the host's end is closed");
    // Restored: the guest gets TRANSPORT_RESET in its event buffer.
    g.d.mmio.restore(&st).unwrap();
    let mut ev = Vq::new(2, 16, 0x10_8000);
    // The event buffer is taken again from where the snapshot left it.
    let used = ev.wait_used(&g.d, Duration::from_secs(2)).expect("no event");
    assert_eq!(used.1, 4);
    assert_eq!(g.d.bytes(0x1f_0000, 4), 0u32.to_le_bytes());
}
