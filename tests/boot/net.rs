//! The network and vsock checks of the Debian boots (to be called from boot.rs; see the
//! README's network section). Everything runs inside a network namespace the test
//! makes (`ip netns add`), with the TAP inside it and skiff started there: never the
//! host's own interfaces, never an outside address.
//!
//! Wiring (in boot_and_check): `let ns = net::Netns::new(&format!("b{cpus}"));`, add
//! `ns.args()` to skiff's arguments, boot with `Guest::boot_in_netns(&ns.name, ...)`,
//! then `net::check(&mut g, &ns)` after the boot and again after the in-place reboot.
//! The vsock half needs /bin/skiff-vsock in the guest (guest/checks/skiff-vsock.c,
//! built by scripts/fetch-guest as skiff-check is).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::common::Guest;

const CMD_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes each transfer moves.
pub const MIB64: u64 = 64 << 20;
pub const HOST_IP: &str = "10.0.2.1";
pub const GUEST_IP: &str = "10.0.2.2";
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
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
             ip -n {name} addr add {HOST_IP}/24 dev skt0 && ip -n {name} link set skt0 up"
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

/// 64 MiB guest -> host and host -> guest over TCP, checksums equal on both sides.
pub fn tcp_64mib_each_way(g: &mut Guest, ns: &Netns) {
    g.run("dd if=/dev/urandom of=/tmp/tx bs=1M count=64 2>/dev/null", CMD_TIMEOUT);
    let mine = guest_sum(g, "tx");
    let sink = ns.python(SINK, &[format!("tcp:{HOST_IP}:5001"), MIB64.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    g.run(&format!("nc {HOST_IP} 5001 < /tmp/tx"), CMD_TIMEOUT);
    assert_eq!(child_line(sink), format!("{MIB64} {mine}"), "guest -> host over TCP");
    g.run("rm -f /tmp/tx; (nc -l -p 5002 > /tmp/rx &) ", CMD_TIMEOUT);
    let source = ns.python(SOURCE, &[format!("tcp:{GUEST_IP}:5002"), MIB64.to_string()]);
    let sent = child_line(source);
    g.run("while pidof nc >/dev/null; do sleep 1; done", CMD_TIMEOUT);
    assert_eq!(format!("{MIB64} {}", guest_sum(g, "rx")), sent, "host -> guest over TCP");
    g.run("rm -f /tmp/rx", CMD_TIMEOUT);
}

/// 64 MiB guest -> host and host -> guest over vsock (skiff-vsock in the guest).
pub fn vsock_64mib_each_way(g: &mut Guest, ns: &Netns) {
    g.run("dd if=/dev/urandom of=/tmp/tx bs=1M count=64 2>/dev/null", CMD_TIMEOUT);
    let mine = guest_sum(g, "tx");
    let path = format!("{}_5003", ns.uds.display());
    let _ = std::fs::remove_file(&path);
    let sink = ns.python(SINK, &[format!("unix:{path}"), MIB64.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    g.run("skiff-vsock connect 2 5003 < /tmp/tx", CMD_TIMEOUT);
    assert_eq!(child_line(sink), format!("{MIB64} {mine}"), "guest -> host over vsock");
    let _ = std::fs::remove_file(&path);
    g.run("rm -f /tmp/tx; (skiff-vsock listen 5004 < /dev/null > /tmp/rx &)", CMD_TIMEOUT);
    let source = ns.python(SOURCE, &[format!("unix:{}:5004", ns.uds.display()), MIB64.to_string()]);
    let sent = child_line(source);
    g.run("while pidof skiff-vsock >/dev/null; do sleep 1; done", CMD_TIMEOUT);
    assert_eq!(format!("{MIB64} {}", guest_sum(g, "rx")), sent, "host -> guest over vsock");
    g.run("rm -f /tmp/rx", CMD_TIMEOUT);
}

/// Everything: addresses, pings, TCP and vsock transfers. Call after each boot.
pub fn check(g: &mut Guest, ns: &Netns) {
    guest_network_up(g);
    ping_both_ways(g, ns);
    tcp_64mib_each_way(g, ns);
    vsock_64mib_each_way(g, ns);
}
