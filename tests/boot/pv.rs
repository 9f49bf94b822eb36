//! The Debian guest and KVM's paravirtual features as skiff exposes them
//! (src/vcpu/probe/pv.rs): kvm-clock is its clocksource, steal time is registered
//! and accounted, and the features skiff hides are not used.
//!
//! Called from tests/boot.rs: `let log = pv::kvm_clock_and_steal_time(&mut g);` on the
//! booted guest (its shell up), and after the run, with skiff's `--stats` output,
//! `pv::stats_agree(&stderr, &log);`.

use super::CMD_TIMEOUT;
use super::common::Guest;

/// What Debian's 6.1 kernel says in its log about each feature (arch/x86/kernel/kvm.c
/// and kvmclock.c; pr_fmt "kvm-guest: " and "kvm-clock: "), at KERN_INFO: dmesg has
/// them though loglevel=4 keeps them off the console.
/// Returns the guest's PV log lines, for [`stats_agree`].
pub fn kvm_clock_and_steal_time(g: &mut Guest) -> String {
    // kvm-clock is registered; Linux picks it, or the TSC where it trusts the TSC
    // more (kvm-clock lowers its own rating for an invariant TSC): either is a clock
    // the host keeps right. Which one it is goes to the log.
    let clock = g.run("cat /sys/devices/system/clocksource/clocksource0/current_clocksource /sys/devices/system/clocksource/clocksource0/available_clocksource", CMD_TIMEOUT);
    assert!(clock.first().is_some_and(|c| c.trim() == "kvm-clock" || c.trim() == "tsc"), "current clocksource: {clock:?}");
    assert!(clock.get(1).is_some_and(|a| a.split_whitespace().any(|c| c == "kvm-clock")), "available clocksources: {clock:?}");
    // Without dmesg's time stamps: lines that look like the kernel's own log are not
    // taken as a command's output.
    let log = g.run("dmesg | grep -E 'kvm-clock|kvm-guest|stealtime' | head -40 | sed 's/^\\[[^]]*\\] //'", CMD_TIMEOUT);
    let log = log.join("\n");
    assert!(log.contains("kvm-clock: Using msrs 4b564d01 and 4b564d00"), "kvmclock's MSRs:\n{log}");
    // Steal time: the guest registered its record (MSR_KVM_STEAL_TIME, enable bit 0),
    // and /proc/stat has the steal column (the eighth value of the "cpu" line).
    let loaded = g.run("modprobe msr; ls /dev/cpu/0/msr", CMD_TIMEOUT);
    assert_eq!(loaded, vec!["/dev/cpu/0/msr".to_string()], "msr driver");
    let steal = super::read_msr(g, 0, 0x4b56_4d03);
    assert_eq!(steal & 1, 1, "MSR_KVM_STEAL_TIME on cpu 0 is {steal:#x}: steal time not registered");
    let stat = g.run("head -1 /proc/stat", CMD_TIMEOUT);
    let fields: Vec<&str> = stat.first().map(|l| l.split_whitespace().collect()).unwrap_or_default();
    assert!(fields.first() == Some(&"cpu") && fields.len() >= 9, "/proc/stat: {stat:?}");
    assert!(fields.get(8).is_some_and(|s| s.parse::<u64>().is_ok()), "steal column: {stat:?}");
    // PV spinlocks' line, for stats_agree (6.1 checks PV_UNHALT before the CPU count).
    let spin = g.run("dmesg | grep 'PV spinlocks' | sed 's/^\\[[^]]*\\] //'", CMD_TIMEOUT).join("\n");
    eprintln!("pv: clocksource {:?}, MSR_KVM_STEAL_TIME {steal:#x}; guest log:\n{log}\n{spin}", clock.first());
    format!("{log}\n{spin}")
}

/// Cross-check with skiff's `--stats` (after the run): the exposed features include
/// kvmclock and steal time, enforcement is on; where `pv_unhalt` is hidden, the guest
/// did not turn on PV spinlocks.
pub fn stats_agree(stats: &str, guest_log: &str) {
    let head = stats.lines().find(|l| l.starts_with("paravirtual features")).unwrap_or_else(|| panic!("no PV line:\n{stats}"));
    assert!(head.contains("enforced on every vCPU"), "{head}");
    for name in ["clocksource2", "steal_time"] {
        let line = stats.lines().find(|l| l.trim_start().starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}:\n{stats}"));
        assert!(line.contains("exposed:"), "{line}");
    }
    let unhalt_hidden = stats.lines().any(|l| l.trim_start().starts_with("pv_unhalt ") && l.contains("hidden:"));
    if unhalt_hidden {
        assert!(guest_log.contains("PV spinlocks disabled, no host support"), "PV_UNHALT hidden, yet:\n{guest_log}");
    }
}
