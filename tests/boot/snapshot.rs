//! The Debian guest through a snapshot: a counting process and disk reads in flight
//! when it is paused and snapshotted through the API; after the original skiff ended
//! (its disks are locked while it runs), a new skiff restores the snapshot and the
//! guest goes on: the count continues from where it was, the reads finish, the data
//! the guest flushed before the snapshot is on its disk, and the shell answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CMD_TIMEOUT;
use super::common::{Guest, api};
use super::disk;
use super::net::{self, Netns};

pub struct Taken {
    /// The snapshot file (its memory file beside it); gdb.rs restores it too.
    pub snap: PathBuf,
    /// The count the guest had written just before the pause.
    count_before: u64,
}

fn count(g: &mut Guest) -> u64 {
    let out = g.run("cat /tmp/count", CMD_TIMEOUT);
    out.first().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("/tmp/count: {out:?}"))
}

/// Starts the counter and a disk read, pauses, snapshots, resumes.
pub fn take(g: &mut Guest, sock: &Path) -> Taken {
    g.run("(n=0; while true; do n=$((n+1)); echo $n > /tmp/count; sleep 0.2; done) >/dev/null 2>&1 & true", CMD_TIMEOUT);
    // Reads in flight while the snapshot is taken (they end in the restored guest).
    g.run("(dd if=/dev/vda of=/dev/null bs=4k count=2048 iflag=direct 2>/dev/null && echo done > /tmp/dd) >/dev/null 2>&1 & true", CMD_TIMEOUT);
    std::thread::sleep(Duration::from_secs(1));
    let count_before = count(g);
    api::pause(sock);
    let snap = disk::scratch("debian.snap");
    let mem = disk::scratch("debian.mem");
    let (code, body) = api::snapshot(sock, &snap, &mem);
    assert_eq!(code, 204, "snapshot of the Debian guest: {body}");
    api::resume(sock);
    let (code, body) = api::request(sock, "GET", "/", None);
    assert!(code == 200 && body.contains(r#""state":"Running""#), "{code} {body}");
    Taken { snap, count_before }
}

/// Restores the snapshot (the original skiff has ended) and checks the guest goes on.
pub fn restore_and_check(t: &Taken, raw_sum: &str, ns: &Netns) {
    let sock = disk::scratch("restored.sock");
    let sock_arg = sock.display().to_string();
    let mut r = Guest::restore_in_netns(&ns.name, &[
        "--snapshot",
        t.snap.to_str().expect("utf-8"),
        "--resume",
        "--stats",
        "--api-sock",
        &sock_arg,
        "--on-reboot",
        "exit",
    ]);
    let first = count(&mut r);
    assert!(
        first >= t.count_before && first <= t.count_before + 50,
        "the restored count {first} does not go on from {} (before the snapshot)",
        t.count_before
    );
    std::thread::sleep(Duration::from_secs(2));
    let later = count(&mut r);
    assert!(later > first, "the count stopped in the restored guest: {first} then {later}");
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
    let _ = std::fs::remove_file(&t.snap);
    let _ = std::fs::remove_file(t.snap.with_file_name(t.snap.file_name().map(|n| n.to_string_lossy().replace(".snap", ".mem")).unwrap_or_default()));
    eprintln!("--- restored 2-vCPU guest ---\n{stderr}");
}
