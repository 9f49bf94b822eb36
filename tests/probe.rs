//! `skiff probe` on this host's KVM: it must run, time guest kernel mode, and report
//! what it found; every feature it hides must be one of the gated features.

mod common;

#[test]
fn probe_reports_host_quirks() {
    common::require_kvm();
    let (status, stdout, stderr) = common::skiff(&["probe"]);
    assert!(status.success(), "skiff probe failed: {stderr}");
    assert!(stdout.starts_with("host quirks (probed at run time in"), "{stdout}");
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
