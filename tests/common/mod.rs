//! Shared helpers for integration tests: run skiff on the default guest, talk to the
//! guest shell over the serial console, and collect what it says.

#![allow(dead_code)]

pub mod api;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

pub const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

/// How long a boot of the default guest may take. Guest kernel mode can be emulated
/// (minutes per boot); this bounds a hang, it does not measure anything.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(1500);

/// Fails loudly when /dev/kvm cannot be used: these tests never skip.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("integration tests need a usable /dev/kvm and cannot open it: {e}");
    }
}

pub fn guest_dir() -> PathBuf {
    match std::env::var_os("SKIFF_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/out"),
    }
}

pub fn require_guest() {
    let dir = guest_dir();
    for f in ["vmlinux", "initrd.cpio"] {
        assert!(dir.join(f).is_file(), "default guest missing {}: run scripts/fetch-guest", dir.join(f).display());
    }
}

/// A running skiff with its console on pipes.
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Everything the console printed so far.
    pub transcript: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// Where a long test spends its time: each guest command that took 10 s or more,
/// with the seconds since the test process started.
fn log_if_slow(pid: u32, cmd: &str, started: std::time::Instant) {
    let took = started.elapsed().as_secs_f64();
    if took >= 10.0 {
        let short: String = cmd.chars().take(70).collect();
        eprintln!("[{:.0} s] skiff {pid}: {took:.1} s: {short}", since_first_guest());
    }
}

/// Seconds since this test process started its first guest.
pub fn since_first_guest() -> f64 {
    static FIRST: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    FIRST.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}

impl Guest {
    pub fn boot(args: &[&str]) -> Guest {
        Self::boot_env(args, &[])
    }

    /// Boots with extra environment variables (test hooks).
    pub fn boot_env(args: &[&str], env: &[(&str, &str)]) -> Guest {
        require_guest();
        Self::start("run", args, env)
    }

    /// Boots a kernel `args` name themselves (a test kernel): the default guest is
    /// not needed.
    #[allow(dead_code)]
    pub fn boot_kernel(args: &[&str]) -> Guest {
        Self::start("run", args, &[])
    }

    /// Restores a snapshot (`skiff restore ARGS`), its console on pipes.
    pub fn restore(args: &[&str]) -> Guest {
        Self::start("restore", args, &[])
    }

    /// Boots inside the network namespace `ns` (`ip netns exec NS skiff run ARGS`:
    /// `ip` execs skiff, so the child is skiff itself).
    #[allow(dead_code)]
    pub fn boot_in_netns(ns: &str, args: &[&str], env: &[(&str, &str)]) -> Guest {
        require_guest();
        Self::start_with(&["ip", "netns", "exec", ns, SKIFF], "run", args, env)
    }

    /// Restores a snapshot inside the network namespace `ns` (its TAP devices are
    /// opened again by name there).
    #[allow(dead_code)]
    pub fn restore_in_netns(ns: &str, args: &[&str]) -> Guest {
        Self::start_with(&["ip", "netns", "exec", ns, SKIFF], "restore", args, &[])
    }

    fn start(subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Guest {
        Self::start_with(&[SKIFF], subcommand, args, env)
    }

    fn start_with(program: &[&str], subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Guest {
        require_kvm();
        since_first_guest();
        let (exe, pre) = program.split_first().expect("a program");
        let mut child = Command::new(exe)
            .args(pre)
            .arg(subcommand)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn skiff");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                if tx.send(text).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let stdin = child.stdin.take();
        Guest { child, stdin, lines: rx, transcript: String::new(), stderr: Some(stderr) }
    }

    /// Waits for a console line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.transcript.push_str(&line);
                    self.transcript.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                    // With panic=-1 the guest would reboot and the test would go on
                    // in a fresh boot, hiding why: stop here with the oops in view.
                    if line.contains("Kernel panic - not syncing") {
                        panic!("the guest kernel panicked while waiting for {needle:?}; console:\n{}", self.tail());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out waiting for {needle:?}; console so far:\n{}", self.tail())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
                    panic!(
                        "skiff ended ({status:?}) before {needle:?}; stderr:\n{err}\nconsole:\n{}",
                        self.tail()
                    )
                }
            }
        }
    }

    fn tail(&self) -> String {
        let lines: Vec<&str> = self.transcript.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// skiff's process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("write to guest");
        stdin.flush().expect("flush");
    }

    /// Runs a shell command in the guest and returns its output lines (between markers
    /// the command itself cannot print by accident). A guest process that died of a
    /// fault signal (the shell reports it: "Segmentation fault", "Illegal
    /// instruction"...) fails the test at once with the console: such a death is a
    /// defect of skiff's until shown otherwise, never something to run again.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Vec<String> {
        let started = std::time::Instant::now();
        let out = self.run_once(cmd, timeout);
        log_if_slow(self.child.id(), cmd, started);
        if let Some(line) = out.iter().find(|l| fault_signal_report(l).is_some()) {
            panic!("a guest process died of a fault signal running {cmd:?}: {line:?}\nconsole:\n{}", self.tail());
        }
        out
    }

    fn run_once(&mut self, cmd: &str, timeout: Duration) -> Vec<String> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let tag = format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        // The markers are split in the typed text so the echoed command line never
        // matches them.
        self.send(&format!("echo BEGIN''-{tag}; {cmd}; echo END''-{tag}\n"));
        self.wait_for(&format!("BEGIN-{tag}"), timeout);
        let mut out = Vec::new();
        loop {
            let line = self.wait_for("", timeout);
            if line.contains(&format!("END-{tag}")) {
                return out;
            }
            if is_kernel_log(&line) {
                // The guest kernel prints to the same console; its messages are not
                // the command's output (but are shown, for the log).
                eprintln!("guest kernel, during {cmd:?}: {line}");
                continue;
            }
            out.push(line);
        }
    }

    /// Kills skiff with SIGKILL and waits for it, then takes what the console printed
    /// before into the transcript; returns the status and skiff's stderr.
    pub fn kill9_collect(&mut self) -> (ExitStatus, String) {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait");
        // The reader thread ends at the pipe's end: everything it read is queued.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.transcript.push_str(&line);
            self.transcript.push('\n');
        }
        let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (status, err)
    }

    /// Kills skiff with SIGKILL (no chance to flush anything) and waits for it.
    pub fn kill9(mut self) -> (ExitStatus, String) {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait");
        let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (status, err)
    }

    /// Waits for skiff to exit; returns its status, its stderr and the console's last
    /// lines (for a failing assertion's message).
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        loop {
            // Keep draining the console so skiff never blocks on a full pipe.
            while let Ok(line) = self.lines.try_recv() {
                self.transcript.push_str(&line);
                self.transcript.push('\n');
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
                return (status, err, self.tail());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("skiff did not exit in time; console:\n{}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test kernel from guest/tiny (`name`.elf), built from source into Cargo's scratch
/// directory once per test binary (guest/tiny/build: as and ld), so tests that use
/// them need nothing fetched.
pub fn tiny_kernel(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(concat!("tiny-", env!("CARGO_CRATE_NAME")));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/tiny/build");
        let out = Command::new(&script).env("SKIFF_GUEST_DIR", &dir).output().expect("run guest/tiny/build");
        assert!(
            out.status.success(),
            "guest/tiny/build failed (needs as and ld from binutils):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    });
    dir.join(format!("{name}.elf"))
}

/// A kernel console message: "[  861.077918] ..." (printk's timestamp prefix).
pub fn is_kernel_log(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else { return false };
    let Some((stamp, _)) = rest.split_once(']') else { return false };
    let stamp = stamp.trim_start();
    let mut parts = stamp.split('.');
    let (Some(secs), Some(frac), None) = (parts.next(), parts.next(), parts.next()) else { return false };
    !secs.is_empty() && !frac.is_empty() && secs.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
}

/// Waits at most `limit` for `child` to end; past it, kills it and fails the test,
/// naming `what`.
pub fn wait_or_kill(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not end within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs skiff to completion with the given arguments (for bad-input cases).
pub fn skiff(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(SKIFF).args(args).stdin(Stdio::null()).output().expect("run skiff");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The shell's report of a process killed by a signal that only a fault (or a broken
/// program) raises, as busybox's sh words it; None for other lines. SIGTERM and
/// SIGKILL are left out: tests send those themselves.
pub fn fault_signal_report(line: &str) -> Option<&'static str> {
    const FAULTS: [&str; 7] = [
        "Segmentation fault",
        "Illegal instruction",
        "Bus error",
        "Floating point exception",
        "Aborted",
        "Trace/breakpoint trap",
        "Bad system call",
    ];
    FAULTS.into_iter().find(|f| line.contains(f))
}
