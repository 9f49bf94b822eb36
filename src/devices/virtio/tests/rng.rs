//! virtio-rng: buffers filled from the host, bounded per request, refusing readable ones.

use super::*;
use crate::devices::virtio::rng::{MAX_PER_REQUEST, Rng};

#[test]
fn fills_writable_buffers_with_random_bytes() {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.start(VERSION_1 | INDIRECT, 16);
    d.fill(DATA, 4096, 0);
    d.fill(DATA + 0x2000, 16, 0);
    let head = d.submit(&[(DATA, 4096, true), (DATA + 0x2000, 16, true)]);
    assert_eq!(d.wait_used(), Some((u32::from(head), 4096 + 16)));
    let bytes = d.bytes(DATA, 4096);
    assert!(bytes.iter().filter(|b| **b == 0).count() < 64, "looks unfilled");
    assert_ne!(d.bytes(DATA + 0x2000, 16), vec![0; 16]);
    assert_eq!(d.mmio.stats().bytes, 4096 + 16);
}

#[test]
fn a_request_gets_at_most_its_bound() {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.start(VERSION_1, 16);
    let big = (MAX_PER_REQUEST * 2) as u32;
    d.submit(&[(DATA, big, true)]);
    assert_eq!(d.wait_used().unwrap().1, MAX_PER_REQUEST as u32);
}

#[test]
fn a_readable_buffer_is_refused() {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.start(VERSION_1, 16);
    d.fill(DATA, 64, 0);
    d.submit(&[(DATA, 64, false)]);
    assert_eq!(d.wait_used().unwrap().1, 0);
    assert_eq!(d.bytes(DATA, 64), vec![0; 64]);
    assert_eq!(d.mmio.stats().refused, 1);
    assert_eq!(entropy_ok(&mut d), 32);
}

fn entropy_ok(d: &mut Driver) -> u32 {
    d.submit(&[(DATA, 32, true)]);
    d.wait_used().unwrap().1
}
