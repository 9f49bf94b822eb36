//! In-place reboot on the reboot test kernel (guest/tiny/reboot.S): ten boots in one
//! skiff process through every reset path (i8042, 0xcf9 / ACPI reset register, triple
//! fault). Each boot programs the MTRRs; the next must find them at their RESET values
//! (IA32_MTRR_DEF_TYPE.E clear, PHYSMASK0 invalid: seed 004's bug). skiff's threads
//! and fds must not grow from one reboot to the next, nor its RSS once warm; with one
//! vCPU and with two.

mod common;

use std::process::{Command, Stdio};

fn reboot_kernel() -> String {
    let path = common::guest_dir().join("reboot.elf");
    assert!(path.is_file(), "{} missing: run scripts/fetch-guest (it builds guest/tiny)", path.display());
    path.to_string_lossy().into_owned()
}

fn run_skiff(extra: &[&str]) -> (std::process::ExitStatus, String, String) {
    common::require_kvm();
    let kernel = reboot_kernel();
    let mut args = vec!["run", "--kernel", &kernel, "--boot", "pvh", "--stats"];
    args.extend_from_slice(extra);
    let out = Command::new(common::SKIFF).args(&args).stdin(Stdio::null()).output().expect("run skiff");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// "threads 3, fds 11, RSS 4032 KiB" from a reboot line.
fn resources(line: &str) -> (u64, u64, u64) {
    let num_after = |key: &str| -> u64 {
        let rest = line.split(key).nth(1).unwrap_or_else(|| panic!("no {key:?} in {line}"));
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (num_after("threads "), num_after("fds "), num_after("RSS "))
}

#[test]
fn reboots_in_place_through_every_reset_path() {
    ten_boots_in_one_process(&[]);
}

/// The same with a second vCPU (it waits for a SIPI that never comes): both are reset
/// at every reboot, and neither's thread or fds may leak.
#[test]
fn reboots_in_place_with_two_vcpus() {
    ten_boots_in_one_process(&["--cpus", "2"]);
}

fn ten_boots_in_one_process(extra: &[&str]) {
    let (status, console, stderr) = run_skiff(extra);
    eprintln!("{stderr}");
    assert!(status.success(), "skiff failed ({status}):\n{console}\n{stderr}");
    let found: Vec<&str> = console.lines().filter(|l| l.starts_with("reboot-test: boot ")).collect();
    assert_eq!(found.len(), 10, "ten boots:\n{console}");
    for (i, line) in found.iter().enumerate() {
        assert!(line.starts_with(&format!("reboot-test: boot {} found", i + 1)), "{line}");
        // RESET: default type E and FE clear (all of DEF_TYPE zero here), PHYSMASK0's
        // valid bit (11) clear.
        assert!(line.ends_with("def=00000000 mask0=00000000"), "boot {} found MTRRs not at RESET: {line}", i + 1);
    }
    let programmed = console.lines().filter(|l| l.contains("programmed def=00000c06 mask0=f0000800")).count();
    assert_eq!(programmed, 9, "each boot but the last programmed the MTRRs:\n{console}");
    for path in ["through the i8042", "through 0xcf9", "by triple fault"] {
        assert_eq!(console.matches(path).count(), 3, "three reboots {path}");
    }
    assert!(console.contains("reboot-test: done"));

    let reboots: Vec<&str> = stderr.lines().filter(|l| l.starts_with("reboot ") && l.contains("reset in place")).collect();
    assert_eq!(reboots.len(), 9, "{stderr}");
    for src in ["(i8042 reset line)", "(0xcf9 reset control)", "(triple fault)"] {
        assert!(reboots.iter().any(|l| l.contains(src)), "no reboot {src}");
    }
    let res: Vec<(u64, u64, u64)> = reboots.iter().map(|l| resources(l)).collect();
    let (threads, fds, _) = res[0];
    for (i, (t, f, _)) in res.iter().enumerate() {
        assert_eq!((*t, *f), (threads, fds), "reboot {}: threads/fds grew: {}", i + 1, reboots[i]);
    }
    // RSS: allocator and stdio buffers settle over the first reboots; after that a
    // reboot must not cost memory.
    let warm = res[3].2;
    let last = res[res.len() - 1].2;
    assert!(last <= warm + 128, "RSS grew from {warm} KiB (reboot 4) to {last} KiB (reboot 9)");
    assert!(stderr.contains("reboots: 9 in place"), "{stderr}");
}

#[test]
fn on_reboot_exit_stops_with_status_3() {
    let (status, console, stderr) = run_skiff(&["--on-reboot", "exit"]);
    assert_eq!(status.code(), Some(3), "{console}\n{stderr}");
    assert_eq!(console.matches("reboot-test: boot ").count(), 1, "{console}");
    assert!(stderr.contains("guest rebooted (i8042 reset line)"), "{stderr}");
}
