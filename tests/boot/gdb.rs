//! Debian's gdb against the Debian guest's kernel (guest/out/vmlinux's symbols): a
//! snapshot of the booted guest is restored under `--gdb`, gdb breaks in the write
//! system call (the shell and the counter of snapshot.rs write all the time), reads
//! `jiffies`, steps one instruction, sets a hardware watchpoint on `jiffies` and
//! detaches; the guest keeps running and answers a command.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::CMD_TIMEOUT;
use super::common::{Guest, guest_dir};

/// Restores `snap` (a snapshot of the booted 2-vCPU Debian guest, as
/// snapshot::take writes it; the skiff that took it must have ended) with `--gdb`
/// and drives it with gdb in batch mode, then powers the guest off.
/// Call it where snapshot::restore_and_check is called, before that removes the
/// snapshot: `gdb::check_restored(&taken.snap)`.
#[allow(dead_code)] // Called by the Debian boot test's owner when it runs it.
pub fn check_restored(snap: &Path) {
    let sock = std::env::temp_dir().join(format!("skiff-boot-gdb-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let gdb_arg = format!("unix:{}", sock.display());
    let mut r = Guest::restore(&["--snapshot", snap.to_str().expect("utf-8"), "--resume", "--gdb", &gdb_arg]);
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let vmlinux = guest_dir().join("vmlinux");
    // Where guest kernel mode is emulated (PVM), KVM's emulator checks no data
    // breakpoints: the watchpoint is set and removed there, not waited for.
    let emulated = Path::new("/sys/module/kvm_pvm").exists();
    let mut cmds = vec![
        format!("file {}", vmlinux.display()),
        format!("target remote {}", sock.display()),
        "info threads".into(),
        "break __x64_sys_write".into(),
        "continue".into(),
        "x/gx &jiffies".into(),
        "stepi".into(),
        "info registers rip cr3".into(),
        "delete".into(),
        "watch *(unsigned long *)&jiffies".into(),
    ];
    if !emulated {
        cmds.push("continue".into());
    }
    cmds.extend(["delete".into(), "detach".into()]);
    let mut gdb = Command::new("timeout");
    gdb.args(["600", "gdb", "-batch", "-nx"]);
    for c in &cmds {
        gdb.args(["-ex", c]);
    }
    let out = gdb.stdin(Stdio::null()).output().expect("run gdb");
    let out = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.contains("Thread 1.1") && out.contains("Thread 1.2"), "{out}");
    assert!(out.contains("hit Breakpoint 1") && out.contains("__x64_sys_write"), "{out}");
    assert!(out.lines().any(|l| l.contains("<jiffies") && l.contains(":\t0x")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("rip") && l.contains("__x64_sys_write")), "{out}");
    assert!(out.contains("Hardware watchpoint 2"), "{out}");
    if !emulated {
        assert!(out.contains("Old value") && out.contains("New value"), "{out}");
    }
    assert!(out.contains("detached"), "{out}");
    // The guest runs on after the detach.
    let echo = r.run("echo answering-after-gdb", CMD_TIMEOUT);
    assert_eq!(echo, vec!["answering-after-gdb".to_string()], "{out}");
    r.send("poweroff\n");
    let (status, stderr, _) = r.wait_exit(CMD_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("skiff: gdb: detached"), "{stderr}");
    eprintln!("--- gdb against the restored Debian guest ---\n{out}");
}
