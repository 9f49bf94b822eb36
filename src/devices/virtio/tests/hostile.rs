//! Hostile descriptor chains and rings, through virtio-blk: each ends bounded, with an
//! error status where one can be found, or with DEVICE_NEEDS_RESET where the ring
//! itself is unusable; the device then serves a good request.

use super::*;
use crate::devices::virtio::block::Block;

const HEADER: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x3000;
const TABLE: u64 = DATA + 0x4000;

fn blk(features: u64) -> (Driver, TempFile) {
    let file = TempFile::new("hostile.img", 1 << 20);
    let mut d = Driver::new(Box::new(Block::open(&file.0, false, None, false).unwrap()));
    d.start(features, 16);
    (d, file)
}

/// Writes a request header (type, sector) at HEADER.
fn header(d: &Driver, kind: u32, sector: u64) {
    d.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
    d.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
}

/// A good read of sector 0 completes with status OK.
fn good_read(d: &mut Driver) {
    header(d, 0, 0);
    d.fill(STATUS, 1, 0xff);
    let head = d.submit(&[(HEADER, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    assert_eq!(d.wait_used(), Some((u32::from(head), 513)));
    assert_eq!(d.byte(STATUS), 0);
}

/// Posts the chain at descriptor 0 (laid out by the caller) and returns its used entry.
fn post_raw(d: &mut Driver) -> (u32, u32) {
    d.fill(STATUS, 1, 0xff);
    d.make_available(0);
    d.mmio.notify(0);
    d.wait_used().expect("a refused chain must still be returned")
}

#[test]
fn malformed_chains_are_returned_with_an_error() {
    let (mut d, _f) = blk(VERSION_1);
    header(&d, 0, 0);
    type Layout = fn(&Driver);
    let cases: [(&str, Layout, Option<u32>); 6] = [
        ("next index past the table", |d| d.put_desc(DESC, 0, HEADER, 16, F_NEXT, 200), Some(0)),
        (
            "buffer outside RAM",
            |d| {
                d.put_desc(DESC, 0, HEADER, 16, F_NEXT, 1);
                d.put_desc(DESC, 1, RAM as u64 + 0x1000, 512, F_WRITE | F_NEXT, 2);
                d.put_desc(DESC, 2, STATUS, 1, F_WRITE, 0);
            },
            Some(0),
        ),
        (
            "a buffer longer than RAM",
            |d| {
                d.put_desc(DESC, 0, HEADER, 16, F_NEXT, 1);
                d.put_desc(DESC, 1, BUF, u32::MAX - 8, F_WRITE | F_NEXT, 2);
                d.put_desc(DESC, 2, STATUS, 1, F_WRITE, 0);
            },
            Some(0),
        ),
        (
            "readable after writable",
            |d| {
                d.put_desc(DESC, 0, HEADER, 16, F_NEXT, 1);
                d.put_desc(DESC, 1, STATUS, 1, F_WRITE | F_NEXT, 2);
                d.put_desc(DESC, 2, BUF, 512, 0, 0);
            },
            Some(1),
        ),
        (
            "indirect not negotiated",
            |d| d.put_desc(DESC, 0, TABLE, 48, F_INDIRECT, 0),
            Some(0),
        ),
        (
            "a loop",
            |d| {
                d.put_desc(DESC, 0, HEADER, 16, F_NEXT, 1);
                d.put_desc(DESC, 1, BUF, 512, F_WRITE | F_NEXT, 2);
                d.put_desc(DESC, 2, STATUS, 1, F_WRITE | F_NEXT, 1);
            },
            None, // the error lands in whichever writable buffer the walk stopped at
        ),
    ];
    for (n, (what, layout, used_len)) in cases.into_iter().enumerate() {
        layout(&d);
        let (id, len) = post_raw(&mut d);
        assert_eq!(id, 0, "{what}");
        if let Some(l) = used_len {
            assert_eq!(len, l, "{what}");
        }
        if used_len == Some(1) {
            assert_eq!(d.byte(STATUS), 1, "{what}: IOERR in the status byte");
        }
        assert_eq!(d.status() & NEEDS_RESET, 0, "{what}: the ring is fine");
        assert_eq!(d.mmio.stats().refused, n as u64 + 1, "{what}");
        good_read(&mut d);
    }
}

#[test]
fn request_layout_errors_get_ioerr() {
    let (mut d, _f) = blk(VERSION_1);
    // A read whose data buffer is device-readable, a write whose data is device-writable,
    // a header shorter than 16 bytes, and a chain with no status byte at all.
    type Case<'a> = (u32, &'a [(u64, u32, bool)], u32, u8);
    let cases: [Case; 4] = [
        (0, &[(HEADER, 16, false), (BUF, 512, false), (STATUS, 1, true)], 1, 1),
        (1, &[(HEADER, 16, false), (BUF, 512, true), (STATUS, 1, true)], 1, 1),
        (0, &[(HEADER, 8, false), (STATUS, 1, true)], 1, 1),
        (0, &[(HEADER, 16, false), (BUF, 512, false)], 0, 0xff),
    ];
    for (kind, bufs, used_len, status) in cases {
        header(&d, kind, 0);
        d.fill(STATUS, 1, 0xff);
        d.submit(bufs);
        assert_eq!(d.wait_used().unwrap().1, used_len, "{bufs:?}");
        assert_eq!(d.byte(STATUS), status, "{bufs:?}");
    }
    assert_eq!(d.mmio.stats().refused, 4);
    good_read(&mut d);
}

#[test]
fn indirect_tables_good_and_bad() {
    let (mut d, _f) = blk(VERSION_1 | INDIRECT);
    header(&d, 0, 0);
    // A good request entirely in an indirect table.
    d.put_desc(TABLE, 0, HEADER, 16, F_NEXT, 1);
    d.put_desc(TABLE, 1, BUF, 512, F_WRITE | F_NEXT, 2);
    d.put_desc(TABLE, 2, STATUS, 1, F_WRITE, 0);
    d.put_desc(DESC, 0, TABLE, 48, F_INDIRECT, 0);
    assert_eq!(post_raw(&mut d), (0, 513));
    assert_eq!(d.byte(STATUS), 0);
    // Nested, odd-sized, oversized, outside RAM, and a loop inside the table.
    type Layout = fn(&Driver);
    let cases: [(&str, Layout); 5] = [
        ("nested", |d| {
            d.put_desc(TABLE, 2, TABLE, 48, F_INDIRECT, 0);
            d.put_desc(DESC, 0, TABLE, 48, F_INDIRECT, 0);
        }),
        ("odd size", |d| d.put_desc(DESC, 0, TABLE, 40, F_INDIRECT, 0)),
        ("larger than the queue", |d| d.put_desc(DESC, 0, TABLE, 17 * 16, F_INDIRECT, 0)),
        ("outside RAM", |d| d.put_desc(DESC, 0, RAM as u64 - 16, 48, F_INDIRECT, 0)),
        ("loop", |d| {
            d.put_desc(TABLE, 2, STATUS, 1, F_WRITE | F_NEXT, 1);
            d.put_desc(DESC, 0, TABLE, 48, F_INDIRECT, 0);
        }),
    ];
    for (what, layout) in cases {
        d.put_desc(TABLE, 2, STATUS, 1, F_WRITE, 0);
        layout(&d);
        assert_eq!(post_raw(&mut d).0, 0, "{what}");
        assert_eq!(d.status() & NEEDS_RESET, 0, "{what}");
        good_read(&mut d);
    }
}

#[test]
fn unusable_rings_need_a_reset() {
    type Break = fn(&mut Driver);
    let cases: [(&str, Break); 3] = [
        ("head index past the queue", |d| {
            d.make_available(16);
            d.mmio.notify(0);
        }),
        ("available index jumping past the queue size", |d| {
            d.set_avail_idx(17);
            d.mmio.notify(0);
        }),
        ("available index going backwards", |d| {
            good_read(d);
            d.set_avail_idx(0);
            d.mmio.notify(0);
        }),
    ];
    for (what, break_it) in cases {
        let (mut d, _f) = blk(VERSION_1);
        d.interrupted();
        break_it(&mut d);
        assert_ne!(d.status() & NEEDS_RESET, 0, "{what}");
        assert_eq!(d.read(0x60) & 2, 2, "{what}");
        assert!(d.interrupted(), "{what}");
        // Nothing more is processed until the driver resets the device.
        let used = d.used_idx();
        header(&d, 0, 0);
        d.chain(&[(HEADER, 16, false), (STATUS, 1, true)]);
        d.mmio.notify(0);
        assert_eq!(d.used_idx(), used, "{what}");
        d.write(0x70, 0);
        d.start(VERSION_1, 16);
        good_read(&mut d);
    }
}
