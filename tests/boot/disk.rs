//! The disk checks of the Debian boots: an ext4 image made on the host, written by
//! the guest through virtio-blk, then read back on the host with e2fsprogs (e2fsck,
//! debugfs); a read-only disk the guest cannot change.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::common::Guest;

const CMD_TIMEOUT: Duration = Duration::from_secs(300);

/// A scratch file in Cargo's per-target temporary directory, removed first.
pub fn scratch(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("boot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A `size_mib` MiB ext4 image, made by the host's mkfs.ext4.
pub fn ext4_image(name: &str, size_mib: u64) -> PathBuf {
    let p = scratch(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(size_mib << 20).expect("size image");
    let out = Command::new("mkfs.ext4").args(["-q", "-F", "-L", "skiff"]).arg(&p).output().unwrap_or_else(|e| panic!("mkfs.ext4 cannot be run ({e}): install e2fsprogs"));
    assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    p
}

/// A file of `size_mib` MiB of a fixed pattern, for the read-only disk.
pub fn pattern_image(name: &str, size_mib: u64) -> PathBuf {
    let p = scratch(name);
    let data: Vec<u8> = (0..(size_mib << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, data).expect("write pattern image");
    p
}

pub fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// Bounds a mount that first loads the ext4 module: minutes where guest kernel mode
/// is emulated (the bound catches a hang, it is not a goal).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(2400);
/// Bytes written raw at the start of the 2-vCPU boot's disk (random from the guest
/// kernel costs about 100 s a MiB where its kernel mode is emulated; 256 KiB span 512
/// sectors, enough to catch one out of place).
const RAW_KIB: u64 = 256;

/// In the guest: mounts /dev/`dev` on /mnt (if it is not mounted), writes `files`
/// files of 16 to 48 KiB of random data (the guest kernel makes random data at about
/// 10 KiB a second here; a file still spans many blocks), and returns each name with
/// the SHA-256 the guest computed. Names go on from the files already there.
pub fn write_files(g: &mut Guest, dev: &str, files: u32) -> Vec<(String, String)> {
    let started = std::time::Instant::now();
    let out = g.run(
        &format!("mkdir -p /mnt && (grep -q ' /mnt ' /proc/mounts || mount -t ext4 /dev/{dev} /mnt) && ls /mnt | grep -c file"),
        MOUNT_TIMEOUT,
    );
    eprintln!("mount of /dev/{dev} (ext4 module on the first): {:.1} s", started.elapsed().as_secs_f64());
    let first: u32 = out.last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("mounting /dev/{dev}: {out:?}"));
    let mut sums = Vec::new();
    for i in first..first + files {
        let name = format!("file{i}");
        let kib = 16 * (1 + i % 3);
        let out = g.run(&format!("dd if=/dev/urandom of=/mnt/{name} bs=1k count={kib} 2>/dev/null && sha256sum /mnt/{name}"), CMD_TIMEOUT);
        let sum = out.iter().find_map(|l| l.strip_suffix(&format!("  /mnt/{name}"))).unwrap_or_else(|| panic!("writing {name}: {out:?}"));
        sums.push((name, sum.to_string()));
    }
    sums
}

/// On the host: the image's filesystem is clean (e2fsck -fn) and debugfs reads every
/// file back with the checksum the guest computed.
pub fn host_reads_back(image: &Path, sums: &[(String, String)]) {
    let fsck = Command::new("e2fsck").arg("-fn").arg(image).output().expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn {}: {}\n{}",
        image.display(),
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    for (name, sum) in sums {
        let out = scratch(&format!("{name}.out"));
        let dump = Command::new("debugfs").arg("-R").arg(format!("dump /{name} {}", out.display())).arg(image).output().expect("debugfs");
        assert!(out.exists(), "debugfs could not dump /{name}: {}", String::from_utf8_lossy(&dump.stderr));
        assert_eq!(&sha256_file(&out), sum, "/{name} on the host differs from what the guest wrote");
        let _ = std::fs::remove_file(out);
    }
}

/// In the guest: writes RAW_KIB of random data to the start of /dev/`dev` with O_DIRECT
/// and returns its SHA-256 (as the guest computed it from what it wrote).
pub fn write_raw(g: &mut Guest, dev: &str) -> String {
    let out = g.run(
        &format!(
            "dd if=/dev/urandom of=/tmp/raw bs=1k count={RAW_KIB} 2>/dev/null && dd if=/tmp/raw of=/dev/{dev} bs=64k oflag=direct 2>/dev/null && sync && sha256sum /tmp/raw"
        ),
        CMD_TIMEOUT,
    );
    out.iter().find_map(|l| l.strip_suffix("  /tmp/raw")).unwrap_or_else(|| panic!("raw write to /dev/{dev}: {out:?}")).to_string()
}

/// In the guest: the SHA-256 of the first RAW_KIB of /dev/`dev`, read with O_DIRECT.
pub fn read_raw(g: &mut Guest, dev: &str) -> String {
    let out = g.run(&format!("dd if=/dev/{dev} bs=64k count={} iflag=direct 2>/dev/null | sha256sum", RAW_KIB / 64), CMD_TIMEOUT);
    out.iter().find_map(|l| l.strip_suffix("  -")).unwrap_or_else(|| panic!("raw read of /dev/{dev}: {out:?}")).to_string()
}

/// On the host: the SHA-256 of the image's first RAW_KIB.
pub fn raw_sum_on_host(image: &Path) -> String {
    let bytes = std::fs::read(image).expect("read image");
    let head = bytes.get(..(RAW_KIB << 10) as usize).expect("image shorter than the raw data");
    let tmp = scratch("raw-head");
    std::fs::write(&tmp, head).expect("write head");
    let sum = sha256_file(&tmp);
    let _ = std::fs::remove_file(tmp);
    sum
}

/// The read-only disk: the guest sees it read-only and cannot write it; the image is
/// unchanged (checked by the caller after exit).
pub fn read_only_disk_refuses_writes(g: &mut Guest, dev: &str) {
    let ro = g.run(&format!("cat /sys/block/{dev}/ro"), CMD_TIMEOUT);
    assert_eq!(ro, vec!["1".to_string()], "/dev/{dev} read-only flag");
    let out = g.run(&format!("dd if=/dev/zero of=/dev/{dev} bs=4k count=1 oflag=direct 2>&1; echo rc=$?"), CMD_TIMEOUT);
    assert!(out.iter().any(|l| l.starts_with("rc=") && l != "rc=0"), "a write to the read-only disk succeeded: {out:?}");
    let read = g.run(&format!("dd if=/dev/{dev} bs=1M count=1 2>/dev/null | od -An -tx1 -N4"), CMD_TIMEOUT);
    assert_eq!(read.concat().split_whitespace().collect::<Vec<_>>(), ["00", "01", "02", "03"], "reading the read-only disk");
}

/// After skiff was killed (SIGKILL) right after the guest's sync: the next mount's
/// journal replay (e2fsck -fy on a copy) gives a clean filesystem with every file.
pub fn survives_sigkill(image: &Path, sums: &[(String, String)]) {
    let copy = scratch("killed-copy.img");
    std::fs::copy(image, &copy).expect("copy image");
    let replay = Command::new("e2fsck").arg("-fy").arg(&copy).output().expect("e2fsck");
    // 0: clean; 1: errors corrected (the journal replayed). Anything else lost data.
    assert!(
        matches!(replay.status.code(), Some(0 | 1)),
        "e2fsck -fy after SIGKILL: {:?}\n{}",
        replay.status,
        String::from_utf8_lossy(&replay.stdout)
    );
    host_reads_back(&copy, sums);
    let _ = std::fs::remove_file(copy);
}
