//! vCPU state on this host's KVM: the saved MSR set accounts for every MSR KVM
//! reports, RESET state survives a put and a get, and the whole state (vCPU and
//! chipset) round-trips from a paused guest into a fresh VM bit-exact, except the
//! fields KVM documents as volatile, each named here.

mod common;

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use skiff::vcpu::cpuid;
use skiff::vcpu::msr::{self, MsrSet};
use skiff::vcpu::reset::{self, ResetKind, Vendor};
use skiff::vcpu::state::{VcpuState, VmState, apic_reg, lapic_get};
use skiff::vcpu::{BootEntry, StateSpec, Vcpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const CODE: u64 = 0x1000;

/// 32-bit code: set registers and MSRs a guest would, stop at `out 0x80`; then
/// `out 0x81` after the restore proves the guest continues where it was.
const PROGRAM: &[u8] = &[
    0xb9, 0x77, 0x02, 0x00, 0x00, // mov ecx, 0x277 (PAT)
    0xb8, 0x06, 0x01, 0x06, 0x01, // mov eax, 0x01060106
    0xba, 0x07, 0x04, 0x00, 0x00, // mov edx, 0x407
    0x0f, 0x30, // wrmsr
    0xb9, 0xff, 0x02, 0x00, 0x00, // mov ecx, 0x2ff (MTRR_DEF_TYPE)
    0xb8, 0x06, 0x0c, 0x00, 0x00, // mov eax, 0xc06
    0x31, 0xd2, // xor edx, edx
    0x0f, 0x30, // wrmsr
    0xbb, 0xef, 0xbe, 0xad, 0xde, // mov ebx, 0xdeadbeef
    0xbe, 0x34, 0x12, 0x00, 0x00, // mov esi, 0x1234
    0xe6, 0x80, // out 0x80, al
    0x81, 0xc6, 0x01, 0x00, 0x00, 0x00, // add esi, 1
    0xe6, 0x81, // out 0x81, al
    0xf4, // hlt
];

struct Machine {
    vcpu: Vcpu,
    vm: VmFd,
}

fn machine(kvm: &Kvm) -> Machine {
    machine_with(kvm, kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("CPUID"))
}

/// A machine whose vCPU has `cpuid` (which gates the MSRs KVM lets it use).
fn machine_with(kvm: &Kvm, cpuid: CpuId) -> Machine {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    vm.create_irq_chip().expect("irqchip");
    vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() }).expect("PIT");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
    mem.write_slice(PROGRAM, GuestAddress(CODE)).expect("program");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address");
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 2 << 20,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the mapping lives in `mem`, which the vCPU (and so the machine) keeps.
    unsafe { vm.set_user_memory_region(region) }.expect("memory region");
    let fd = vm.create_vcpu(0).expect("vCPU");
    fd.set_cpuid2(&cpuid).expect("set CPUID");
    // As skiff's vCPUs: KVM enforces the PV features CPUID lists.
    skiff::vcpu::probe::pv::enforce(&fd).expect("KVM_CAP_ENFORCE_PV_FEATURE_CPUID");
    let msrs = MsrSet::discover(kvm, &fd, &skiff::vcpu::probe::pv::hidden_msrs(&cpuid)).expect("MSR set");
    let amd = cpuid::find_entry(&cpuid, 0, 0).is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth"));
    let spec = Arc::new(StateSpec {
        msrs,
        xsave_size: usize::try_from(vm.check_extension_int(kvm_ioctls::Cap::Xsave2)).unwrap_or(0),
        sregs2: vm.check_extension_raw(kvm_bindings::KVM_CAP_SREGS2 as libc::c_ulong) > 0,
        tsc_khz: fd.get_tsc_khz().is_ok(),
        vendor: if amd { Vendor::Amd } else { Vendor::Intel },
        signature: cpuid::find_entry(&cpuid, 1, 0).map_or(0, |e| e.eax),
    });
    let mut vcpu = Vcpu::new(
        0,
        fd,
        mem,
        Arc::default(),
        Arc::new(skiff::control::Control::new()),
        Arc::new(skiff::vcpu::xsave::XsaveLayout::from_cpuid(&cpuid)),
        spec,
    );
    vcpu.capture_pristine().expect("pristine state");
    Machine { vcpu, vm }
}

#[test]
fn every_msr_kvm_reports_is_saved_or_explained() {
    common::require_kvm();
    let kvm = Kvm::new().expect("/dev/kvm");
    let m = machine(&kvm);
    let set = &m.vcpu.spec.msrs;
    assert!(!set.kvm_list.is_empty(), "KVM_GET_MSR_INDEX_LIST is empty");
    let mut unaccounted = Vec::new();
    let mut not_saved = Vec::new();
    for &index in &set.kvm_list {
        match set.why_not_saved(index) {
            None => {}
            Some(why) if why.starts_with("UNACCOUNTED") => unaccounted.push(format!("{index:#x}")),
            Some(why) => not_saved.push(format!("  {index:#010x}: {why}")),
        }
    }
    let refused: Vec<String> = set
        .refused
        .iter()
        .filter(|d| !set.kvm_list.contains(&d.index))
        .map(|d| format!("  {:#010x}: {}: {}", d.index, d.refusal.as_str(), d.why.unwrap_or("UNEXPLAINED")))
        .collect();
    eprintln!(
        "KVM lists {} MSRs; skiff saves {} (with the MSRs CPUID implies); of KVM's list not saved:\n{}\nimplied but refused here:\n{}",
        set.kvm_list.len(),
        set.saved.len(),
        not_saved.join("\n"),
        refused.join("\n")
    );
    assert!(unaccounted.is_empty(), "MSRs neither saved nor explained: {}", unaccounted.join(", "));
    // The MSRs KVM's list leaves out but the architecture implies: every MTRR, PAT...
    let vcnt = msr::read_one(&m.vcpu.fd, msr::IA32_MTRRCAP).expect("MTRRcap") as u32 & 0xff;
    assert!(vcnt > 0, "MTRRcap.VCNT");
    for index in msr::implied(vcnt) {
        let mtrr_or_pat = (0x200..=0x2ff).contains(&index);
        if mtrr_or_pat {
            assert!(set.saved.contains(&index), "MSR {index:#x} (MTRR/PAT) is not saved: {:?}", set.why_not_saved(index));
        }
    }
}

/// The CPUIDs a skiff vCPU can have on this host: KVM's supported CPUID (what the
/// other tests here use); that with everything hidden the probe finds failing here
/// (what `skiff run` gives the guest on this host); and that with every gated feature
/// and every hypercall feature hidden (the most any host's probe can take away).
fn cpuid_variants(kvm: &Kvm) -> Vec<(&'static str, CpuId)> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("CPUID");
    let quirks = skiff::vcpu::probe::probe_host(kvm, &supported).expect("probe");
    let mut probed = supported.clone();
    for (feature, _) in &quirks.hidden {
        cpuid::hide(&mut probed, feature);
    }
    let mut all_hidden = supported.clone();
    for feature in cpuid::GATED {
        cpuid::hide(&mut all_hidden, feature);
    }
    // KVM's PV features: those the probe saw work; none at all.
    for (c, keep) in [(&mut probed, quirks.pv.exposed()), (&mut all_hidden, 0)] {
        for e in c.as_mut_slice() {
            if e.function == skiff::vcpu::probe::pv::PV_LEAF {
                e.eax &= keep;
            }
        }
    }
    vec![
        ("KVM's supported CPUID", supported),
        ("the CPUID skiff gives the guest here", cpuid::normalize(&probed, 0, 1)),
        ("every gated and PV feature hidden", cpuid::normalize(&all_hidden, 0, 1)),
    ]
}

/// Every MSR discovery drops (KVM refuses to read it, or to take back what it read)
/// must have a reason written by a person on msr::MAY_BE_REFUSED: a refusal nobody
/// explained fails here, whatever CPUID the vCPU has.
#[test]
fn every_msr_discovery_drops_has_a_written_reason() {
    common::require_kvm();
    let kvm = Kvm::new().expect("/dev/kvm");
    let mut unexplained = Vec::new();
    for (name, cpuid) in cpuid_variants(&kvm) {
        let m = machine_with(&kvm, cpuid);
        let set = &m.vcpu.spec.msrs;
        eprintln!("{name}: {} MSRs saved, {} dropped", set.saved.len(), set.refused.len());
        for d in &set.refused {
            eprintln!("  {:#010x}: {}: {}", d.index, d.refusal.as_str(), d.why.unwrap_or("UNEXPLAINED"));
        }
        unexplained.extend(set.unexplained().iter().map(|d| format!("{:#x} ({}; {name})", d.index, d.refusal.as_str())));
    }
    assert!(
        unexplained.is_empty(),
        "MSRs dropped without a written reason (add each to msr::MAY_BE_REFUSED once you know why): {}",
        unexplained.join(", ")
    );
}

#[test]
fn reset_state_reads_back_as_put() {
    common::require_kvm();
    let kvm = Kvm::new().expect("/dev/kvm");
    let mut m = machine(&kvm);
    m.vcpu.reset(ResetKind::Power).expect("RESET");
    let s = m.vcpu.get_state().expect("get");
    let r = s.regs;
    let sr = s.sregs.as_sregs();
    assert_eq!((r.rip, r.rflags), (reset::RIP, reset::RFLAGS));
    assert_eq!(r.rdx as u32, m.vcpu.spec.signature);
    assert_eq!((sr.cs.selector, sr.cs.base), (reset::CS_SELECTOR, reset::CS_BASE));
    assert_eq!(sr.cr0, reset::CR0);
    assert_eq!((sr.cr3, sr.cr4, sr.efer), (0, 0, 0));
    assert_eq!((s.debugregs.dr6, s.debugregs.dr7), (reset::DR6, reset::DR7));
    assert_eq!(s.xsave.fcw(), reset::FCW);
    assert_eq!(s.xsave.mxcsr(), reset::MXCSR);
    assert_eq!(s.xcrs.xcrs[0].value, reset::XCR0);
    assert_eq!(s.msrs.get_value(msr::IA32_PAT), Some(reset::PAT));
    let def = s.msrs.get_value(msr::IA32_MTRR_DEF_TYPE).expect("DEF_TYPE saved");
    assert_eq!(def & (msr::MTRR_DEF_TYPE_E | msr::MTRR_DEF_TYPE_FE), 0);
    assert_eq!(lapic_get(&s.lapic, apic_reg::SVR), reset::SVR);
    assert_eq!(lapic_get(&s.lapic, apic_reg::LVT_TIMER), reset::LVT_MASKED);

    // Field by field: what KVM reads back is exactly the table applied to KVM's
    // creation state (except the volatile fields named below).
    let mut expected = m.vcpu.pristine.clone().expect("pristine");
    reset::apply(ResetKind::Power, m.vcpu.spec.vendor, &mut expected, 0, m.vcpu.spec.signature);
    let d = differences(&expected, &s);
    assert!(d.is_empty(), "RESET state read back differs from what was put: {d:#?}");
}

/// Fields that change on their own between a put and the next get.
const VOLATILE_MSRS: &[(u32, &str)] = &[(msr::IA32_TSC, "the TSC counts")];
const VOLATILE_LAPIC: &[(usize, &str)] = &[(apic_reg::TIMER_CURRENT, "the APIC timer's current count counts down")];

/// Compares two vCPU states part by part, skipping only the named volatile fields.
fn differences(a: &VcpuState, b: &VcpuState) -> Vec<String> {
    let mut d: Vec<String> = a.diff(b).into_iter().filter(|p| !["msrs", "lapic"].contains(p)).map(String::from).collect();
    for (x, y) in a.msrs.0.iter().zip(&b.msrs.0) {
        if x.index != y.index {
            d.push(format!("MSR order {:#x} vs {:#x}", x.index, y.index));
        } else if x.data != y.data && !VOLATILE_MSRS.iter().any(|(i, _)| *i == x.index) {
            d.push(format!("MSR {:#x}: {:#x} vs {:#x}", x.index, x.data, y.data));
        }
    }
    if a.msrs.0.len() != b.msrs.0.len() {
        d.push("MSR count".into());
    }
    for off in (0..1024).step_by(16) {
        if VOLATILE_LAPIC.iter().any(|(o, _)| *o == off) {
            continue;
        }
        if lapic_get(&a.lapic, off) != lapic_get(&b.lapic, off) {
            d.push(format!("LAPIC register {off:#x}: {:#x} vs {:#x}", lapic_get(&a.lapic, off), lapic_get(&b.lapic, off)));
        }
    }
    d
}

#[test]
fn state_round_trips_into_a_fresh_vm() {
    common::require_kvm();
    let kvm = Kvm::new().expect("/dev/kvm");
    let mut a = machine(&kvm);
    a.vcpu.reset(ResetKind::Power).expect("RESET");
    a.vcpu.set_firmware_state().expect("firmware state");
    a.vcpu.set_boot_state(BootEntry::Pvh { entry: CODE, start_info: 0 }).expect("entry state");
    match a.vcpu.fd.run().expect("KVM_RUN") {
        VcpuExit::IoOut(0x80, _) => {}
        other => panic!("expected the guest's out 0x80, got {other:?}"),
    }
    // Paused (out of KVM_RUN): take everything.
    let s1 = a.vcpu.get_state().expect("get from the first VM");
    let v1 = VmState::get(&a.vm).expect("chipset state");
    assert_eq!(s1.msrs.get_value(msr::IA32_PAT), Some(0x0000_0407_0106_0106), "the guest's PAT write is in the state");
    assert_eq!(s1.msrs.get_value(msr::IA32_MTRR_DEF_TYPE), Some(0xc06), "the guest's MTRR write is in the state");

    let mut b = machine(&kvm);
    v1.put(&b.vm).expect("put the chipset");
    b.vcpu.put_state(&s1).expect("put into the fresh vCPU");
    let s2 = b.vcpu.get_state().expect("get from the fresh VM");
    let d = differences(&s1, &s2);
    assert!(d.is_empty(), "state differs after put+get: {d:#?}");
    let v2 = VmState::get(&b.vm).expect("chipset state");
    // The PIT's counter load times are host timestamps (volatile): compare the rest.
    let mut d = v1.diff(&v2);
    d.retain(|p| *p != "pit");
    assert!(d.is_empty(), "chipset state differs: {d:?}");
    for (x, y) in v1.pit.channels.iter().zip(&v2.pit.channels) {
        assert_eq!((x.count, x.mode, x.gate, x.rw_mode), (y.count, y.mode, y.gate, y.rw_mode));
    }
    eprintln!(
        "round trip: {} parts compared; volatile and skipped: {}; {}",
        VcpuState::PARTS.len() + VmState::PARTS.len(),
        VOLATILE_MSRS.iter().map(|(i, w)| format!("MSR {i:#x} ({w})")).collect::<Vec<_>>().join(", "),
        VOLATILE_LAPIC.iter().map(|(o, w)| format!("LAPIC {o:#x} ({w})")).collect::<Vec<_>>().join(", "),
    );

    // The restored guest carries on from where it was paused.
    match b.vcpu.fd.run().expect("KVM_RUN after restore") {
        VcpuExit::IoOut(0x81, _) => {}
        other => panic!("the restored guest should reach out 0x81, got {other:?}"),
    }
    let regs = b.vcpu.fd.get_regs().expect("regs");
    assert_eq!((regs.rbx as u32, regs.rsi as u32), (0xdead_beef, 0x1235));
}

