//! Real state from KVM through the file and back, and what writing and reading cost.

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::control::Control;
use crate::devices::serial::{Console, ConsoleOut};
use crate::vcpu::cpuid;
use crate::vcpu::msr::MsrSet;
use crate::vcpu::state::{VcpuCtx, VmClock};
use crate::vmm::devices::DeviceManager;

const IA32_TSC: u32 = 0x10;

/// A VM with an irqchip, a PIT, one vCPU with its CPUID, and the legacy devices:
/// its state is got from KVM, written to files, read back, put, and got again.
#[test]
fn real_state_through_the_file_and_back() {
    let kvm = Kvm::new().expect("/dev/kvm is needed for this test");
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config::default()).unwrap();
    let base = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let cpuid = cpuid::normalize(&base, 0, 1);
    fd.set_cpuid2(&cpuid).unwrap();
    let msrs = MsrSet::discover(&kvm, &fd, &[]).unwrap();
    let ctx = VcpuCtx {
        fd: &fd,
        msrs: &msrs.saved,
        xsave_size: usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0),
        sregs2: vm.check_extension_raw(kvm_bindings::KVM_CAP_SREGS2 as libc::c_ulong) > 0,
        tsc_khz: fd.get_tsc_khz().is_ok(),
    };
    let console = Console::start(Box::new(std::io::sink())).unwrap();
    let mut devices = DeviceManager::new(&vm, &Arc::new(Control::new()), ConsoleOut::new(console), None).unwrap();
    devices.build_buses().unwrap();
    devices.buses.pio.write(0x70, &[0x40]);
    devices.buses.pio.write(0x71, &[0x5a]);

    // Some state that is not the reset state.
    let mut regs = fd.get_regs().unwrap();
    regs.rax = 0x1234_5678;
    regs.rip = 0xfff0;
    fd.set_regs(&regs).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    mem.write_slice(b"restored guest memory", GuestAddress(0x7000)).unwrap();

    let dir = TmpDir::new("kvm");
    let w = write_memory_full(&dir.path("guest.mem"), &mem).unwrap();
    let original = Snapshot {
        header: Header::for_this_host(cpuid.as_slice().iter().map(CpuidEntry::from).collect()),
        vcpus: vec![VcpuState::get(&ctx).unwrap()],
        chipset: Chipset { state: VmState::get(&vm).unwrap(), clock: VmClock::get(&vm).unwrap().0.clock },
        devices: devices.save(),
        memory_map: w.map.clone(),
        memory_file: w.file.clone(),
        patched_sites: Vec::new(),
        machine: Machine { disks: Vec::new(), ..sample_machine(1, 4 << 20) },
    };
    let path = dir.path("vm.snap");
    write_snapshot(&path, &original).unwrap();

    // Disturb everything, then restore from the file.
    fd.set_regs(&Default::default()).unwrap();
    devices.reset();
    let read = read_snapshot(&path).unwrap();
    assert_same(&original, &read);
    read.vcpus[0].put(&ctx).unwrap();
    read.chipset.state.put(&vm).unwrap();
    devices.restore(&read.devices).unwrap();
    let restored_mem = map_memory(&path, &read).unwrap();
    let mut b = [0u8; 21];
    restored_mem.read_slice(&mut b, GuestAddress(0x7000)).unwrap();
    assert_eq!(&b, b"restored guest memory");

    let again = VcpuState::get(&ctx).unwrap();
    assert_eq!(fd.get_regs().unwrap().rax, 0x1234_5678);
    // The TSC runs on between the two reads; every other part is exact.
    let differ = original.vcpus[0].diff(&again);
    assert!(differ.iter().all(|p| *p == "msrs"), "{differ:?}");
    let strip = |m: &crate::vcpu::state::MsrValues| m.0.iter().filter(|e| e.index != IA32_TSC).map(|e| (e.index, e.data)).collect::<Vec<_>>();
    assert_eq!(strip(&original.vcpus[0].msrs), strip(&again.msrs));
    assert!(original.chipset.state.diff(&VmState::get(&vm).unwrap()).iter().all(|p| *p == "pit"));
    assert_eq!(devices.save(), original.devices);
    assert_eq!(original.header.cpuid.len(), cpuid.as_slice().len());
    // This host runs what it was given.
    let supported: Vec<CpuidEntry> = base.as_slice().iter().map(CpuidEntry::from).collect();
    check_host(&read.header, &host_cpu_vendor(), &supported).unwrap();
    let two = cpuid::normalize(&base, 1, 2).as_slice().iter().map(CpuidEntry::from).collect();
    check_host(&Header::for_this_host(two), &host_cpu_vendor(), &supported).unwrap();
}

/// What a 4-vCPU snapshot's sections cost to write and read (printed, not asserted),
/// and a guest-memory file of 64 MiB, a quarter of it data.
#[test]
fn timings() {
    let s = sample(4);
    let n = 200;
    let t = Instant::now();
    let mut bytes = Vec::new();
    for _ in 0..n {
        bytes = encode(&s).unwrap();
    }
    let enc = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        decode(&bytes).unwrap();
    }
    let dec = t.elapsed() / n;
    let dir = TmpDir::new("timings");
    let path = dir.path("vm.snap");
    let t = Instant::now();
    write_snapshot(&path, &s).unwrap();
    let write = t.elapsed();
    let t = Instant::now();
    read_snapshot(&path).unwrap();
    let read = t.elapsed();
    eprintln!(
        "4-vCPU snapshot file: {} bytes; encode {enc:?}, decode (all checks) {dec:?}; written with fsync {write:?}, read {read:?}",
        bytes.len()
    );

    let size = 64 << 20;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    // 16 MiB in one run, as a kernel's memory mostly is. (Scattered pages would make
    // as many extents, and an ext4 with discard here then takes seconds to delete the
    // file: a property of that file system, not of the writing.)
    mem.write_slice(&vec![0xa5; 16 << 20], GuestAddress(0)).unwrap();
    let t = Instant::now();
    let w = write_memory_full(&dir.path("guest.mem"), &mem).unwrap();
    let full = t.elapsed();
    let mut snap = sample(4);
    snap.memory_map = w.map.clone();
    snap.machine.memory = snap.memory_map.iter().map(|r| r.len).sum();
    snap.memory_file = w.file.clone();
    write_snapshot(&path, &snap).unwrap();
    let t = Instant::now();
    let snap = read_snapshot(&path).unwrap();
    let _mapped = map_memory(&path, &snap).unwrap();
    let load = t.elapsed();
    eprintln!("64 MiB guest, 16 MiB of data: memory file written with fsync {full:?} ({} pages); snapshot read + memory mapped {load:?}", w.pages_written);
}
