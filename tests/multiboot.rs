//! Multiboot kernels (guest/tiny/mb-*.S), the exit-status device and fw_cfg, end to
//! end: skiff runs each test kernel, which reports on the console and hands its
//! verdict back through the exit device; bad kernels and arguments are one line each.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

/// A test kernel's path, as a string for the command line.
fn kernel(name: &str) -> String {
    let elf = common::tiny_kernel("mb-long");
    let dir = elf.parent().expect("kernel dir");
    let file = if name.contains('.') { name.to_string() } else { format!("{name}.elf") };
    dir.join(file).to_string_lossy().into_owned()
}

/// Runs `skiff run ARGS` to its end (at most 120 s): status, console, stderr.
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    common::require_kvm();
    let mut child = Command::new(common::SKIFF)
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn skiff");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = common::wait_or_kill(&mut child, Duration::from_secs(120), &format!("skiff {args:?}"));
    (status, out.join().unwrap().replace('\r', ""), err.join().unwrap())
}

/// A scratch directory of the test's own (tests run in parallel and remove theirs).
fn tempdir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("skiff-multiboot-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_multiboot_kernel_reaches_long_mode_and_exits_through_the_exit_device() {
    for k in ["mb-long", "mb-long64"] {
        let kernel = kernel(k);
        let (status, console, stderr) = run(&["--kernel", &kernel, "--exit-device", "--stats"]);
        assert!(console.contains("mb-long: in long mode"), "{k}: {console}\n{stderr}");
        // The kernel writes 0x21: status (0x21 << 1) | 1.
        assert_eq!(status.code(), Some(67), "{k}: {console}\n{stderr}");
        // The same clean stop as a poweroff: --stats is printed.
        assert!(stderr.contains("boot: first console byte"), "{k}: {stderr}");
        assert!(!stderr.lines().any(|l| l.starts_with("skiff: ")), "{k}: an exit-device stop is no error: {stderr}");
    }
}

#[test]
fn without_the_exit_device_its_port_is_ignored() {
    let kernel = kernel("mb-long");
    // No exit device, or one elsewhere: the kernel's write to 0xf4 goes nowhere and it
    // powers off through ACPI instead.
    for extra in [&[][..], &["--exit-device", "port=0x501,size=2"][..]] {
        let mut args = vec!["--kernel", kernel.as_str()];
        args.extend_from_slice(extra);
        let (status, console, stderr) = run(&args);
        assert!(console.contains("mb-long: in long mode"), "{extra:?}: {console}");
        assert_eq!(status.code(), Some(0), "{extra:?}: {console}\n{stderr}");
    }
}

#[test]
fn explicit_boot_protocols() {
    let kernel = kernel("mb-long");
    let (status, console, _) = run(&["--kernel", &kernel, "--boot", "multiboot", "--exit-device"]);
    assert_eq!(status.code(), Some(67), "{console}");
    // The same file as a Linux kernel: an ELF32 is not one (one line, no boot).
    let (status, _, stderr) = run(&["--kernel", &kernel, "--boot", "linux"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("not a loadable x86-64 vmlinux"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

fn smp(cpus: u32) {
    let kernel = kernel("mb-smp");
    let n = cpus.to_string();
    let (status, console, stderr) = run(&["--kernel", &kernel, "--exit-device", "--cpus", &n]);
    let aps = cpus - 1;
    assert!(console.contains(&format!("mb-smp: {aps} of {aps} application processors started")), "{console}\n{stderr}");
    assert_eq!(status.code(), Some(((aps << 1) | 1) as i32), "{console}\n{stderr}");
}

#[test]
fn the_kernel_starts_its_application_processors_with_init_sipi_2_vcpus() {
    smp(2);
}

#[test]
fn the_kernel_starts_its_application_processors_with_init_sipi_4_vcpus() {
    smp(4);
}

#[test]
fn a_multiboot_kernel_reboots_in_place() {
    // Boot 1 reboots through the i8042, boot 2 through 0xcf9, boot 3 exits with 3:
    // each boot loaded and entered as multiboot again (the magic checked), APs reset.
    let kernel = kernel("mb-reboot");
    let (status, console, stderr) = run(&["--kernel", &kernel, "--exit-device", "--cpus", "2", "--boot-time"]);
    let boots: Vec<&str> = console.lines().filter(|l| l.starts_with("mb-reboot: ")).collect();
    assert_eq!(boots, ["mb-reboot: boot 1", "mb-reboot: boot 2", "mb-reboot: boot 3"], "{console}
{stderr}");
    assert_eq!(status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("reboots: 2 in place"), "{stderr}");
}

/// The 32-bit sum of a file's bytes, as mb-info prints it.
fn sum(bytes: &[u8]) -> String {
    format!("{:08x}", bytes.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b))))
}

#[test]
fn the_kernel_reads_its_command_line_memory_map_and_modules() {
    let dir = tempdir("info");
    let (one, two) = (dir.join("module-one"), dir.join("module-two"));
    let a: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
    let b = b"the second module\n".to_vec();
    std::fs::write(&one, &a).unwrap();
    std::fs::write(&two, &b).unwrap();
    let kernel = kernel("mb-info.bin");
    let (one_s, two_s) = (one.to_string_lossy().into_owned(), two.to_string_lossy().into_owned());
    let second = format!("{two_s},second module, with a comma");
    let (status, console, stderr) = run(&[
        "--kernel", &kernel, "--exit-device", "--memory", "128M", "--cmdline", "alpha beta=2", "--module", &one_s, "--module", &second,
    ]);
    assert!(console.contains("mb-info: checks passed"), "{console}\n{stderr}");
    assert_eq!(status.code(), Some(0x23), "{console}");
    let line = |prefix: &str| console.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?}:\n{console}")).to_string();
    assert_eq!(line("mb-info: cmdline="), format!("mb-info: cmdline={kernel} alpha beta=2"));
    assert_eq!(line("mb-info: loader="), "mb-info: loader=skiff");
    // mem_lower: 639 KiB below the EBDA; mem_upper: 1 MiB to the end of 128 MiB.
    assert!(line("mb-info: flags=").contains(" mem_lower=639 mem_upper=130048 "), "{console}");
    let mmap: Vec<&str> = console.lines().filter(|l| l.starts_with("mb-info: mmap ")).collect();
    assert_eq!(
        mmap,
        [
            "mb-info: mmap 0000000000000000 000000000009fc00 type 1",
            "mb-info: mmap 000000000009fc00 0000000000060400 type 2",
            "mb-info: mmap 0000000000100000 0000000007f00000 type 1",
        ],
        "{console}"
    );
    let m0 = line("mb-info: module 0 ");
    let m1 = line("mb-info: module 1 ");
    assert!(m0.ends_with(&format!(" sum={} string={one_s}", sum(&a))), "{m0}");
    assert!(m1.ends_with(&format!(" sum={} string=second module, with a comma", sum(&b))), "{m1}");
    // Sizes: end - start is the file's length.
    for (l, len) in [(&m0, a.len()), (&m1, b.len())] {
        let hex = |k: &str| u32::from_str_radix(l.split(k).nth(1).unwrap().get(..8).unwrap(), 16).unwrap();
        assert_eq!((hex("end=") - hex("start=")) as usize, len, "{l}");
    }
    assert!(!console.contains("module 2"), "{console}");
    // --initrd is the first module, before every --module.
    let (status, console, _) = run(&["--kernel", &kernel, "--exit-device", "--initrd", &two_s, "--module", &one_s]);
    assert_eq!(status.code(), Some(0x23), "{console}");
    assert!(line_in(&console, "mb-info: module 0 ").ends_with(&format!("sum={} string={two_s}", sum(&b))), "{console}");
    assert!(line_in(&console, "mb-info: module 1 ").ends_with(&format!("sum={} string={one_s}", sum(&a))), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn line_in(console: &str, prefix: &str) -> String {
    console.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?}:\n{console}")).to_string()
}

#[test]
fn a_test_kernel_reads_fw_cfg_through_its_ports() {
    let dir = tempdir("fwcfg");
    let file = dir.join("fw-cfg-file");
    std::fs::write(&file, "contents of a host file").unwrap();
    let file_arg = format!("name=opt/skiff/from-file,file={}", file.display());
    let kernel = kernel("mb-fwcfg");
    let (status, console, stderr) = run(&[
        "--kernel", &kernel, "--exit-device", "--cpus", "2", "--memory", "192M",
        "--fw-cfg", "name=opt/skiff/greeting,string=hello, fw_cfg", "--fw-cfg", &file_arg,
    ]);
    assert_eq!(status.code(), Some(0x23), "{console}\n{stderr}");
    let want = [
        "fw_cfg: signature=QEMU id=00000001 cpus=2 ram=000000000c000000",
        "fw_cfg: files=2",
        "fw_cfg: file opt/skiff/from-file size=23 select=00000020",
        "fw_cfg: data opt/skiff/from-file=contents of a host file",
        "fw_cfg: file opt/skiff/greeting size=13 select=00000021",
        "fw_cfg: data opt/skiff/greeting=hello, fw_cfg",
    ];
    let got: Vec<&str> = console.lines().filter(|l| l.starts_with("fw_cfg: ")).collect();
    assert_eq!(got, want, "{console}");
    // With no --fw-cfg the directory is empty, the rest the same.
    let (status, console, _) = run(&["--kernel", &kernel, "--exit-device"]);
    assert_eq!(status.code(), Some(0x23));
    assert!(console.contains("fw_cfg: signature=QEMU id=00000001 cpus=1 ram=0000000010000000\nfw_cfg: files=0\n"), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One line on stderr, a non-zero status, no panic, nothing on the console.
fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let (status, stdout, stderr) = run(args);
    assert!(!status.success(), "{args:?} should fail");
    assert!(status.code().is_some_and(|c| c != 101), "{args:?}: {status} {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} missing from {stderr:?}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.is_empty(), "{args:?} printed to the console: {stdout}");
}

/// A copy of a test kernel with `patch` applied.
fn patched(dir: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut bytes = std::fs::read(kernel(name)).unwrap();
    patch(&mut bytes);
    let p = dir.join(format!("patched-{name}"));
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

/// Where the multiboot magic is in a file.
fn magic_at(bytes: &[u8]) -> usize {
    (0..bytes.len().min(8192)).step_by(4).find(|&i| bytes.get(i..i + 4) == Some(&0x1bad_b002u32.to_le_bytes()[..])).expect("a multiboot header")
}

#[test]
fn bad_kernels_and_arguments_are_one_line_each() {
    let dir = tempdir("bad");
    let mb = kernel("mb-long");
    // A wrong checksum.
    let bad_sum = patched(&dir, "mb-long", |b| {
        let at = magic_at(b) + 8;
        b[at] ^= 1;
    });
    assert_one_line_error(&["--kernel", &bad_sum], &[&bad_sum, "wrong checksum"]);
    // A segment outside guest memory: the flat kernel's bss_end_addr at 1 GiB.
    let far = patched(&dir, "mb-info.bin", |b| {
        let at = magic_at(b) + 24;
        b[at..at + 4].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    });
    assert_one_line_error(&["--kernel", &far, "--memory", "128M"], &[&far, "outside guest RAM"]);
    // A module that does not fit (sparse, larger than guest memory), a missing one.
    let huge = dir.join("huge-module");
    std::fs::File::create(&huge).unwrap().set_len(200 << 20).unwrap();
    let huge_s = huge.to_string_lossy().into_owned();
    assert_one_line_error(&["--kernel", &mb, "--memory", "128M", "--module", &huge_s], &[&format!("module {huge_s}"), "do not fit"]);
    assert_one_line_error(&["--kernel", &mb, "--initrd", &huge_s, "--memory", "128M"], &["do not fit"]);
    assert_one_line_error(&["--kernel", &mb, "--module", "/nonexistent/module"], &["--module /nonexistent/module", "No such file"]);
    // Modules for a kernel that is not multiboot.
    let tiny_k = common::tiny_kernel("tiny");
    assert_one_line_error(&["--kernel", &tiny_k.to_string_lossy(), "--boot", "pvh", "--module", &mb], &["only a multiboot kernel takes modules"]);
    // --boot multiboot for a kernel without a header.
    let tiny = common::tiny_kernel("tiny");
    let tiny = tiny.to_string_lossy();
    assert_one_line_error(&["--kernel", &tiny, "--boot", "multiboot"], &["no multiboot header"]);
    // fw_cfg names and files, exit-device options.
    assert_one_line_error(&["--kernel", &mb, "--fw-cfg", "name=etc/x,string=a"], &["--fw-cfg", "opt/"]);
    let long = format!("name=opt/{},string=a", "n".repeat(60));
    assert_one_line_error(&["--kernel", &mb, "--fw-cfg", &long], &["longer than 55 bytes"]);
    assert_one_line_error(&["--kernel", &mb, "--fw-cfg", "name=opt/x,file=/nonexistent/f"], &["file /nonexistent/f", "No such file"]);
    assert_one_line_error(&["--kernel", &mb, "--fw-cfg", "name=opt/x,string=a", "--fw-cfg", "name=opt/x,string=b"], &["opt/x", "twice"]);
    assert_one_line_error(&["--kernel", &mb, "--exit-device", "size=3"], &["--exit-device", "size="]);
    assert_one_line_error(&["--kernel", &mb, "--exit-device", "port=0x3f8"], &["exit device", "overlaps"]);
    let _ = std::fs::remove_dir_all(&dir);
}
