//! Every bad input gets one line saying what and where, a non-zero status, no panic.

mod common;

use common::skiff;

fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let (status, stdout, stderr) = skiff(args);
    assert!(!status.success(), "{args:?} should fail");
    assert_ne!(status.code(), Some(101), "{args:?} panicked: {stderr}");
    assert!(status.code().is_some(), "{args:?} died by a signal: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} missing from {stderr:?}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.is_empty(), "{args:?} printed to stdout: {stdout}");
}

#[test]
fn missing_kernel() {
    assert_one_line_error(&["run", "--kernel", "/nonexistent/vmlinux"], &["kernel /nonexistent/vmlinux", "No such file"]);
}

#[test]
fn kernel_is_a_directory() {
    assert_one_line_error(&["run", "--kernel", "/tmp"], &["kernel /tmp", "not a regular file"]);
}

#[test]
fn file_that_is_no_kernel() {
    let dir = tempdir();
    let p = dir.join("notakernel");
    std::fs::write(&p, b"this is not a kernel, just some text that is long enough to look at").unwrap();
    let ps = p.to_str().unwrap();
    assert_one_line_error(&["run", "--kernel", ps], &[ps, "not a kernel"]);
}

#[test]
fn truncated_elf_is_no_kernel() {
    let dir = tempdir();
    let p = dir.join("truncated");
    std::fs::write(&p, b"\x7fELF\x02\x01\x01").unwrap();
    let ps = p.to_str().unwrap();
    assert_one_line_error(&["run", "--kernel", ps], &[ps, "vmlinux"]);
}

#[test]
fn initrd_that_does_not_fit() {
    common::require_kvm();
    common::require_guest();
    let dir = tempdir();
    let p = dir.join("huge-initrd");
    // Sparse: 200 MiB of nothing, larger than 128 MiB of guest memory.
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(200 << 20).unwrap();
    let kernel = common::guest_dir().join("vmlinux");
    let ps = p.to_str().unwrap();
    assert_one_line_error(
        &["run", "--kernel", kernel.to_str().unwrap(), "--initrd", ps, "--memory", "128M"],
        &[ps, "do not fit"],
    );
}

#[test]
fn kernel_larger_than_memory() {
    common::require_guest();
    let kernel = common::guest_dir().join("vmlinux");
    let k = kernel.to_str().unwrap();
    assert_one_line_error(&["run", "--kernel", k, "--memory", "64M"], &[k, "does not fit in 64 MiB"]);
}

#[test]
fn missing_initrd() {
    assert_one_line_error(&["run", "--initrd", "/nonexistent/initrd"], &["initrd /nonexistent/initrd"]);
}

#[test]
fn memory_out_of_range() {
    assert_one_line_error(&["run", "--memory", "1M"], &["--memory 1M", "at least"]);
    assert_one_line_error(&["run", "--memory", "5T"], &["--memory 5T", "at most"]);
    assert_one_line_error(&["run", "--memory", "lots"], &["--memory lots"]);
}

#[test]
fn cpus_out_of_range() {
    assert_one_line_error(&["run", "--cpus", "0"], &["--cpus 0"]);
    assert_one_line_error(&["run", "--cpus", "255"], &["--cpus 255"]);
}

#[test]
fn unknown_flag() {
    let (status, _, stderr) = skiff(&["run", "--frobnicate"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--frobnicate"), "{stderr}");
}

/// Runs `program args` as root (the setup needs it) and checks it failed the way a
/// KVM problem must: status 1 and one line on stderr, which it returns.
fn kvm_error_as_root(needs_root_for: &str, program: &str, args: &[&str]) -> String {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test {needs_root_for} and needs root");
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (util-linux): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn kvm_missing_or_not_permitted() {
    // An unprivileged user cannot open /dev/kvm (mode 0600 root here): run skiff as
    // nobody; the error must name /dev/kvm and the cause.
    let stderr = kvm_error_as_root(
        "runs skiff as nobody",
        "setpriv",
        &["--reuid=65534", "--regid=65534", "--clear-groups", common::SKIFF, "probe"],
    );
    assert!(stderr.contains("/dev/kvm: permission denied"), "{stderr}");
}

#[test]
fn kvm_device_missing() {
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there. The
    // error must say so and suggest why.
    let stderr = kvm_error_as_root(
        "hides /dev/kvm in a mount namespace",
        "unshare",
        &["--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /dev && exec \"$0\" probe", common::SKIFF],
    );
    assert!(stderr.contains("/dev/kvm: does not exist"), "{stderr}");
}

/// Runs skiff with a deadline (a hang fails the test instead of hanging it) and checks
/// it failed the way bad input must: status 1, one line naming every needle.
fn one_line_error_within(limit: std::time::Duration, args: &[&str], needles: &[&str]) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(common::SKIFF)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skiff");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?}: skiff did not end within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: expected one line, got:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} missing from {stderr:?}");
    }
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
}

#[test]
fn elf_with_a_huge_sparse_note_is_refused_at_once() {
    // A 64 GiB PT_NOTE (sparse: no disk space) kept the loader reading for 90 minutes.
    common::require_kvm();
    let dir = tempdir();
    let p = dir.join("huge-note.elf");
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    (b[4], b[5], b[6]) = (2, 1, 1);
    b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b[0x18..0x20].copy_from_slice(&0x100000u64.to_le_bytes()); // entry
    b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // program headers at 64
    b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    let mut ph = [0u8; 56];
    ph[..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[0x20..0x28].copy_from_slice(&(64u64 << 30).to_le_bytes());
    ph[0x28..0x30].copy_from_slice(&(64u64 << 30).to_le_bytes());
    b.extend_from_slice(&ph);
    std::fs::write(&p, &b).unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(0x1000 + (64 << 30)).unwrap();
    let ps = p.to_str().unwrap();
    one_line_error_within(std::time::Duration::from_secs(30), &["run", "--kernel", ps], &[ps, "PT_NOTE", "64 KiB"]);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn half_a_bzimage_is_refused() {
    // Half a bzImage booted into its missing half: a silent triple-fault reboot loop.
    common::require_kvm();
    let bz = common::guest_dir().join("bzImage");
    assert!(bz.is_file(), "{} missing: run scripts/fetch-guest", bz.display());
    let whole = std::fs::read(&bz).unwrap();
    let dir = tempdir();
    let p = dir.join("half-bzImage");
    std::fs::write(&p, &whole[..whole.len() / 2]).unwrap();
    let ps = p.to_str().unwrap();
    one_line_error_within(std::time::Duration::from_secs(60), &["run", "--kernel", ps], &[ps, "bzImage is truncated"]);
}

fn tempdir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "skiff-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn unknown_virtio_transport() {
    assert_one_line_error(&["run", "--virtio-transport", "isa"], &["--virtio-transport isa", "`pci` or `mmio`"]);
}
