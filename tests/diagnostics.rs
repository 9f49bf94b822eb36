//! Seed 002's diagnostics, end to end: skiff's paging-mode test kernels
//! (guest/tiny/modes.S) each enter a mode (real, 32-bit paging, PAE, 4-level), load
//! an empty IDT and run one faulting instruction; the fault escalates to a triple
//! fault, and `skiff run --on-reboot exit` must print the registers and the
//! instruction at CS:RIP, fetched through the guest's own page tables and decoded in
//! the mode the vCPU was in. About a second a kernel.
//!
//! Where this host's KVM refuses a paging mode (PVM runs 64-bit guests only: the
//! `mov cr0` that turns on 32-bit or PAE paging faults), skiff cannot show that
//! mode's walk in a diagnostic. So the outcome is not taken on trust: each paging
//! kernel also runs on a bare KVM vCPU here (no skiff in between), and what that run
//! shows decides what skiff must print; and skiff's page walker and instruction
//! fetch run on the page tables the kernel built in guest memory, with the CR0 the
//! kernel asked for, so the PAE and 32-bit walks are tested on this host either way.

mod common;

use std::process::{Command, Stdio};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use skiff::x86::boot::{gdt_entry, kvm_segment_from_gdt};
use kvm_ioctls::{Kvm, VcpuExit};
use skiff::x86::insn;
use skiff::x86::paging::{self, Access, PagingContext, PagingMode, Translation};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const CR0_PG: u64 = 1 << 31;

/// Runs one mode kernel; returns skiff's status, console and stderr.
fn run_mode(name: &str) -> (Option<i32>, String, String) {
    common::require_kvm();
    let kernel = common::tiny_kernel(&format!("modes-{name}"));
    let out = Command::new(common::SKIFF)
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--boot", "pvh", "--on-reboot", "exit"])
        .stdin(Stdio::null())
        .output()
        .expect("run skiff");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The line of the diagnostic that names the instruction.
fn instruction_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("instruction at CS:RIP"))
        .unwrap_or_else(|| panic!("no instruction in the diagnostic:\n{stderr}"))
}

/// The value of `key=` in the diagnostic's register dump.
fn reg(stderr: &str, key: &str) -> u64 {
    let text = stderr
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the diagnostic:\n{stderr}"));
    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{key}={text}"))
}

/// A paging-mode kernel run on a bare KVM vCPU: where it stopped, and its memory.
struct BareRun {
    console: String,
    regs: kvm_regs,
    sregs: kvm_sregs,
    mem: GuestMemoryMmap,
}

impl BareRun {
    /// Whether this host's KVM turned the kernel's paging mode on.
    fn paging_on(&self) -> bool {
        self.sregs.cr0 & CR0_PG != 0
    }
}

/// Runs `modes-<name>` on one bare vCPU (KVM's supported CPUID, 8 MiB of RAM, the
/// PVH entry state: flat 32-bit protected mode, paging off) until it shuts down.
/// Its console output (port 0x3f8) is kept; nothing else is emulated.
fn run_bare(name: &str) -> BareRun {
    common::require_kvm();
    let kernel = common::tiny_kernel(&format!("modes-{name}"));
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_tss_address(skiff::vmm::layout::KVM_TSS_ADDR as usize).expect("TSS");
    vm.create_irq_chip().expect("irqchip");
    let size = 8 << 20;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("memory");
    let loaded = skiff::vmm::loader::load_kernel(&mem, &kernel).expect("load the kernel");
    let entry = loaded.pvh_entry.expect("a PVH entry");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address");
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the mapping lives in `mem`, which outlives the VM (returned with it).
    unsafe { vm.set_user_memory_region(region) }.expect("memory region");
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("CPUID")).expect("set CPUID");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    // Flat 32-bit segments (present, DPL 0, 4 KiB granularity) as their GDT entries say.
    let flat = |selector: u16, type_: u8| kvm_segment_from_gdt(gdt_entry(0xc090 | u16::from(type_), 0, 0xfffff), selector);
    sregs.cs = flat(0x08, 0xb);
    for seg in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *seg = flat(0x10, 0x3);
    }
    sregs.cr0 = 0x11; // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    vcpu.set_regs(&kvm_regs { rip: entry, rflags: 2, ..Default::default() }).expect("KVM_SET_REGS");

    let mut console = Vec::new();
    for _ in 0..100_000 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, data) => console.extend_from_slice(data),
            VcpuExit::IoOut(..) => {}
            VcpuExit::IoIn(_, data) => data.fill(0),
            VcpuExit::Shutdown => {
                return BareRun {
                    console: String::from_utf8_lossy(&console).into_owned(),
                    regs: vcpu.get_regs().expect("regs"),
                    sregs: vcpu.get_sregs().expect("sregs"),
                    mem,
                };
            }
            other => panic!("modes-{name} on a bare vCPU: unexpected exit {other:?}"),
        }
    }
    panic!("modes-{name} on a bare vCPU did not shut down");
}

/// The special registers the kernel asked for: where KVM refused its `mov cr0,eax`
/// (CR0.PG still clear), EAX holds the CR0 it tried to load.
fn asked_for(run: &BareRun) -> kvm_sregs {
    let mut sregs = run.sregs;
    if !run.paging_on() {
        let at = insn::fetch(&run.mem, &run.sregs, run.regs.rip, run.regs.rflags).expect("fetch at RIP");
        assert_eq!(at.disasm(), "mov cr0,eax", "paging off: the kernel stopped at its CR0 write");
        assert_ne!(run.regs.rax & CR0_PG, 0, "the CR0 write turns paging on: {:#x}", run.regs.rax);
        sregs.cr0 = run.regs.rax;
    }
    sregs
}

/// What skiff's page walker and instruction fetch make of the tables a paging kernel
/// built (with the CR0 it asked for): its present mappings, and the instructions
/// from RIP up to the one that faults, decoded in its mode through its tables.
struct Walked {
    mode: PagingMode,
    mappings: Vec<(u64, u64, u64, bool)>,
    ctx: PagingContext,
    insns: Vec<String>,
}

fn walk(run: &BareRun, faulting: &str) -> Walked {
    let sregs = asked_for(run);
    let ctx = PagingContext::from_sregs(&sregs, run.regs.rflags);
    let mut mappings = Vec::new();
    paging::for_each_mapping(&run.mem, &ctx, 1 << 16, |m| mappings.push((m.gva, m.gpa, m.size, m.writable)));
    let mut insns = Vec::new();
    let mut rip = run.regs.rip;
    while insns.len() < 4 && insns.last().is_none_or(|i| i != faulting) {
        let f = insn::fetch(&run.mem, &sregs, rip, run.regs.rflags).unwrap_or_else(|e| panic!("fetch at {rip:#x}: {e}"));
        insns.push(f.disasm());
        rip += f.insn.len() as u64;
    }
    Walked { mode: ctx.mode(), mappings, ctx, insns }
}

/// A paging mode's kernel under skiff: the diagnostic names `expected` where this
/// host's KVM runs the mode (as the bare vCPU shows); where it refuses it, the CR0
/// write that tried, with CR0.PG clear and the paging bit in EAX. Either way it is the
/// instruction the guest stopped at, fetched and decoded in its mode.
fn check_paging_mode(name: &str, banner: &str, expected: &str, cr4_bit: u64, fault_addr: u64) {
    let host = run_bare(name);
    assert!(host.console.contains(banner), "bare vCPU: {}", host.console);
    let (status, console, stderr) = run_mode(name);
    assert_eq!(status, Some(3), "triple fault ends the run with status 3:\n{console}\n{stderr}");
    assert!(console.contains(banner), "{console}");
    assert!(stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)"), "{stderr}");
    let line = instruction_line(&stderr);
    let cr0 = reg(&stderr, "cr0");
    let cr4 = reg(&stderr, "cr4");
    assert_ne!(cr4 & cr4_bit, 0, "the kernel set up its mode's CR4 bit: {stderr}");
    assert_eq!(cr0 & CR0_PG != 0, host.paging_on(), "skiff's guest and the bare vCPU disagree on CR0.PG:\n{stderr}");
    if host.paging_on() {
        assert!(line.ends_with(expected), "{name}: expected {expected:?}:\n{stderr}");
        assert_eq!(reg(&stderr, "cr2"), fault_addr, "the #PF's address: {stderr}");
    } else {
        assert!(line.ends_with("mov cr0,eax"), "{name}: {stderr}");
        assert_ne!(reg(&stderr, "rax") & CR0_PG, 0, "the refused CR0 write sets PG: {stderr}");
        eprintln!("{name}: host limit: this KVM refuses to turn the mode on (so does a bare vCPU); the walk is tested on the kernel's tables below");
    }
    eprintln!("{name}: {line}");
}

/// The translation of one address through the walked tables.
fn translate(run: &BareRun, w: &Walked, gva: u64, access: Access) -> Translation {
    paging::translate(&run.mem, &w.ctx, gva, access)
}

#[test]
fn long_mode_diagnostic_names_the_faulting_instruction() {
    let (status, console, stderr) = run_mode("long");
    assert_eq!(status, Some(3), "{console}\n{stderr}");
    assert!(console.contains("modes: 4-level paging"), "{console}");
    assert!(stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)"), "{stderr}");
    assert_eq!(instruction_line(&stderr), "instruction at CS:RIP: 48 8b 08  mov rcx,[rax]");
    assert_eq!(reg(&stderr, "rax"), 0x1234_5678_9000);
    assert_eq!(reg(&stderr, "cr2"), 0x1234_5678_9000, "the #PF's address");
    assert!(stderr.contains("l=1"), "64-bit code segment: {stderr}");
    assert!(stderr.contains("guest rebooted (triple fault); exiting with status 3"), "{stderr}");
}

#[test]
fn pae_diagnostic_names_the_faulting_instruction() {
    check_paging_mode("pae", "modes: PAE paging", "mov [80000000h],ebx", 1 << 5, 0x8000_0000);
}

/// PAE (modes.S, MODE 2): PDPTE 0 -> a PD whose entries 0 and 1 map 0-4 MiB with
/// 2 MiB pages; then a write to 0x80000000, whose PDPTE (2) is not present.
#[test]
fn pae_walk_on_the_tables_the_kernel_built() {
    let run = run_bare("pae");
    assert!(run.console.contains("modes: PAE paging"), "{}", run.console);
    let w = walk(&run, "mov [80000000h],ebx");
    assert_eq!(w.mode, PagingMode::Pae);
    assert_eq!(w.mappings, [(0, 0, 2 << 20, true), (2 << 20, 2 << 20, 2 << 20, true)]);
    let expected: &[&str] = if run.paging_on() {
        &["mov [80000000h],ebx"]
    } else {
        &["mov cr0,eax", "mov ebx,5A5A5A5Ah", "mov [80000000h],ebx"]
    };
    assert_eq!(w.insns, expected, "decoded through the PAE tables from RIP {:#x}", run.regs.rip);
    // Identity inside both large pages (the code, its page tables, the top byte).
    for gva in [run.regs.rip, w.ctx.cr3, 0x3f_ffff] {
        assert_eq!(translate(&run, &w, gva, Access::Write), Translation::Ok(gva), "{gva:#x}");
    }
    // PDE 2, and PDPTEs 1-3 (2: the kernel's write), are not present: a #PF.
    assert_eq!(translate(&run, &w, 0x40_0000, Access::Read), Translation::Retry { level: 2, entry: 0 });
    for gva in [0x4000_0000, 0x8000_0000, 0xc000_0000, 0xffff_ffff] {
        assert_eq!(translate(&run, &w, gva, Access::Write), Translation::Retry { level: 3, entry: 0 }, "{gva:#x}");
    }
    eprintln!("pae walk: {:x?}; {}", w.mappings, w.insns.join("; "));
}

#[test]
fn paging32_diagnostic_names_the_faulting_instruction() {
    check_paging_mode("paging32", "modes: 32-bit paging", "mov eax,[40000000h]", 1 << 4, 0x4000_0000);
}

/// 32-bit paging with CR4.PSE (modes.S, MODE 1): PDE 0 maps 0-4 MiB with one 4 MiB
/// page; then a read of 0x40000000, whose PDE (256) is not present.
#[test]
fn paging32_walk_on_the_tables_the_kernel_built() {
    let run = run_bare("paging32");
    assert!(run.console.contains("modes: 32-bit paging"), "{}", run.console);
    let w = walk(&run, "mov eax,[40000000h]");
    assert_eq!(w.mode, PagingMode::Bits32);
    assert_eq!(w.mappings, [(0, 0, 4 << 20, true)]);
    let expected: &[&str] =
        if run.paging_on() { &["mov eax,[40000000h]"] } else { &["mov cr0,eax", "mov eax,[40000000h]"] };
    assert_eq!(w.insns, expected, "decoded through the 32-bit tables from RIP {:#x}", run.regs.rip);
    for gva in [run.regs.rip, w.ctx.cr3, 0x3f_ffff] {
        assert_eq!(translate(&run, &w, gva, Access::Write), Translation::Ok(gva), "{gva:#x}");
    }
    // PDEs 1-1023 (256: the kernel's read) are not present: a #PF.
    for gva in [0x40_0000, 0x4000_0000, 0x8000_0000, 0xffff_ffff] {
        assert_eq!(translate(&run, &w, gva, Access::Read), Translation::Retry { level: 2, entry: 0 }, "{gva:#x}");
    }
    eprintln!("paging32 walk: {:x?}; {}", w.mappings, w.insns.join("; "));
}

/// Real mode: CS base 0xffff0, 16-bit decoding. Where the CPU runs real mode, ud2's
/// #UD escalates to a triple fault; where KVM's emulator runs it (exceptions then go
/// through the IVT whatever IDTR's limit), the kernel's `popcnt` fails that emulator,
/// and skiff, which does not emulate it either, stops and names it.
#[test]
fn real_mode_diagnostic_names_the_faulting_instruction() {
    let (status, console, stderr) = run_mode("real");
    assert!(console.contains("modes: real mode"), "{console}");
    let line = instruction_line(&stderr);
    assert!(stderr.contains("cs=0xffff base=0xffff0"), "real-mode CS: {stderr}");
    assert_eq!(reg(&stderr, "cr0") & 1, 0, "PE clear: {stderr}");
    if line.ends_with("ud2") {
        assert_eq!(status, Some(3), "{stderr}");
        assert!(stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)"), "{stderr}");
    } else {
        assert_eq!(line, "instruction at CS:RIP: f3 0f b8 d8  popcnt bx,ax", "{stderr}");
        assert_eq!(status, Some(1), "{stderr}");
        // Kernel mode (CPL 0): an instruction neither KVM nor skiff emulates stops
        // the machine with a diagnostic naming it.
        assert!(stderr.contains("skiff does not emulate Popcnt"), "{stderr}");
    }
    eprintln!("real: {line}");
}
