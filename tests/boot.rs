//! Boots the default guest (Debian's kernel, busybox initramfs) under KVM and checks
//! what the guest says. Each boot is shared by all its checks: boots can be slow where
//! guest kernel mode is emulated.

mod common;

use std::time::Duration;

use common::{BOOT_TIMEOUT, Guest};

const CMD_TIMEOUT: Duration = Duration::from_secs(300);

fn boot_and_check(cpus: u32) {
    let cpus_arg = cpus.to_string();
    let mut g = Guest::boot(&["--cpus", &cpus_arg, "--stats", "--boot-time"]);
    g.wait_for("skiff-guest: ready", BOOT_TIMEOUT);

    let nproc = g.run("nproc", CMD_TIMEOUT);
    assert_eq!(nproc, vec![cpus_arg.clone()], "nproc in the guest");

    let cmdline = g.run("cat /proc/cmdline", CMD_TIMEOUT);
    assert_eq!(cmdline.len(), 1, "{cmdline:?}");
    assert!(cmdline[0].contains("console=ttyS0"), "{cmdline:?}");
    assert!(cmdline[0].starts_with(skiff::config::DEFAULT_CMDLINE), "the guest got skiff's command line: {cmdline:?}");

    // The CMOS RTC gives the guest the host's date.
    let year = g.run("date -u +%Y", CMD_TIMEOUT);
    let host_year = skiff::devices::rtc::utc_from_unix(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    )
    .year;
    assert_eq!(year, vec![host_year.to_string()], "guest date");
    let rtc = g.run("cat /sys/class/rtc/rtc0/name 2>&1 || true", CMD_TIMEOUT);
    assert!(rtc.iter().any(|l| l.contains("rtc_cmos")), "RTC driver: {rtc:?}");

    g.send("poweroff\n");
    let (status, stderr) = g.wait_exit(CMD_TIMEOUT);
    assert_eq!(status.code(), Some(0), "poweroff exits 0; stderr:\n{stderr}");
    assert!(stderr.contains("boot: first console byte"), "{stderr}");
    assert!(stderr.contains("exits:"), "{stderr}");
    assert!(stderr.contains("host quirks"), "{stderr}");
    // Print what the boot cost, for the log.
    eprintln!("--- {cpus} vCPU(s) ---\n{stderr}");
}

#[test]
fn boots_debian_with_one_vcpu() {
    boot_and_check(1);
}

#[test]
fn boots_debian_with_two_vcpus() {
    boot_and_check(2);
}
