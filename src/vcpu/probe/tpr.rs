//! What a TPR write costs on this host, through MMIO and through the patched helper
//! (src/tpr/): `--tpr-patch=auto` engages patching only where the helper is cheaper.
//!
//! A throw-away VM with an in-kernel irqchip runs 32-bit protected-mode code at CPL 0
//! (where 32-bit kernels write the TPR), paging off, with the real helper at its
//! address and a vAPIC slot set, TPR reports off (what an unpatched guest pays is the
//! access alone). Three loops of N iterations, timed around KVM_RUN on the host and
//! interleaved, best of two each: `mov [TPR], eax`, the patched form of the same
//! (`call` the helper's set-from-EAX entry), and an empty loop, subtracted from both.
//!
//! Then whether KVM takes a TPR the guest wrote into its vAPIC slot at the exit that
//! follows (`movb [slot], 0x40; out`, then KVM_GET_LAPIC). KVM reads the slot after
//! the guest leaves the CPU; where guest kernel mode runs through KVM's emulator,
//! the write and the `out` are emulated after that read, the byte waits for a later
//! one, and KVM's own write of the slot before an entry that handles an event can
//! overwrite it first. There the helper hands every TPR write to skiff (the poll),
//! which gives it to KVM (`helper_for`, vcpu/exit.rs).

use std::time::Instant;

use kvm_bindings::{CpuId, kvm_userspace_memory_region};
use serde::{Deserialize, Serialize};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::x86::boot::{BOOT_GDT, SEL_CODE32, SEL_DATA, kvm_segment_from_gdt};

/// What one TPR write costs here, in nanoseconds, and how KVM takes the vAPIC slot.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TprCost {
    pub mmio_ns: f64,
    pub patched_ns: f64,
    /// Iterations per loop.
    pub iterations: u32,
    /// KVM took a TPR written into the vAPIC slot at the next exit.
    pub vapic_at_exit: bool,
    /// An exit to skiff and back from CPL 0 (`out`, then KVM_RUN again): what each
    /// TPR access costs where the host reports it (KVM_TPR_ACCESS_REPORTING), the
    /// unit of bench/tpr.py's model of hosts where every TPR access exits.
    pub exit_ns: f64,
}

impl TprCost {
    pub fn describe(&self) -> String {
        format!(
            "a TPR write at CPL 0 measured {:.0} ns through MMIO, {:.0} ns through the patched helper ({:.1}x), {} iterations; an exit to skiff and back {:.0} ns",
            self.mmio_ns,
            self.patched_ns,
            self.patched_ns / self.mmio_ns.max(0.001),
            self.iterations,
            self.exit_ns
        ) + if self.vapic_at_exit { "" } else { "; a TPR written into the vAPIC slot was not KVM's at the next exit" }
    }
}

const MEM: usize = 1 << 20;
const GDT: u64 = 0x500;
const CODE: u64 = 0x1000;
const STACK: u64 = 0x8000;
const DONE_PORT: u8 = 0x10;
/// The port of the exit loop's `out` (nothing claims it: KVM exits to skiff).
const EXIT_PORT: u8 = 0x11;
/// Exits timed: about 1 ms where an exit costs 10 us.
const EXITS: u32 = 100;
const APIC: u32 = 0xfee0_0000;

/// The loop: enable the APIC (SVR, so KVM syncs the vAPIC), ECX = n, then `body`
/// n times, then `out DONE_PORT`.
fn program(body: &[u8], n: u32) -> Vec<u8> {
    let mut p = vec![0xc7, 0x05];
    p.extend((APIC + 0xf0).to_le_bytes());
    p.extend(0x1ffu32.to_le_bytes());
    p.push(0x31); // xor eax, eax: TPR 0, nothing to poll for
    p.push(0xc0);
    p.push(0xb9); // mov ecx, n
    p.extend(n.to_le_bytes());
    let top = p.len();
    p.extend(body);
    p.push(0x49); // dec ecx
    let back = top as i64 - (p.len() as i64 + 2);
    p.extend([0x75, back as i8 as u8]); // jnz top
    p.extend([0xe6, DONE_PORT]);
    p
}

/// `call rel32` to the helper's set-from-EAX entry, from CODE + `at`.
fn call_helper(at: u64) -> [u8; 5] {
    let target = crate::tpr::HELPER_GPA + u64::from(crate::tpr::decode::entry::SET_EAX);
    let rel = (target.wrapping_sub(CODE + at + 5) as u32).to_le_bytes();
    [0xe8, rel[0], rel[1], rel[2], rel[3]]
}

/// A throw-away VM for the measurement: one vCPU in 32-bit protected mode (paging
/// off, flat segments), the in-kernel irqchip, the helper as `variant` and the
/// hypercall page at their addresses; with `vapic`, vCPU 0's vAPIC slot set. Fields
/// drop in order: the vCPU and the VM before the memory they map.
struct TprVm {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
    mem: GuestMemoryMmap,
}

impl TprVm {
    fn new(kvm: &Kvm, cpuid: &CpuId, variant: crate::tpr::Variant, vapic: bool) -> Result<TprVm, String> {
        let vm = kvm.create_vm().map_err(|e| format!("probe: KVM_CREATE_VM: {e}"))?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).map_err(|e| format!("probe: guest memory: {e}"))?;
        let host = mem.get_host_address(GuestAddress(0)).map_err(|e| format!("probe: {e}"))?;
        let region = kvm_userspace_memory_region { slot: 0, guest_phys_addr: 0, memory_size: MEM as u64, userspace_addr: host as u64, flags: 0 };
        // SAFETY: the region maps `mem`, which outlives the VM (TprVm drops it last).
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("probe: KVM_SET_USER_MEMORY_REGION: {e}"))?;
        vm.create_irq_chip().map_err(|e| format!("probe: KVM_CREATE_IRQCHIP: {e}"))?;
        let err = |e: vm_memory::GuestMemoryError| format!("probe: {e}");
        for (i, e) in BOOT_GDT.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(GDT + i as u64 * 8)).map_err(err)?;
        }
        crate::tpr::write_helper(&mem, variant)?;
        crate::hypercall::write_page(&mem)?;
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("probe: KVM_CREATE_VCPU: {e}"))?;
        vcpu.set_cpuid2(cpuid).map_err(|e| format!("probe: KVM_SET_CPUID2: {e}"))?;
        if vapic {
            crate::tpr::set_vapic(&vcpu, 0)?;
        }
        let mut sregs = vcpu.get_sregs().map_err(|e| format!("probe: KVM_GET_SREGS: {e}"))?;
        sregs.gdt.base = GDT;
        sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
        sregs.cs = kvm_segment_from_gdt(BOOT_GDT[3], SEL_CODE32);
        let data = kvm_segment_from_gdt(BOOT_GDT[2], SEL_DATA);
        (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs) = (data, data, data, data, data);
        sregs.cr0 = 0x11; // PE, ET
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs).map_err(|e| format!("probe: KVM_SET_SREGS: {e}"))?;
        Ok(TprVm { vcpu, _vm: vm, mem })
    }

    /// Runs `code` from CODE (EAX = `eax`) to its first exit; the port of an `out`
    /// and how long KVM_RUN took, or None for any other exit.
    fn run(&mut self, code: &[u8], eax: u32) -> Option<(u16, u128)> {
        self.mem.write_slice(code, GuestAddress(CODE)).ok()?;
        let mut regs = self.vcpu.get_regs().ok()?;
        (regs.rip, regs.rsp, regs.rflags, regs.rax) = (CODE, STACK, 2, u64::from(eax));
        self.vcpu.set_regs(&regs).ok()?;
        let t = Instant::now();
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(p, _)) => Some((p, t.elapsed().as_nanos())),
            _ => None,
        }
    }
}

/// Measures both paths; None where a loop does not run as expected (no irqchip, an
/// exit on the way): then nothing is engaged by `auto`.
pub(super) fn measure(kvm: &Kvm, cpuid: &CpuId) -> Result<Option<TprCost>, String> {
    // One vCPU; the poll is never reached (TPR 0, nothing requested).
    let mut vm = TprVm::new(kvm, cpuid, crate::tpr::Variant { cpus: 1, late: false }, true)?;
    let mmio_body = {
        let mut b = vec![0xa3];
        b.extend((APIC + 0x80).to_le_bytes());
        b
    };
    // The patched loop's call sits where the MMIO store would: after the prologue.
    let at = program(&[], 0).len() as u64 - 5; // prologue length (the empty program less dec/jnz/out)
    let mut run = |body: &[u8], n: u32| -> Option<u128> {
        match vm.run(&program(body, n), 0)? {
            (p, ns) if p == u16::from(DONE_PORT) => Some(ns),
            _ => None,
        }
    };
    let patched_body = call_helper(at);
    // Enough iterations for the MMIO loop to take about 0.3 ms (bounded both ways):
    // where the helper is 40x slower its loop then takes about 12 ms, and the whole
    // measurement (best of two) stays a small part of a fresh probe.
    let Some(first) = run(&mmio_body, 64) else { return Ok(None) };
    let n = ((300_000u128 * 64) / first.max(1)).clamp(64, 1 << 16) as u32;
    let mut best = [u128::MAX; 3];
    for _ in 0..2 {
        for (i, body) in [&mmio_body[..], &patched_body[..], &[][..]].into_iter().enumerate() {
            let Some(ns) = run(body, n) else { return Ok(None) };
            if let Some(b) = best.get_mut(i) {
                *b = (*b).min(ns);
            }
        }
    }
    let per = |x: u128| x.saturating_sub(best[2]) as f64 / f64::from(n);
    let Some(vapic_at_exit) = vapic_at_exit(&mut vm) else { return Ok(None) };
    let Some(exit_ns) = exit_cost(&mut vm) else { return Ok(None) };
    Ok(Some(TprCost { mmio_ns: per(best[0]), patched_ns: per(best[1]), iterations: n, vapic_at_exit, exit_ns }))
}

/// Nanoseconds per exit to skiff and back: a loop of [`EXITS`] `out`s, each ending
/// KVM_RUN and resumed at once, less the same loop without them; best of two.
fn exit_cost(vm: &mut TprVm) -> Option<f64> {
    let mut best = [u128::MAX; 2];
    for _ in 0..2 {
        let empty = vm.run(&program(&[], EXITS), 0)?;
        if empty.0 != u16::from(DONE_PORT) {
            return None;
        }
        let t = Instant::now();
        let mut port = vm.run(&program(&[0xe6, EXIT_PORT], EXITS), 0)?.0;
        let mut exits = 0;
        while port == u16::from(EXIT_PORT) && exits < EXITS {
            exits += 1;
            port = match vm.vcpu.run() {
                Ok(VcpuExit::IoOut(p, _)) => p,
                _ => return None,
            };
        }
        if port != u16::from(DONE_PORT) || exits != EXITS {
            return None;
        }
        best = [best[0].min(empty.1), best[1].min(t.elapsed().as_nanos())];
    }
    Some(best[1].saturating_sub(best[0]) as f64 / f64::from(EXITS))
}

/// Whether a TPR the guest writes into its vAPIC slot is KVM's at the next exit (the
/// loops above left the TPR 0). None where the run does not go as expected.
fn vapic_at_exit(vm: &mut TprVm) -> Option<bool> {
    const TPR: u8 = 0x40;
    let mut code = vec![0xc6, 0x05]; // mov byte [slot 0], TPR
    code.extend((crate::tpr::vapic_gpa(0) as u32).to_le_bytes());
    code.extend([TPR, 0xe6, DONE_PORT]); // out DONE_PORT
    if vm.run(&code, 0)?.0 != u16::from(DONE_PORT) {
        return None;
    }
    let lapic = vm.vcpu.get_lapic().ok()?;
    Some(crate::vcpu::state::lapic_get(&lapic, crate::vcpu::state::apic_reg::TPR) == u32::from(TPR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loops_decode_as_intended() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        let at = program(&[], 0).len() as u64 - 5;
        let body = call_helper(at);
        let p = program(&body, 3);
        let mut d = Decoder::with_ip(32, &p, CODE, DecoderOptions::NONE);
        let got: Vec<_> = std::iter::from_fn(|| d.can_decode().then(|| d.decode())).collect();
        let m: Vec<Mnemonic> = got.iter().map(|i| i.mnemonic()).collect();
        assert_eq!(m, [Mnemonic::Mov, Mnemonic::Xor, Mnemonic::Mov, Mnemonic::Call, Mnemonic::Dec, Mnemonic::Jne, Mnemonic::Out]);
        assert_eq!(got[3].near_branch32() as u64, crate::tpr::HELPER_GPA + 0x10);
        assert_eq!(got[5].near_branch32() as u64, got[3].ip());
    }

    /// The helper's decision after a write, run by KVM on crafted vAPIC slots (no
    /// vAPIC address set, so KVM leaves the slot alone): poll exactly when the new
    /// TPR unmasks the highest requested interrupt, which is the path hosts where KVM
    /// takes the byte at the next exit use (not this project's). With several vCPUs
    /// the slot is CPUID's initial APIC ID's (3 here).
    #[test]
    fn the_helper_polls_exactly_when_a_write_unmasks_a_request() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let mut cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ebx = (e.ebx & 0x00ff_ffff) | (3 << 24);
        }
        // (slot bytes: TPR, in-service class, -, highest request; new TPR; every write polls; poll expected)
        let cases: [([u8; 4], u8, bool, bool); 9] = [
            ([0x60, 0x00, 0, 0x50], 0x40, false, true),
            ([0x60, 0x00, 0, 0x50], 0x50, false, false), // the same class still masks
            ([0x60, 0x00, 0, 0x50], 0x70, false, false), // raising never polls
            ([0x60, 0x50, 0, 0x50], 0x20, false, false), // its class is in service
            ([0x60, 0x40, 0, 0x51], 0x20, false, true),
            ([0x60, 0x00, 0, 0x00], 0x00, false, false), // nothing requested
            ([0x60, 0x00, 0, 0x5f], 0x4f, false, true),  // sub-classes play no part
            ([0x60, 0x00, 0, 0x50], 0x70, true, true),   // every write handed to skiff
            ([0x60, 0x00, 0, 0x00], 0x00, true, true),
        ];
        let mut code = call_helper(0).to_vec();
        code.extend([0xe6, DONE_PORT]);
        for cpus in [1u8, 2] {
            let slot = if cpus == 1 { 0 } else { 3 };
            for (bytes, new, every, want_poll) in cases {
                let variant = crate::tpr::Variant { cpus, late: every };
                let mut vm = TprVm::new(&kvm, &cpuid, variant, false).unwrap();
                vm.mem.write_slice(&bytes, GuestAddress(crate::tpr::vapic_gpa(slot))).unwrap();
                let (port, _) = vm.run(&code, u32::from(new)).expect("an out");
                let case = format!("{cpus} vCPUs, slot {bytes:02x?}, new {new:#x}, every write {every}");
                if want_poll {
                    assert_eq!(port, crate::hypercall::PORT_DIRECT, "{case}: no poll");
                    assert_eq!(vm.vcpu.get_regs().unwrap().rax & 0xffff_ffff, crate::hypercall::HC_TPR_POLL, "{case}");
                } else {
                    assert_eq!(port, u16::from(DONE_PORT), "{case}: a poll");
                }
                let mut now = [0u8; 4];
                vm.mem.read_slice(&mut now, GuestAddress(crate::tpr::vapic_gpa(slot))).unwrap();
                assert_eq!(now[0], new, "{case}: the TPR byte");
                assert_eq!(now[1..], bytes[1..], "{case}: the helper wrote only the TPR");
            }
        }
    }

    /// The helper's read (`mov eax, [TPR]`'s entry): where KVM takes the slot at the
    /// next exit it reads the slot and makes no exit; where KVM takes it late it asks
    /// skiff first (HC_TPR_READ), so an MMIO write through a site not yet patched is
    /// never missed.
    #[test]
    fn the_helper_asks_skiff_before_a_read_exactly_where_kvm_takes_the_slot_late() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let target = crate::tpr::HELPER_GPA + u64::from(crate::tpr::decode::entry::GET_REG);
        let rel = (target.wrapping_sub(CODE + 5) as u32).to_le_bytes();
        let code = [0xe8, rel[0], rel[1], rel[2], rel[3], 0xe6, DONE_PORT];
        for late in [false, true] {
            let mut vm = TprVm::new(&kvm, &cpuid, crate::tpr::Variant { cpus: 1, late }, false).unwrap();
            vm.mem.write_slice(&[0x5a], GuestAddress(crate::tpr::vapic_gpa(0))).unwrap();
            let (port, _) = vm.run(&code, 0x1234_5678).expect("an out");
            let rax = vm.vcpu.get_regs().unwrap().rax & 0xffff_ffff;
            if late {
                assert_eq!((port, rax), (crate::hypercall::PORT_DIRECT, crate::hypercall::HC_TPR_READ));
            } else {
                assert_eq!((port, rax), (u16::from(DONE_PORT), 0x5a), "the slot's byte, zero-extended");
            }
        }
    }
}
