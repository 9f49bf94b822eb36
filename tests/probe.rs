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
        assert!(line.contains("hidden from CPUID") || line.contains("cleared through the kernel command line"), "{line}");
    }
    eprintln!("{stdout}");
}
