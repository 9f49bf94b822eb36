//! The dispatcher, the page and the CPUID leaves.

use super::*;
use crate::devices::serial::Console;

fn setup() -> (Hypercalls, Arc<Control>, Arc<std::sync::Mutex<Vec<u8>>>, GuestMemoryMmap) {
    #[derive(Clone)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let bytes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let console = Console::start(Box::new(Sink(bytes.clone()))).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let control = Arc::new(Control::new());
    let h = Hypercalls::new(mem.clone(), control.clone(), ConsoleOut::new(console.clone()), Arc::new(BootMarker::default()));
    (h, control, bytes, mem)
}

#[test]
fn calls_return_what_kvm_would() {
    let (h, control, bytes, mem) = setup();
    assert_eq!(h.call(Path::Direct, 0x1234, [0; 4]) as i64, -KVM_ENOSYS, "unknown number");
    assert_eq!(h.call(Path::Direct, 1, [0; 4]) as i64, -KVM_ENOSYS, "KVM's own numbers are not skiff's");
    assert_eq!(h.call(Path::Direct, HC_NOP, [0; 4]), 0);
    let t = h.call(Path::Trapped, HC_TIME, [0; 4]) as i64;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    assert!((now - t).abs() < 5_000_000_000, "{t} vs {now}");
    mem.write_slice(b"hello", GuestAddress(0x5000)).unwrap();
    assert_eq!(h.call(Path::Patched, HC_CONSOLE_WRITE, [0x5000, 5, 0, 0]), 5);
    assert_eq!(h.call(Path::Direct, HC_CONSOLE_WRITE, [0x5000, CONSOLE_MAX + 1, 0, 0]) as i64, -KVM_E2BIG);
    assert_eq!(h.call(Path::Direct, HC_CONSOLE_WRITE, [(1 << 20) - 2, 5, 0, 0]) as i64, -KVM_EFAULT, "runs off RAM");
    assert_eq!(h.call(Path::Direct, HC_CONSOLE_WRITE, [u64::MAX - 1, 5, 0, 0]) as i64, -KVM_EFAULT, "wraps");
    assert_eq!(h.call(Path::Direct, HC_CONSOLE_WRITE, [0x5000, 0, 0, 0]), 0);
    assert!(h.marker.this_boot().is_none());
    assert_eq!(h.call(Path::Direct, HC_READY, [0; 4]), 0);
    assert!(h.marker.this_boot().is_some());
    assert_eq!(h.call(Path::Ring, HC_RING_SET, [0x8000, 0, 0, 0]) as i64, -KVM_EINVAL, "not from inside the ring");
    assert!(!control.stopping());
    assert_eq!(h.call(Path::Direct, HC_POWEROFF, [0; 4]), 0);
    assert_eq!(control.reason(), Some(StopReason::Poweroff));
    let c2 = Arc::new(Control::new());
    let h2 = Hypercalls { control: c2.clone(), ..setup().0 };
    h2.call(Path::Direct, HC_REBOOT, [0; 4]);
    assert_eq!(c2.reason(), Some(StopReason::Reboot("reboot hypercall")));
    let c = &h.counters;
    assert_eq!(c.direct.load(Ordering::Relaxed), 9);
    assert_eq!((c.trapped.load(Ordering::Relaxed), c.patched.load(Ordering::Relaxed), c.unknown.load(Ordering::Relaxed)), (1, 1, 2));
    drop(h);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(&*bytes.lock().unwrap(), b"hello");
}

#[test]
fn the_page_and_the_leaves() {
    let page = page_image();
    assert_eq!(&page[..3], &[0xe6, PORT_DIRECT as u8, 0xc3]);
    assert_eq!(&page[0x10..0x13], &[0xe6, PORT_PATCHED as u8, 0xc3]);
    assert_eq!(page[3], 0xcc);
    let mut cpuid = kvm_bindings::CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 { function: 0, eax: 0xd, ..Default::default() }]).unwrap();
    add_cpuid_leaves(&mut cpuid, true).unwrap();
    add_cpuid_leaves(&mut cpuid, false).unwrap();
    assert_eq!(cpuid.as_slice().len(), 3, "added once");
    let sig = crate::vcpu::cpuid::find_entry(&cpuid, LEAF_SIGNATURE, 0).unwrap();
    let mut s = Vec::new();
    for r in [sig.ebx, sig.ecx, sig.edx] {
        s.extend_from_slice(&r.to_le_bytes());
    }
    assert_eq!(&s, SIGNATURE);
    assert_eq!(sig.eax, LEAF_INFO);
    let info = crate::vcpu::cpuid::find_entry(&cpuid, LEAF_INFO, 0).unwrap();
    assert_eq!(u64::from(info.eax) | u64::from(info.ebx) << 32, PAGE_GPA);
    assert_eq!(info.ecx, CAP_RING, "no trap path");
    assert_eq!(info.edx, u32::from(PORT_RING) | 64 << 16);
}

#[test]
fn the_page_is_in_a_reserved_e820_range() {
    use crate::vmm::layout::*;
    let map = crate::x86::boot::e820_map(256 << 20, EBDA_START, HIMEM_START, MMIO_HOLE_START, MMIO_HOLE_END);
    let e = map.iter().find(|e| e.addr <= PAGE_GPA && PAGE_GPA + 4096 <= e.addr + e.size).unwrap();
    assert_eq!(e.kind, crate::x86::boot::E820_RESERVED);
    const { assert!(PAGE_GPA + 4096 <= ACPI_START, "below the ACPI tables") };
}
