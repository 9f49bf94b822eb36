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
    assert_eq!(&page[0x20..0x23], &[0xe6, PORT_DIRECT32 as u8, 0xc3]);
    assert_eq!(&page[0x30..0x33], &[0xe6, PORT_PATCHED32 as u8, 0xc3]);
    assert!(page[0x33..].iter().all(|&b| b == 0xcc));
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
    assert_eq!(info.ecx, CAP_RING | CAP_STUB32, "no trap path");
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

fn regs(rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64) -> kvm_bindings::kvm_regs {
    kvm_bindings::kvm_regs { rax, rbx, rcx, rdx, rsi, rdi: 0xdead_beef_dead_beef, ..Default::default() }
}

#[test]
fn the_32_bit_subset_masks_number_arguments_and_result() {
    let (h, control, bytes, mem) = setup();
    const G: u64 = 0xbad0_bad1_0000_0000;
    // Unknown: -1000 as a 32-bit value, high half clear.
    assert_eq!(h.call_regs(Path::Direct, Width::Bits32, &regs(G | 0x1234, 0, 0, 0, 0)), 0xffff_fc18);
    assert_eq!(h.call_regs(Path::Direct, Width::Bits64, &regs(0x1234, 0, 0, 0, 0)), (-KVM_ENOSYS) as u64);
    // A skiff number under garbage: the call, not an unknown number.
    assert_eq!(h.call_regs(Path::Trapped, Width::Bits32, &regs(G | HC_NOP, G, G, G, G)), 0);
    assert_eq!(h.call_regs(Path::Direct, Width::Bits64, &regs(G | HC_NOP, 0, 0, 0, 0)) as i64, -KVM_ENOSYS, "in 64-bit mode it is unknown");
    // Arguments: a buffer address and length under garbage.
    mem.write_slice(b"32-bit", GuestAddress(0x6000)).unwrap();
    assert_eq!(h.call_regs(Path::Patched, Width::Bits32, &regs(G | HC_CONSOLE_WRITE, G | 0x6000, 0xffff_ffff_0000_0006, G, G)), 6);
    assert_eq!(h.call_regs(Path::Direct, Width::Bits64, &regs(HC_CONSOLE_WRITE, G | 0x6000, 6, 0, 0)) as i64, -KVM_EFAULT);
    // Time: the low 32 bits of the nanoseconds.
    let t = h.call_regs(Path::Direct, Width::Bits32, &regs(HC_TIME, 0, 0, 0, 0));
    assert_eq!(t >> 32, 0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(now as u32 as u64 >= t || t - now as u32 as u64 > 1 << 31, "the low bits of now, or now wrapped since: {t} vs {now}");
    // Error results truncated too.
    assert_eq!(h.call_regs(Path::Direct, Width::Bits32, &regs(HC_CONSOLE_WRITE, 0x6000, 5000, 0, 0)), (-KVM_E2BIG) as u32 as u64);
    assert_eq!(h.call_regs(Path::Direct, Width::Bits32, &regs(G | HC_POWEROFF, 0, 0, 0, 0)), 0);
    assert_eq!(control.reason(), Some(StopReason::Poweroff));
    assert_eq!(h.counters.calls32.load(Ordering::Relaxed), 6);
    assert_eq!(h.counters.unknown.load(Ordering::Relaxed), 3);
    drop(h);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(&*bytes.lock().unwrap(), b"32-bit");
}

#[test]
fn the_width_comes_from_the_port_then_the_registers_then_the_mode() {
    let asked = std::cell::Cell::new(0);
    let ask = |w| {
        asked.set(asked.get() + 1);
        Ok::<_, ()>(w)
    };
    let clean = regs(HC_CONSOLE_WRITE, 0xffff_ffff, 1, 2, 3);
    // The 32-bit ports say so: never asked.
    assert_eq!(Width::of_port_call(Some(Width::Bits32), &regs(u64::MAX, 0, 0, 0, 0), || ask(Width::Bits64)), Ok(Width::Bits32));
    // A 64-bit port with every high half clear: 64-bit, never asked.
    assert_eq!(Width::of_port_call(None, &clean, || ask(Width::Bits32)), Ok(Width::Bits64));
    assert_eq!(asked.get(), 0);
    // A high half set in RAX or an argument the call reads (console write: RBX,
    // RCX): the mode decides.
    for i in 0..3 {
        let mut r = clean;
        *[&mut r.rax, &mut r.rbx, &mut r.rcx][i] |= 1 << 32;
        assert_eq!(Width::of_port_call(None, &r, || ask(Width::Bits32)), Ok(Width::Bits32));
        assert_eq!(Width::of_port_call(None, &r, || ask(Width::Bits64)), Ok(Width::Bits64));
    }
    assert_eq!(asked.get(), 6);
    // Registers it does not read (RDX, RSI; RDI is never an argument): not asked.
    let mut r = clean;
    (r.rdx, r.rsi, r.rdi) = (u64::MAX, u64::MAX, u64::MAX);
    assert_eq!(Width::of_port_call(None, &r, || Err(())), Ok(Width::Bits64));
    let nop = regs(HC_NOP, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
    assert_eq!(Width::of_port_call(None, &nop, || Err(())), Ok(Width::Bits64), "nop reads no argument");
    let va = regs(HC_SET_PAGE_VA, 0xffff_ffff_8000_0000, u64::MAX, 0, 0);
    assert_eq!(Width::of_port_call(None, &va, || ask(Width::Bits64)), Ok(Width::Bits64), "a kernel's upper-half page address: asked");
    assert_eq!(asked.get(), 7);
    assert_eq!((args_read(HC_RING_SET), args_read(HC_TIME), args_read(0x1234)), (1, 0, 0));
    assert_eq!(Width::of_port_call(None, &regs(1 << 40, 0, 0, 0, 0), || Err::<Width, _>("no sregs")), Err("no sregs"));
    // The ports.
    assert_eq!(call_port(PORT_DIRECT), Some((Path::Direct, None)));
    assert_eq!(call_port(PORT_PATCHED), Some((Path::Patched, None)));
    assert_eq!(call_port(PORT_DIRECT32), Some((Path::Direct, Some(Width::Bits32))));
    assert_eq!(call_port(PORT_PATCHED32), Some((Path::Patched, Some(Width::Bits32))));
    assert_eq!(call_port(PORT_RING), None, "the doorbell is no call");
    assert_eq!(u64::from(PORT_PATCHED32 - PORT_DIRECT) + 1, PORTS_LEN);
}

#[test]
fn the_mode_is_64_bit_only_with_lma_and_cs_l() {
    let mut s = kvm_bindings::kvm_sregs::default();
    assert_eq!(Width::of_mode(&s), Width::Bits32, "real or protected mode");
    s.cs.l = 1;
    assert_eq!(Width::of_mode(&s), Width::Bits32, "CS.L without EFER.LMA");
    s.efer = 0x500;
    assert_eq!(Width::of_mode(&s), Width::Bits64);
    s.cs.l = 0;
    assert_eq!(Width::of_mode(&s), Width::Bits32, "compatibility mode");
}
