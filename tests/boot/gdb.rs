//! Debian's gdb against the Debian guest's kernel: a snapshot of the booted guest is
//! restored under `--gdb`, gdb breaks in the write system call (the shell and the
//! counter of snapshot.rs write all the time), reads `jiffies`, steps one
//! instruction, sets a hardware watchpoint on `jiffies` and detaches; the guest keeps
//! running and answers a command. Debian ships its kernel's symbols only in a
//! debug package of about a gigabyte (its System.map is a placeholder), so the
//! addresses come from the System.map scripts/fetch-guest decodes from the kernel's
//! own kallsyms tables (reading /proc/kallsyms in the guest took over 5 minutes of
//! emulated kernel work here). No KASLR: skiff enters the uncompressed vmlinux, past
//! the decompressor that would randomise it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::CMD_TIMEOUT;
use super::common::Guest;

/// The addresses of `__x64_sys_write` and `jiffies`, from the guest's System.map.
fn symbols() -> (u64, u64) {
    let path = super::common::guest_dir().join("System.map");
    let map = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let find = |name: &str| {
        map.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&name))
            .and_then(|f| u64::from_str_radix(f[0], 16).ok())
            .unwrap_or_else(|| panic!("{name} in {} (run scripts/fetch-guest)", path.display()))
    };
    (find("__x64_sys_write"), find("jiffies"))
}

/// Where the restored guest serves gdb (`--gdb unix:PATH`).
pub fn socket() -> PathBuf {
    let sock = std::env::temp_dir().join(format!("skiff-boot-gdb-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    sock
}

/// Drives the restored guest `r` (serving gdb on `sock`) with gdb in batch mode; the
/// guest must answer after the detach. Its skiff says "gdb: detached" at exit.
pub fn check_restored(r: &mut Guest, sock: &Path) {
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sock.exists(), "the restored guest serves no gdb socket at {}", sock.display());
    let (write, jiffies) = symbols();
    // Where guest kernel mode is emulated (PVM), KVM's emulator checks no data
    // breakpoints: the watchpoint is set and removed there, not waited for.
    let emulated = Path::new("/sys/module/kvm_pvm").exists();
    let mut cmds = vec![
        "set architecture i386:x86-64".to_string(),
        // A loaded host (the original guest runs beside) answers in seconds, not 2.
        "set remotetimeout 120".into(),
        format!("target remote {}", sock.display()),
        "info threads".into(),
        format!("break *{write:#x}"),
        "continue".into(),
        format!("x/gx {jiffies:#x}"),
        "stepi".into(),
        "info registers rip cr3".into(),
        "delete".into(),
        format!("watch *(unsigned long *){jiffies:#x}"),
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
    assert!(out.contains("hit Breakpoint 1") && out.contains(&format!("{write:#x}")), "{out}");
    assert!(out.lines().any(|l| l.starts_with(&format!("{jiffies:#x}:\t0x"))), "{out}");
    // One instruction on from the breakpoint (an x86 instruction is at most 15 bytes).
    let rip = out.lines().find(|l| l.starts_with("rip")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    assert!(rip.is_some_and(|rip| rip > write && rip <= write + 15), "rip {rip:x?} after a step from {write:#x}: {out}");
    assert!(out.contains("Hardware watchpoint 2"), "{out}");
    if !emulated {
        assert!(out.contains("Old value") && out.contains("New value"), "{out}");
    }
    assert!(out.contains("detached"), "{out}");
    // The guest runs on after the detach.
    let echo = r.run("echo answering-after-gdb", CMD_TIMEOUT);
    assert_eq!(echo, vec!["answering-after-gdb".to_string()], "{out}");
    eprintln!("--- gdb against the restored Debian guest ---\n{out}");
}
