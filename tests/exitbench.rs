//! The exit probe (guest/tiny/exitbench.S) under skiff: it must report every
//! operation, and its 5000 writes to port 0x80 must mostly wait in KVM's coalesced
//! ring instead of exiting (visible in --stats); with --no-coalesce every one exits.
//! The probe is built here from source (guest/tiny/build: as and ld), so the test
//! needs nothing fetched. About a second a run.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The probe's operations, and those that must cost something (they leave the guest).
const OPS: [&str; 7] = ["cpuid", "out_unclaimed", "out_post", "out_doorbell", "pm_timer_read", "mmio_write", "rep_outsb_4k"];
const EXITING: [&str; 4] = ["out_unclaimed", "pm_timer_read", "mmio_write", "rep_outsb_4k"];
/// exitbench.S: REPS (5) timed loops of 1000 `outb` to port 0x80.
const PORT80_WRITES: u64 = 5000;

fn probe_kernel() -> PathBuf {
    common::tiny_kernel("exitbench")
}

fn run_probe(extra: &[&str]) -> (String, String) {
    common::require_kvm();
    let kernel = probe_kernel();
    let out = Command::new(common::SKIFF)
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--boot", "pvh", "--stats"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run skiff");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "skiff failed ({}):\n{console}\n{stderr}", out.status);
    assert!(console.contains("exitbench: done"), "probe did not finish:\n{console}");
    (console, stderr)
}

/// ns for `op` from "exitbench: op=OP n=N ns=X ...".
fn ns(console: &str, op: &str) -> f64 {
    let prefix = format!("exitbench: op={op} ");
    let line = console.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {op} line:\n{console}"));
    let v = line.split_whitespace().find_map(|w| w.strip_prefix("ns=")).unwrap_or_else(|| panic!("no ns in {line}"));
    v.parse().unwrap_or_else(|_| panic!("bad ns in {line}"))
}

/// Exits counted for `port` in --stats' top ports (0 if not listed).
fn port_exits(stderr: &str, port: u16) -> u64 {
    let key = format!("{port:#06x}");
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix(&key).map(|n| n.trim().parse::<u64>().unwrap()))
        .unwrap_or(0)
}

fn coalesced_pio(stderr: &str) -> u64 {
    let line = stderr.lines().find(|l| l.starts_with("coalesced writes: ")).unwrap_or_else(|| panic!("no coalesced line:\n{stderr}"));
    line["coalesced writes: ".len()..].split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn probe_reports_every_operation_and_port_0x80_is_coalesced() {
    let (console, stderr) = run_probe(&[]);
    eprintln!("{console}");
    let khz: u64 = console
        .lines()
        .find_map(|l| l.strip_prefix("exitbench: tsc_khz="))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no TSC calibration:\n{console}"));
    assert!(khz > 100_000, "implausible TSC rate {khz} kHz");
    for op in OPS {
        let v = ns(&console, op);
        assert!(v.is_finite() && v >= 0.0, "{op}: {v}");
    }
    for op in EXITING {
        assert!(ns(&console, op) > 0.0, "{op} cost nothing?\n{console}");
    }
    // skiff's FADT names the PM timer: the probe must have found it.
    assert!(port_exits(&stderr, 0x608) >= 5000, "PM timer reads did not reach port 0x608:\n{stderr}");

    let exits = port_exits(&stderr, 0x80);
    let coalesced = coalesced_pio(&stderr);
    assert!(stderr.contains("port 0x80+1"), "port 0x80 not registered as a coalesced zone:\n{stderr}");
    assert!(exits < PORT80_WRITES / 10, "{exits} exits for {PORT80_WRITES} port 0x80 writes:\n{stderr}");
    assert!(exits + coalesced >= PORT80_WRITES, "writes lost: {exits} exits + {coalesced} coalesced");
    // The boot-marker port is a doorbell: KVM signals an eventfd, no exit to skiff.
    let bell_exits = port_exits(&stderr, 0x440);
    assert!(bell_exits < PORT80_WRITES / 10, "{bell_exits} exits for {PORT80_WRITES} doorbell writes:\n{stderr}");
    assert!(doorbells_rung(&stderr) + bell_exits >= PORT80_WRITES, "doorbell writes lost:\n{stderr}");
    // What coalescing saves is measured by bench/exits.py, not asserted here: a
    // timing assertion fails whenever the machine is busy.
}

fn doorbells_rung(stderr: &str) -> u64 {
    let key = "doorbell writes (ioeventfd, no exit): ";
    let line = stderr.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no doorbell line:\n{stderr}"));
    line.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad doorbell line: {line}"))
}

#[test]
fn no_coalesce_makes_every_port_0x80_write_exit() {
    let (_, stderr) = run_probe(&["--no-coalesce"]);
    assert!(port_exits(&stderr, 0x80) >= PORT80_WRITES, "{stderr}");
    assert!(port_exits(&stderr, 0x440) >= PORT80_WRITES, "{stderr}");
    assert_eq!(doorbells_rung(&stderr), 0, "{stderr}");
    assert_eq!(coalesced_pio(&stderr), 0, "{stderr}");
    assert!(stderr.contains("off (--no-coalesce)"), "{stderr}");
}
