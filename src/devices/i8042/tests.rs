use super::*;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

fn device() -> (I8042, Arc<Control>) {
    let control = Arc::new(Control::new());
    (I8042::new(control.clone(), EventFd::new(EFD_NONBLOCK).unwrap()), control)
}

fn status(d: &I8042) -> u8 {
    let mut b = [0u8];
    d.read(4, &mut b);
    b[0]
}

fn data(d: &I8042) -> u8 {
    let mut b = [0u8];
    d.read(0, &mut b);
    b[0]
}

/// Everything waiting in the output buffer.
fn drain(d: &I8042) -> Vec<u8> {
    let mut out = Vec::new();
    while status(d) & STATUS_OUTPUT_FULL != 0 && out.len() < 64 {
        out.push(data(d));
    }
    out
}

/// Interrupts raised since the last call.
fn irqs(d: &I8042) -> u64 {
    d.irq.read().unwrap_or(0)
}

/// A controller command with an answer, as Linux's i8042_command polls for it.
fn ask(d: &I8042, cmd: u8) -> Vec<u8> {
    d.write(4, &[cmd]);
    drain(d)
}

#[test]
fn linux_probe_finds_a_translating_keyboard_and_no_mouse_port() {
    let (d, control) = device();
    // Controller init: read the configuration twice, write it back with the
    // keyboard off, flush.
    assert_eq!(status(&d) & STATUS_NOT_INHIBITED, STATUS_NOT_INHIBITED, "key lock open");
    let config = ask(&d, 0x20);
    assert_eq!(config, vec![CONFIG_AT_POWER_ON]);
    assert_ne!(config[0] & CONFIG_TRANSLATE, 0);
    d.write(4, &[0x60]);
    d.write(0, &[(config[0] | CONFIG_KBD_DISABLED) & !CONFIG_KBD_INTERRUPT]);
    assert_eq!(ask(&d, 0x20), vec![(config[0] | CONFIG_KBD_DISABLED) & !CONFIG_KBD_INTERRUPT]);
    // Multiplexer check: an aux loop of 0xf0. The answer comes as keyboard data,
    // which Linux reads as "no loop" without taking it; its next flush does.
    d.write(4, &[0xd3]);
    d.write(0, &[0xf0]);
    assert_eq!(status(&d) & (STATUS_OUTPUT_FULL | 0x20), STATUS_OUTPUT_FULL, "an answer, not from a mouse");
    drain(&d);
    // Aux check: loop 0x5a (no aux flag again), then the aux test reads the stale
    // answer: neither 0, 0xfa nor 0xff, so there is no mouse port.
    d.write(4, &[0xd3]);
    d.write(0, &[0x5a]);
    assert_eq!(status(&d) & (STATUS_OUTPUT_FULL | 0x20), STATUS_OUTPUT_FULL);
    let test = ask(&d, 0xa9);
    assert_eq!(test.len(), 1);
    assert!(!matches!(test[0], 0 | 0xfa | 0xff), "aux test answered {:#x}", test[0]);
    // Keyboard port on, interrupt on; atkbd asks for the ID, enables scanning.
    d.write(4, &[0x60]);
    d.write(0, &[config[0] & !CONFIG_KBD_DISABLED]);
    irqs(&d);
    d.write(0, &[0xf2]);
    assert_eq!(irqs(&d), 1, "the answer raises IRQ 1");
    assert_eq!(drain(&d), vec![KBD_ACK, 0xab, 0x83]);
    assert!(irqs(&d) >= 1, "each following byte raises it again");
    for cmd in [0xf5, 0xf4] {
        d.write(0, &[cmd]);
        assert_eq!(drain(&d), vec![KBD_ACK]);
    }
    d.write(0, &[0xed]);
    d.write(0, &[0x02]);
    assert_eq!(drain(&d), vec![KBD_ACK, KBD_ACK], "LED command and its parameter");
    assert!(!control.stopping());
}

#[test]
fn ctrl_alt_del_in_the_set_the_guest_reads() {
    let (d, _) = device();
    irqs(&d);
    d.ctrl_alt_del().unwrap();
    assert_eq!(irqs(&d), 1);
    assert_eq!(drain(&d), CTRL_ALT_DEL_SET1);
    // Without translation, set 2.
    d.write(4, &[0x60]);
    d.write(0, &[CONFIG_KBD_INTERRUPT]);
    d.ctrl_alt_del().unwrap();
    assert_eq!(drain(&d), CTRL_ALT_DEL_SET2);
}

#[test]
fn ctrl_alt_del_refused_when_the_guest_cannot_take_it() {
    let (d, _) = device();
    d.write(0, &[0xf5]);
    drain(&d);
    assert!(d.ctrl_alt_del().unwrap_err().contains("not enabled"));
    d.write(0, &[0xf4]);
    drain(&d);
    d.write(4, &[0xad]);
    assert!(d.ctrl_alt_del().is_err(), "keyboard interface disabled");
    d.write(4, &[0xae]);
    let fits = OUTPUT_LIMIT / CTRL_ALT_DEL_SET1.len();
    for _ in 0..fits {
        d.ctrl_alt_del().unwrap();
    }
    let e = d.ctrl_alt_del().unwrap_err();
    assert!(e.contains("not reading"), "{e}");
    assert_eq!(drain(&d).len(), fits * CTRL_ALT_DEL_SET1.len(), "nothing half-queued");
}

#[test]
fn reset_lines() {
    for (port, bytes) in [(4u64, vec![0xfeu8]), (4, vec![0xf0]), (4, vec![0xd1, 0x00])] {
        let (d, control) = device();
        for (i, b) in bytes.iter().enumerate() {
            // 0xd1's parameter goes to the data port.
            d.write(if i == 0 { port } else { 0 }, &[*b]);
        }
        assert_eq!(control.reason(), Some(StopReason::Reboot("i8042 reset line")), "{bytes:x?}");
    }
    let (d, control) = device();
    d.write(4, &[0xff]);
    d.write(4, &[0xd1]);
    d.write(0, &[0x03]);
    assert!(!control.stopping(), "no pulse, reset line high");
}

#[test]
fn a_guest_that_never_reads_cannot_grow_the_queue() {
    let (d, control) = device();
    for _ in 0..10_000 {
        d.write(0, &[0xf2]);
        d.write(4, &[0x20]);
    }
    assert_eq!(drain(&d).len(), OUTPUT_LIMIT);
    // Every byte value on every port, reads included: no panic, no stop but resets.
    for port in 0..5u64 {
        for v in 0..=255u8 {
            d.write(port, &[v]);
            let mut wide = [0u8; 4];
            d.read(port, &mut wide);
            d.write(port, &[]);
        }
    }
    assert!(control.stopping(), "0xfe on port 4 was among them");
}

#[test]
fn state_round_trips_and_old_snapshots_restore() {
    let (d, _) = device();
    d.write(0, &[0xf2]);
    d.write(0, &[0xed]);
    let saved = d.state();
    let (e, _) = device();
    e.restore(&saved).unwrap();
    assert_eq!(e.state(), saved);
    assert_eq!(drain(&e), drain(&d));
    e.restore(&DeviceState::I8042).unwrap();
    assert_eq!(e.state(), DeviceState::Keyboard(I8042Regs::default()));
    let too_many = I8042Regs { output: vec![0; OUTPUT_LIMIT + 1], ..Default::default() };
    assert!(e.restore(&DeviceState::Keyboard(too_many)).is_err());
    assert!(e.restore(&DeviceState::PostPort { last: 0 }).is_err());
    e.write(4, &[0x60]);
    e.write(0, &[0]);
    e.reset();
    assert_eq!(e.state(), DeviceState::Keyboard(I8042Regs::default()));
}
