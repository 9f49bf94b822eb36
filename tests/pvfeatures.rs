//! KVM's paravirtual features as skiff gives them (src/vcpu/probe/pv.rs), on the
//! test kernel guest/tiny/pvfeat.S: every PV MSR whose feature the guest's CPUID
//! lists is taken, every other one raises #GP (KVM_CAP_ENFORCE_PV_FEATURE_CPUID on
//! every vCPU), kvmclock and steal-time records get filled; the same after an
//! in-place reboot, and after a restore, where the snapshot's CPUID is what counts.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Guest, api, tiny_kernel};

/// skiff run on `kernel` with --stats and `hooks` (SKIFF_TEST_HOOK): status, console, stderr.
fn run(kernel: &str, hooks: &str) -> (std::process::ExitStatus, String, String) {
    common::require_kvm();
    let kernel = tiny_kernel(kernel);
    let out = Command::new(common::SKIFF)
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--boot", "pvh", "--stats"])
        .env("SKIFF_TEST_HOOK", hooks)
        .stdin(Stdio::null())
        .output()
        .expect("run skiff");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The guest's PV feature bits as the kernel printed them ("pv: features XXXXXXXX").
fn features(console: &str) -> u32 {
    let hex = console.lines().find_map(|l| l.strip_prefix("pv: features ")).unwrap_or_else(|| panic!("no features line:\n{console}"));
    u32::from_str_radix(hex.trim(), 16).unwrap()
}

/// Both boots ran every case and none failed; returns the lines of the first boot.
fn all_ok(console: &str) -> Vec<String> {
    let fails: Vec<&str> = console.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(fails.is_empty(), "failed cases:\n{}\n{console}", fails.join("\n"));
    assert!(console.contains("pv: boot 1\n"), "no second boot:\n{console}");
    assert!(console.contains("pv: done failures=0\n"), "{console}");
    let first: Vec<String> = console.split("pv: boot 1").next().unwrap_or("").lines().filter(|l| l.starts_with("pv: msr ")).map(String::from).collect();
    assert_eq!(first.len(), 11, "every PV MSR tried:\n{console}");
    first
}

#[test]
fn exposed_features_work_and_hidden_ones_fault() {
    let (status, console, stderr) = run("pvfeat", "");
    assert!(status.success(), "skiff failed ({status}):\n{console}\n{stderr}");
    all_ok(&console);
    let f = features(&console);
    // kvmclock is what every Linux guest wants; migration control is never exposed
    // (skiff has no encrypted guests), so its MSR must fault: enforcement is on.
    assert_ne!(f & (1 << 3), 0, "kvmclock exposed:\n{stderr}");
    assert!(console.contains("migration_control) hidden, #GP ok"), "{console}");
    for line in ["kvmclock record filled ok", "steal-time record written ok"] {
        if line.starts_with("kvmclock") || f & (1 << 5) != 0 {
            assert_eq!(console.matches(line).count(), 2, "{line}, both boots:\n{console}");
        }
    }
    // --stats: one line per feature, and the bits match what the guest saw.
    let head = stderr.lines().find(|l| l.starts_with("paravirtual features")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(head.contains(&format!("the guest gets {f:#x}")), "{head}");
    assert!(head.contains("enforced on every vCPU"), "{head}");
    for name in ["clocksource2", "steal_time", "pv_eoi", "async_pf", "poll_control", "pv_unhalt", "pv_send_ipi", "pv_sched_yield", "pv_tlb_flush"] {
        let line = stderr.lines().find(|l| l.trim_start().starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} line:\n{stderr}"));
        assert!(line.contains("exposed:") || line.contains("hidden:"), "{line}");
    }
}

#[test]
fn a_working_feature_hidden_faults_before_and_after_a_reboot() {
    // steal time and PV EOI work here; hidden, the guest must get #GP on their MSRs,
    // and skiff's MSR set, reset and state must do without them.
    let (status, console, stderr) = run("pvfeat", "hide-pv-steal_time,hide-pv-pv_eoi");
    assert!(status.success(), "skiff failed ({status}):\n{console}\n{stderr}");
    all_ok(&console);
    assert_eq!(features(&console) & ((1 << 5) | (1 << 6)), 0);
    for name in ["steal time (steal_time)", "pv eoi (pv_eoi)"] {
        assert_eq!(console.matches(&format!("{name} hidden, #GP ok")).count(), 2, "{name}:\n{console}");
    }
    assert!(stderr.contains("steal_time         hidden: works, but this machine's CPUID hides it"), "{stderr}");
}

#[test]
fn a_restored_machine_enforces_its_snapshot_s_cpuid() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pvfeatures-restore");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let kernel = tiny_kernel("pvfeat-wait");
    let args = ["--kernel", kernel.to_str().unwrap(), "--boot", "pvh", "--api-sock", sock.to_str().unwrap()];
    // Taken with steal time hidden; restored by a process with no hook: the
    // snapshot's CPUID (steal time hidden) is enforced all the same.
    let mut g = Guest::boot_env(&args, &[("SKIFF_TEST_HOOK", "hide-pv-steal_time")]);
    g.wait_for("pv: waiting for a key", Duration::from_secs(60));
    api::pause(&sock);
    let (code, body) = api::snapshot(&sock, &dir.join("vm.snap"), &dir.join("vm.mem"));
    assert_eq!(code, 204, "snapshot: {body}");
    g.kill9_collect();
    let snap = dir.join("vm.snap");
    let mut r = Guest::restore(&["--snapshot", snap.to_str().unwrap(), "--resume", "--stats"]);
    r.send("x");
    r.wait_for("pv: done failures=", Duration::from_secs(60));
    // The restored boot and the one after its reboot: steal time hidden, the rest as before.
    let console = r.transcript.clone();
    all_ok(&console);
    assert_eq!(console.matches("steal time (steal_time) hidden, #GP ok").count(), 2, "{console}");
    let (status, stderr, _) = r.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    let after = stderr.lines().find(|l| l.starts_with("paravirtual features")).unwrap_or_else(|| panic!("{stderr}")).to_string();
    assert!(after.contains("enforced on every vCPU"), "{after}");
    assert!(after.contains("this machine's CPUID"), "the snapshot's CPUID, not the probe's: {after}");
}
