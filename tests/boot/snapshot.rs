//! The Debian guest through a snapshot: a counting process and disk reads in flight
//! when it is paused and snapshotted through the API, and its disks copied while it
//! is paused. A new skiff restores the snapshot on the copies (`skiff restore
//! --disk`, `--vsock-uds`), in a network namespace of its own, while the original
//! runs on (its disks are locked while it runs): the count continues from where it
//! was, the reads finish, the data the guest flushed before the snapshot is on its
//! disk, and the shell answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CMD_TIMEOUT;
use super::common::{Guest, api};
use super::disk;
use super::gdb;
use super::net::{self, Netns};

pub struct Taken {
    /// The snapshot file (its memory file beside it); gdb.rs restores it too.
    pub snap: PathBuf,
    /// The count the guest had written just before the pause.
    count_before: u64,
    /// The disks' copies, made while the guest was paused.
    copies: Vec<PathBuf>,
}

impl Taken {
    /// `skiff restore`'s arguments for a clone beside the original, in `ns`.
    pub fn clone_args(&self, ns: &Netns) -> Vec<String> {
        let mut args = vec!["--snapshot".to_string(), self.snap.display().to_string(), "--vsock-uds".into(), ns.uds.display().to_string()];
        for c in &self.copies {
            args.extend(["--disk".to_string(), c.display().to_string()]);
        }
        args
    }
}

fn count(g: &mut Guest) -> u64 {
    let out = g.run("cat /tmp/count", CMD_TIMEOUT);
    out.first().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("/tmp/count: {out:?}"))
}

/// Starts the counter and a disk read, pauses, snapshots, copies `disks`, resumes,
/// and stops the counter in the original (its fork every 0.2 s costs the emulated
/// guest kernel a vCPU's worth).
pub fn take(g: &mut Guest, sock: &Path, disks: &[&Path]) -> Taken {
    g.run("(n=0; while true; do n=$((n+1)); echo $n > /tmp/count; sleep 0.2; done) >/dev/null 2>&1 & echo $! > /tmp/count.pid", CMD_TIMEOUT);
    // Reads in flight while the snapshot is taken (they end in the restored guest;
    // each costs about 60 ms here).
    g.run("(dd if=/dev/vda of=/dev/null bs=4k count=256 iflag=direct 2>/dev/null && echo done > /tmp/dd) >/dev/null 2>&1 & true", CMD_TIMEOUT);
    std::thread::sleep(Duration::from_secs(1));
    let count_before = count(g);
    api::pause(sock);
    let snap = disk::scratch("debian.snap");
    let mem = disk::scratch("debian.mem");
    let (code, body) = api::snapshot(sock, &snap, &mem);
    assert_eq!(code, 204, "snapshot of the Debian guest: {body}");
    let copies: Vec<PathBuf> = disks
        .iter()
        .map(|d| {
            let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let copy = disk::scratch(&format!("clone-{name}"));
            std::fs::copy(d, &copy).unwrap_or_else(|e| panic!("copying {}: {e}", d.display()));
            copy
        })
        .collect();
    api::resume(sock);
    let (code, body) = api::request(sock, "GET", "/", None);
    assert!(code == 200 && body.contains(r#""state":"Running""#), "{code} {body}");
    g.run("kill $(cat /tmp/count.pid)", CMD_TIMEOUT);
    Taken { snap, count_before, copies }
}

/// Restores the snapshot on the disks' copies, in `ns`, under `--gdb`, and checks the
/// guest goes on, and gdb against it.
pub fn restore_and_check(t: &Taken, raw_sum: &str, ns: &Netns) {
    let sock = disk::scratch("restored.sock");
    let sock_arg = sock.display().to_string();
    let gdb_sock = gdb::socket();
    let mut args = t.clone_args(ns);
    args.extend(["--resume", "--stats", "--api-sock", &sock_arg, "--on-reboot", "exit", "--gdb"].map(String::from));
    args.push(format!("unix:{}", gdb_sock.display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut r = Guest::restore_in_netns(&ns.name, &args);
    let first = count(&mut r);
    assert!(
        first >= t.count_before && first <= t.count_before + 50,
        "the restored count {first} does not go on from {} (before the snapshot)",
        t.count_before
    );
    std::thread::sleep(Duration::from_secs(2));
    let later = count(&mut r);
    assert!(later > first, "the count stopped in the restored guest: {first} then {later}");
    // Debian's gdb against the restored kernel (the counter keeps the write system
    // call busy).
    gdb::check_restored(&mut r, &gdb_sock);
    let dd = r.run("while [ ! -e /tmp/dd ]; do sleep 0.2; done; cat /tmp/dd", CMD_TIMEOUT);
    assert_eq!(dd, vec!["done".to_string()], "the disk reads in flight at the snapshot");
    assert_eq!(disk::read_raw(&mut r, "vda"), raw_sum, "vda's data in the restored guest");
    net::after_restore(&mut r, ns);
    let echo = r.run("echo restored-and-answering", CMD_TIMEOUT);
    assert_eq!(echo, vec!["restored-and-answering".to_string()]);
    r.send("poweroff\n");
    let (status, stderr, console) = r.wait_exit(CMD_TIMEOUT);
    assert_eq!(status.code(), Some(0), "the restored guest's poweroff; stderr:\n{stderr}\nconsole:\n{console}");
    assert!(stderr.contains("restore: "), "{stderr}");
    assert!(stderr.contains("skiff: gdb: detached"), "{stderr}");
    let _ = std::fs::remove_file(&t.snap);
    let _ = std::fs::remove_file(t.snap.with_file_name(t.snap.file_name().map(|n| n.to_string_lossy().replace(".snap", ".mem")).unwrap_or_default()));
    for c in &t.copies {
        let _ = std::fs::remove_file(c);
    }
    eprintln!("--- restored 2-vCPU guest ---\n{stderr}");
}
