//! skiff's hypercall ABI on its test kernel (guest/tiny/hypercall.S): every call
//! through every path (direct, trap and emulate, patched, the ring), a hostile ring,
//! the reboot and poweroff calls; and the page written again after an in-place reboot.
//! guest/tiny/hypercall32.S: the 32-bit register subset, from 32-bit protected mode.

mod common;

use std::process::{Command, Stdio};

fn run(extra: &[&str]) -> (std::process::ExitStatus, String, String) {
    run_kernel("hypercall", extra)
}

fn run_kernel(name: &str, extra: &[&str]) -> (std::process::ExitStatus, String, String) {
    common::require_kvm();
    let kernel = common::tiny_kernel(name);
    let kernel = kernel.to_string_lossy();
    let mut args = vec!["run", "--kernel", &kernel, "--boot", "pvh", "--stats"];
    args.extend_from_slice(extra);
    let out = Command::new(common::SKIFF).args(&args).stdin(Stdio::null()).output().expect("run skiff");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The number after `key` in the `--stats` hypercall line (or the 32-bit subset's line after it).
fn count(stderr: &str, key: &str) -> u64 {
    let line = stderr
        .lines()
        .filter(|l| l.starts_with("hypercalls:") || l.starts_with("  32-bit register subset:"))
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("no hypercall line with {key:?}:\n{stderr}"));
    let rest = line.split(key).nth(1).unwrap_or_else(|| panic!("no {key:?} in {line}"));
    rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn every_call_through_every_path() {
    let (status, console, stderr) = run(&[]);
    assert!(status.success(), "skiff failed ({status}):\n{console}\n{stderr}");
    let fails: Vec<&str> = console.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(fails.is_empty(), "failed cases:\n{}\n{console}", fails.join("\n"));
    assert!(!console.contains("still running"), "a stopping call returned:\n{console}");
    // Both boots reported, with no failures.
    assert_eq!(console.matches("hc: done failures=0000000000000000").count(), 2, "{console}");
    for case in ["direct console", "trap console", "patched inline nop", "ring full flush", "ring count past the end refused", "second boot page stub"] {
        assert!(console.contains(&format!("hc: {case} ok")), "{case} missing:\n{console}");
    }
    // The console calls' bytes went where the UART's go.
    for who in ["the direct call", "the trapped call", "the ring", "after the reboot"] {
        assert!(console.contains(&format!("hc-console: written by {who}\n")) || console.contains(&format!("hc-console: written {who}\n")), "{who}:\n{console}");
    }
    assert!(stderr.contains("reboot 1 (reboot hypercall)"), "{stderr}");
    // Each path was taken and counted; the hostile ring cases were refused.
    assert!(count(&stderr, "direct ") >= 20, "{stderr}");
    assert!(count(&stderr, "trap-and-emulate ") >= 5, "{stderr}");
    assert!(count(&stderr, "patched ") >= 3, "{stderr}");
    assert_eq!(count(&stderr, "sites patched "), 2, "{stderr}");
    assert_eq!(count(&stderr, "ring "), 68, "{stderr}");
    assert_eq!(count(&stderr, "refused "), 5, "two flushes without a valid ring, three hostile heads:\n{stderr}");
    // The /init marker the ready call set.
    assert!(!stderr.contains("/init marker never"), "{stderr}");
}

#[test]
fn the_reboot_call_is_a_reboot() {
    let (status, console, stderr) = run(&["--on-reboot", "exit"]);
    assert_eq!(status.code(), Some(3), "{console}\n{stderr}");
    assert!(console.contains("hc: done failures=0000000000000000"), "{console}");
    assert!(!console.contains("hc: second boot"), "{console}");
}

#[test]
fn two_vcpus_patch_with_both_paused() {
    // The second vCPU waits for a SIPI: the patch must pause and resume it too.
    let (status, console, stderr) = run(&["--cpus", "2"]);
    assert!(status.success(), "skiff failed ({status}):\n{console}\n{stderr}");
    assert_eq!(console.matches("hc: done failures=0000000000000000").count(), 2, "{console}");
    assert_eq!(count(&stderr, "sites patched "), 2, "{stderr}");
}

#[test]
fn the_32_bit_register_subset() {
    let (status, console, stderr) = run_kernel("hypercall32", &[]);
    assert!(status.success(), "skiff failed ({status}):\n{console}\n{stderr}");
    let fails: Vec<&str> = console.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(fails.is_empty(), "failed cases:\n{}\n{console}", fails.join("\n"));
    assert!(console.contains("hc32: done failures=00000000"), "{console}");
    // The garbage in the high halves reached skiff: without it the masking is untested.
    assert!(console.contains("hc32: high halves observable yes"), "{console}");
    let trap = console.contains("hc32: trap nop ok");
    let ways: &[&str] = if trap { &["stub32", "stub64", "trap", "patched-call", "patched-inline"] } else { &["stub32", "stub64"] };
    for way in ways {
        for case in ["nop", "unknown", "unknown high half clear", "console", "console e2big high half clear", "time", "time high half clear", "ready"] {
            assert!(console.contains(&format!("hc32: {way} {case} ok")), "{way} {case} missing:\n{console}");
        }
    }
    assert_eq!(console.matches("hc32-console: written in 32-bit mode\n").count(), ways.len(), "{console}");
    if trap {
        for case in ["trap site kept raw", "patched-call site is a call", "patched-call call target", "patched-inline site is the out inline"] {
            assert!(console.contains(&format!("hc32: {case} ok")), "{case} missing:\n{console}");
        }
        assert_eq!(count(&stderr, "sites patched "), 2, "{stderr}");
    }
    assert!(!console.contains("still running"), "the power-off call returned:\n{console}");
    // Every call but the first checks' was in the 32-bit subset; the 64-bit stub's
    // (garbage in the high halves) asked KVM for the mode.
    assert!(count(&stderr, "32-bit register subset: ") >= 7 * ways.len() as u64, "{stderr}");
    assert!(count(&stderr, "whose mode KVM was asked: ") >= 7, "{stderr}");
    assert!(!stderr.contains("/init marker never"), "{stderr}");
}
