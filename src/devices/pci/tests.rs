//! The PCI bus as Linux drives it: configuration mechanism #1, and a virtio-pci
//! function found, sized, moved and driven through its capabilities and MSI-X.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::routing::Kvm;
use super::*;
use crate::devices::legacy::ResetControl;
use crate::devices::virtio::VirtioPci;
use crate::devices::virtio::pci::{BAR_SIZE, COMMON, MSIX_PBA, MSIX_TABLE, NOTIFY, NOTIFY_MULTIPLIER};
use crate::devices::virtio::rng::Rng;

const BAR: u64 = 0xe000_0000;

struct Machine {
    root: PciRoot,
    window: PciWindow,
    function: Arc<VirtioPci>,
    control: Arc<crate::control::Control>,
    mem: GuestMemoryMmap,
}

fn machine() -> Machine {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let function = Arc::new(VirtioPci::new(Box::new(Rng::new()), mem.clone(), Arc::new(Kvm::new(None)), BAR).unwrap());
    let control = Arc::new(crate::control::Control::new());
    let reset = Arc::new(ResetControl::new(control.clone(), "0xcf9"));
    let devices: Vec<Arc<dyn PciFunction>> = vec![Arc::new(HostBridge::default()), function.clone()];
    let root = PciRoot::new(reset, devices);
    let window = PciWindow::new(BAR, vec![function.clone() as Arc<dyn PciFunction>]);
    Machine { root, window, function, control, mem }
}

impl Machine {
    fn select(&self, device: u32, reg: u32) {
        self.root.write(0, &(0x8000_0000 | (device << 11) | reg).to_le_bytes());
    }
    fn cfg_read(&self, device: u32, offset: u32, len: usize) -> u32 {
        self.select(device, offset & !3);
        let mut b = [0u8; 4];
        self.root.read(4 + u64::from(offset & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn cfg_write(&self, device: u32, offset: u32, len: usize, v: u32) {
        self.select(device, offset & !3);
        self.root.write(4 + u64::from(offset & 3), &v.to_le_bytes()[..len]);
    }
    fn bar_read(&self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.window.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn bar_write(&self, offset: u64, len: usize, v: u64) {
        self.window.write(offset, &v.to_le_bytes()[..len]);
    }
}

#[test]
fn mechanism_one_addresses_bus_zero_only() {
    let m = machine();
    // The address register reads back what was written (Linux's conf1 check).
    m.root.write(0, &0x8000_0000u32.to_le_bytes());
    let mut d = [0u8; 4];
    m.root.read(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
    assert_eq!(m.cfg_read(0, 0, 4), 0x0d57_8086, "host bridge");
    assert_eq!(m.cfg_read(0, 8, 4) >> 8, 0x06_00_00);
    assert_eq!(m.cfg_read(1, 0, 4), 0x1044_1af4, "virtio-rng");
    // Odd sizes and offsets inside the dword.
    assert_eq!(m.cfg_read(1, 1, 1), 0x1a);
    assert_eq!(m.cfg_read(1, 2, 2), 0x1044);
    assert_eq!(m.cfg_read(1, 3, 1), 0x10);
    m.select(1, 0);
    let mut two = [0u8; 2];
    m.root.read(7, &mut two); // runs past the dword
    assert_eq!(two, [0xff, 0xff]);
    // Absent devices, other functions, other buses, the enable bit off: all ones.
    assert_eq!(m.cfg_read(2, 0, 4), u32::MAX);
    assert_eq!(m.cfg_read(31, 0, 2), 0xffff);
    m.root.write(0, &(0x8000_0000u32 | 1 << 8).to_le_bytes());
    m.root.read(4, &mut d);
    assert_eq!(d, [0xff; 4]);
    m.root.write(0, &(0x8000_0000u32 | 1 << 16).to_le_bytes());
    m.root.read(4, &mut d);
    assert_eq!(d, [0xff; 4]);
    m.root.write(0, &(1u32 << 11).to_le_bytes());
    m.root.read(4, &mut d);
    assert_eq!(d, [0xff; 4]);
    // AMD's extended-register bits (offset 0x100 and up): no such space here.
    m.root.write(0, &(0x8100_0800u32).to_le_bytes());
    m.root.read(4, &mut d);
    assert_eq!(d, [0xff; 4]);
    // Writes to absent devices go nowhere; a byte at 0xcf9 is the reset register.
    m.cfg_write(5, 0x10, 4, u32::MAX);
    m.root.write(1, &[0x02]);
    let mut b = [0u8];
    m.root.read(1, &mut b);
    assert_eq!(b, [0x02]);
    assert!(!m.control.stopping());
    m.root.write(1, &[0x06]);
    assert!(m.control.stopping(), "0xcf9 still resets");
}

/// Linux's virtio_pci_modern: find each vendor capability by cfg_type.
fn virtio_caps(m: &Machine) -> Vec<(u8, u8, u32, u32, u32)> {
    let mut caps = Vec::new();
    assert_ne!(m.cfg_read(1, 6, 2) & 0x10, 0, "capability list bit");
    let mut pos = m.cfg_read(1, 0x34, 1);
    for _ in 0..48 {
        if pos < 0x40 {
            break;
        }
        let id = m.cfg_read(1, pos, 1);
        if id == 0x09 {
            let ty = m.cfg_read(1, pos + 3, 1) as u8;
            let bar = m.cfg_read(1, pos + 4, 1) as u8;
            let off = m.cfg_read(1, pos + 8, 4);
            let len = m.cfg_read(1, pos + 12, 4);
            let extra = if ty == 2 { m.cfg_read(1, pos + 16, 4) } else { pos };
            caps.push((ty, bar, off, len, extra));
        }
        if id == 0x11 {
            caps.push((0x11, 0, m.cfg_read(1, pos + 4, 4), m.cfg_read(1, pos + 8, 4), m.cfg_read(1, pos + 2, 2)));
        }
        pos = m.cfg_read(1, pos + 1, 1);
    }
    caps
}

#[test]
fn virtio_capabilities_describe_bar_zero() {
    let m = machine();
    let caps = virtio_caps(&m);
    let find = |t: u8| caps.iter().find(|c| c.0 == t).copied().unwrap_or_else(|| panic!("cap type {t} missing: {caps:?}"));
    assert_eq!(find(1).2, COMMON as u32);
    assert!(find(1).3 >= 0x38);
    assert_eq!((find(2).2, find(2).4), (NOTIFY as u32, NOTIFY_MULTIPLIER));
    assert_eq!(find(3).3, 1);
    assert!(find(4).3 > 0);
    let pci_cfg = find(5);
    for t in 1..=5 {
        assert_eq!(find(t).1, 0, "in BAR 0");
    }
    let msix = find(0x11);
    assert_eq!((msix.2, msix.3, msix.4 & 0x7ff), (MSIX_TABLE as u32, MSIX_PBA as u32, 1), "BIR 0, two vectors");
    assert_eq!(m.cfg_read(1, 0x3d, 1), 0, "no INTx pin");
    assert_eq!(m.cfg_read(1, 8, 1), 1, "revision 1");
    // PCI_CFG reaches the BAR through configuration space: num_queues (0x12, 2 bytes).
    let cap = pci_cfg.4;
    m.cfg_write(1, cap + 4, 1, 0);
    m.cfg_write(1, cap + 8, 4, 0x12);
    m.cfg_write(1, cap + 12, 4, 2);
    assert_eq!(m.cfg_read(1, cap + 16, 4), 1);
    // A bad length or BAR reads zero and writes nothing.
    m.cfg_write(1, cap + 12, 4, 3);
    assert_eq!(m.cfg_read(1, cap + 16, 4), 0);
}

#[test]
fn bar_sizing_relocation_and_decode() {
    let m = machine();
    assert_eq!(m.function.bar_address(), BAR);
    assert_eq!(m.bar_read(0x12, 2), 1, "num_queues at the firmware's address");
    // Sizing as Linux does: decode off, all ones, read, restore.
    m.cfg_write(1, 4, 2, 0);
    assert_eq!(m.bar_read(0x12, 2), 0xffff, "decode off: the BAR does not respond");
    m.cfg_write(1, 0x10, 4, u32::MAX);
    assert_eq!(m.cfg_read(1, 0x10, 4), !(BAR_SIZE as u32 - 1) | 0x4);
    m.cfg_write(1, 0x14, 4, u32::MAX);
    assert_eq!(m.cfg_read(1, 0x14, 4), u32::MAX);
    // Moved by the guest, inside the window.
    m.cfg_write(1, 0x10, 4, (BAR + 0x10_0000) as u32);
    m.cfg_write(1, 0x14, 4, 0);
    m.cfg_write(1, 4, 2, 2);
    assert_eq!(m.function.bar_address(), BAR + 0x10_0000);
    assert_eq!(m.bar_read(0x12, 2), 0xffff, "nothing at the old place");
    assert_eq!(m.bar_read(0x10_0012, 2), 1);
    // Accesses that run off the BAR's end are refused.
    assert_eq!(m.bar_read(0x10_0000 + BAR_SIZE - 2, 4), 0xffff_ffff);
}

/// A driver setting up queue 0 of the rng with MSI-X vector 1, and the config vector 0.
fn start(m: &Machine) {
    m.cfg_write(1, 4, 2, 6); // memory decode, bus master
    let control = virtio_caps(m).iter().find(|c| c.0 == 0x11).unwrap().4;
    let _ = control;
    // MSI-X on (as Linux: function-masked while it fills the table).
    let msix_at = {
        let mut pos = m.cfg_read(1, 0x34, 1);
        while m.cfg_read(1, pos, 1) != 0x11 {
            pos = m.cfg_read(1, pos + 1, 1);
        }
        pos
    };
    m.cfg_write(1, msix_at + 2, 2, 0xc000);
    for v in 0..2u64 {
        m.bar_write(MSIX_TABLE + 16 * v, 4, 0xfee0_0000);
        m.bar_write(MSIX_TABLE + 16 * v + 4, 4, 0);
        m.bar_write(MSIX_TABLE + 16 * v + 8, 4, 0x30 + v);
        m.bar_write(MSIX_TABLE + 16 * v + 12, 4, 0);
    }
    m.cfg_write(1, msix_at + 2, 2, 0x8000);
    m.bar_write(0x14, 1, 0); // reset
    m.bar_write(0x14, 1, 1 | 2);
    m.bar_write(0x08, 4, 1);
    m.bar_write(0x0c, 4, 1); // VERSION_1
    m.bar_write(0x14, 1, 1 | 2 | 8);
    assert_eq!(m.bar_read(0x14, 1), 11);
    m.bar_write(0x10, 2, 0);
    assert_eq!(m.bar_read(0x10, 2), 0);
    m.bar_write(0x16, 2, 0);
    assert_eq!(m.bar_read(0x18, 2), 256, "an unsized queue reads its maximum");
    m.bar_write(0x18, 2, 16);
    m.bar_write(0x1a, 2, 1);
    assert_eq!(m.bar_read(0x1a, 2), 1);
    m.bar_write(0x20, 4, 0x1000);
    m.bar_write(0x24, 4, 0);
    m.bar_write(0x28, 4, 0x3000);
    m.bar_write(0x2c, 4, 0);
    m.bar_write(0x30, 4, 0x4000);
    m.bar_write(0x34, 4, 0);
    m.bar_write(0x1c, 2, 1);
    assert_eq!(m.bar_read(0x1c, 2), 1);
    m.bar_write(0x14, 1, 15);
}

/// Posts one 32-byte writable buffer on queue 0 (descriptor `n`) and notifies.
fn post(m: &Machine, n: u16) {
    use vm_memory::Bytes;
    let desc = 0x1000 + 16 * u64::from(n);
    m.mem.write_obj(0x10_0000u64, GuestAddress(desc)).unwrap();
    m.mem.write_obj(32u32, GuestAddress(desc + 8)).unwrap();
    m.mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap();
    m.mem.write_obj(n, GuestAddress(0x3004 + 2 * u64::from(n))).unwrap();
    m.mem.write_obj(n + 1, GuestAddress(0x3002)).unwrap();
    m.bar_write(NOTIFY, 2, 0); // no ioeventfd in tests: the write exits to the BAR
}

fn used_idx(m: &Machine) -> u16 {
    use vm_memory::Bytes;
    m.mem.read_obj(GuestAddress(0x4002)).unwrap()
}

#[test]
fn msix_vector_masking_holds_the_interrupt_in_the_pba() {
    let m = machine();
    start(&m);
    let irq = &m.function.irqfd_for_tests(1);
    post(&m, 0);
    assert_eq!(used_idx(&m), 1);
    assert_eq!(irq.read().unwrap(), 1, "the queue's vector fired");
    // Masked vector: held, pending bit set, delivered on unmask.
    m.bar_write(MSIX_TABLE + 16 + 12, 4, 1);
    post(&m, 1);
    assert!(irq.read().is_err(), "nothing while masked");
    assert_eq!(m.bar_read(MSIX_PBA, 8), 2);
    m.bar_write(MSIX_TABLE + 16 + 12, 4, 0);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(m.bar_read(MSIX_PBA, 8), 0);
    // The function mask holds it the same way.
    let msix_at = (0x40..0x100).step_by(4).find(|&p| m.cfg_read(1, p, 1) == 0x11 && m.cfg_read(1, p + 2, 2) & 0x7ff == 1).unwrap();
    m.cfg_write(1, msix_at + 3, 1, 0xc0);
    post(&m, 2);
    assert!(irq.read().is_err());
    m.cfg_write(1, msix_at + 3, 1, 0x80);
    assert_eq!(irq.read().unwrap(), 1);
    // No ISR read is needed, but the ISR still says why (and clears on read).
    assert_eq!(m.bar_read(0x1000, 1), 1);
    assert_eq!(m.bar_read(0x1000, 1), 0);
}

#[test]
fn hostile_values_are_refused_not_fatal() {
    let m = machine();
    start(&m);
    // A vector beyond the table reads back NO_VECTOR; a missing queue is ignored.
    m.bar_write(0x1a, 2, 7);
    assert_eq!(m.bar_read(0x1a, 2), 0xffff);
    m.bar_write(0x16, 2, 9);
    assert_eq!(m.bar_read(0x18, 2), 0);
    m.bar_write(0x1c, 2, 1);
    m.bar_write(0x1a, 2, 0);
    m.bar_write(NOTIFY + 4 * 100, 2, 100);
    m.bar_write(NOTIFY + 1, 2, 0);
    // The MSI-X table out of range, odd sizes everywhere.
    m.bar_write(MSIX_TABLE + 16 * 300, 4, 1);
    m.bar_write(MSIX_TABLE + 1, 4, 1);
    m.bar_write(MSIX_TABLE, 1, 1);
    for off in [0u64, 1, 3, 0x11, 0x15, 0x37, 0x1001, 0x2fff, 0x5fff, 0x7ffe] {
        for len in [1usize, 2, 4, 8] {
            m.bar_read(off, len);
            m.bar_write(off, len, u64::MAX);
        }
    }
    // Configuration space beyond 0x100 and junk everywhere else.
    for off in (0..0x100).step_by(1) {
        m.cfg_write(1, off, 1, 0xff);
    }
    m.function.reset();
    assert_eq!(m.function.bar_address(), BAR, "reset puts the BAR back");
    assert_eq!(m.bar_read(0x12, 2), 1);
}

#[test]
fn state_round_trip_and_reset() {
    let m = machine();
    start(&m);
    post(&m, 0);
    let s = m.function.state();
    let fresh = machine();
    fresh.function.restore(&s).unwrap();
    assert_eq!(fresh.function.state(), s);
    let mut forged = s.clone();
    forged.config[0] = 0;
    assert!(fresh.function.restore(&forged).is_err());
    let mut short = s.clone();
    short.msix.table.pop();
    assert!(fresh.function.restore(&short).is_err());
    let mut newer = s;
    newer.version += 1;
    assert!(fresh.function.restore(&newer).is_err());
}
