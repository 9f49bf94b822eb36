//! The transport's registers, negotiation, queue setup, interrupts, reset and snapshots.

use super::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::state::STATE_VERSION;
use crate::devices::virtio::{DeviceState, VirtioError, VirtioMmioState};

fn rng() -> Driver {
    Driver::new(Box::new(Rng::new()))
}

/// One entropy request of 32 bytes at DATA; returns its used length.
fn entropy(d: &mut Driver) -> u32 {
    d.submit(&[(DATA, 32, true)]);
    d.wait_used().expect("no used entry").1
}

#[test]
fn identity_registers_and_odd_accesses() {
    let d = rng();
    assert_eq!(d.read(0x00), 0x7472_6976);
    assert_eq!(d.read(0x04), 2);
    assert_eq!(d.read(0x08), 4);
    assert_eq!(d.mmio.device_type(), 4);
    assert_eq!(d.mmio.queue_count(), 1);
    // Wrong sizes and misaligned offsets read 0 and are not written.
    let mut b = [0xffu8; 2];
    d.mmio.read(0x00, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    d.mmio.read(0x02, &mut b);
    assert_eq!(b, [0; 4]);
    d.mmio.write(0x70, &[ACK as u8]);
    d.mmio.write(0x71, &ACK.to_le_bytes());
    assert_eq!(d.status(), 0);
    // Queues past the last have no size; unknown registers read 0.
    assert_eq!(d.read(0x34), 256);
    d.write(0x30, 7);
    assert_eq!(d.read(0x34), 0);
    d.write(0x44, 1); // readying a queue that does not exist does nothing
    assert_eq!(d.read(0x44), 0);
    assert_eq!(d.read(0x18), 0);
    assert_eq!(d.read(0xb0), u32::MAX); // no shared memory regions
    let mut wide = [0xffu8; 8];
    d.mmio.read(0x100, &mut wide);
    assert_eq!(wide, [0; 8]);
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered() {
    let d = rng();
    let offered = d.device_features();
    assert_eq!(offered & (VERSION_1 | EVENT_IDX | INDIRECT), VERSION_1 | EVENT_IDX | INDIRECT);
    assert_eq!(d.negotiate(VERSION_1 | (1 << 40)) & FEATURES_OK, 0, "an unoffered bit");
    d.write(0x70, 0);
    assert_eq!(d.negotiate(EVENT_IDX) & FEATURES_OK, 0, "VERSION_1 is required");
    d.write(0x70, 0);
    assert_eq!(d.negotiate(VERSION_1 | EVENT_IDX), ACK | DRIVER | FEATURES_OK);
    // Features are frozen once accepted, and the driver cannot clear status bits.
    d.write(0x24, 0);
    d.write(0x20, 0);
    d.write(0x70, ACK);
    assert_eq!(d.status(), ACK | DRIVER | FEATURES_OK);
    assert_eq!(d.mmio.state().driver_features, VERSION_1 | EVENT_IDX);
    // DRIVER_OK without FEATURES_OK is not taken.
    d.write(0x70, 0);
    d.write(0x70, ACK | DRIVER | DRIVER_OK);
    assert_eq!(d.status(), ACK | DRIVER);
}

#[test]
fn bad_queue_setup_sets_needs_reset_and_a_reset_recovers() {
    let ram = RAM as u64;
    let cases: [(u32, u64, u64, u64); 7] = [
        (100, DESC, AVAIL, USED),       // not a power of two
        (512, DESC, AVAIL, USED),       // larger than the maximum
        (0, DESC, AVAIL, USED),         // empty
        (1 << 16, DESC, AVAIL, USED),   // does not fit the register's u16
        (16, ram, AVAIL, USED),         // descriptor table outside RAM
        (16, DESC + 8, AVAIL, USED),    // misaligned
        (256, DESC, AVAIL, ram - 0x10), // used ring running off the end of RAM
    ];
    for (size, desc, avail, used) in cases {
        let mut d = rng();
        d.negotiate(VERSION_1);
        d.setup_queue(size, desc, avail, used);
        let what = format!("size {size} desc {desc:#x} used {used:#x}");
        assert_eq!(d.read(0x44), 0, "{what}: queue must not be ready");
        assert_ne!(d.status() & NEEDS_RESET, 0, "{what}");
        assert_eq!(d.read(0x60) & 2, 2, "{what}: config-change interrupt");
        assert!(d.interrupted(), "{what}");
        assert_eq!(d.mmio.stats().needs_reset, 1);
        d.write(0x70, 0);
        assert_eq!(d.status(), 0);
        assert_eq!(d.read(0x60), 0);
        d.start(VERSION_1, 16);
        assert_eq!(entropy(&mut d), 32, "{what}: a good request after the reset");
    }
}

#[test]
fn interrupts_follow_event_idx() {
    let mut d = rng();
    d.start(VERSION_1, 16);
    for _ in 0..3 {
        entropy(&mut d);
        assert!(d.interrupted());
        assert_eq!(d.read(0x60), 1);
        d.write(0x64, 1);
        assert_eq!(d.read(0x60), 0);
    }
    // With EVENT_IDX the driver asks for an interrupt once used idx passes used_event.
    let mut d = rng();
    d.start(VERSION_1 | EVENT_IDX, 16);
    let used_event = GuestAddress(AVAIL + 4 + 2 * 16);
    d.mem.write_obj(3u16, used_event).unwrap();
    for n in 1..=5u16 {
        entropy(&mut d);
        assert_eq!(d.interrupted(), n == 4, "after {n} requests");
    }
    assert_eq!(d.mmio.stats().interrupts, 1);
    assert_eq!(d.mmio.stats().requests, 5);
    // The device asks to be notified at the next available index.
    let avail_event: u16 = d.mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap();
    assert_eq!(avail_event, 5);
}

#[test]
fn chains_posted_before_driver_ok_run_at_driver_ok() {
    let mut d = rng();
    assert_ne!(d.negotiate(VERSION_1) & FEATURES_OK, 0);
    d.setup_queue(16, DESC, AVAIL, USED);
    let head = d.chain(&[(DATA, 8, true)]);
    d.make_available(head);
    d.mmio.notify(0);
    assert_eq!(d.used_idx(), 0, "not before DRIVER_OK");
    d.write(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.wait_used(), Some((u32::from(head), 8)));
}

/// A device that, like a guest posting as fast as it can, makes a new chain available
/// each time it takes one.
struct Endless;

impl crate::devices::virtio::VirtioDevice for Endless {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn handle_chain(
        &mut self,
        _index: u16,
        chain: crate::devices::virtio::Chain,
        mem: &GuestMemoryMmap,
    ) -> crate::devices::virtio::Handled {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        mem.write_obj(chain.head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 16))).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
        crate::devices::virtio::Handled::Done(Default::default())
    }
    fn state(&self) -> DeviceState {
        DeviceState::Rng
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), VirtioError> {
        Ok(())
    }
}

fn resume_set(d: &Driver) -> bool {
    let fds = d.mmio.backend_fds();
    let mut p = libc::pollfd { fd: *fds.last().unwrap(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

#[test]
fn a_pass_takes_one_queue_worth_then_resumes() {
    // Exactly one queue's worth: all taken in one pass, nothing left to resume.
    let mut d = rng();
    d.start(VERSION_1, 16);
    for _ in 0..16 {
        let head = d.chain(&[(DATA, 4, true)]);
        d.make_available(head);
    }
    d.mmio.notify(0);
    assert_eq!(d.used_idx(), 16);
    assert!(!resume_set(&d));
    // A driver that never stops posting is served one queue's worth per pass.
    let mut d = Driver::new(Box::new(Endless));
    d.start(VERSION_1, 16);
    let head = d.chain(&[(DATA, 4, true)]);
    d.make_available(head);
    d.mmio.notify(0);
    assert_eq!(d.used_idx(), 16);
    assert!(resume_set(&d));
    let resume = d.mmio.backend_fds().len() - 1;
    d.mmio.backend_ready(resume);
    assert_eq!(d.used_idx(), 32);
    d.mmio.backend_ready(resume + 5); // an index past the fds is ignored
    assert_eq!(d.used_idx(), 32);
    d.mmio.doorbell(super::super::QUEUE_NOTIFY);
    assert_eq!(d.used_idx(), 48);
    assert_eq!(d.status() & NEEDS_RESET, 0);
}

#[test]
fn reset_forgets_queues_features_and_interrupts() {
    let mut d = rng();
    d.start(VERSION_1 | EVENT_IDX, 16);
    entropy(&mut d);
    d.write(0x70, 0);
    assert_eq!((d.status(), d.read(0x44), d.read(0x60)), (0, 0, 0));
    assert_eq!(d.mmio.state().driver_features, 0);
    d.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    d.start(VERSION_1, 16); // rings start again at index 0
    assert_eq!(entropy(&mut d), 32);
    // A machine reset through the bus does the same.
    BusDevice::reset(&d.mmio);
    assert_eq!(d.status(), 0);
}

#[test]
fn snapshot_round_trip_and_hostile_snapshots() {
    let mut d = rng();
    d.start(VERSION_1 | EVENT_IDX, 16);
    for _ in 0..3 {
        entropy(&mut d);
    }
    let state = d.mmio.state();
    assert_eq!(state.version, STATE_VERSION);
    assert_eq!(state.queues[0].next_avail, 3);
    assert!(state.queues[0].ready);
    // A fresh device on the same memory carries on where the first stopped.
    d.mmio = VirtioMmio::new(Box::new(Rng::new()), d.mem.clone(), d.irq.try_clone().unwrap()).unwrap();
    d.mmio.restore(&state).unwrap();
    assert_eq!(d.mmio.state(), state);
    assert_eq!(entropy(&mut d), 32);
    assert_eq!(d.mmio.state().queues[0].next_used, 4);

    let bad = |f: &dyn Fn(&mut VirtioMmioState)| {
        let mut s = state.clone();
        f(&mut s);
        s
    };
    // Bad headers change nothing; a bad queue or device part leaves the device reset.
    type Check = fn(&VirtioError) -> bool;
    let cases: Vec<(VirtioMmioState, Check, bool)> = vec![
        (bad(&|s| s.version += 1), |e| matches!(e, VirtioError::Version { .. }), false),
        (bad(&|s| s.device_type = 2), |e| matches!(e, VirtioError::DeviceType { .. }), false),
        (bad(&|s| s.queues.clear()), |e| matches!(e, VirtioError::QueueCount { .. }), false),
        (bad(&|s| s.driver_features |= 1 << 40), |e| matches!(e, VirtioError::Features { .. }), false),
        (bad(&|s| s.queues[0].desc_table = RAM as u64), |e| matches!(e, VirtioError::Queue { .. }), true),
        (bad(&|s| s.queues[0].size = 3), |e| matches!(e, VirtioError::Queue { .. }), true),
        (
            bad(&|s| s.device = DeviceState::Block { capacity_sectors: 1, read_only: true, id: vec![] }),
            |e| matches!(e, VirtioError::Device(_)),
            true,
        ),
    ];
    for (s, is_expected, resets) in cases {
        d.mmio.restore(&state).unwrap();
        let e = d.mmio.restore(&s).unwrap_err();
        assert!(is_expected(&e), "{e}");
        assert!(!e.to_string().contains('\n'));
        let want = if resets { 0 } else { state.status };
        assert_eq!(d.status(), want, "after {e}");
    }
}
