//! A hostile virtio driver against skiff's virtio-mmio devices: the test kernel
//! guest/tiny/virtio-hostile.S drives slot 0 (virtio-rng), slot 1 (a virtio-blk disk)
//! and slot 2 (a read-only disk) through their registers with descriptor loops, chains longer than the queue,
//! buffers outside RAM or wrapping past 2^64, device-readable buffers where the device
//! must write, nested and malformed indirect tables, avail indices far ahead, bad
//! queue sizes and rings outside RAM, requests past the end of the disk and of
//! absurd length, writes, write-zeroes and discards on the read-only disk. Every case
//! must be handled (an error completion, an error status or NEEDS_RESET, as its line
//! says), a good request must work after each, skiff must exit 0, the disk image must
//! keep its size and the read-only one every byte.
//!
//! A second run gives the same kernel only a virtio-net device (on a TAP in a network
//! namespace the test creates) and a virtio-vsock device: transmit chains with loops,
//! short headers, buffers outside RAM or device-writable, nested indirect tables,
//! lengths that overflow, frames too long; vsock packets shorter than their header or
//! with a len past the chain, an unknown type or op, CIDs that are not the host's or
//! the guest's; receive buffers outside RAM, device-readable or too short. After each
//! a good frame must go out (the TAP counts exactly one per case: no bad frame got
//! out) and a REQUEST to a host port nobody listens on must get its RST.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The cases, in the order the kernel runs them. Each prints
/// "virtio-hostile: NAME ok (...)" or "virtio-hostile: NAME FAIL: ...".
const CASES: &[&str] = &[
    "rng-present",
    "rng-good",
    "rng-desc-loop",
    "rng-next-out-of-table",
    "rng-head-out-of-table",
    "rng-chain-longer-than-queue",
    "rng-addr-0xf0000000",
    "rng-addr-0xfffffffffffff000",
    "rng-addr-own-registers",
    "rng-addr-len-wraps",
    "rng-buffer-past-ram-end",
    "rng-device-readable-buffer",
    "rng-indirect-in-indirect",
    "rng-indirect-odd-length",
    "rng-indirect-outside-ram",
    "rng-indirect-empty",
    "rng-avail-idx-jump",
    "rng-queue-size-0",
    "rng-queue-size-3",
    "rng-queue-size-over-max",
    "rng-rings-outside-ram",
    "rng-used-ring-outside-ram",
    "rng-desc-table-past-ram-end",
    "rng-ring-moved-while-ready",
    "rng-missing-queue",
    "rng-notify-missing-queue",
    "rng-feature-not-offered",
    "rng-narrow-register-access",
    "blk-present",
    "blk-good",
    "blk-desc-loop",
    "blk-chain-longer-than-queue",
    "blk-addr-0xf0000000",
    "blk-addr-0xfffffffffffff000",
    "blk-addr-len-wraps",
    "blk-buffer-past-ram-end",
    "blk-data-in-device-readable",
    "blk-status-device-readable",
    "blk-indirect-in-indirect",
    "blk-indirect-odd-length",
    "blk-indirect-outside-ram",
    "blk-avail-idx-jump",
    "blk-sector-past-end",
    "blk-sectors-across-end",
    "blk-sector-overflows",
    "blk-write-past-end",
    "blk-huge-length",
    "blk-write-huge-length",
    "blk-length-not-512-multiple",
    "blk-unknown-type",
    "blk-header-short",
    "blk-no-status-buffer",
    "blk-rings-outside-ram",
    "ro-present",
    "ro-offers-ro-feature",
    "ro-write",
    "ro-write-zeroes",
    "ro-discard",
];

/// The network and vsock cases, in order (virtio-hostile-net.inc, -vsock.inc).
const NET_CASES: &[&str] = &[
    "net-present",
    "net-good",
    "net-tx-desc-loop",
    "net-tx-header-short",
    "net-tx-buffer-outside-ram",
    "net-tx-buffer-past-ram-end",
    "net-tx-device-writable-buffer",
    "net-tx-indirect-in-indirect",
    "net-tx-length-overflows",
    "net-tx-frame-too-long",
    "net-tx-head-out-of-table",
    "net-rx-device-readable-buffer",
    "net-rx-buffer-outside-ram",
    "net-rx-buffer-shorter-than-header",
    "vsock-present",
    "vsock-good",
    "vsock-tx-header-short",
    "vsock-tx-len-past-chain",
    "vsock-tx-len-huge",
    "vsock-tx-unknown-type",
    "vsock-tx-unknown-op",
    "vsock-tx-dst-cid-not-host",
    "vsock-tx-src-cid-not-guest",
    "vsock-tx-device-writable-buffer",
    "vsock-tx-desc-loop",
    "vsock-tx-header-outside-ram",
    "vsock-tx-indirect-in-indirect",
    "vsock-rx-buffer-outside-ram",
    "vsock-rx-buffer-past-ram-end",
    "vsock-rx-device-readable-buffer",
    "vsock-rx-buffer-shorter-than-header",
    "net-good-after-vsock",
];

/// Bounds a hang: a case the device never answers costs the kernel a few seconds
/// (its wait is bounded by the TSC), so even all of them stay well inside this.
const TIMEOUT: Duration = Duration::from_secs(600);

const DISK_SIZE: u64 = 1 << 20;
/// The read-only disk: every byte this (the kernel checks a sector reads so).
const RO_SIZE: usize = 64 << 10;
const RO_BYTE: u8 = 0x5a;

/// A scratch disk image that is removed when dropped.
struct Disk(PathBuf);

impl Disk {
    fn new(name: &str, size: u64) -> Disk {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("virtio-hostile-{}-{name}.img", std::process::id()));
        let file = std::fs::File::create(&path).expect("create the disk image");
        file.set_len(size).expect("size the disk image");
        Disk(path)
    }

    fn filled(name: &str, bytes: &[u8]) -> Disk {
        let disk = Disk::new(name, 0);
        std::fs::write(&disk.0, bytes).expect("fill the disk image");
        disk
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs skiff to completion (killed after `timeout`): exit status, console, stderr.
fn run_bounded(args: &[&str], timeout: Duration) -> (std::process::ExitStatus, String, String) {
    run_bounded_in(&[common::SKIFF], args, timeout)
}

/// The same, skiff started by `cmd` (its last element skiff's path).
fn run_bounded_in(cmd: &[&str], args: &[&str], timeout: Duration) -> (std::process::ExitStatus, String, String) {
    let (program, before) = cmd.split_first().expect("a command");
    let mut child = Command::new(program)
        .args(before)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn skiff");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("skiff did not finish the virtio cases in {timeout:?}; console:\n{}", out.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

#[test]
fn hostile_virtio_driver_is_handled() {
    common::require_kvm();
    let kernel = common::tiny_kernel("virtio-hostile");
    let disk = Disk::new("rw", DISK_SIZE);
    let ro = Disk::filled("ro", &[RO_BYTE; RO_SIZE]);
    let kernel = kernel.to_string_lossy().into_owned();
    let disk_arg = disk.0.to_string_lossy().into_owned();
    let ro_arg = format!("{},ro", ro.0.display());
    let args = ["run", "--kernel", &kernel, "--boot", "pvh", "--disk", &disk_arg, "--disk", &ro_arg];
    let (status, console, stderr) = run_bounded(&args, TIMEOUT);
    assert!(status.success(), "skiff failed ({status}):\nconsole:\n{console}\nstderr:\n{stderr}");

    check_cases(CASES, &console, &stderr);
    let size = std::fs::metadata(&disk.0).expect("disk image").len();
    assert_eq!(size, DISK_SIZE, "the disk image changed size (a write past its end went through)");
    let after = std::fs::read(&ro.0).expect("read-only disk image");
    assert!(after.len() == RO_SIZE && after.iter().all(|&b| b == RO_BYTE), "the read-only disk image changed");
}

/// Every case of `cases` printed "ok", in order, and nothing more; then "done N ok".
fn check_cases(cases: &[&str], console: &str, stderr: &str) {
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.strip_prefix("virtio-hostile: "))
        .filter(|l| *l != "start" && !l.starts_with("done "))
        .collect();
    let mut wrong = Vec::new();
    for (i, name) in cases.iter().enumerate() {
        match lines.get(i) {
            Some(line) if line.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).is_some_and(|r| r.starts_with("ok")) => {}
            Some(line) => wrong.push(format!("  {name}: {line}")),
            None => wrong.push(format!("  {name}: no line")),
        }
    }
    if lines.len() > cases.len() {
        wrong.push(format!("  {} lines more than the {} cases", lines.len() - cases.len(), cases.len()));
    }
    assert!(wrong.is_empty(), "cases not handled:\n{}\nconsole:\n{console}\nstderr:\n{stderr}", wrong.join("\n"));
    let done = format!("virtio-hostile: done {} ok", cases.len());
    assert!(console.lines().any(|l| l == done), "no {done:?} line:\n{console}");
}

/// A network namespace with one TAP device in it, up; removed when dropped (with the
/// vsock socket path). Nothing of the host's own network is touched.
struct Netns {
    name: String,
    tap: &'static str,
    uds: PathBuf,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("skiff-{}-hostile", std::process::id());
        let tap = "skh0";
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = Netns { uds: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("virtio-hostile-{}.vsock", std::process::id())), name, tap };
        for args in [
            vec!["netns", "add", &ns.name],
            vec!["-n", &ns.name, "tuntap", "add", tap, "mode", "tap"],
            vec!["-n", &ns.name, "link", "set", tap, "up"],
        ] {
            let out = Command::new("ip").args(&args).output().expect("run ip");
            assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        ns
    }

    /// Frames the TAP took from skiff (its receive count, as the host sees it).
    fn tap_rx_packets(&self) -> u64 {
        let out = Command::new("ip").args(["-n", &self.name, "-s", "link", "show", self.tap]).output().expect("run ip");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "    RX:  bytes packets errors ..." then the figures on the next line.
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.trim_start().starts_with("RX:") {
                let figures: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
                return figures.get(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no RX packets in:\n{text}"));
            }
        }
        panic!("no RX line in:\n{text}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_file(&self.uds);
    }
}

#[test]
fn hostile_net_and_vsock_drivers_are_handled() {
    common::require_kvm();
    let kernel = common::tiny_kernel("virtio-hostile");
    let kernel = kernel.to_string_lossy().into_owned();
    let ns = Netns::new();
    let net = format!("tap={}", ns.tap);
    let vsock = format!("cid=3,uds={}", ns.uds.display());
    let args = ["run", "--kernel", &kernel, "--boot", "pvh", "--no-rng", "--net", &net, "--vsock", &vsock];
    let (status, console, stderr) = run_bounded_in(&["ip", "netns", "exec", &ns.name, common::SKIFF], &args, TIMEOUT);
    assert!(status.success(), "skiff failed ({status}):\nconsole:\n{console}\nstderr:\n{stderr}");
    check_cases(NET_CASES, &console, &stderr);

    // One good frame after each network case but net-present, and none of the bad ones.
    let good = NET_CASES.iter().filter(|c| c.starts_with("net-") && **c != "net-present").count() as u64;
    assert_eq!(ns.tap_rx_packets(), good, "frames that reached the TAP (one good frame per network case)");
    // Nothing answered at the port nobody listens on, and skiff removed its socket.
    assert!(!ns.uds.exists(), "skiff left its vsock socket behind");
}
