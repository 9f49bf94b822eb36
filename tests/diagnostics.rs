//! Seed 002's diagnostics, end to end: skiff's paging-mode test kernels
//! (guest/tiny/modes.S) each enter a mode (real, 32-bit paging, PAE, 4-level), load
//! an empty IDT and run one faulting instruction; the fault escalates to a triple
//! fault, and `skiff run --on-reboot exit` must print the registers and the
//! instruction at CS:RIP, fetched through the guest's own page tables and decoded in
//! the mode the vCPU was in. About a second a kernel.

mod common;

use std::process::{Command, Stdio};

/// Runs one mode kernel; returns skiff's status, console and stderr.
fn run_mode(name: &str) -> (Option<i32>, String, String) {
    common::require_kvm();
    let kernel = common::tiny_kernel(&format!("modes-{name}"));
    let out = Command::new(common::SKIFF)
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--boot", "pvh", "--on-reboot", "exit"])
        .stdin(Stdio::null())
        .output()
        .expect("run skiff");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The line of the diagnostic that names the instruction.
fn instruction_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("instruction at CS:RIP"))
        .unwrap_or_else(|| panic!("no instruction in the diagnostic:\n{stderr}"))
}

/// The value of `key=` in the diagnostic's register dump.
fn reg(stderr: &str, key: &str) -> u64 {
    let text = stderr
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the diagnostic:\n{stderr}"));
    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{key}={text}"))
}

/// A paging mode's kernel: the diagnostic names `expected`, or, where this host's
/// KVM refuses to turn that paging mode on (PVM runs 64-bit guests only), the CR0
/// write that tried to, with CR0.PG still clear in the dump. Either way it is the
/// instruction the guest stopped at, fetched and decoded in its mode.
fn check_paging_mode(name: &str, banner: &str, expected: &str, cr4_bit: u64) {
    let (status, console, stderr) = run_mode(name);
    assert_eq!(status, Some(3), "triple fault ends the run with status 3:\n{console}\n{stderr}");
    assert!(console.contains(banner), "{console}");
    assert!(stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)"), "{stderr}");
    let line = instruction_line(&stderr);
    let cr0 = reg(&stderr, "cr0");
    let cr4 = reg(&stderr, "cr4");
    assert_ne!(cr4 & cr4_bit, 0, "the kernel set up its mode's CR4 bit: {stderr}");
    if cr0 & (1 << 31) != 0 {
        assert!(line.ends_with(expected), "{name}: expected {expected:?}:\n{stderr}");
    } else {
        eprintln!("{name}: this host's KVM refused to enable the paging mode; the diagnostic names that CR0 write");
        assert!(line.ends_with("mov cr0,eax"), "{name}: {stderr}");
    }
    eprintln!("{name}: {line}");
}

#[test]
fn long_mode_diagnostic_names_the_faulting_instruction() {
    let (status, console, stderr) = run_mode("long");
    assert_eq!(status, Some(3), "{console}\n{stderr}");
    assert!(console.contains("modes: 4-level paging"), "{console}");
    assert!(stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)"), "{stderr}");
    assert_eq!(instruction_line(&stderr), "instruction at CS:RIP: 48 8b 08  mov rcx,[rax]");
    assert_eq!(reg(&stderr, "rax"), 0x1234_5678_9000);
    assert_eq!(reg(&stderr, "cr2"), 0x1234_5678_9000, "the #PF's address");
    assert!(stderr.contains("l=1"), "64-bit code segment: {stderr}");
    assert!(stderr.contains("guest rebooted (triple fault); exiting with status 3"), "{stderr}");
}

#[test]
fn pae_diagnostic_names_the_faulting_instruction() {
    check_paging_mode("pae", "modes: PAE paging", "mov [80000000h],ebx", 1 << 5);
}

#[test]
fn paging32_diagnostic_names_the_faulting_instruction() {
    check_paging_mode("paging32", "modes: 32-bit paging", "mov eax,[40000000h]", 1 << 4);
}

/// Real mode: CS base 0xffff0, 16-bit decoding. Where the CPU runs real mode, ud2's
/// #UD escalates to a triple fault; where KVM's emulator runs it (exceptions then go
/// through the IVT whatever IDTR's limit), the kernel's `popcnt` fails that emulator,
/// and skiff, which does not emulate it either, stops and names it.
#[test]
fn real_mode_diagnostic_names_the_faulting_instruction() {
    let (status, console, stderr) = run_mode("real");
    assert!(console.contains("modes: real mode"), "{console}");
    let line = instruction_line(&stderr);
    assert!(stderr.contains("cs=0xffff base=0xffff0"), "real-mode CS: {stderr}");
    assert_eq!(reg(&stderr, "cr0") & 1, 0, "PE clear: {stderr}");
    if line.ends_with("ud2") {
        assert_eq!(status, Some(3), "{stderr}");
        assert!(stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)"), "{stderr}");
    } else {
        assert_eq!(line, "instruction at CS:RIP: f3 0f b8 d8  popcnt bx,ax", "{stderr}");
        assert_eq!(status, Some(1), "{stderr}");
        // Kernel mode (CPL 0): an instruction neither KVM nor skiff emulates stops
        // the machine with a diagnostic naming it.
        assert!(stderr.contains("skiff does not emulate Popcnt"), "{stderr}");
    }
    eprintln!("real: {line}");
}
