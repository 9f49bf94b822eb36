//! A restore's replacement files (`skiff restore --disk`, `--vsock-uds`): a copy of
//! the right size stands in for its disk, the recorded file must be unchanged, and
//! every mismatch is one line.

use std::path::{Path, PathBuf};

use super::*;

/// A machine whose one disk is a real file of `len` bytes in `dir`.
fn machine_with_disk(dir: &Path, len: u64) -> (Machine, PathBuf) {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(len).unwrap();
    let mut m = sample_machine(1, 1 << 20);
    m.disks = vec![DiskRecord::of(&crate::config::DiskConfig { path: disk.clone(), read_only: false, id: None, direct: false }).unwrap()];
    (m, disk)
}

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("skiff-relocate-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_copy_of_the_right_size_stands_in_for_its_disk() {
    let dir = scratch_dir("copy");
    let (mut m, disk) = machine_with_disk(&dir, 1 << 20);
    let copy = dir.join("copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    let uds = dir.join("clone.sock");
    m.relocate_and_check(&Relocation { disks: std::slice::from_ref(&copy), vsock_uds: Some(&uds) }).unwrap();
    assert_eq!(m.disks[0].path, copy.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(m.network.vsock, Some((3, uds.to_str().unwrap().to_string())));
    // The guest read the original's serial; the copy keeps it.
    let orig = std::fs::metadata(&disk).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.disks[0].id.as_deref(), Some(crate::devices::virtio::block::default_serial(orig.dev(), orig.ino()).as_str()));
    // The original file, named again, is checked as unchanged.
    let (mut m, disk) = machine_with_disk(&dir, 1 << 20);
    m.relocate_and_check(&Relocation { disks: std::slice::from_ref(&disk), vsock_uds: None }).unwrap();
    std::fs::write(&disk, b"written since").unwrap();
    let e = m.relocate_and_check(&Relocation { disks: &[disk], vsock_uds: None }).unwrap_err();
    assert!(e.contains("bytes") || e.contains("written since"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mismatches_are_one_line_each() {
    let dir = scratch_dir("refused");
    let (m, _) = machine_with_disk(&dir, 1 << 20);
    let short = dir.join("short.img");
    std::fs::File::create(&short).unwrap().set_len(4096).unwrap();
    let refuse = |r: Relocation, m: &Machine| {
        let e = m.clone().relocate_and_check(&r).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        e
    };
    let e = refuse(Relocation { disks: &[short.clone(), short.clone()], vsock_uds: None }, &m);
    assert!(e.contains("--disk given 2 times; the snapshotted machine has 1 disks"), "{e}");
    let e = refuse(Relocation { disks: std::slice::from_ref(&short), vsock_uds: None }, &m);
    assert!(e.contains("4096 bytes") && e.contains(&format!("was {} bytes", 1 << 20)), "{e}");
    let e = refuse(Relocation { disks: &[dir.join("missing.img")], vsock_uds: None }, &m);
    assert!(e.contains("missing.img"), "{e}");
    let mut no_vsock = m.clone();
    no_vsock.network.vsock = None;
    let e = refuse(Relocation { disks: &[], vsock_uds: Some(Path::new("/tmp/x.sock")) }, &no_vsock);
    assert!(e.contains("no vsock device"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
