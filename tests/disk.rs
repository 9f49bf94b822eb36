//! `--disk` on the command line: each bad argument gives one line; an image in use by
//! another skiff is refused with one line (read-write takes the image alone;
//! read-only ones share it); a read-only disk's file is never changed.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::skiff;

fn scratch(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("disk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn image(name: &str, len: u64) -> String {
    let p = scratch(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p.display().to_string()
}

/// skiff with the tiny kernel (which powers off at once) and `disks`.
fn tiny_with(disks: &[&str]) -> (std::process::ExitStatus, String, String) {
    let kernel = common::tiny_kernel("tiny");
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap(), "--boot", "pvh"];
    for d in disks {
        args.extend(["--disk", d]);
    }
    skiff(&args)
}

fn one_line(stderr: &str, needles: &[&str]) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} missing from {stderr:?}");
    }
}

#[test]
fn bad_disk_arguments_each_give_one_line() {
    let good = image("good.img", 1 << 20);
    let odd = image("odd.img", 1000);
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("/nonexistent/disk.img".into(), vec!["/nonexistent/disk.img", "No such file"]),
        ("/tmp".into(), vec!["/tmp", "directory"]),
        (odd.clone(), vec![odd.as_str(), "not a multiple of 512"]),
        (format!("{good},rw"), vec!["--disk", "unknown option `rw`"]),
        (",ro".into(), vec!["--disk", "no path"]),
        (format!("{good},id=123456789012345678901"), vec!["id="]),
        (format!("{good},ro,ro"), vec!["twice"]),
    ];
    for (arg, needles) in cases {
        let (status, stdout, stderr) = tiny_with(&[&arg]);
        assert_eq!(status.code(), Some(1), "--disk {arg}: {stderr}");
        assert!(stdout.is_empty(), "--disk {arg}: {stdout}");
        one_line(&stderr, &needles);
    }
    let (status, _, stderr) = tiny_with(&[&good]);
    assert_eq!(status.code(), Some(0), "a good disk: {stderr}");
}

/// A skiff that keeps running (the chatter kernel) with `disk`, until killed.
fn running_with(disk: &str) -> std::process::Child {
    let kernel = common::tiny_kernel("chatter");
    let child = Command::new(common::SKIFF)
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--boot", "pvh", "--disk", disk])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn skiff");
    // Its lock is taken once the machine is built: wait until a second one sees it.
    std::thread::sleep(Duration::from_millis(500));
    child
}

#[test]
fn two_skiffs_on_one_image_refuse_with_one_line() {
    let img = image("shared.img", 1 << 20);
    let mut first = running_with(&img);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stderr = loop {
        let (status, _, stderr) = tiny_with(&[&img]);
        if !status.success() || Instant::now() > deadline {
            break stderr;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    one_line(&stderr, &[&img, "in use by another skiff"]);
    // Read-only does not share with a writer either.
    let (status, _, stderr) = tiny_with(&[&format!("{img},ro")]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    one_line(&stderr, &["in use by another skiff"]);
    first.kill().unwrap();
    first.wait().unwrap();
    // Read-only users share the image.
    let mut reader = running_with(&format!("{img},ro"));
    let (status, _, stderr) = tiny_with(&[&format!("{img},ro")]);
    assert_eq!(status.code(), Some(0), "two read-only users: {stderr}");
    reader.kill().unwrap();
    reader.wait().unwrap();
}
