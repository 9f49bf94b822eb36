//! In-place reboot on the reboot test kernel (guest/tiny/reboot.S): ten boots in one
//! skiff process through every reset path (i8042, 0xcf9 / ACPI reset register, triple
//! fault). Each boot programs the MTRRs; the next must find them at their RESET values
//! (IA32_MTRR_DEF_TYPE.E clear, PHYSMASK0 invalid: seed 004's bug). skiff's threads
//! and fds must not grow from one reboot to the next, nor its anonymous memory once
//! warm; with one vCPU and with two. Thousands of reboots keep skiff's memory flat, and a guest that
//! reboots without getting anywhere (a reboot storm) is stopped and named.

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

/// Threads, fds and anonymous KiB from a reboot line's "threads 3, fds 11, RSS 4032
/// KiB without guest RAM (1200 KiB anonymous)". Anonymous memory (heap, stacks) is where
/// a leak shows; the rest of RSS is code pages, which grow once when rarely used code
/// (in skiff or libc) first runs: CI once saw libc's text grow 64 KiB at reboot 1699.
fn resources(line: &str) -> (u64, u64, u64) {
    let num_after = |key: &str| -> u64 {
        let rest = line.split(key).nth(1).unwrap_or_else(|| panic!("no {key:?} in {line}"));
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (num_after("threads "), num_after("fds "), num_after("RAM ("))
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
    // Anonymous memory: allocator and stdio buffers settle over the first reboots;
    // after that a reboot must not cost memory.
    let warm = res[3].2;
    let last = res[res.len() - 1].2;
    assert!(last <= warm + 128, "anonymous memory grew from {warm} KiB (reboot 4) to {last} KiB (reboot 9)");
    assert!(stderr.contains("reboots: 9 in place"), "{stderr}");
}

#[test]
fn on_reboot_exit_stops_with_status_3() {
    let (status, console, stderr) = run_skiff(&["--on-reboot", "exit"]);
    assert_eq!(status.code(), Some(3), "{console}\n{stderr}");
    assert_eq!(console.matches("reboot-test: boot ").count(), 1, "{console}");
    assert!(stderr.contains("guest rebooted (i8042 reset line)"), "{stderr}");
}

/// Runs skiff on a tiny kernel with a deadline (a hang fails the test instead of
/// hanging it); returns status, console, stderr.
fn run_tiny_within(name: &str, extra: &[&str], limit: std::time::Duration) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    common::require_kvm();
    let kernel = common::tiny_kernel(name);
    let mut child = Command::new(common::SKIFF)
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--boot", "pvh"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skiff");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err_t.join().unwrap();
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            panic!("skiff on {name} did not end within {limit:?}; stderr ends:\n{}", tail.join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (status, out_t.join().unwrap(), err_t.join().unwrap())
}

#[test]
fn a_reboot_storm_stops_and_says_so() {
    // A kernel that triple-faults at once, silently, every boot: was an endless
    // reboot loop (57,459 reboots in 250 s with half a bzImage). Now skiff stops after
    // a few, names the storm (status 1, last line), and shows where the guest faulted.
    let (status, console, stderr) = run_tiny_within("triple", &["--stats"], std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(console.is_empty(), "{console}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("skiff: reboot storm: the guest rebooted 16 times in a row"), "{stderr}");
    assert!(last.contains("triple fault"), "{last}");
    assert!(stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)") && stderr.contains("instruction at CS:RIP"), "no diagnostic: {stderr}");
    assert!(stderr.contains("reboots: 15 in place (triple fault 15)"), "{stderr}");
}

#[test]
fn memory_stays_flat_over_thousands_of_reboots() {
    // 5,000 boots of a guest that prints and reboots at once (guest/tiny/rebootloop.S;
    // not a storm: every boot prints). skiff kept a record of every reboot forever
    // (RSS +73 bytes a reboot); now it keeps a bounded summary.
    let (status, console, stderr) = run_tiny_within("rebootloop", &["--stats"], std::time::Duration::from_secs(300));
    assert!(status.success(), "{status}\n{}", stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n"));
    assert_eq!(console.lines().filter(|l| l.starts_with("rebootloop: boot ")).count(), 5000);
    assert!(console.contains("rebootloop: done"));
    // "skiff: reboot N (...) ... (K KiB anonymous)" is printed as each reboot happens.
    let rss_at = |n: u64| -> u64 {
        let prefix = format!("skiff: reboot {n} (");
        let line = stderr.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no reboot {n} line"));
        resources(line.trim_start_matches("skiff: ")).2
    };
    let (warm, last) = (rss_at(500), rss_at(4999));
    assert!(last <= warm + 32, "anonymous memory grew from {warm} KiB (reboot 500) to {last} KiB (reboot 4999)");
    assert!(stderr.contains("reboots: 4999 in place (i8042 reset line 4999)"), "{stderr}");
    let kept = stderr.lines().filter(|l| l.starts_with("reboot ") && l.contains("reset in place")).count();
    assert_eq!(kept, 32, "the report keeps the first and the latest reboots");
}
