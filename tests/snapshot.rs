//! Snapshot and restore through the control API, on the chatter test kernel (it
//! prints "chatter: N ....." lines, N = 1, 2, 3, ..., forever): a restored guest goes
//! on from the very line it was at. Every refusal is one line, a non-zero exit, and
//! no file written. (tests/boot.rs does the same with the Debian guest.)

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api;
use common::{Guest, skiff, tiny_kernel};

const WAIT: Duration = Duration::from_secs(60);

/// A scratch directory of the test's own.
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("snapshot-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The chatter kernel with the API on `dir`/api.sock, waited for until it printed line 20.
fn chatter(dir: &Path, extra: &[&str]) -> (Guest, PathBuf) {
    let sock = dir.join("api.sock");
    let kernel = tiny_kernel("chatter");
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--boot", "pvh", "--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut g = Guest::boot(&args);
    g.wait_for("chatter: 20 ", WAIT);
    (g, sock)
}

/// The number of the last whole "chatter: N " the console showed (a snapshot may cut
/// a line, even inside its number: "chatter: 4" of 48239 is not line 4).
fn last_number(transcript: &str) -> u64 {
    transcript
        .rsplit("chatter: ")
        .filter_map(|t| t.split_once(' ').and_then(|(n, _)| n.parse().ok()))
        .next()
        .unwrap_or_else(|| panic!("no chatter line in {:?}", &transcript[transcript.len().saturating_sub(300)..]))
}

/// Pauses, snapshots into `dir` (vm.snap, vm.mem), and kills the guest; returns
/// what its console showed.
fn snapshot_and_kill(mut g: Guest, sock: &Path, dir: &Path) -> String {
    api::pause(sock);
    let (code, body) = api::request(sock, "GET", "/", None);
    assert_eq!(code, 200);
    assert!(body.contains(r#""state":"Paused""#), "{body}");
    let (code, body) = api::snapshot(sock, &dir.join("vm.snap"), &dir.join("vm.mem"));
    assert_eq!(code, 204, "snapshot: {body}");
    // (Everything the guest printed before the pause was written when it answered.)
    g.kill9_collect();
    g.transcript.clone()
}

/// What the console showed before the snapshot followed by what the restored guest
/// printed: a line cut by the snapshot is joined again (every whole chatter line has
/// the same length; the transcript ends each piece with a newline).
fn joined(before: &str, after: &str) -> String {
    let before = before.trim_end_matches('\n');
    let whole = before.lines().map(str::len).max().unwrap_or(0);
    let last = before.rsplit('\n').next().unwrap_or("");
    if last.len() < whole { format!("{before}{after}") } else { format!("{before}\n{after}") }
}

/// Asserts that the chatter lines in `text` count up by one, without a gap or a
/// repeat, and that there are at least `min` of them; returns the last number.
fn assert_consecutive(text: &str, min: usize) -> u64 {
    let numbers: Vec<u64> = text
        .split("chatter: ")
        .skip(1)
        .filter_map(|t| t.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()))
        .collect();
    assert!(numbers.len() >= min, "only {} chatter lines", numbers.len());
    for w in numbers.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a gap or a repeat around line {}: {:?}", w[0], around(text, w[0]));
    }
    *numbers.last().unwrap_or(&0)
}

fn around(text: &str, n: u64) -> &str {
    let at = text.find(&format!("chatter: {n} ")).unwrap_or(0);
    &text[at.saturating_sub(200)..(at + 400).min(text.len())]
}

/// Waits until a restored chatter printed `more` lines, then checks that they follow
/// what was printed before the snapshot with nothing lost or repeated.
fn goes_on_from(r: &mut Guest, before: &str, more: u64) {
    let last = last_number(before);
    r.wait_for(&format!("chatter: {} ", last + more), WAIT);
    assert_consecutive(&joined(before, &r.transcript), 20);
}

#[test]
fn a_restored_guest_goes_on_from_where_it_was() {
    let dir = scratch("continue");
    let (g, sock) = chatter(&dir, &[]);
    let before = snapshot_and_kill(g, &sock, &dir);
    let snap = dir.join("vm.snap");
    let mut r = Guest::restore(&["--snapshot", snap.to_str().unwrap(), "--resume"]);
    goes_on_from(&mut r, &before, 50);
}

#[test]
fn one_snapshot_restores_in_two_processes_at_once_and_its_memory_file_is_untouched() {
    let dir = scratch("twice");
    let (g, sock) = chatter(&dir, &[]);
    let before = snapshot_and_kill(g, &sock, &dir);
    let mem = std::fs::read(dir.join("vm.mem")).unwrap();
    let snap = dir.join("vm.snap");
    let mut a = Guest::restore(&["--snapshot", snap.to_str().unwrap(), "--resume"]);
    let mut b = Guest::restore(&["--snapshot", snap.to_str().unwrap(), "--resume"]);
    goes_on_from(&mut a, &before, 100);
    goes_on_from(&mut b, &before, 100);
    drop((a, b));
    assert!(std::fs::read(dir.join("vm.mem")).unwrap() == mem, "a restore wrote to the memory file");
}

/// A clone beside the original, which still runs and holds its disk locked: the
/// snapshot's own disk is refused as in use, a copy of another size is refused with
/// one line, and a copy made while the original was paused restores and goes on.
#[test]
fn a_clone_restores_on_a_disk_copy_beside_the_running_original() {
    let dir = scratch("clone");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("{},id=d0", disk.display());
    let (mut g, sock) = chatter(&dir, &["--disk", &disk_arg]);
    api::pause(&sock);
    let (code, body) = api::snapshot(&sock, &dir.join("vm.snap"), &dir.join("vm.mem"));
    assert_eq!(code, 204, "snapshot: {body}");
    let copy = dir.join("copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    // What the original printed before the pause may still be on its way to this
    // test: the clone is checked from where the original surely was.
    let at = last_number(&g.transcript);
    api::resume(&sock);
    let snap = dir.join("vm.snap");
    let snap = snap.to_str().unwrap();
    let (status, _, err) = skiff(&["restore", "--snapshot", snap, "--resume"]);
    assert!(!status.success() && err.trim_end().lines().count() == 1, "the original's locked disk: {err}");
    let short = dir.join("short.img");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let (status, _, err) = skiff(&["restore", "--snapshot", snap, "--disk", short.to_str().unwrap(), "--resume"]);
    assert!(!status.success() && err.trim_end().lines().count() == 1 && err.contains("4096 bytes"), "{err}");
    let (status, _, err) = skiff(&["restore", "--disk", copy.to_str().unwrap(), "--resume"]);
    assert!(!status.success() && err.contains("--snapshot"), "--disk without --snapshot: {err}");
    let mut r = Guest::restore(&["--snapshot", snap, "--disk", copy.to_str().unwrap(), "--resume"]);
    r.wait_for(&format!("chatter: {} ", at + 50), WAIT);
    assert_consecutive(&r.transcript, 40);
    let first: u64 = r.transcript.split("chatter: ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(first >= at && first <= at + 20, "the clone started at line {first}, the original was at {at}");
    // The original ran on beside it.
    let last = last_number(&g.transcript);
    g.wait_for(&format!("chatter: {} ", last + 20), WAIT);
}

/// Restored paused, resumed through the API, snapshotted again, and that snapshot
/// restored: the count goes on through both.
#[test]
fn a_restored_machine_resumes_through_the_api_and_snapshots_again() {
    let dir = scratch("chain");
    let (g, sock) = chatter(&dir, &[]);
    let before = snapshot_and_kill(g, &sock, &dir);
    let sock2 = dir.join("api2.sock");
    let snap = dir.join("vm.snap");
    let mut r = Guest::restore(&["--snapshot", snap.to_str().unwrap(), "--api-sock", sock2.to_str().unwrap()]);
    api::wait_for_socket(&sock2, WAIT);
    let (_, body) = api::request(&sock2, "GET", "/", None);
    assert!(body.contains(r#""state":"Paused""#), "restored without --resume: {body}");
    api::resume(&sock2);
    goes_on_from(&mut r, &before, 30);
    let dir2 = dir.join("second");
    std::fs::create_dir_all(&dir2).unwrap();
    let mid = snapshot_and_kill(r, &sock2, &dir2);
    let snap2 = dir2.join("vm.snap");
    let mut r2 = Guest::restore(&["--snapshot", snap2.to_str().unwrap(), "--resume"]);
    // From the first boot through both restores, not a line lost or repeated.
    goes_on_from(&mut r2, &joined(&before, &mid), 30);
}

#[test]
fn snapshot_requests_that_cannot_be_done_are_refused_and_write_nothing() {
    let dir = scratch("api-refusals");
    let (g, sock) = chatter(&dir, &[]);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Running: must pause first.
    let (code, body) = api::snapshot(&sock, &out.join("a.snap"), &out.join("a.mem"));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("fault_message") && body.contains("pause"), "{body}");
    api::pause(&sock);
    // A directory that does not exist; the same file for both; unknown fields; a
    // diff with no full snapshot before it.
    let (code, body) = api::snapshot(&sock, &out.join("nope/a.snap"), &out.join("a.mem"));
    assert_eq!(code, 400, "{body}");
    let (code, body) = api::snapshot(&sock, &out.join("same"), &out.join("same"));
    assert_eq!(code, 400, "{body}");
    let (code, body) = api::request(&sock, "PUT", "/snapshot/create", Some(r#"{"snapshot_path": "x", "mem_file_path": "y", "colour": 1}"#));
    assert_eq!(code, 400, "{body}");
    let body_diff = format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "Diff"}}"#, out.join("d.snap").display(), out.join("d.mem").display());
    let (code, body) = api::request(&sock, "PUT", "/snapshot/create", Some(&body_diff));
    assert_eq!(code, 400, "{body}");
    let (code, body) = api::request(&sock, "PUT", "/snapshot/load", Some(r#"{"snapshot_path": "x", "mem_backend": {"backend_path": "y", "backend_type": "File"}}"#));
    assert_eq!(code, 400, "{body}");
    assert_eq!(entries(&out), Vec::<String>::new(), "a refused request left files behind");
    // The machine is fine: it resumes and goes on.
    api::resume(&sock);
    let mut g = g;
    let n = last_number(&g.transcript);
    g.wait_for(&format!("chatter: {} ", n + 20), WAIT);
    let (code, body) = api::request(&sock, "GET", "/stats", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("io-out"), "{body}");
}

/// Each bad snapshot: one line naming what is wrong, a non-zero exit, nothing written.
#[test]
fn bad_snapshots_are_refused_with_one_line() {
    let dir = scratch("refusals");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("{},id=d0", disk.display());
    let (g, sock) = chatter(&dir, &["--disk", &disk_arg]);
    let _ = snapshot_and_kill(g, &sock, &dir);
    let _ = std::fs::remove_file(dir.join("api.sock"));
    let good = std::fs::read(dir.join("vm.snap")).unwrap();
    let case = |name: &str, bytes: &[u8], expect: &str| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let before = entries(&dir);
        let (status, _, err) = skiff(&["restore", "--snapshot", p.to_str().unwrap(), "--resume"]);
        assert!(!status.success(), "{name}: restored");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
        assert!(err.contains(expect), "{name}: expected {expect:?} in {err:?}");
        assert!(!err.contains("panick"), "{name}: {err}");
        assert_eq!(entries(&dir), before, "{name}: files changed");
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    case("flipped.snap", &flipped, "checksum");
    case("truncated.snap", &good[..good.len() - 100], "truncated");
    case("text.snap", b"this is not a snapshot\n", "wrong magic");
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    case("newer.snap", &newer, "newer");
    // The memory file moved away.
    std::fs::rename(dir.join("vm.mem"), dir.join("moved.mem")).unwrap();
    case("nomem.snap", &good, "vm.mem");
    // Another snapshot's memory file in its place.
    std::fs::write(dir.join("vm.mem"), vec![0u8; std::fs::metadata(dir.join("moved.mem")).unwrap().len() as usize]).unwrap();
    case("othermem.snap", &good, "not a skiff memory file");
    std::fs::rename(dir.join("moved.mem"), dir.join("vm.mem")).unwrap();
    // The disk written since.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::OpenOptions::new().write(true).open(&disk).and_then(|f| std::os::unix::fs::FileExt::write_at(&f, b"x", 512)).unwrap();
    case("disk-changed.snap", &good, "written since the snapshot");
    // A missing file, and a restore nothing could resume.
    let (status, _, err) = skiff(&["restore", "--snapshot", dir.join("missing.snap").to_str().unwrap(), "--resume"]);
    assert!(!status.success() && err.trim_end().lines().count() == 1 && err.contains("missing.snap"), "{err}");
    let (status, _, err) = skiff(&["restore", "--snapshot", dir.join("vm.snap").to_str().unwrap()]);
    assert!(!status.success() && err.trim_end().lines().count() == 1 && err.contains("--resume"), "{err}");
}

/// Firecracker's way: a fresh process with only the API, then `PUT /snapshot/load`.
#[test]
fn a_fresh_process_loads_a_snapshot_through_the_api() {
    let dir = scratch("load");
    let (g, sock) = chatter(&dir, &[]);
    let before = snapshot_and_kill(g, &sock, &dir);
    let sock2 = dir.join("load.sock");
    let mut r = Guest::restore(&["--api-sock", sock2.to_str().unwrap()]);
    api::wait_for_socket(&sock2, WAIT);
    let (code, body) = api::request(&sock2, "GET", "/", None);
    assert!(code == 200 && body.contains("Not started"), "{code} {body}");
    let (code, _) = api::request(&sock2, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(code, 400, "a pause before any machine exists");
    // A load that fails changes nothing: the process still waits for a good one.
    let bad = format!(r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_path": "{}", "backend_type": "File"}}}}"#, dir.join("nope.snap").display(), dir.join("vm.mem").display());
    let (code, body) = api::request(&sock2, "PUT", "/snapshot/load", Some(&bad));
    assert!(code == 400 && body.contains("nope.snap"), "{code} {body}");
    let good = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_path": "{}", "backend_type": "File"}}, "resume_vm": true}}"#,
        dir.join("vm.snap").display(),
        dir.join("vm.mem").display()
    );
    let (code, body) = api::request(&sock2, "PUT", "/snapshot/load", Some(&good));
    assert_eq!(code, 204, "{body}");
    goes_on_from(&mut r, &before, 50);
    let (code, body) = api::request(&sock2, "GET", "/", None);
    assert!(code == 200 && body.contains(r#""state":"Running""#), "{code} {body}");
    let (code, _) = api::request(&sock2, "PUT", "/snapshot/load", Some(&good));
    assert_eq!(code, 400, "a second load into a running machine");
}

/// A diff on top of a full snapshot: only the pages that changed (chatter keeps its
/// count in a register: almost none), and the full + diff chain restores the same
/// memory as a full snapshot taken at the same moment, and a guest that goes on.
#[test]
fn a_diff_snapshot_holds_only_changed_pages_and_restores_like_a_full_one() {
    let dir = scratch("diff");
    let (mut g, sock) = chatter(&dir, &[]);
    api::pause(&sock);
    let (code, body) = api::snapshot(&sock, &dir.join("full.snap"), &dir.join("full.mem"));
    assert_eq!(code, 204, "{body}");
    api::resume(&sock);
    let n = last_number(&g.transcript);
    g.wait_for(&format!("chatter: {} ", n + 200), WAIT);
    api::pause(&sock);
    let diff = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "Diff"}}"#,
        dir.join("diff.snap").display(),
        dir.join("diff.mem").display()
    );
    let (code, body) = api::request(&sock, "PUT", "/snapshot/create", Some(&diff));
    assert_eq!(code, 204, "{body}");
    let (code, body) = api::snapshot(&sock, &dir.join("again.snap"), &dir.join("again.mem"));
    assert_eq!(code, 204, "{body}");
    g.kill9_collect();
    let before = g.transcript.clone();

    // The pages the diff lists (chatter writes only its stack, with the same return
    // addresses each time), and what its memory file holds: those and the trailer.
    let d = skiff::snapshot::read_snapshot(&dir.join("diff.snap")).unwrap();
    let listed: u64 = d.memory_file.diff.as_ref().expect("a diff").pages.iter().map(|r| r.1).sum();
    let allocated = |p: &str| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(dir.join(p)).unwrap()) * 512;
    assert!(listed <= 2, "the diff lists {listed} pages");
    assert!(allocated("diff.mem") <= (listed + 1) * 4096, "the diff's file holds {} bytes for {listed} pages", allocated("diff.mem"));
    assert!(allocated("full.mem") > allocated("diff.mem"), "{} {}", allocated("full.mem"), allocated("diff.mem"));
    // Full + diff is the same memory as a full snapshot of the same moment.
    let view = |name: &str| {
        let p = dir.join(name);
        let s = skiff::snapshot::read_snapshot(&p).unwrap();
        let mem = skiff::snapshot::map_memory(&p, &s).unwrap();
        let mut all = vec![0u8; s.memory_map[0].len as usize];
        vm_memory::Bytes::read_slice(&mem, &mut all, vm_memory::GuestAddress(0)).unwrap();
        all
    };
    assert!(view("diff.snap") == view("again.snap"), "full + diff differs from a full snapshot of the same moment");
    let mut r = Guest::restore(&["--snapshot", dir.join("diff.snap").to_str().unwrap(), "--resume"]);
    goes_on_from(&mut r, &before, 50);
}

/// Clients that connect and say nothing, many at once, and one that leaves in the
/// middle of a request: the machine runs on and the API still answers.
#[test]
fn idle_and_vanishing_api_clients_do_not_hold_up_the_machine() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = scratch("clients");
    let (mut g, sock) = chatter(&dir, &[]);
    let idle: Vec<UnixStream> = (0..80).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
    {
        let mut half = UnixStream::connect(&sock).expect("connect");
        half.write_all(b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"snapshot_path\": ").unwrap();
    }
    let n = last_number(&g.transcript);
    g.wait_for(&format!("chatter: {} ", n + 100), WAIT);
    let (code, body) = api::request(&sock, "GET", "/", None);
    assert!(code == 200 && body.contains("Running"), "{code} {body}");
    drop(idle);
    api::pause(&sock);
    api::resume(&sock);
    let n = last_number(&g.transcript);
    g.wait_for(&format!("chatter: {} ", n + 100), WAIT);
}

/// A restored machine reboots in place as a booted one does (RAM that was the memory
/// file is cleared, the kernel loaded again), and the guest's CMOS counter goes on.
#[test]
fn a_restored_machine_reboots_in_place() {
    let dir = scratch("reboot");
    let sock = dir.join("api.sock");
    let kernel = tiny_kernel("rebootloop");
    let mut g = Guest::boot(&["--kernel", kernel.to_str().unwrap(), "--boot", "pvh", "--api-sock", sock.to_str().unwrap()]);
    g.wait_for("rebootloop: boot 20", WAIT);
    api::pause(&sock);
    let (code, body) = api::snapshot(&sock, &dir.join("vm.snap"), &dir.join("vm.mem"));
    assert_eq!(code, 204, "{body}");
    g.kill9_collect();
    let boots = |t: &str| -> Vec<u64> { t.split("rebootloop: boot ").skip(1).filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).collect() };
    // The console's last line may be cut anywhere by the snapshot (the restored guest
    // finishes it): the line before it is the last whole one, and the restored guest's
    // first whole line is the one after the cut one.
    let lines: Vec<&str> = g.transcript.lines().collect();
    let whole = lines[..lines.len().saturating_sub(1)].join("\n");
    let last = *boots(&whole).last().expect("a boot line");
    let mut r = Guest::restore(&["--snapshot", dir.join("vm.snap").to_str().unwrap(), "--resume"]);
    r.wait_for(&format!("rebootloop: boot {}", last + 30), WAIT);
    let after = boots(&r.transcript.lines().filter(|l| l.starts_with("rebootloop: boot ")).collect::<Vec<_>>().join("\n"));
    let first = *after.first().expect("boot lines after the restore");
    assert_eq!(first, last + 2, "boots before: ..{last}; after: {after:?}");
    for w in after.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{after:?}");
    }
}

/// `SendCtrlAltDel` presses Ctrl, Alt and Delete on the guest's PS/2 keyboard: the
/// kbd test kernel reads the scan codes (set 1, as the translating controller
/// delivers them) and powers off.
#[test]
fn ctrl_alt_del_from_the_api_reaches_the_guest_keyboard() {
    let dir = scratch("ctrl-alt-del");
    let sock = dir.join("api.sock");
    let kernel = tiny_kernel("kbd");
    let mut g = Guest::boot(&["--kernel", kernel.to_str().unwrap(), "--boot", "pvh", "--api-sock", sock.to_str().unwrap()]);
    g.wait_for("kbd: ready", WAIT);
    for line in ["kbd: self-test 00000055", "kbd: id 000000fa\n000000ab00000083", "kbd: enable 000000fa"] {
        assert!(g.transcript.contains(line), "{line}: {}", g.transcript);
    }
    let (code, body) = api::request(&sock, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    assert_eq!(code, 204, "{body}");
    g.wait_for("kbd: done", WAIT);
    let codes = "0000001d 00000038 000000e0 00000053 000000e0 000000d3 000000b8 0000009d";
    assert!(g.transcript.contains(codes), "{}", g.transcript);
    let (status, stderr, _) = g.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}
