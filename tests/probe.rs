//! `skiff probe` on this host's KVM: it must run, time guest kernel mode, and report
//! what it found; every feature it hides must be one of the gated features.

mod common;

#[test]
fn probe_reports_host_quirks() {
    common::require_kvm();
    let (status, stdout, stderr) = common::skiff(&["probe"]);
    assert!(status.success(), "skiff probe failed: {stderr}");
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
    let kernel = common::tiny_kernel("tiny");
    let kernel = kernel.to_str().unwrap();
    let cmdline = |extra: &[&str]| {
        let mut args = vec!["run", "--kernel", kernel, "--boot", "pvh", "--stats"];
        args.extend_from_slice(extra);
        let (status, _, stderr) = common::skiff(&args);
        assert!(status.success(), "{stderr}");
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
