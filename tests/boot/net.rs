//! The network and vsock checks of the 2-vCPU Debian boot (see the README's network
//! section). Everything runs inside a network namespace the test makes (`ip netns
//! add`), with the TAP inside it and skiff started there: never the host's own
//! interfaces, never an outside address. The vsock half uses /bin/skiff-vsock in the
//! guest (guest/checks/skiff-vsock.c, built by scripts/fetch-guest).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::Guest;

const CMD_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes each transfer moves: 1 MiB. Moving a MiB through the guest kernel costs
/// seconds where its kernel mode is emulated (`cat` of a 1 MiB file to another: 8 s),
/// so 64 MiB each way, TCP and vsock, would take the boot test hours here; bench/net.py
/// moves more.
pub const TRANSFER: u64 = 1 << 20;
pub const HOST_IP: &str = "10.0.2.1";
pub const GUEST_IP: &str = "10.0.2.2";
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// The host end's MAC, the same in every namespace: a clone restored into another
/// namespace finds the host where its ARP cache says (as a cloned VM's network would
/// be set up).
pub const HOST_MAC: &str = "06:00:ac:10:00:01";
pub const GUEST_CID: u32 = 3;

/// A network namespace with a TAP `skt0` at 10.0.2.1/24 in it, removed when dropped.
pub struct Netns {
    pub name: String,
    /// The vsock device's Unix socket (host side).
    pub uds: PathBuf,
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("skiff-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up && ip -n {name} tuntap add skt0 mode tap && \
             ip -n {name} link set skt0 address {HOST_MAC} && ip -n {name} addr add {HOST_IP}/24 dev skt0 && \
             ip -n {name} link set skt0 up"
        ));
        let uds = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("vsock-{}-{tag}.sock", std::process::id()));
        Netns { name, uds }
    }

    /// skiff's arguments for the network and vsock devices.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--net".into(),
            format!("tap=skt0,mac={GUEST_MAC}"),
            "--vsock".into(),
            format!("cid={GUEST_CID},uds={}", self.uds.display()),
        ]
    }

    /// A shell command in the namespace; its stdout.
    pub fn run(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', "'\\''")))
    }

    /// A Python program in the namespace, in the background.
    pub fn python(&self, program: &str, args: &[String]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", program])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 in the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Reads N bytes from one connection (TCP on ADDR:PORT, or Unix at PATH), prints
/// "N sha256". Argument: tcp:ADDR:PORT | unix:PATH, N.
const SINK: &str = r#"
import hashlib, socket, sys
kind, _, where = sys.argv[1].partition(":")
if kind == "tcp":
    host, port = where.rsplit(":", 1)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, int(port)))
else:
    s = socket.socket(socket.AF_UNIX); s.bind(where)
s.listen(1); print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0; want = int(sys.argv[2])
while n < want:
    d = c.recv(1 << 20)
    if not d: break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"#;

/// Sends N random bytes on one connection (TCP to ADDR:PORT, or vsock through the
/// device's socket: CONNECT PORT first), prints "N sha256". Retries the connect for
/// 60 s (the guest's listener starts at its own pace).
const SOURCE: &str = r#"
import hashlib, os, socket, sys, time
kind, _, where = sys.argv[1].partition(":")
n = int(sys.argv[2]); h = hashlib.sha256()
for _ in range(600):
    try:
        if kind == "tcp":
            host, port = where.rsplit(":", 1); c = socket.create_connection((host, int(port)))
        else:
            path, port = where.rsplit(":", 1); c = socket.socket(socket.AF_UNIX); c.connect(path)
            c.sendall(b"CONNECT %s\n" % port.encode()); line = b""
            while not line.endswith(b"\n"):
                b = c.recv(1)
                if not b: raise OSError("closed")
                line += b
            if not line.startswith(b"OK "): raise OSError(line)
        break
    except OSError:
        time.sleep(0.1)
sent = 0
while sent < n:
    d = os.urandom(min(1 << 20, n - sent)); c.sendall(d); h.update(d); sent += len(d)
c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
print(sent, h.hexdigest(), flush=True)
"#;

fn child_line(c: Child) -> String {
    let out = c.wait_with_output().expect("python");
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string()
}

/// Loads the drivers and gives eth0 its static address (again after a reboot).
pub fn guest_network_up(g: &mut Guest) {
    let out = g.run(
        &format!(
            "modprobe virtio_net; modprobe vmw_vsock_virtio_transport; ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && cat /sys/class/net/eth0/address"
        ),
        CMD_TIMEOUT,
    );
    assert!(out.iter().any(|l| l.trim() == GUEST_MAC), "eth0 with skiff's MAC: {out:?}");
}

pub fn ping_both_ways(g: &mut Guest, ns: &Netns) {
    let out = g.run(&format!("ping -c 3 -W 10 {HOST_IP} | grep -c 'bytes from'"), CMD_TIMEOUT);
    assert_eq!(out.last().map(|s| s.trim()), Some("3"), "guest -> host ping: {out:?}");
    let out = ns.run(&format!("ping -c 3 -W 10 {GUEST_IP} | grep -c \"bytes from\""));
    assert_eq!(out.trim(), "3", "host -> guest ping");
}

/// The SHA-256 the guest computes of /tmp/FILE.
fn guest_sum(g: &mut Guest, file: &str) -> String {
    let out = g.run(&format!("sha256sum /tmp/{file}"), CMD_TIMEOUT);
    out.last().and_then(|l| l.split_whitespace().next()).unwrap_or("").to_string()
}

/// BYTES host -> guest and back guest -> host over TCP, checksums equal on all
/// sides. The data is the host's (random data made by the guest kernel costs 86 s a
/// MiB where its kernel mode is emulated); the guest sends back what it received.
pub fn tcp_each_way(g: &mut Guest, ns: &Netns, bytes: u64) {
    let listener = "nc -l -p 5002 > /tmp/rx";
    let source = ns.python(SOURCE, &[format!("tcp:{GUEST_IP}:5002"), bytes.to_string()]);
    let sent = host_to_guest(g, listener, source);
    let sink = ns.python(SINK, &[format!("tcp:{HOST_IP}:5001"), bytes.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    g.run(&format!("nc {HOST_IP} 5001 < /tmp/rx; rm -f /tmp/rx"), CMD_TIMEOUT);
    assert_eq!(child_line(sink), sent, "guest -> host over TCP");
}

/// The same over vsock (skiff-vsock in the guest, the device's Unix sockets on the
/// host).
pub fn vsock_each_way(g: &mut Guest, ns: &Netns, bytes: u64) {
    let listener = "skiff-vsock listen 5004 < /dev/null > /tmp/rx";
    let source = ns.python(SOURCE, &[format!("unix:{}:5004", ns.uds.display()), bytes.to_string()]);
    let sent = host_to_guest(g, listener, source);
    let path = format!("{}_5003", ns.uds.display());
    let _ = std::fs::remove_file(&path);
    let sink = ns.python(SINK, &[format!("unix:{path}"), bytes.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    g.run("skiff-vsock connect 2 5003 < /tmp/rx; rm -f /tmp/rx", CMD_TIMEOUT);
    assert_eq!(child_line(sink), sent, "guest -> host over vsock");
    let _ = std::fs::remove_file(&path);
}

/// Starts `listener` in the guest (writing /tmp/rx), lets the host's `source` (which
/// retries its connect) send to it, waits for the listener to end; the guest's
/// checksum of /tmp/rx must be the host's. Returns the source's "BYTES SHA256".
fn host_to_guest(g: &mut Guest, listener: &str, source: Child) -> String {
    g.run(&format!("rm -f /tmp/rx; ({listener} & echo $! > /tmp/rx.pid)"), CMD_TIMEOUT);
    let sent = child_line(source);
    g.run("while kill -0 $(cat /tmp/rx.pid) 2>/dev/null; do sleep 0.5; done", CMD_TIMEOUT);
    let size = g.run("wc -c < /tmp/rx", CMD_TIMEOUT);
    assert_eq!(format!("{} {}", size.concat().trim(), guest_sum(g, "rx")), sent, "host -> guest");
    sent
}

/// Everything: addresses, pings, TCP and vsock transfers, many vsock connections and
/// a vanishing host peer. Call after the first boot.
pub fn check(g: &mut Guest, ns: &Netns) {
    guest_network_up(g);
    ping_both_ways(g, ns);
    tcp_each_way(g, ns, TRANSFER);
    vsock_each_way(g, ns, TRANSFER);
    vsock_many_connections(g, ns);
    host_peer_vanishes(g, ns);
}

/// After an in-place reboot: the device set up again by a new kernel moves the same
/// (a quarter of the first boot's transfer: the path is the same).
pub fn check_after_reboot(g: &mut Guest, ns: &Netns) {
    guest_network_up(g);
    ping_both_ways(g, ns);
    tcp_each_way(g, ns, TRANSFER / 4);
}

/// Connects to the guest's vsock port through the device's socket (Firecracker's
/// convention: `CONNECT PORT`, answered `OK ...`), retrying while the guest's listener
/// starts.
fn vsock_connect(ns: &Netns, port: u32) -> UnixStream {
    let started = Instant::now();
    loop {
        let attempt = UnixStream::connect(&ns.uds).and_then(|mut c| {
            c.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\n") {
                if c.read(&mut b)? == 0 {
                    return Err(std::io::Error::other("closed before OK"));
                }
                line.push(b[0]);
            }
            if line.starts_with(b"OK ") { Ok(c) } else { Err(std::io::Error::other(String::from_utf8_lossy(&line).into_owned())) }
        });
        match attempt {
            Ok(c) => return c,
            Err(e) if started.elapsed() > CMD_TIMEOUT => panic!("vsock CONNECT {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// 100 host connections to one guest echo server, all open at once: each sends its
/// own 4 KiB, shuts its write side (a half-close) and reads its bytes back to EOF.
pub fn vsock_many_connections(g: &mut Guest, ns: &Netns) {
    const N: usize = 100;
    const LEN: usize = 4 << 10;
    g.run(&format!("rm -f /tmp/echo; (skiff-vsock echo 5005 {N} > /tmp/echo 2>&1 &)"), CMD_TIMEOUT);
    let conns: Vec<UnixStream> = (0..N).map(|_| vsock_connect(ns, 5005)).collect();
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..LEN).map(|k| (k * 7 + i * 13) as u8).collect();
                let mut reader = c.try_clone().expect("clone");
                let echo = std::thread::spawn(move || {
                    let mut back = Vec::new();
                    reader.read_to_end(&mut back).map(|_| back)
                });
                c.write_all(&data).expect("send to the echo server");
                c.shutdown(std::net::Shutdown::Write).expect("half-close");
                let back = echo.join().expect("reader").expect("read the echo");
                assert!(back == data, "connection {i}: {} bytes came back of {LEN}, or different ones", back.len());
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a vsock connection failed");
    }
    let out = g.run("while ! grep -q echo /tmp/echo; do sleep 0.2; done; cat /tmp/echo", CMD_TIMEOUT);
    assert_eq!(out, vec![format!("echo {N} {}", N * LEN)], "the guest's echo server");
}

/// The host peer vanishes mid-transfer: the host's listener for port 5006 reads 1 MiB
/// of a guest upload and closes. The guest's sender ends; skiff runs on.
pub fn host_peer_vanishes(g: &mut Guest, ns: &Netns) {
    let path = format!("{}_5006", ns.uds.display());
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the host's port-5006 socket");
    let host = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept the guest's connection");
        let mut buf = vec![0u8; 1 << 20];
        c.read_exact(&mut buf).expect("the first MiB");
    });
    let out = g.run("dd if=/dev/zero bs=64k count=4096 2>/dev/null | skiff-vsock connect 2 5006 >/dev/null 2>&1; echo sender-ended", CMD_TIMEOUT);
    host.join().expect("host side");
    assert!(out.iter().any(|l| l == "sender-ended"), "{out:?}");
    let _ = std::fs::remove_file(&path);
}

/// A vsock connection open when the snapshot is taken: the guest listens on port
/// 5007 (its input a `sleep`, so it never half-closes) and the host connects.
pub fn hold_vsock_connection(g: &mut Guest, ns: &Netns) -> UnixStream {
    g.run("(sleep 100000 | skiff-vsock listen 5007 > /dev/null 2>&1 &)", CMD_TIMEOUT);
    let mut c = vsock_connect(ns, 5007);
    c.write_all(b"held\n").expect("write on the held connection");
    c
}

/// After the vsock device was reset (an in-place reboot) or skiff ended: the host's
/// end of the held connection reads EOF (or a reset), never hangs.
pub fn held_connection_ended(mut held: UnixStream) {
    held.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut buf = [0u8; 64];
    match held.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the held vsock connection after skiff ended: {other:?}"),
    }
}

/// In the restored guest: the connection that was open at the snapshot was reset (the
/// guest's listener ended, as with Firecracker), the network answers again, and new
/// vsock and TCP connections work.
pub fn after_restore(r: &mut Guest, ns: &Netns) {
    // (Each round forks twice: a second or more of emulated guest kernel work.)
    let out = r.run("n=0; while pidof skiff-vsock >/dev/null && [ $n -lt 30 ]; do sleep 1; n=$((n+1)); done; pidof skiff-vsock || echo reset", CMD_TIMEOUT);
    assert_eq!(out, vec!["reset".to_string()], "the vsock connection open at the snapshot");
    ping_both_ways(r, ns);
    vsock_each_way(r, ns, TRANSFER / 4);
    tcp_each_way(r, ns, TRANSFER / 4);
}
