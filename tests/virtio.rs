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
    let mut child = Command::new(common::SKIFF)
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

    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.strip_prefix("virtio-hostile: "))
        .filter(|l| *l != "start" && !l.starts_with("done "))
        .collect();
    let mut wrong = Vec::new();
    for (i, name) in CASES.iter().enumerate() {
        match lines.get(i) {
            Some(line) if line.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).is_some_and(|r| r.starts_with("ok")) => {}
            Some(line) => wrong.push(format!("  {name}: {line}")),
            None => wrong.push(format!("  {name}: no line")),
        }
    }
    if lines.len() > CASES.len() {
        wrong.push(format!("  {} lines more than the {} cases", lines.len() - CASES.len(), CASES.len()));
    }
    assert!(wrong.is_empty(), "cases not handled:\n{}\nconsole:\n{console}\nstderr:\n{stderr}", wrong.join("\n"));
    let done = format!("virtio-hostile: done {} ok", CASES.len());
    assert!(console.lines().any(|l| l == done), "no {done:?} line:\n{console}");

    let size = std::fs::metadata(&disk.0).expect("disk image").len();
    assert_eq!(size, DISK_SIZE, "the disk image changed size (a write past its end went through)");
    let after = std::fs::read(&ro.0).expect("read-only disk image");
    assert!(after.len() == RO_SIZE && after.iter().all(|&b| b == RO_BYTE), "the read-only disk image changed");
}
