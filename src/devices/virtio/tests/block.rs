//! virtio-blk requests against a temp file, and the errors of opening a disk.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::devices::virtio::block::{Block, BlockError};

const HEADER: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x8_0000;
const SEGS: u64 = DATA + 0x9_0000;
const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;
const MIB: u64 = 1 << 20;

fn disk(read_only: bool, id: Option<&str>) -> (Driver, TempFile) {
    let file = TempFile::new("disk.img", MIB);
    let d = open(&file, read_only, id);
    (d, file)
}

fn open(file: &TempFile, read_only: bool, id: Option<&str>) -> Driver {
    let mut d = Driver::new(Box::new(Block::open(&file.0, read_only, id.map(String::from), false).unwrap()));
    d.start(VERSION_1 | EVENT_IDX, 64);
    d
}

/// One request: header, then `data` (device-writable for reads), then the status byte.
/// Returns (status, used length).
fn request(d: &mut Driver, kind: u32, sector: u64, data: &[(u64, u32)], writable: bool) -> (u8, u32) {
    d.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    d.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
    d.fill(STATUS, 1, 0xff);
    let mut bufs = vec![(HEADER, 16, false)];
    bufs.extend(data.iter().map(|&(a, l)| (a, l, writable)));
    bufs.push((STATUS, 1, true));
    let head = d.submit(&bufs);
    let (id, len) = d.wait_used().expect("request did not complete");
    assert_eq!(id, u32::from(head));
    (d.byte(STATUS), len)
}

fn file_bytes(file: &TempFile) -> Vec<u8> {
    std::fs::read(&file.0).unwrap()
}

/// Fills the whole file with a non-zero pattern.
fn scribble(file: &TempFile) {
    let mut f = std::fs::OpenOptions::new().write(true).open(&file.0).unwrap();
    f.write_all(&vec![0x5a; MIB as usize]).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn write_then_read_back_across_buffers() {
    let (mut d, file) = disk(false, None);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    d.mem.write_slice(&pattern[..1024], GuestAddress(BUF)).unwrap();
    d.mem.write_slice(&pattern[1024..], GuestAddress(BUF + 0x4000)).unwrap();
    assert_eq!(request(&mut d, OUT, 8, &[(BUF, 1024), (BUF + 0x4000, 3072)], false), (0, 1));
    assert_eq!(&file_bytes(&file)[4096..8192], &pattern[..]);
    d.fill(BUF, 0x8000, 0);
    assert_eq!(request(&mut d, IN, 8, &[(BUF + 0x6000, 512), (BUF, 3584)], true), (0, 4097));
    assert_eq!(d.bytes(BUF + 0x6000, 512), pattern[..512]);
    assert_eq!(d.bytes(BUF, 3584), pattern[512..]);
    let s = d.mmio.stats();
    assert_eq!((s.requests, s.bytes, s.refused), (2, 8192, 0));
}

#[test]
fn header_and_data_may_share_buffers() {
    // virtio 1.x drivers may frame a request any way: header and data in one buffer.
    let (mut d, file) = disk(false, None);
    d.mem.write_obj(OUT, GuestAddress(HEADER)).unwrap();
    d.mem.write_obj(1u64, GuestAddress(HEADER + 8)).unwrap();
    d.fill(HEADER + 16, 512, 0xab);
    d.fill(STATUS, 1, 0xff);
    d.submit(&[(HEADER, 16 + 512, false), (STATUS, 1, true)]);
    assert_eq!(d.wait_used().unwrap().1, 1);
    assert_eq!(d.byte(STATUS), 0);
    assert_eq!(file_bytes(&file)[512..1024], [0xab; 512]);
}

#[test]
fn many_requests_in_flight() {
    let (mut d, file) = disk(false, None);
    // Three descriptors each: 21 requests fill the 64-entry queue.
    for i in 0..21u64 {
        d.fill(BUF + i * 4096, 4096, i as u8 + 1);
        d.mem.write_obj(OUT, GuestAddress(HEADER + i * 16)).unwrap();
        d.mem.write_obj(i * 8, GuestAddress(HEADER + i * 16 + 8)).unwrap();
        let head = d.chain(&[(HEADER + i * 16, 16, false), (BUF + i * 4096, 4096, false), (STATUS + i, 1, true)]);
        d.make_available(head);
    }
    d.mmio.notify(0);
    for _ in 0..21 {
        d.wait_used().expect("a write did not complete");
    }
    let bytes = file_bytes(&file);
    for i in 0..21usize {
        assert_eq!(d.byte(STATUS + i as u64), 0);
        assert!(bytes[i * 4096..(i + 1) * 4096].iter().all(|b| *b == i as u8 + 1), "block {i}");
    }
}

#[test]
fn flush_and_get_id() {
    let (mut d, file) = disk(false, Some("data-disk"));
    assert_eq!(request(&mut d, FLUSH, 0, &[], false), (0, 1));
    d.fill(BUF, 20, 0xee);
    assert_eq!(request(&mut d, GET_ID, 0, &[(BUF, 20)], true), (0, 21));
    let mut want = b"data-disk".to_vec();
    want.resize(20, 0);
    assert_eq!(d.bytes(BUF, 20), want);
    drop(d);
    // Without an id, one derived from the file: the same for the same file.
    let mut d = open(&file, false, None);
    request(&mut d, GET_ID, 0, &[(BUF, 20)], true);
    let first = d.bytes(BUF, 20);
    drop(d);
    let mut d = open(&file, false, None);
    request(&mut d, GET_ID, 0, &[(BUF, 20)], true);
    assert_eq!(d.bytes(BUF, 20), first);
    assert_ne!(first, vec![0; 20]);
}

fn write_segment(d: &Driver, at: u64, sector: u64, sectors: u32, flags: u32) {
    d.mem.write_obj(sector, GuestAddress(at)).unwrap();
    d.mem.write_obj(sectors, GuestAddress(at + 8)).unwrap();
    d.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_punches_a_hole() {
    let (mut d, file) = disk(false, None);
    scribble(&file);
    let before = std::fs::metadata(&file.0).unwrap().blocks();
    write_segment(&d, SEGS, 128, 128, 0); // 64 KiB at 64 KiB
    assert_eq!(request(&mut d, DISCARD, 0, &[(SEGS, 16)], false), (0, 1));
    let f = std::fs::File::open(&file.0).unwrap();
    // SAFETY: lseek on an open fd.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(hole, 64 << 10);
    assert!(std::fs::metadata(&file.0).unwrap().blocks() < before);
    assert_eq!(std::fs::metadata(&file.0).unwrap().len(), MIB, "size kept");
    // UNMAP is not a discard flag, and unknown flags are refused.
    write_segment(&d, SEGS, 0, 8, 1);
    assert_eq!(request(&mut d, DISCARD, 0, &[(SEGS, 16)], false).0, 2);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let (mut d, file) = disk(false, None);
    scribble(&file);
    write_segment(&d, SEGS, 0, 8, 0);
    write_segment(&d, SEGS + 16, 16, 8, 0);
    assert_eq!(request(&mut d, WRITE_ZEROES, 0, &[(SEGS, 32)], false), (0, 1));
    write_segment(&d, SEGS, 64, 16, 1);
    assert_eq!(request(&mut d, WRITE_ZEROES, 0, &[(SEGS, 16)], false), (0, 1));
    let bytes = file_bytes(&file);
    let zero = |r: std::ops::Range<usize>| bytes[r].iter().all(|b| *b == 0);
    assert!(zero(0..4096) && zero(8192..12288) && zero(32768..40960));
    assert!(bytes[4096..8192].iter().all(|b| *b == 0x5a));
    assert!(bytes[40960..].iter().all(|b| *b == 0x5a));
    write_segment(&d, SEGS, 0, 8, 2);
    assert_eq!(request(&mut d, WRITE_ZEROES, 0, &[(SEGS, 16)], false).0, 2, "unknown flag");
    write_segment(&d, SEGS, 2040, 16, 0);
    assert_eq!(request(&mut d, WRITE_ZEROES, 0, &[(SEGS, 16)], false).0, 1, "past the end");
}

#[test]
fn read_only_refuses_writes_and_leaves_the_file_alone() {
    let file = TempFile::new("ro.img", MIB);
    scribble(&file);
    let before = file_bytes(&file);
    let mut d = open(&file, true, None);
    assert_ne!(d.device_features() & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    d.fill(BUF, 4096, 0x11);
    assert_eq!(request(&mut d, OUT, 0, &[(BUF, 4096)], false), (1, 1));
    write_segment(&d, SEGS, 0, 8, 0);
    assert_eq!(request(&mut d, DISCARD, 0, &[(SEGS, 16)], false).0, 1);
    assert_eq!(request(&mut d, WRITE_ZEROES, 0, &[(SEGS, 16)], false).0, 1);
    assert_eq!(request(&mut d, IN, 0, &[(BUF, 4096)], true), (0, 4097));
    assert_eq!(d.bytes(BUF, 4096), vec![0x5a; 4096]);
    assert_eq!(file_bytes(&file), before);
}

#[test]
fn out_of_range_and_odd_requests() {
    let (mut d, _file) = disk(false, None);
    let last = MIB / 512 - 1;
    assert_eq!(request(&mut d, IN, last, &[(BUF, 512)], true).0, 0, "the last sector");
    assert_eq!(request(&mut d, IN, last, &[(BUF, 1024)], true).0, 1, "past the end");
    assert_eq!(request(&mut d, OUT, MIB / 512, &[(BUF, 512)], false).0, 1);
    assert_eq!(request(&mut d, IN, u64::MAX / 256, &[(BUF, 512)], true).0, 1, "sector * 512 overflows");
    assert_eq!(request(&mut d, IN, u64::MAX, &[(BUF, 512)], true).0, 1);
    assert_eq!(request(&mut d, IN, 0, &[(BUF, 100)], true).0, 1, "not whole sectors");
    assert_eq!(request(&mut d, 99, 0, &[], false).0, 2, "unknown type: UNSUPP");
    write_segment(&d, SEGS, 0, 8, 0);
    assert_eq!(request(&mut d, DISCARD, 0, &[(SEGS, 12)], false).0, 1, "partial segment");
    assert_eq!(request(&mut d, DISCARD, 0, &[(SEGS, 17 * 16)], false).0, 1, "too many segments");
    write_segment(&d, SEGS, 0, u32::MAX, 0);
    assert_eq!(request(&mut d, DISCARD, 0, &[(SEGS, 16)], false).0, 1, "too many sectors");
    assert_eq!(d.status() & NEEDS_RESET, 0);
}

#[test]
fn reset_waits_for_requests_in_flight() {
    let (mut d, _file) = disk(false, None);
    // Writes: they always go to the workers (a cached read may finish at once).
    for i in 0..21u64 {
        d.mem.write_obj(OUT, GuestAddress(HEADER + i * 16)).unwrap();
        d.mem.write_obj(0u64, GuestAddress(HEADER + i * 16 + 8)).unwrap();
        let head = d.chain(&[(HEADER + i * 16, 16, false), (BUF, 0x4000, false), (STATUS + i, 1, true)]);
        d.make_available(head);
    }
    d.fill(STATUS, 21, 0xff);
    d.mmio.notify(0);
    d.write(0x70, 0);
    // Every request either finished before the reset returned or never ran: no status
    // byte changes after it.
    let after = d.bytes(STATUS, 21);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.bytes(STATUS, 21), after);
    assert_eq!(d.used_idx(), 0, "completions of the old queue are dropped");
    d.poll_backends(Duration::from_millis(10));
    assert_eq!(d.used_idx(), 0);
}

#[test]
fn snapshot_waits_for_requests_and_checks_the_disk() {
    let (mut d, file) = disk(false, Some("a"));
    for i in 0..8u64 {
        d.mem.write_obj(IN, GuestAddress(HEADER + i * 16)).unwrap();
        let head = d.chain(&[(HEADER + i * 16, 16, false), (BUF, 4096, true), (STATUS + i, 1, true)]);
        d.make_available(head);
    }
    d.mmio.notify(0);
    let state = d.mmio.state();
    assert_eq!(d.used_idx(), 8, "in-flight requests were completed first");
    assert_eq!(state.queues[0].next_used, 8);
    drop(d);
    // The same disk restores; another id (another disk) does not.
    let d = open(&file, false, Some("a"));
    d.mmio.restore(&state).unwrap();
    drop(d);
    let d = open(&file, false, Some("b"));
    assert!(d.mmio.restore(&state).is_err());
}

#[test]
fn open_errors_are_one_line_naming_the_path() {
    let dir = std::env::temp_dir();
    let missing = dir.join(format!("skiff-virtio-{}-missing.img", std::process::id()));
    let odd = TempFile::new("odd.img", 1000);
    let good = TempFile::new("good.img", 4096);
    let fifo = TempFile::new("fifo", 0);
    std::fs::remove_file(&fifo.0).unwrap();
    let c = std::ffi::CString::new(fifo.0.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

    let check = |r: Result<Block, BlockError>, path: &std::path::Path, want: &str| {
        let e = r.err().expect("open should fail");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(want), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    };
    check(Block::open(&missing, false, None, false), &missing, "cannot open");
    check(Block::open(&dir, false, None, false), &dir, "directory");
    check(Block::open(&odd.0, false, None, false), &odd.0, "multiple of 512");
    check(Block::open(&fifo.0, true, None, false), &fifo.0, "neither a regular file");
    check(Block::open(&good.0, false, Some("x".repeat(21)), false), &good.0, "longer than 20");

    // Locks: one writer, or any number of readers.
    let rw = Block::open(&good.0, false, None, false).unwrap();
    check(Block::open(&good.0, false, None, false), &good.0, "in use");
    check(Block::open(&good.0, true, None, false), &good.0, "in use");
    drop(rw);
    let ro1 = Block::open(&good.0, true, None, false).unwrap();
    let ro2 = Block::open(&good.0, true, None, false).unwrap();
    check(Block::open(&good.0, false, None, false), &good.0, "in use");
    assert_eq!(ro1.capacity_sectors(), 8);
    assert!(ro2.read_only());
}

#[test]
fn config_space_describes_the_disk() {
    let (d, _file) = disk(false, None);
    let mut cap = [0u8; 8];
    d.mmio.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), MIB / 512);
    assert_eq!(d.read(0x100 + 20), 512, "blk_size");
    let f = d.device_features();
    for bit in [2, 6, 9, 13, 14] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    let mut past = [0xffu8; 4];
    d.mmio.read(0x100 + 58, &mut past);
    assert_eq!(past, [0; 4]);
    let mut file = std::fs::File::open(&_file.0).unwrap();
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut buf).unwrap();
    assert_eq!(buf.len() as u64, MIB);
}

/// `direct`: aligned requests go through O_DIRECT, the others through the page cache,
/// and each sees what the other wrote.
#[test]
fn direct_and_cached_requests_agree() {
    let file = TempFile::new("direct.img", MIB);
    let block = Block::open(&file.0, false, None, true)
        .unwrap_or_else(|e| panic!("{e} (the tests need a temporary directory that allows O_DIRECT)"));
    let mut d = Driver::new(Box::new(block));
    d.start(VERSION_1 | EVENT_IDX, 64);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
    // Aligned (page-aligned buffer, 4 KiB multiple, 4 KiB offset): direct.
    d.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
    assert_eq!(request(&mut d, OUT, 8, &[(BUF, 8192)], false), (0, 1));
    // An odd buffer address cannot be direct: the cached read must see the direct write.
    d.fill(BUF, 0x4000, 0);
    assert_eq!(request(&mut d, IN, 8, &[(BUF + 1, 4096)], true), (0, 4097));
    assert_eq!(d.bytes(BUF + 1, 4096), pattern[..4096]);
    // A cached write from an odd address, then a direct read of it.
    d.mem.write_slice(&pattern[4096..], GuestAddress(BUF + 0x2001)).unwrap();
    assert_eq!(request(&mut d, OUT, 64, &[(BUF + 0x2001, 4096)], false), (0, 1));
    d.fill(BUF, 0x4000, 0);
    assert_eq!(request(&mut d, IN, 64, &[(BUF, 4096)], true), (0, 4097));
    assert_eq!(d.bytes(BUF, 4096), pattern[4096..]);
    assert_eq!(&file_bytes(&file)[4096..4096 + 8192], &pattern[..]);
    assert_eq!(&file_bytes(&file)[32768..32768 + 4096], &pattern[4096..]);
}
