//! KVM's paravirtual features (CPUID 0x4000_0001 EAX), each checked on this host
//! before a guest is told about it. A feature is exposed only when the probe saw it
//! do what a guest relies on; everything else is hidden, and KVM's
//! KVM_CAP_ENFORCE_PV_FEATURE_CPUID (set on every vCPU) turns a guest's use of a
//! hidden MSR into the #GP hardware gives, never a hang or a half-working feature.
//!
//! How each kind is checked, in a throw-away VM with an in-kernel irqchip (as the real
//! machine has: async PF needs a kernel LAPIC), at guest CPL 0 with enforcement on:
//! - MSR features: the guest's own `wrmsr` (what Linux does, through KVM's emulator
//!   where kernel mode is emulated), then what KVM did with it: the kvmclock and wall
//!   clock records filled, the steal-time record written on the next entry. Where no
//!   effect can be raised in a probe (PV EOI needs an interrupt injected, async PF a
//!   host page that is paged out, poll control halt polling) the value must read back.
//! - Hypercall features: only where a hypercall at CPL 0 returns (the hypercall probe).
//! - Enforcement itself: a vCPU whose CPUID lacks kvmclock must fault on its MSR.

use kvm_bindings::{CpuId, KVM_CAP_ENFORCE_PV_FEATURE_CPUID, kvm_enable_cap};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::{ProbeResult, ProbeVm};
use crate::vcpu::msr;

/// KVM's paravirtual feature leaf.
pub const PV_LEAF: u32 = 0x4000_0001;

/// What the probe concluded about one feature bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PvVerdict {
    /// Seen working ([`PvFeature::proof`] says how).
    Works,
    /// KVM does not offer it here (not in KVM_GET_SUPPORTED_CPUID).
    NotOffered,
    /// The guest's `wrmsr` faulted.
    MsrFaults,
    /// The MSR was taken but KVM did not do what the feature promises (record not
    /// written, value not kept).
    NoEffect,
    /// It makes hypercalls, and a hypercall at CPL 0 never returns here.
    HypercallsHang,
    /// It builds on the feature with this bit, which is hidden.
    Needs(u8),
    /// skiff does not provide what it needs from the VMM.
    NotInSkiff,
    /// A bit skiff does not know: never exposed unprobed.
    Unknown,
}

impl PvVerdict {
    fn why(self) -> String {
        match self {
            PvVerdict::Works => "works".into(),
            PvVerdict::NotOffered => "not offered by this KVM".into(),
            PvVerdict::MsrFaults => "the guest's wrmsr of its MSR faults here".into(),
            PvVerdict::NoEffect => "its MSR is taken but KVM did not do what it promises here".into(),
            PvVerdict::HypercallsHang => "it makes hypercalls, and a hypercall at CPL 0 never returns from KVM_RUN here".into(),
            PvVerdict::Needs(bit) => format!("needs {}, which is hidden", name_of(bit)),
            PvVerdict::NotInSkiff => "skiff does not provide what it needs".into(),
            PvVerdict::Unknown => "unknown to skiff, so never probed".into(),
        }
    }
}

/// A feature bit of CPUID 0x4000_0001 EAX (Documentation/virt/kvm/x86/cpuid.rst).
pub struct PvFeature {
    pub bit: u8,
    pub name: &'static str,
    /// What a working feature showed the probe (or why it needs no probe).
    pub proof: &'static str,
}

pub const CLOCKSOURCE: u8 = 0;
pub const NOP_IO_DELAY: u8 = 1;
pub const CLOCKSOURCE2: u8 = 3;
pub const ASYNC_PF: u8 = 4;
pub const STEAL_TIME: u8 = 5;
pub const PV_EOI: u8 = 6;
pub const PV_UNHALT: u8 = 7;
pub const PV_TLB_FLUSH: u8 = 9;
pub const ASYNC_PF_VMEXIT: u8 = 10;
pub const PV_SEND_IPI: u8 = 11;
pub const POLL_CONTROL: u8 = 12;
pub const PV_SCHED_YIELD: u8 = 13;
pub const ASYNC_PF_INT: u8 = 14;
pub const MSI_EXT_DEST_ID: u8 = 15;
pub const HC_MAP_GPA_RANGE: u8 = 16;
pub const MIGRATION_CONTROL: u8 = 17;
pub const CLOCKSOURCE_STABLE: u8 = 24;

pub const PV_FEATURES: &[PvFeature] = &[
    PvFeature { bit: CLOCKSOURCE, name: "clocksource", proof: "KVM filled the wall clock and pvclock records after the guest's wrmsr of 0x11/0x12" },
    PvFeature { bit: NOP_IO_DELAY, name: "nop_io_delay", proof: "a hint, no mechanism: the guest skips port-0x80 delays" },
    PvFeature { bit: CLOCKSOURCE2, name: "clocksource2", proof: "KVM filled the wall clock and pvclock records after the guest's wrmsr of 0x4b564d00/01" },
    PvFeature {
        bit: ASYNC_PF,
        name: "async_pf",
        proof: "the guest's wrmsr of 0x4b564d06 (vector), 0x4b564d02 (on, delivered as an interrupt) and 0x4b564d07 (ack) taken, \
                values kept; no async fault raised (that needs host memory paged out)",
    },
    PvFeature { bit: STEAL_TIME, name: "steal_time", proof: "KVM wrote the steal-time record on the entry after the guest's wrmsr of 0x4b564d03" },
    PvFeature {
        bit: PV_EOI,
        name: "pv_eoi",
        proof: "the guest's wrmsr of 0x4b564d04 taken, value kept; the EOI flag itself moves only around an injected interrupt (not raised)",
    },
    PvFeature { bit: PV_UNHALT, name: "pv_unhalt", proof: "hypercalls at CPL 0 return (KVM_HC_KICK_CPU)" },
    PvFeature { bit: PV_TLB_FLUSH, name: "pv_tlb_flush", proof: "no MSR or hypercall: a flag in the steal-time record, which works" },
    PvFeature { bit: ASYNC_PF_VMEXIT, name: "async_pf_vmexit", proof: "goes with async_pf (nested async PF delivery)" },
    PvFeature { bit: PV_SEND_IPI, name: "pv_send_ipi", proof: "hypercalls at CPL 0 return (KVM_HC_SEND_IPI)" },
    PvFeature { bit: POLL_CONTROL, name: "poll_control", proof: "the guest's wrmsr of 0x4b564d05 taken, value kept (host halt polling is not observable)" },
    PvFeature { bit: PV_SCHED_YIELD, name: "pv_sched_yield", proof: "hypercalls at CPL 0 return (KVM_HC_SCHED_YIELD)" },
    PvFeature { bit: ASYNC_PF_INT, name: "async_pf_int", proof: "goes with async_pf (its vector and ack MSRs)" },
    PvFeature { bit: MSI_EXT_DEST_ID, name: "msi_ext_dest_id", proof: "" },
    PvFeature { bit: HC_MAP_GPA_RANGE, name: "hc_map_gpa_range", proof: "" },
    PvFeature { bit: MIGRATION_CONTROL, name: "migration_control", proof: "" },
    PvFeature { bit: CLOCKSOURCE_STABLE, name: "clocksource_stable", proof: "goes with a working kvmclock: says its stable flag may be trusted" },
];

/// The table's name for `bit`, or "bit N".
pub fn name_of(bit: u8) -> String {
    PV_FEATURES.iter().find(|f| f.bit == bit).map_or_else(|| format!("bit {bit}"), |f| f.name.to_string())
}

/// The MSRs that belong to each MSR-based feature: a vCPU whose CPUID hides the
/// feature cannot use them (KVM refuses them, guest and host accesses alike, once
/// enforcement is on).
pub const PV_MSRS: &[(u32, u8)] = &[
    (msr::KVM_WALL_CLOCK, CLOCKSOURCE),
    (msr::KVM_SYSTEM_TIME, CLOCKSOURCE),
    (msr::KVM_WALL_CLOCK_NEW, CLOCKSOURCE2),
    (msr::KVM_SYSTEM_TIME_NEW, CLOCKSOURCE2),
    (msr::KVM_ASYNC_PF_EN, ASYNC_PF),
    (msr::KVM_STEAL_TIME, STEAL_TIME),
    (msr::KVM_PV_EOI_EN, PV_EOI),
    (msr::KVM_POLL_CONTROL, POLL_CONTROL),
    (msr::KVM_ASYNC_PF_INT, ASYNC_PF_INT),
    (msr::KVM_ASYNC_PF_ACK, ASYNC_PF_INT),
    (msr::KVM_MIGRATION_CONTROL, MIGRATION_CONTROL),
];

/// The PV feature bits in `cpuid` (0 without KVM's leaf).
pub fn features_in(cpuid: &CpuId) -> u32 {
    crate::vcpu::cpuid::find_entry(cpuid, PV_LEAF, 0).map_or(0, |e| e.eax)
}

/// The PV MSRs a vCPU with `cpuid` may not use, with why (for the MSR set).
pub fn hidden_msrs(cpuid: &CpuId) -> Vec<(u32, &'static str)> {
    let eax = features_in(cpuid);
    PV_MSRS
        .iter()
        .filter(|(_, bit)| eax & (1 << bit) == 0)
        .map(|(i, _)| (*i, "paravirtual feature hidden from this vCPU's CPUID (0x40000001), enforced: KVM refuses its MSR"))
        .collect()
}

/// Turns on KVM_CAP_ENFORCE_PV_FEATURE_CPUID for `vcpu`: from now on KVM lets the
/// guest (and skiff) use only the PV features its CPUID 0x4000_0001 lists.
pub fn enforce(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let cap = kvm_enable_cap { cap: KVM_CAP_ENFORCE_PV_FEATURE_CPUID, args: [1, 0, 0, 0], ..Default::default() };
    vcpu.enable_cap(&cap)
}

/// What the probe learned about the PV features.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PvFindings {
    /// CPUID 0x4000_0001 EAX as KVM offers it.
    pub offered: u32,
    /// A verdict for every offered bit and every bit of the table.
    pub verdicts: Vec<(u8, PvVerdict)>,
    /// KVM_CAP_ENFORCE_PV_FEATURE_CPUID works: a hidden feature's MSR faulted.
    pub enforced: bool,
    /// kvmclock's record carried PVCLOCK_TSC_STABLE_BIT.
    pub clock_stable: bool,
}

impl PvFindings {
    /// The bits a guest may be told about.
    pub fn exposed(&self) -> u32 {
        self.verdicts.iter().filter(|(_, v)| *v == PvVerdict::Works).fold(0, |m, (b, _)| m | 1u32.checked_shl(u32::from(*b)).unwrap_or(0))
            & self.offered
    }

    fn verdict(&self, bit: u8) -> PvVerdict {
        self.verdicts.iter().find(|(b, _)| *b == bit).map_or(PvVerdict::Unknown, |(_, v)| *v)
    }

    /// Lines for `--stats` and `skiff probe`: every feature, exposed or hidden and
    /// why. `guest` is the EAX the guest really has (a restore's comes from its
    /// snapshot), `enforcing` whether its vCPUs enforce it.
    pub fn report(&self, guest: Option<u32>, enforcing: Option<bool>) -> String {
        let exposed = guest.unwrap_or_else(|| self.exposed());
        let mut out = format!(
            "paravirtual features (CPUID 0x40000001 EAX): KVM offers {:#x}, the guest gets {exposed:#x}{}; {}\n",
            self.offered,
            if guest.is_some_and(|g| g != self.exposed()) { " (this machine's CPUID: a snapshot's, or a test hook)" } else { "" },
            match (enforcing, self.enforced) {
                (Some(true), _) => "enforced on every vCPU (a hidden feature's MSR raises #GP)",
                (Some(false), _) => "NOT enforced: KVM refused KVM_CAP_ENFORCE_PV_FEATURE_CPUID",
                (None, true) => "enforced on every vCPU (probed: a hidden feature's MSR raises #GP)",
                (None, false) => "NOT enforced: KVM_CAP_ENFORCE_PV_FEATURE_CPUID did not make a hidden MSR fault",
            }
        );
        let mut bits: Vec<u8> = PV_FEATURES.iter().map(|f| f.bit).collect();
        let unknown: Vec<u8> = (0..32u8).filter(|b| self.offered & (1 << b) != 0 && !bits.contains(b)).collect();
        bits.extend(unknown);
        for bit in bits {
            let name = name_of(bit);
            let v = self.verdict(bit);
            let line = if exposed & (1 << bit) != 0 {
                let proof = PV_FEATURES.iter().find(|f| f.bit == bit).map_or("", |f| f.proof);
                let stable = if bit == CLOCKSOURCE2 && !self.clock_stable { " (its record does not say stable here)" } else { "" };
                format!("  {name:<18} exposed: {proof}{stable}\n")
            } else if self.offered & (1 << bit) == 0 {
                format!("  {name:<18} hidden: {}\n", PvVerdict::NotOffered.why())
            } else if v == PvVerdict::Works {
                format!("  {name:<18} hidden: works, but this machine's CPUID hides it\n")
            } else {
                format!("  {name:<18} hidden: {}\n", v.why())
            };
            out.push_str(&line);
        }
        out
    }
}

// Guest-physical places in the probe VM for the records KVM writes (below 2 MiB,
// clear of the probe's page tables, code and data).
const PVCLOCK: u64 = 0x30000;
const WALLCLOCK: u64 = 0x30040;
const STEAL: u64 = 0x30080; // 64-byte aligned
const EOI: u64 = 0x30100;
const APF: u64 = 0x30140; // 64-byte aligned
const PROBE_PAGE_BYTES: usize = 0x200;
/// Linux's HYPERVISOR_CALLBACK_VECTOR, the async-PF interrupt it asks for.
const APF_VECTOR: u64 = 0xf3;
/// ASYNC_PF_EN: enabled, sent at CPL 0 too, delivered as an interrupt (what a
/// Linux 6.1 guest writes).
const APF_ENABLED: u64 = 1;
const APF_SEND_ALWAYS: u64 = 2;
const APF_DELIVERY_AS_INT: u64 = 8;

/// `mov ecx, index; mov eax, lo; mov edx, hi; wrmsr`.
fn wrmsr(index: u32, value: u64) -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend_from_slice(&index.to_le_bytes());
    code.push(0xb8);
    code.extend_from_slice(&(value as u32).to_le_bytes());
    code.push(0xba);
    code.extend_from_slice(&((value >> 32) as u32).to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x30]);
    code
}

/// A pvclock-style record (kvmclock's or the wall clock's) that KVM filled: its
/// version (first u32) even and not zero, and `field` (a u32 at `offset`) not zero.
fn record_filled(vm: &ProbeVm, at: u64, offset: u64) -> bool {
    let version: u32 = vm.mem.read_obj(GuestAddress(at)).unwrap_or(0);
    let field: u32 = vm.mem.read_obj(GuestAddress(at + offset)).unwrap_or(0);
    version != 0 && version.is_multiple_of(2) && field != 0
}

/// Runs the guest's `wrmsr`s at CPL 0, then an empty run (KVM writes most records
/// on the entry after the write). Fault: the vCPU is replaced.
fn guest_writes(vm: &mut ProbeVm, cpuid: &CpuId, writes: &[(u32, u64)]) -> Result<ProbeResult, String> {
    let code: Vec<u8> = writes.iter().flat_map(|(i, v)| wrmsr(*i, *v)).collect();
    let r = vm.run(&code, 0);
    if r != ProbeResult::Works {
        vm.fresh_vcpu(cpuid)?;
        enforce(&vm.vcpu).map_err(|e| format!("probe: KVM_ENABLE_CAP (ENFORCE_PV_FEATURE_CPUID): {e}"))?;
        return Ok(r);
    }
    Ok(vm.run(&[], 0))
}

fn verdict_of(r: ProbeResult, effect: bool) -> PvVerdict {
    match r {
        ProbeResult::Works if effect => PvVerdict::Works,
        ProbeResult::Works => PvVerdict::NoEffect,
        _ => PvVerdict::MsrFaults,
    }
}

/// Whether every MSR in `writes` reads back (KVM_GET_MSRS) as written.
fn kept(vm: &ProbeVm, writes: &[(u32, u64)]) -> bool {
    writes.iter().all(|(i, v)| msr::read_one(&vm.vcpu, *i) == Some(*v))
}

/// Probes every PV feature KVM offers in `cpuid`. `hypercalls_return`: the
/// hypercall probe's answer.
pub(super) fn probe(kvm: &Kvm, cpuid: &CpuId, hypercalls_return: bool) -> Result<PvFindings, String> {
    let offered = features_in(cpuid);
    let mut f = PvFindings { offered, ..Default::default() };
    let mut vm = ProbeVm::new_with(kvm, cpuid, true)?;
    // Without enforcement, nothing a guest is not told about is stopped; every
    // feature is probed as the guest will run, with it on.
    let enforceable = enforce(&vm.vcpu).is_ok();
    let zero = [0u8; PROBE_PAGE_BYTES];
    vm.mem.write_slice(&zero, GuestAddress(PVCLOCK)).map_err(|e| format!("probe: {e}"))?;
    let has = |bit: u8| offered & (1 << bit) != 0;
    let mut verdicts: Vec<(u8, PvVerdict)> = Vec::new();
    let mut set = |bit: u8, v: PvVerdict| verdicts.push((bit, if has(bit) { v } else { PvVerdict::NotOffered }));

    // kvmclock, new MSRs then old: the wall clock is written at the wrmsr, the
    // pvclock record on the next entry (tsc_to_system_mul at offset 24, never 0).
    let clock = |vm: &mut ProbeVm, wall: u32, system: u32| -> Result<(PvVerdict, u8), String> {
        vm.mem.write_slice(&zero, GuestAddress(PVCLOCK)).map_err(|e| format!("probe: {e}"))?;
        let r = guest_writes(vm, cpuid, &[(wall, WALLCLOCK), (system, PVCLOCK | 1)])?;
        let filled = record_filled(vm, WALLCLOCK, 4) && record_filled(vm, PVCLOCK, 24);
        let flags: u8 = vm.mem.read_obj(GuestAddress(PVCLOCK + 29)).unwrap_or(0);
        // Off again, so KVM stops writing into the probe's memory.
        guest_writes(vm, cpuid, &[(system, 0)])?;
        Ok((verdict_of(r, filled), flags))
    };
    let (v2, flags) = if has(CLOCKSOURCE2) { clock(&mut vm, msr::KVM_WALL_CLOCK_NEW, msr::KVM_SYSTEM_TIME_NEW)? } else { (PvVerdict::NotOffered, 0) };
    let (v1, _) = if has(CLOCKSOURCE) { clock(&mut vm, msr::KVM_WALL_CLOCK, msr::KVM_SYSTEM_TIME)? } else { (PvVerdict::NotOffered, 0) };
    set(CLOCKSOURCE2, v2);
    set(CLOCKSOURCE, v1);
    f.clock_stable = flags & 1 != 0;
    let clock_ok = v1 == PvVerdict::Works || v2 == PvVerdict::Works;
    set(CLOCKSOURCE_STABLE, if clock_ok { PvVerdict::Works } else { PvVerdict::Needs(CLOCKSOURCE2) });
    set(NOP_IO_DELAY, PvVerdict::Works);

    // Steal time: the record's version (offset 8) is bumped by KVM on the next entry.
    let steal = if has(STEAL_TIME) {
        let r = guest_writes(&mut vm, cpuid, &[(msr::KVM_STEAL_TIME, STEAL | 1)])?;
        let version: u32 = vm.mem.read_obj(GuestAddress(STEAL + 8)).unwrap_or(0);
        guest_writes(&mut vm, cpuid, &[(msr::KVM_STEAL_TIME, 0)])?;
        verdict_of(r, version != 0 && version.is_multiple_of(2))
    } else {
        PvVerdict::NotOffered
    };
    set(STEAL_TIME, steal);
    set(PV_TLB_FLUSH, if steal == PvVerdict::Works { PvVerdict::Works } else { PvVerdict::Needs(STEAL_TIME) });

    // PV EOI and poll control: the value must stay.
    for (bit, index, value) in [(PV_EOI, msr::KVM_PV_EOI_EN, EOI | 1), (POLL_CONTROL, msr::KVM_POLL_CONTROL, 0)] {
        let v = if has(bit) {
            let r = guest_writes(&mut vm, cpuid, &[(index, value)])?;
            let v = verdict_of(r, kept(&vm, &[(index, value)]));
            guest_writes(&mut vm, cpuid, &[(index, if bit == POLL_CONTROL { 1 } else { 0 })])?;
            v
        } else {
            PvVerdict::NotOffered
        };
        set(bit, v);
    }

    // Async PF as Linux 6.1 turns it on: the vector, then the enable with delivery as
    // an interrupt, then an acknowledgement.
    let apf = if has(ASYNC_PF) && has(ASYNC_PF_INT) {
        let writes = [(msr::KVM_ASYNC_PF_INT, APF_VECTOR), (msr::KVM_ASYNC_PF_EN, APF | APF_ENABLED | APF_SEND_ALWAYS | APF_DELIVERY_AS_INT)];
        let r = guest_writes(&mut vm, cpuid, &writes)?;
        let r = if r == ProbeResult::Works { guest_writes(&mut vm, cpuid, &[(msr::KVM_ASYNC_PF_ACK, 1)])? } else { r };
        let v = verdict_of(r, kept(&vm, &writes));
        guest_writes(&mut vm, cpuid, &[(msr::KVM_ASYNC_PF_EN, 0)])?;
        v
    } else {
        PvVerdict::Needs(ASYNC_PF_INT)
    };
    set(ASYNC_PF, apf);
    set(ASYNC_PF_INT, apf);
    set(ASYNC_PF_VMEXIT, if apf == PvVerdict::Works { PvVerdict::Works } else { PvVerdict::Needs(ASYNC_PF) });

    let hc = if hypercalls_return { PvVerdict::Works } else { PvVerdict::HypercallsHang };
    for bit in [PV_UNHALT, PV_SEND_IPI, PV_SCHED_YIELD] {
        set(bit, hc);
    }
    // Extended MSI destination IDs need the VMM's I/O APIC and MSI routing to take
    // them; MAP_GPA_RANGE exits to the VMM (KVM_EXIT_HYPERCALL), which skiff does not
    // handle; migration control is for encrypted guests' live migration.
    for bit in [MSI_EXT_DEST_ID, HC_MAP_GPA_RANGE, MIGRATION_CONTROL] {
        set(bit, PvVerdict::NotInSkiff);
    }
    for bit in (0..32u8).filter(|b| has(*b)) {
        if !verdicts.iter().any(|(b, _)| *b == bit) {
            verdicts.push((bit, PvVerdict::Unknown));
        }
    }
    f.verdicts = verdicts;

    // Enforcement: a vCPU told no kvmclock must fault on its MSR.
    f.enforced = enforceable && {
        let mut without = cpuid.clone();
        crate::vcpu::cpuid::clear(&mut without, crate::vcpu::cpuid::FeatureBit { leaf: PV_LEAF, subleaf: 0, reg: crate::vcpu::cpuid::Reg::Eax, bit: CLOCKSOURCE2 });
        vm.fresh_vcpu(&without)?;
        enforce(&vm.vcpu).is_ok() && vm.run(&wrmsr(msr::KVM_SYSTEM_TIME_NEW, 0), 0) == ProbeResult::Faults
    };
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings() -> PvFindings {
        PvFindings {
            // clocksource2, steal time, PV_UNHALT, PV_TLB_FLUSH, and a bit nobody knows (30).
            offered: (1 << CLOCKSOURCE2) | (1 << STEAL_TIME) | (1 << PV_UNHALT) | (1 << PV_TLB_FLUSH) | (1 << 30),
            verdicts: vec![
                (CLOCKSOURCE2, PvVerdict::Works),
                (STEAL_TIME, PvVerdict::NoEffect),
                (PV_UNHALT, PvVerdict::HypercallsHang),
                (PV_TLB_FLUSH, PvVerdict::Needs(STEAL_TIME)),
                (30, PvVerdict::Unknown),
                // Works, but not offered: never exposed.
                (POLL_CONTROL, PvVerdict::Works),
            ],
            enforced: true,
            clock_stable: true,
        }
    }

    #[test]
    fn only_what_works_and_is_offered_is_exposed() {
        assert_eq!(findings().exposed(), 1 << CLOCKSOURCE2);
        // A hostile cache's bit numbers cannot overflow the mask.
        let odd = PvFindings { offered: u32::MAX, verdicts: vec![(200, PvVerdict::Works), (3, PvVerdict::Works)], ..Default::default() };
        assert_eq!(odd.exposed(), 1 << 3);
    }

    #[test]
    fn the_report_says_why_each_is_hidden() {
        let r = findings().report(None, None);
        assert!(r.starts_with("paravirtual features (CPUID 0x40000001 EAX): KVM offers 0x400002a8, the guest gets 0x8; enforced"), "{r}");
        assert!(r.contains("  clocksource2       exposed: KVM filled"), "{r}");
        assert!(r.contains("  steal_time         hidden: its MSR is taken but KVM did not do"), "{r}");
        assert!(r.contains("  pv_tlb_flush       hidden: needs steal_time, which is hidden"), "{r}");
        assert!(r.contains("  pv_unhalt          hidden: it makes hypercalls"), "{r}");
        assert!(r.contains("  bit 30             hidden: unknown to skiff"), "{r}");
        assert!(r.contains("  poll_control       hidden: not offered by this KVM"), "{r}");
        let restored = findings().report(Some(0), Some(false));
        assert!(restored.contains("  clocksource2       hidden: works, but this machine's CPUID hides it"), "{restored}");
        assert!(restored.contains("the guest gets 0x0 (this machine's CPUID"), "{restored}");
        assert!(restored.contains("NOT enforced"), "{restored}");
    }

    #[test]
    fn hidden_features_take_their_msrs_with_them() {
        let cpuid = CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 { function: PV_LEAF, eax: 1 << CLOCKSOURCE2, ..Default::default() }]).unwrap();
        let hidden: Vec<u32> = hidden_msrs(&cpuid).into_iter().map(|(i, _)| i).collect();
        assert!(!hidden.contains(&msr::KVM_SYSTEM_TIME_NEW) && !hidden.contains(&msr::KVM_WALL_CLOCK_NEW));
        for i in [msr::KVM_STEAL_TIME, msr::KVM_ASYNC_PF_EN, msr::KVM_PV_EOI_EN, msr::KVM_POLL_CONTROL, msr::KVM_SYSTEM_TIME] {
            assert!(hidden.contains(&i), "{i:#x}");
        }
        assert_eq!(wrmsr(0x4b56_4d01, 0x1_0000_2001), [0xb9, 0x01, 0x4d, 0x56, 0x4b, 0xb8, 0x01, 0x20, 0, 0, 0xba, 1, 0, 0, 0, 0x0f, 0x30]);
    }
}
