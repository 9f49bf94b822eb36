//! `skiff probe` on this host's KVM: it must run, time guest kernel mode, and report
//! what it found; every feature it hides must be one of the gated features. And the
//! probe cache: `skiff run` reuses what an earlier probe found, `--reprobe` and
//! `skiff probe` probe afresh. Every run here gets its own cache directory
//! (SKIFF_CACHE_DIR), never the user's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A fresh, empty cache directory for one test.
fn cache_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("probe-cache-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// skiff with `args` and the probe cache in `cache`: (success, stdout, stderr).
fn skiff_cached(cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::SKIFF)
        .args(args)
        .env("SKIFF_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .output()
        .expect("run skiff");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The tiny kernel booted with --stats: its "host probe:" line and its command line.
fn boot_tiny(cache: &Path, extra: &[&str]) -> (String, String) {
    common::require_kvm();
    let kernel = common::tiny_kernel("tiny");
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap(), "--boot", "pvh", "--stats"];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = skiff_cached(cache, &args);
    assert!(ok, "{stderr}");
    let line = |prefix: &str| stderr.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in {stderr}")).to_string();
    (line("host probe: "), line("kernel command line: "))
}

#[test]
fn probe_reports_host_quirks() {
    common::require_kvm();
    let cache = cache_dir("report");
    let (ok, stdout, stderr) = skiff_cached(&cache, &["probe"]);
    assert!(ok, "skiff probe failed: {stderr}");
    assert!(stdout.starts_with("host quirks (probed in"), "{stdout}");
    assert!(stdout.contains("guest kernel-mode instruction:"), "{stdout}");
    for line in stdout.lines().filter(|l| l.contains("fails in guest kernel mode")) {
        let name = line.split_whitespace().next().unwrap();
        assert!(
            skiff::vcpu::cpuid::GATED.iter().any(|g| g.name == name),
            "unknown feature {name} in {line}"
        );
        assert!(
            line.contains("hidden from CPUID")
                || line.contains("cleared through the kernel command line")
                || (name == "xsave" && line.contains("kept on")),
            "{line}"
        );
    }
    // Where guest user mode has AVX or AVX-512 state whatever the guest kernel enables,
    // the guest kernel must keep XSAVE (it alone saves that state across context
    // switches): never hidden, never cleared.
    let user_xcr0 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("user mode   xgetbv with the guest's CR4.OSXSAVE clear returns XCR0 0x"))
        .map(|x| u64::from_str_radix(x.trim(), 16).unwrap());
    if user_xcr0.is_some_and(|x| x & !3 != 0) {
        let xsave: Vec<&str> = stdout.lines().filter(|l| l.trim().starts_with("xsave ")).collect();
        assert!(xsave.iter().all(|l| l.contains("kept on")), "{stdout}");
    }
    eprintln!("{stdout}");
}

/// `--stats` names every option skiff adds to the guest's command line and marks those
/// that weaken the guest's security; `--guest-defaults` drops all but `clearcpuid=`.
#[test]
fn guest_defaults_keeps_the_guest_kernel_s_own_options() {
    common::require_kvm();
    let cache = cache_dir("guest-defaults");
    let kernel = common::tiny_kernel("tiny");
    let kernel = kernel.to_str().unwrap();
    let cmdline = |extra: &[&str]| {
        let mut args = vec!["run", "--kernel", kernel, "--boot", "pvh", "--stats"];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = skiff_cached(&cache, &args);
        assert!(ok, "{stderr}");
        let line = stderr.lines().find_map(|l| l.strip_prefix("kernel command line: ")).unwrap().to_string();
        (line, stderr)
    };
    let (kept, stderr) = cmdline(&["--guest-defaults"]);
    for weak in skiff::vcpu::probe::WEAKENS_SECURITY {
        assert!(!kept.split(' ').any(|w| w == *weak), "--guest-defaults still adds {weak}: {kept}");
    }
    assert!(!kept.contains("initcall_blacklist="), "{kept}");
    assert!(stderr.contains("guest kernel options added by skiff:"), "{stderr}");
    let (default, stderr) = cmdline(&[]);
    if stderr.contains("(emulated by KVM, not run natively)") {
        for weak in skiff::vcpu::probe::WEAKENS_SECURITY {
            assert!(default.split(' ').any(|w| w == *weak), "{default}");
            assert!(stderr.contains(&format!("  {weak} (weakens the guest's security): ")), "{stderr}");
        }
    }
    // clearcpuid= is needed for correctness: kept either way.
    let clear = |l: &str| l.split(' ').find(|w| w.starts_with("clearcpuid=")).map(str::to_string);
    assert_eq!(clear(&kept), clear(&default));
}

/// The first run probes and saves; the next reuses the file and gives the guest the
/// same command line; `--reprobe` and `skiff probe` probe afresh and rewrite it.
#[test]
fn a_second_run_reuses_the_probe_and_reprobe_does_not() {
    let cache = cache_dir("reuse");
    let file = cache.join("host-probe.json");
    let (probe, fresh_cmdline) = boot_tiny(&cache, &[]);
    assert!(probe.starts_with("host probe: ran in "), "{probe}");
    assert!(probe.contains("(no cache yet)"), "{probe}");
    assert!(probe.ends_with(&format!("saved to {}", file.display())), "{probe}");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);

    let (probe, cmdline) = boot_tiny(&cache, &[]);
    assert!(probe.starts_with(&format!("host probe: reused from {} (key ", file.display())), "{probe}");
    assert_eq!(cmdline, fresh_cmdline, "the cached quirks make the same guest command line");

    let (probe, cmdline) = boot_tiny(&cache, &["--reprobe"]);
    assert!(probe.starts_with("host probe: ran in "), "{probe}");
    assert!(probe.contains("(a fresh probe was asked for)"), "{probe}");
    assert_eq!(cmdline, fresh_cmdline);

    let (ok, stdout, stderr) = skiff_cached(&cache, &["probe"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("host probe: ran in ") && stdout.contains("(a fresh probe was asked for)"), "{stdout}");
    let (probe, _) = boot_tiny(&cache, &[]);
    assert!(probe.starts_with("host probe: reused from "), "{probe}");
    let _ = std::fs::remove_dir_all(&cache);
}

/// A damaged or foreign cache file costs a probe, never a failed start, and is
/// replaced; a file others may write is not believed.
#[test]
fn a_bad_cache_file_is_probed_over_and_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let cache = cache_dir("bad");
    let file = cache.join("host-probe.json");
    let (_, fresh_cmdline) = boot_tiny(&cache, &[]);
    let good = std::fs::read_to_string(&file).unwrap();
    let cases = [
        (good[..good.len() / 3].to_string(), "is not a skiff probe cache"),
        ("[1, 2, 3]\n".to_string(), "is not a skiff probe cache"),
        (good.replace("\"kernel_release\": \"", "\"kernel_release\": \"x"), "cache stale: the host kernel release changed"),
    ];
    for (text, why) in cases {
        std::fs::write(&file, text).unwrap();
        let (probe, cmdline) = boot_tiny(&cache, &[]);
        assert!(probe.starts_with("host probe: ran in ") && probe.contains(why), "{why}: {probe}");
        assert_eq!(cmdline, fresh_cmdline);
        let (probe, _) = boot_tiny(&cache, &[]);
        assert!(probe.starts_with("host probe: reused from "), "rewritten after {why}: {probe}");
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o646)).unwrap();
    let (probe, _) = boot_tiny(&cache, &[]);
    assert!(probe.contains("not trusted: writable by group or others"), "{probe}");
    let (probe, _) = boot_tiny(&cache, &[]);
    assert!(probe.starts_with("host probe: reused from "), "{probe}");
    let _ = std::fs::remove_dir_all(&cache);
}
