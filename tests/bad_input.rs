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
