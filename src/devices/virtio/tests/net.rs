//! virtio-net against a real TAP, in a network namespace of the test thread's own
//! (nothing on the host's interfaces): frames both ways through an AF_PACKET socket on
//! the TAP's host side, mergeable buffers, a guest without buffers, hostile chains, the
//! held buffers given back in a snapshot, and the one-line errors for bad TAPs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::ring::Vq;
use super::*;
use crate::devices::virtio::net::tap::testing;
use crate::devices::virtio::net::{Net, Tap, TapError, VNET_HDR_LEN};

const MRG: u64 = 1 << 15;
const CSUM: u64 = 1 << 0;
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO4: u64 = 1 << 7;
const MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];
/// An EtherType for local experiments (IEEE 802): nothing in the kernel answers it.
const ETHERTYPE: u16 = 0x88b5;
const RXQ: u64 = 0x20_0000;
const TXQ: u64 = 0x20_4000;
const RXBUF: u64 = 0x24_0000;
const TXBUF: u64 = 0x30_0000;

/// Runs `f` on a thread in a fresh network namespace with a TAP `skt0` (MTU 9000) up;
/// skipped (with a line) where namespaces cannot be made.
fn in_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        if !testing::private_netns() {
            eprintln!("skipped: no network namespace (needs CAP_SYS_ADMIN)");
            return;
        }
        testing::make_tap("skt0");
        testing::set_mtu("skt0", 9000);
        f();
    })
    .join()
    .unwrap();
}

/// An AF_PACKET socket on `skt0`'s host side, for our EtherType only.
fn packet_socket() -> OwnedFd {
    let proto = (ETHERTYPE).to_be() as i32;
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETHERTYPE.to_be();
    sa.sll_ifindex = testing::index("skt0");
    // SAFETY: bind with a live sockaddr_ll of the given size.
    let r = unsafe { libc::bind(s.as_raw_fd(), (&sa as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) };
    assert_eq!(r, 0);
    let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: SO_RCVTIMEO with a live timeval.
    unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32) };
    s
}

fn frame(dst: [u8; 6], src: [u8; 6], payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend(dst);
    f.extend(src);
    f.extend(ETHERTYPE.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn send(s: &OwnedFd, f: &[u8]) {
    // SAFETY: send from a live buffer.
    let n = unsafe { libc::send(s.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n, f.len() as isize, "send: {}", std::io::Error::last_os_error());
}

fn recv(s: &OwnedFd) -> Option<Vec<u8>> {
    let mut b = vec![0u8; 70_000];
    // SAFETY: recv into a live buffer of its length.
    let n = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
    (n > 0).then(|| {
        b.truncate(n as usize);
        b
    })
}

/// A driver with the net device started with `features`, its two queues set up.
fn start(features: u64) -> (Driver, Vq, Vq) {
    let tap = Tap::open("skt0").unwrap();
    let d = Driver::new(Box::new(Net::new(tap, MAC).unwrap()));
    assert_ne!(d.negotiate(VERSION_1 | features) & FEATURES_OK, 0);
    let (rx, tx) = (Vq::new(0, 256, RXQ), Vq::new(1, 256, TXQ));
    rx.setup(&d);
    tx.setup(&d);
    d.write(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.status() & DRIVER_OK, DRIVER_OK);
    testing::wait_running("skt0");
    (d, rx, tx)
}

/// Posts `n` receive buffers of `len` bytes each, one descriptor each, the buffer of
/// descriptor i at RXBUF + i * len.
fn post_rx(d: &Driver, rx: &mut Vq, n: u64, len: u32) {
    for _ in 0..n {
        let at = RXBUF + u64::from(rx.next_head()) * u64::from(len);
        rx.submit(d, &[(at, len, true)]);
    }
}

/// The next received frame of ours (others, if the kernel sends any, are skipped):
/// (used entries, the frame, num_buffers).
fn next_frame(d: &Driver, rx: &mut Vq, buf_len: u32) -> (Vec<(u32, u32)>, Vec<u8>, u16) {
    for _ in 0..64 {
        let first = rx.wait_used(d, Duration::from_secs(5)).expect("no frame reached the guest");
        let addr = RXBUF + u64::from(first.0) * u64::from(buf_len);
        let hdr = d.bytes(addr, VNET_HDR_LEN);
        let nbuf = u16::from_le_bytes([hdr[10], hdr[11]]);
        let mut used = vec![first];
        let mut data = d.bytes(addr + VNET_HDR_LEN as u64, first.1 as usize - VNET_HDR_LEN);
        for _ in 1..nbuf {
            let u = rx.wait_used(d, Duration::from_secs(1)).unwrap();
            data.extend(d.bytes(RXBUF + u64::from(u.0) * u64::from(buf_len), u.1 as usize));
            used.push(u);
        }
        if data.get(12..14) == Some(&ETHERTYPE.to_be_bytes()[..]) {
            return (used, data, nbuf);
        }
        // Someone else's frame: give its buffers back, as a driver would.
        post_rx(d, rx, used.len() as u64, buf_len);
    }
    panic!("only foreign frames");
}

#[test]
fn frames_go_both_ways_through_the_tap() {
    in_netns(|| {
        let s = packet_socket();
        let (d, mut rx, mut tx) = start(MRG | CSUM | GUEST_CSUM);
        assert_eq!(d.read(0x100), u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]), "MAC in config space");
        post_rx(&d, &mut rx, 64, 2048);
        // Host to guest, one buffer.
        let f = frame(MAC, [2, 0, 0, 0, 0, 1], 100, 1);
        send(&s, &f);
        let (used, data, nbuf) = next_frame(&d, &mut rx, 2048);
        assert_eq!((used.len(), nbuf, data), (1, 1, f));
        // Host to guest, 4000 bytes over three mergeable buffers.
        let f = frame(MAC, [2, 0, 0, 0, 0, 1], 3986, 2);
        send(&s, &f);
        let (used, data, nbuf) = next_frame(&d, &mut rx, 2048);
        assert_eq!((used.len(), nbuf), (2, 2));
        assert_eq!(used.iter().map(|u| u.1).sum::<u32>() as usize, f.len() + VNET_HDR_LEN);
        assert_eq!(data, f);
        // Guest to host: a header of zeroes (no offload), then the frame.
        for (i, len) in [60usize, 1500, 8000].into_iter().enumerate() {
            let f = frame([0xff; 6], MAC, len - 14, 10 + i as u8);
            d.fill(TXBUF, VNET_HDR_LEN, 0);
            d.mem.write_slice(&f, GuestAddress(TXBUF + 0x100)).unwrap();
            tx.submit(&d, &[(TXBUF, VNET_HDR_LEN as u32, false), (TXBUF + 0x100, f.len() as u32, false)]);
            assert_eq!(tx.wait_used(&d, Duration::from_secs(2)).map(|u| u.1), Some(0));
            assert_eq!(recv(&s).as_deref(), Some(&f[..]), "frame of {len} bytes");
        }
        assert!(d.interrupted());
    });
}

#[test]
fn a_frame_waits_for_buffers_without_waking_anyone() {
    in_netns(|| {
        let s = packet_socket();
        let (d, mut rx, _tx) = start(0);
        let f = frame(MAC, [2, 0, 0, 0, 0, 1], 200, 3);
        send(&s, &f);
        // The TAP is readable, the guest has no buffers: the device's fd settles.
        d.poll_backends(Duration::from_millis(50));
        let fds = d.mmio.backend_fds();
        let mut pfds: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: a live pollfd array.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        assert_eq!(n, 0, "the device stays readable with nowhere to put the frame");
        // Non-mergeable buffers of 1526 bytes: header and a 1514-byte frame.
        post_rx(&d, &mut rx, 4, 1526);
        let (used, data, _) = next_frame(&d, &mut rx, 1526);
        assert_eq!((used.len(), data), (1, f));
    });
}

#[test]
fn many_frames_arrive_in_order_in_bounded_passes() {
    in_netns(|| {
        let s = packet_socket();
        let (d, mut rx, _tx) = start(MRG | GUEST_CSUM | GUEST_TSO4);
        post_rx(&d, &mut rx, 256, 2048);
        for i in 0..200u8 {
            send(&s, &frame(MAC, [2, 0, 0, 0, 0, 1], 64, i));
        }
        let mut got = 0u8;
        let mut more = 0;
        while got < 200 {
            let (_, data, _) = next_frame(&d, &mut rx, 2048);
            assert_eq!(data[14], got, "frames out of order");
            got += 1;
            // Re-post what was used, as a driver does.
            if got.is_multiple_of(50) {
                post_rx(&d, &mut rx, 50, 2048);
                more += 50;
            }
        }
        assert!(more > 0);
    });
}

#[test]
fn hostile_chains_are_refused_and_the_device_goes_on() {
    in_netns(|| {
        let s = packet_socket();
        let (d, mut rx, mut tx) = start(MRG);
        // Receive: a readable buffer, a buffer shorter than the header.
        rx.submit(&d, &[(RXBUF, 2048, false)]);
        assert_eq!(rx.wait_used(&d, Duration::from_secs(1)).map(|u| u.1), Some(0));
        rx.submit(&d, &[(RXBUF, 8, true)]);
        assert_eq!(rx.wait_used(&d, Duration::from_secs(1)).map(|u| u.1), Some(0));
        // Transmit: writable, shorter than a header, outside RAM, larger than a frame,
        // a header the host refuses (GSO type 0x55, no such thing).
        let bad: [&[(u64, u32, bool)]; 4] = [
            &[(TXBUF, 64, true)],
            &[(TXBUF, 4, false)],
            &[(TXBUF, 12, false), ((RAM as u64) - 8, 64, false)],
            &[(TXBUF, 12, false), (TXBUF, 0x10_0000, false)],
        ];
        for b in bad {
            tx.submit(&d, b);
            assert!(tx.wait_used(&d, Duration::from_secs(1)).is_some());
        }
        d.mem.write_slice(&[0, 0x55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], GuestAddress(TXBUF)).unwrap();
        d.mem.write_slice(&frame([0xff; 6], MAC, 100, 0), GuestAddress(TXBUF + 12)).unwrap();
        tx.submit(&d, &[(TXBUF, 12 + 114, false)]);
        assert!(tx.wait_used(&d, Duration::from_secs(1)).is_some());
        assert!(d.mmio.stats().refused >= 6);
        assert_eq!(d.status() & NEEDS_RESET, 0);
        // Still works both ways.
        post_rx(&d, &mut rx, 64, 2048);
        let f = frame(MAC, [2, 0, 0, 0, 0, 1], 100, 9);
        send(&s, &f);
        assert_eq!(next_frame(&d, &mut rx, 2048).1, f);
        let f = frame([0xff; 6], MAC, 100, 4);
        d.fill(TXBUF, 12, 0);
        d.mem.write_slice(&f, GuestAddress(TXBUF + 12)).unwrap();
        tx.submit(&d, &[(TXBUF, 12 + f.len() as u32, false)]);
        assert!(tx.wait_used(&d, Duration::from_secs(1)).is_some());
        assert_eq!(recv(&s).as_deref(), Some(&f[..]));
    });
}

#[test]
fn held_receive_buffers_go_back_to_the_ring_in_a_snapshot() {
    in_netns(|| {
        let (d, mut rx, _tx) = start(MRG);
        post_rx(&d, &mut rx, 40, 2048);
        let st = d.mmio.state();
        assert_eq!(st.queues[0].next_avail, 0, "40 held buffers are taken again after a restore");
        assert!(matches!(&st.device, crate::devices::virtio::DeviceState::Net { mac, tap } if mac[..] == MAC[..] && tap == "skt0"));
        // Restored into a fresh device on the same TAP: it takes the 8 buffers again
        // and a frame lands in the first.
        drop(d);
        let tap = Tap::open("skt0").unwrap();
        let d2 = Driver::new(Box::new(Net::new(tap, MAC).unwrap()));
        // The rings live in the new driver's memory: copy them over.
        d2.mem.write_slice(&vec![0u8; 0x8000], GuestAddress(RXQ)).unwrap();
        let mut rx2 = Vq::new(0, 256, RXQ);
        for i in 0..40 {
            let head = rx2.chain(&d2, &[(RXBUF + i * 2048, 2048, true)]);
            rx2.make_available(&d2, head);
        }
        d2.mmio.restore(&st).unwrap();
        // The carrier went off and on again: let the link watch catch up.
        std::thread::sleep(Duration::from_millis(1200));
        testing::wait_running("skt0");
        let s = packet_socket();
        let f = frame(MAC, [2, 0, 0, 0, 0, 1], 100, 5);
        send(&s, &f);
        let (used, data, _) = next_frame(&d2, &mut rx2, 2048);
        assert_eq!((used[0].0, data), (0, f));
        // A snapshot of another MAC is refused.
        let mut other = st.clone();
        other.device = crate::devices::virtio::DeviceState::Net { mac: vec![2, 0, 0, 0, 0, 9], tap: "skt0".into() };
        assert!(d2.mmio.restore(&other).is_err());
    });
}

#[test]
fn bad_taps_are_one_line_each() {
    in_netns(|| {
        let e = |name: &str| Tap::open(name).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(matches!(Tap::open("nosuch0"), Err(TapError::Missing(_))), "{}", e("nosuch0"));
        assert!(matches!(Tap::open("lo"), Err(TapError::NotTap(_))), "{}", e("lo"));
        assert!(matches!(Tap::open("a/b"), Err(TapError::BadName(_))));
        let first = Tap::open("skt0").unwrap();
        assert!(matches!(Tap::open("skt0"), Err(TapError::Busy(_))), "{}", e("skt0"));
        drop(first);
        assert!(Tap::open("skt0").is_ok());
        for msg in [e("nosuch0"), e("lo")] {
            assert!(msg.starts_with("--net tap=") && !msg.contains('\n'), "{msg}");
        }
    });
}
