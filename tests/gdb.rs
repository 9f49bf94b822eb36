//! The gdb stub end to end: Debian's gdb in batch mode against the multiboot test
//! kernel guest/tiny/mb-gdb.S (symbols kept) under `--gdb-wait`; a raw protocol
//! client for Ctrl-C and a connection dropped without detach; bad `--gdb` input.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn kernel() -> String {
    common::tiny_kernel("mb-gdb").to_string_lossy().into_owned()
}

/// A socket path of the test's own (tests run in parallel).
fn sock(test: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("skiff-gdb-{test}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn require_gdb() {
    assert!(
        Command::new("gdb").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success()),
        "these tests need Debian's gdb (apt-get install gdb; .ci/run installs it)"
    );
}

/// A skiff that a failing test does not leave running.
struct Skiff(Option<Child>);

impl Drop for Skiff {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `skiff run` on the test kernel with 2 vCPUs, the exit device and `--gdb ADDR
/// --gdb-wait`; returns once the socket is there.
fn start(addr: &str, socket: Option<&Path>) -> Skiff {
    common::require_kvm();
    let k = kernel();
    let child = Command::new(common::SKIFF)
        .args(["run", "--kernel", &k, "--cpus", "2", "--exit-device", "--gdb", addr, "--gdb-wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn skiff");
    if let Some(p) = socket {
        let t = Instant::now();
        while !p.exists() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Skiff(Some(child))
}

/// Waits (at most 120 s) for skiff to end: status and stderr.
fn finish(mut guard: Skiff) -> (ExitStatus, String) {
    let Some(mut child) = guard.0.take() else { panic!("no skiff") };
    let status = common::wait_or_kill(&mut child, Duration::from_secs(120), "skiff");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

/// Debian's gdb in batch mode on the test kernel's symbols: its whole output.
fn gdb(target: &str, commands: &[&str]) -> String {
    let k = kernel();
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "gdb", "-batch", "-nx", "-ex", &format!("file {k}"), "-ex", &format!("target remote {target}")]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run gdb");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn gdb_breaks_reads_steps_watches_and_detaches() {
    require_gdb();
    let s = sock("batch");
    let child = start(&format!("unix:{}", s.display()), Some(&s));
    let out = gdb(
        &s.to_string_lossy(),
        &[
            "info threads",
            "break tick",
            "continue",
            "x/wx &counter",
            "stepi",
            "info registers rip cr0 cr3 efer fs_base",
            "x/wx 0x40000000",
            "set var *(int *)&gdb_flag = 2",
            "delete",
            // A software watchpoint: gdb steps and reads memory after each step (a
            // hardware one does not fire where guest kernel mode is emulated).
            "set can-use-hw-watchpoints 0",
            "watch *(int *)&watched",
            "continue",
            "delete",
            "detach",
        ],
    );
    // Every vCPU is a thread; the guest waits at its first instruction.
    assert!(out.contains("Thread 1.1") && out.contains("Thread 1.2"), "{out}");
    assert!(out.contains("in _start ()"), "{out}");
    assert!(out.contains("hit Breakpoint 1, 0x") && out.contains("in tick ()"), "{out}");
    assert!(out.contains(&format!("{:#x}:\t0x00000000", symbol("counter"))), "{out}");
    // One instruction on: still in tick, past its first instruction.
    assert!(out.lines().any(|l| l.starts_with("rip") && l.contains("<tick+")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("cr0") && l.contains("0x80000011")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("efer") && l.contains("0x500")), "{out}");
    assert!(out.contains("Cannot access memory at address 0x40000000"), "{out}");
    assert!(out.contains("Old value = 0") && out.contains("New value = 1"), "{out}");
    assert!(out.contains("detached"), "{out}");
    // The kernel ran to its end after the detach: 0x20 + the flag gdb wrote.
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some((0x22 << 1) | 1), "{err}\n{out}");
    assert!(err.contains("skiff: gdb: detached; the guest runs on"), "{err}");
    assert!(!s.exists(), "the socket is removed at exit");
}

#[test]
fn gdb_over_loopback_tcp_with_a_hardware_breakpoint() {
    require_gdb();
    // A port nobody uses right now.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let child = start(&format!("tcp:{addr}"), None);
    // Listening yet? (Asked of /proc: a probe connection would be a client that
    // leaves at once, which lets the guest run.)
    let t = Instant::now();
    while !listening(port) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = gdb(&addr, &["hbreak tick", "continue", "continue", "print (int)counter", "delete", "detach"]);
    assert!(out.contains("Hardware assisted breakpoint 1"), "{out}");
    assert!(out.contains("$1 = 1"), "the second hit is the second call: {out}");
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some((0x20 << 1) | 1), "{err}\n{out}");
}

/// Whether a TCP socket listens on 127.0.0.1:`port` (state 0A in /proc/net/tcp).
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")
    })
}

/// A GDB remote protocol packet: `$data#checksum`.
fn packet(data: &str) -> Vec<u8> {
    let sum = data.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${data}#{sum:02x}").into_bytes()
}

/// Reads one packet's data (acking it), skipping acks.
fn read_packet(s: &mut UnixStream) -> String {
    let mut data = Vec::new();
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b).expect("read from the stub");
        if b[0] == b'$' {
            break;
        }
    }
    loop {
        s.read_exact(&mut b).expect("read from the stub");
        if b[0] == b'#' {
            break;
        }
        data.push(b[0]);
    }
    let mut sum = [0u8; 2];
    s.read_exact(&mut sum).unwrap();
    s.write_all(b"+").unwrap();
    // Run-length encoding: `X*n` is X and then n - 29 more of it.
    let mut out = Vec::new();
    let mut bytes = data.into_iter();
    while let Some(b) = bytes.next() {
        if b == b'*' {
            let n = bytes.next().expect("a count after *");
            let last = *out.last().expect("a byte before *");
            out.extend(std::iter::repeat_n(last, usize::from(n - 29)));
        } else {
            out.push(b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn symbol(name: &str) -> u64 {
    let out = Command::new("nm").arg(kernel()).output().expect("nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.ends_with(&format!(" {name}"))).unwrap_or_else(|| panic!("{name} in {text}"));
    u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap()
}

#[test]
fn ctrl_c_stops_the_guest_and_a_dropped_connection_lets_it_run() {
    let s = sock("raw");
    let child = start(&format!("unix:{}", s.display()), Some(&s));
    let mut c = UnixStream::connect(&s).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // Hold the kernel in its wait loop (hold = 1), then let it run.
    let hold = symbol("hold");
    c.write_all(&packet(&format!("M{hold:x},4:01000000"))).unwrap();
    assert_eq!(read_packet(&mut c), "OK");
    c.write_all(&packet("c")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Ctrl-C: every vCPU stops, SIGINT (2) reported with a thread.
    c.write_all(&[0x03]).unwrap();
    let stop = read_packet(&mut c);
    assert!(stop.starts_with("T02"), "{stop}");
    // Stopped in the wait loop: hold reads back as 1.
    c.write_all(&packet(&format!("m{hold:x},4"))).unwrap();
    assert_eq!(read_packet(&mut c), "01000000");
    // An unmapped address is an error, not zeroes.
    c.write_all(&packet("m40000000,4")).unwrap();
    assert!(read_packet(&mut c).starts_with('E'));
    c.write_all(&packet(&format!("M{hold:x},4:00000000"))).unwrap();
    assert_eq!(read_packet(&mut c), "OK");
    // Gone without a detach: the guest runs on to its end.
    drop(c);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some((0x20 << 1) | 1), "{err}");
}

#[test]
fn bad_gdb_addresses_are_one_line() {
    let k = kernel();
    let dir = std::env::temp_dir().join(format!("skiff-gdb-bad-{}", std::process::id()));
    let unusable = format!("unix:{}/no/such/dir/gdb.sock", dir.display());
    for (arg, says) in [
        ("tcp:10.0.0.1:1234", "only loopback"),
        ("bogus", "give unix:PATH or tcp:127.0.0.1:PORT"),
        (unusable.as_str(), "No such file or directory"),
    ] {
        let (status, out, err) = common::skiff(&["run", "--kernel", &k, "--exit-device", "--gdb", arg]);
        assert_eq!(status.code(), Some(1), "{arg}: {err}");
        assert_eq!(err.lines().count(), 1, "{arg}: {err}");
        assert!(err.contains(says) && err.contains(arg), "{arg}: {err}");
        assert!(out.is_empty(), "{arg}: no guest ran: {out}");
    }
    assert!(!dir.exists(), "nothing left behind");
    // --gdb-wait alone is a bad command line.
    let (status, _, _) = common::skiff(&["run", "--kernel", &k, "--gdb-wait"]);
    assert_eq!(status.code(), Some(2));
}
