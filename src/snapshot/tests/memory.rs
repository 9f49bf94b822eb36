//! The guest-memory file: sparse full files, diffs on top of them, restore by private
//! mapping, and atomic writes.

use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const LOW: usize = 2 << 20;
const HIGH: usize = 256 << 10;
const HIGH_BASE: u64 = 1 << 32;

/// Two regions around a hole, like a machine's RAM split around the 32-bit MMIO hole.
fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), LOW), (GuestAddress(HIGH_BASE), HIGH)]).unwrap()
}

/// Guest addresses of every page, in memory-file order.
fn pages() -> impl Iterator<Item = u64> {
    (0..LOW as u64 / PAGE_SIZE).map(|p| p * PAGE_SIZE).chain((0..HIGH as u64 / PAGE_SIZE).map(|p| HIGH_BASE + p * PAGE_SIZE))
}

fn page(mem: &GuestMemoryMmap, gpa: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
    b
}

fn fill(mem: &GuestMemoryMmap, gpa: u64, seed: u8) {
    let b: Vec<u8> = (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31) ^ seed | 1).collect();
    mem.write_slice(&b, GuestAddress(gpa)).unwrap();
}

fn assert_same_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) {
    for gpa in pages() {
        assert!(page(a, gpa) == page(b, gpa), "page {gpa:#x} differs");
    }
}

/// The snapshot that goes with a memory file.
fn snapshot_for(w: &MemoryWritten) -> Snapshot {
    let mut s = sample(1);
    s.memory_map = w.map.clone();
    s.machine.memory = s.memory_map.iter().map(|r| r.len).sum();
    s.memory_file = w.file.clone();
    s
}

/// SEEK_DATA / SEEK_HOLE: the data runs of a file, as (start, end).
fn data_runs(f: &std::fs::File) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut runs = Vec::new();
    let mut at = 0i64;
    loop {
        // SAFETY: lseek on an open fd; no memory is involved.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        runs.push((data as u64, hole as u64));
        at = hole;
    }
    runs
}

#[test]
fn full_file_is_page_aligned_and_sparse() {
    let dir = TmpDir::new("full");
    let mem = guest();
    // Data in pages 1-3, 100, and the high region's second page; the rest zero.
    for (gpa, seed) in [(0x1000, 1), (0x2000, 2), (0x3000, 3), (100 * 0x1000, 4), (HIGH_BASE + 0x1000, 5)] {
        fill(&mem, gpa, seed);
    }
    let path = dir.path("guest.mem");
    let w = write_memory_full(&path, &mem).unwrap();
    assert_eq!(w.pages_written, 5);
    assert_eq!(Path::new(&w.file.path), std::fs::canonicalize(&path).unwrap());
    assert_eq!(w.map, [MemoryRange { guest_addr: 0, len: LOW as u64, file_offset: 0 }, MemoryRange { guest_addr: HIGH_BASE, len: HIGH as u64, file_offset: LOW as u64 }]);
    let ram = (LOW + HIGH) as u64;
    assert_eq!(w.file.size, ram + MEMORY_TRAILER_SIZE);
    let f = std::fs::File::open(&path).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), w.file.size);
    // Five data pages and the trailer take room; the holes take none.
    assert!(md.blocks() * 512 <= 6 * PAGE_SIZE + 8192, "{} bytes allocated", md.blocks() * 512);
    let runs = data_runs(&f);
    if !runs.is_empty() {
        // Where the file system reports holes at page granularity: exactly the data.
        assert_eq!(runs, [(0x1000, 0x4000), (100 * 0x1000, 101 * 0x1000), (LOW as u64 + 0x1000, LOW as u64 + 0x2000), (ram, ram + PAGE_SIZE)]);
    }
    assert_eq!(dir.entries(), ["guest.mem"]);
}

#[test]
fn full_snapshot_restores_by_private_mapping() {
    let dir = TmpDir::new("map");
    let mem = guest();
    for (i, gpa) in pages().enumerate().filter(|(i, _)| i % 7 == 0) {
        fill(&mem, gpa, i as u8);
    }
    let mem_path = dir.path("guest.mem");
    let w = write_memory_full(&mem_path, &mem).unwrap();
    let snap_path = dir.path("vm.snap");
    let mut s = snapshot_for(&w);
    // A relative name is found next to the snapshot.
    s.memory_file.path = "guest.mem".into();
    write_snapshot(&snap_path, &s).unwrap();
    let before = std::fs::read(&mem_path).unwrap();

    let restored = map_memory(&snap_path, &read_snapshot(&snap_path).unwrap()).unwrap();
    assert_same_memory(&mem, &restored);
    // Two restores of one snapshot, each writing its own guest: the file stays as it was.
    let other = map_memory(&snap_path, &read_snapshot(&snap_path).unwrap()).unwrap();
    fill(&restored, 0x5000, 0xaa);
    fill(&other, 0x5000, 0x55);
    assert_ne!(page(&restored, 0x5000), page(&other, 0x5000));
    drop((restored, other));
    assert!(std::fs::read(&mem_path).unwrap() == before, "the memory file was modified");
}

#[test]
fn memory_file_mismatches_are_refused() {
    let dir = TmpDir::new("mismatch");
    let mem = guest();
    fill(&mem, 0, 1);
    let mem_path = dir.path("guest.mem");
    let w = write_memory_full(&mem_path, &mem).unwrap();
    let s = snapshot_for(&w);
    let snap_path = dir.path("vm.snap");

    // Another full file written to the same name since (a new identity).
    write_memory_full(&mem_path, &mem).unwrap();
    let e = map_memory(&snap_path, &s).err().unwrap().to_string();
    assert!(e.contains("identity differs"), "{e}");
    // A file of another size.
    std::fs::write(&mem_path, vec![0u8; 8192]).unwrap();
    let e = map_memory(&snap_path, &s).err().unwrap().to_string();
    assert!(e.contains("8192 bytes, the snapshot says"), "{e}");
    // The right size but no trailer.
    std::fs::write(&mem_path, vec![0u8; w.file.size as usize]).unwrap();
    let e = map_memory(&snap_path, &s).err().unwrap().to_string();
    assert!(e.contains("not a skiff memory file"), "{e}");
    std::fs::remove_file(&mem_path).unwrap();
    assert!(matches!(map_memory(&snap_path, &s), Err(SnapshotError::Io { op: "opening", .. })));
}

/// A full snapshot, then the guest writes (and zeroes) some pages; a diff holds just
/// those, and full + diff restores the guest exactly.
#[test]
fn diff_on_top_of_full() {
    let dir = TmpDir::new("diff");
    let mem = guest();
    for (i, gpa) in pages().enumerate().filter(|(i, _)| i % 3 == 0) {
        fill(&mem, gpa, i as u8);
    }
    let base_snap = dir.path("base.snap");
    let w = write_memory_full(&dir.path("base.mem"), &mem).unwrap();
    write_snapshot(&base_snap, &snapshot_for(&w)).unwrap();

    // The guest runs: rewrites pages 0 and 1 (1 was zero), zeroes page 3, writes the
    // high region's last page; page 6 is named dirty but rewritten with what it had.
    let low_pages = LOW as u64 / PAGE_SIZE;
    let high_last = HIGH as u64 / PAGE_SIZE - 1;
    fill(&mem, 0, 0xee);
    fill(&mem, 0x1000, 0xef);
    mem.write_slice(&[0u8; 4096], GuestAddress(0x3000)).unwrap();
    fill(&mem, HIGH_BASE + high_last * PAGE_SIZE, 0xf0);
    let mut low = vec![0u64; (low_pages as usize).div_ceil(64)];
    low[0] = 0b100_1011;
    let mut high = vec![0u64; (HIGH / 4096).div_ceil(64)];
    high[(high_last / 64) as usize] |= 1 << (high_last % 64);

    let diff_path = dir.path("diff.mem");
    let d = write_memory_diff(&diff_path, &mem, &[low, high], &base_snap).unwrap();
    // Pages 0, 1, 6 and the high one have data; page 3 is listed but a hole.
    assert_eq!(d.pages_written, 4);
    let diff = d.file.diff.clone().unwrap();
    assert_eq!(diff.pages, [(0, 2), (3, 1), (6, 1), (low_pages + high_last, 1)]);
    assert_eq!(diff.parent_memory_id, w.file.id);
    let md = std::fs::metadata(&diff_path).unwrap();
    assert_eq!(md.len(), w.file.size, "same offsets as the full file");
    assert!(md.blocks() * 512 <= 5 * PAGE_SIZE + 8192, "{} bytes allocated", md.blocks() * 512);

    let diff_snap = dir.path("diff.snap");
    let mut s = snapshot_for(&d);
    // The parent named relative to the diff's directory.
    s.memory_file.diff.as_mut().unwrap().parent_snapshot = "base.snap".into();
    write_snapshot(&diff_snap, &s).unwrap();
    let restored = map_memory(&diff_snap, &read_snapshot(&diff_snap).unwrap()).unwrap();
    assert_same_memory(&mem, &restored);
    // As written (absolute names) it restores the same.
    write_snapshot(&diff_snap, &snapshot_for(&d)).unwrap();
    assert_same_memory(&mem, &map_memory(&diff_snap, &read_snapshot(&diff_snap).unwrap()).unwrap());
    write_snapshot(&diff_snap, &s).unwrap();
    assert_eq!(page(&restored, 0x3000), vec![0u8; 4096]);

    // The parent rewritten since: refused before anything is mapped.
    let w2 = write_memory_full(&dir.path("base.mem"), &mem).unwrap();
    write_snapshot(&base_snap, &snapshot_for(&w2)).unwrap();
    let e = map_memory(&diff_snap, &s).err().unwrap().to_string();
    assert!(e.contains("not the snapshot this diff applies on top of"), "{e}");
    // The parent gone.
    std::fs::remove_file(&base_snap).unwrap();
    assert!(matches!(map_memory(&diff_snap, &s), Err(SnapshotError::Io { op: "stat", .. })));
}

#[test]
fn diff_with_wrong_bitmaps_leaves_nothing() {
    let dir = TmpDir::new("badmap");
    let mem = guest();
    let base_snap = dir.path("base.snap");
    let w = write_memory_full(&dir.path("base.mem"), &mem).unwrap();
    write_snapshot(&base_snap, &snapshot_for(&w)).unwrap();
    let before = dir.entries();
    let e = write_memory_diff(&dir.path("diff.mem"), &mem, &[vec![0; 8]], &base_snap).err().unwrap();
    assert!(e.to_string().contains("dirty bitmaps"), "{e}");
    // Another machine's layout under the parent.
    let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), LOW)]).unwrap();
    let e = write_memory_diff(&dir.path("diff.mem"), &other, &[vec![0; 8]], &base_snap).err().unwrap();
    assert!(e.to_string().contains("layout differs"), "{e}");
    assert_eq!(dir.entries(), before);
}

#[test]
fn atomic_write_leaves_no_half_file() {
    let dir = TmpDir::new("atomic");
    let path = dir.path("vm.snap");
    // A failure part way: nothing under the name, no temporary file.
    let r = write_atomic(&path, |f| {
        use std::io::Write;
        f.write_all(b"half").unwrap();
        Err(SnapshotError::Memory("stopped".into()))
    });
    assert!(r.is_err());
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    // An existing snapshot is untouched by a failed overwrite.
    write_snapshot(&path, &sample(1)).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(write_atomic(&path, |_| Err(SnapshotError::Memory("stopped".into()))).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The rename itself failing (the name is a non-empty directory).
    std::fs::create_dir(dir.path("d")).unwrap();
    std::fs::write(dir.path("d/x"), b"x").unwrap();
    let e = write_snapshot(&dir.path("d"), &sample(1)).err().unwrap().to_string();
    assert!(e.contains("renaming into place"), "{e}");
    assert_eq!(dir.entries(), ["d", "vm.snap"]);
    // A directory that does not exist.
    assert!(write_snapshot(&dir.path("no/such/vm.snap"), &sample(1)).is_err());
}
