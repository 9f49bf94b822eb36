//! The floor for exit dispatch: the smallest VMM that can run the exit probe
//! (guest/tiny/exitbench.S), so its figures are measured exactly as under skiff and
//! QEMU (the same guest loops, TSC and PIT calibration, baseline subtraction) while
//! user space does nothing per exit but return to KVM_RUN. KVM's own in-kernel PIC,
//! I/O APIC and PIT (speaker port included) stand in for the chipset; COM1 output goes
//! to stdout, a write of S5 to PM1a_CNT (0x604) stops it, every other exit is
//! dropped. There are no ACPI tables, so the probe skips its PM-timer read.
//!
//! cargo run --release --example kvm_floor -- guest/out/exitbench.elf

use std::io::Write;
use std::time::Instant;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use skiff::x86::boot::{gdt_entry, kvm_segment_from_gdt};
use kvm_ioctls::{Kvm, VcpuExit};
use linux_loader::loader::{KernelLoader, elf::Elf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const MEM_SIZE: usize = 16 << 20;
const GDT_ADDR: u64 = 0x500;
const TSS_ADDR: usize = 0xfffb_d000;
const COM1: u16 = 0x3f8;
const PM1A_CNT: u16 = 0x604;
const SLP_EN: u16 = 1 << 13;

fn main() {
    if let Err(e) = run() {
        eprintln!("kvm_floor: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let path = std::env::args().nth(1).ok_or("usage: kvm_floor EXITBENCH.ELF")?;
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    vm.set_tss_address(TSS_ADDR).map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
    vm.create_irq_chip().map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| format!("KVM_CREATE_PIT2: {e}"))?;

    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).map_err(|e| e.to_string())?;
    let region = mem.iter().next().ok_or("no guest memory region")?;
    let host = mem.get_host_address(GuestAddress(0)).map_err(|e| e.to_string())?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is a live mapping of `memory_size` bytes that outlives the VM
    // (both are dropped at the end of this function, the VM first).
    unsafe { vm.set_user_memory_region(slot) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;

    let mut file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    let loaded = Elf::load(&mem, None, &mut file, None).map_err(|e| format!("{path}: {e}"))?;
    let entry = loaded.kernel_load.raw_value();

    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;

    // PVH entry state: flat 32-bit protected mode, paging off; a GDT in memory too,
    // for anything that looks there.
    let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + i as u64 * 8)).map_err(|e| e.to_string())?;
    }
    // Flat 32-bit segments (present, DPL 0, 4 KiB granularity) as their GDT entries say.
    let flat = |selector: u16, type_: u8| kvm_segment_from_gdt(gdt_entry(0xc090 | u16::from(type_), 0, 0xfffff), selector);
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cs = flat(0x08, 0xb);
    let data = flat(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = entry;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let started = Instant::now();
    let mut exits = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let exit = vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))?;
        exits += 1;
        match exit {
            VcpuExit::IoOut(COM1, data) => {
                let _ = out.write_all(data);
            }
            VcpuExit::IoOut(PM1A_CNT, data) => {
                let v = data.iter().rev().fold(0u16, |a, b| a << 8 | u16::from(*b));
                if v & SLP_EN != 0 {
                    break;
                }
            }
            VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => {}
            VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::Hlt | VcpuExit::Shutdown => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
    let _ = out.flush();
    eprintln!("kvm_floor: {exits} exits in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
