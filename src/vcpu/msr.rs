//! Which MSRs make up a vCPU's state. The saved set is built at run time from what
//! KVM reports (KVM_GET_MSR_INDEX_LIST) plus the MSRs that CPUID implies but KVM's list
//! leaves out (the MTRRs above all: seed 004's bug), minus a short list of MSRs that
//! are deliberately not state, each with its reason. MSRs this KVM refuses to read or
//! to write back are found by trying, never assumed from the host's name.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

// Architectural MSR numbers (Intel SDM vol. 4; AMD APM vol. 2 appendix A).
pub const IA32_TSC: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_MTRRCAP: u32 = 0xfe;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_MTRR_PHYSBASE0: u32 = 0x200;
pub const IA32_MTRR_FIX64K_00000: u32 = 0x250;
pub const IA32_MTRR_FIX16K_80000: u32 = 0x258;
pub const IA32_MTRR_FIX16K_A0000: u32 = 0x259;
/// 0x268..=0x26f: the eight 4 KiB fixed ranges from C0000 to FFFFF.
pub const IA32_MTRR_FIX4K_C0000: u32 = 0x268;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const IA32_SPEC_CTRL: u32 = 0x48;
/// Saved where KVM takes it back; some KVMs refuse host writes of it (found by trying).
pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const TSC_AUX: u32 = 0xc000_0103;
// KVM's paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst).
pub const KVM_WALL_CLOCK: u32 = 0x11;
pub const KVM_SYSTEM_TIME: u32 = 0x12;
pub const KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
pub const KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const KVM_STEAL_TIME: u32 = 0x4b56_4d03;
pub const KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
pub const KVM_POLL_CONTROL: u32 = 0x4b56_4d05;
pub const KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;

/// Variable-range MTRR pair `n`: (PHYSBASEn, PHYSMASKn).
pub const fn mtrr_var(n: u32) -> (u32, u32) {
    (IA32_MTRR_PHYSBASE0 + 2 * n, IA32_MTRR_PHYSBASE0 + 2 * n + 1)
}

/// PHYSMASKn bit 11: the pair is valid (SDM 11.11.2.3).
pub const MTRR_PHYSMASK_VALID: u64 = 1 << 11;
/// IA32_MTRR_DEF_TYPE bit 11 (E) and bit 10 (FE).
pub const MTRR_DEF_TYPE_E: u64 = 1 << 11;
pub const MTRR_DEF_TYPE_FE: u64 = 1 << 10;
/// MTRRcap bits 7:0: the number of variable ranges (VCNT).
pub const MTRRCAP_VCNT_MASK: u64 = 0xff;
/// The architecture allows at most this many variable ranges to be addressed below
/// 0x250 (where the fixed ranges start); a larger VCNT is bogus and is clamped.
pub const MAX_VARIABLE_MTRRS: u32 = (IA32_MTRR_FIX64K_00000 - IA32_MTRR_PHYSBASE0) / 2;

/// MSRs deliberately not part of the saved state, and why.
pub const NOT_SAVED: &[(u32, &str)] = &[
    (IA32_MTRRCAP, "read-only capability (VCNT, FIX, WC): set by KVM from CPUID, not guest state"),
    (0x8b, "IA32_BIOS_SIGN_ID (microcode revision): vCPU configuration, not guest state"),
    (0x345, "IA32_PERF_CAPABILITIES: feature MSR, vCPU configuration like CPUID"),
    (FS_BASE, "held in the segment registers (KVM_GET_SREGS)"),
    (GS_BASE, "held in the segment registers (KVM_GET_SREGS)"),
    (IA32_EFER, "held in the special registers (KVM_GET_SREGS)"),
];

/// Intel's nested-VMX capability MSRs (0x480..=0x493): vCPU configuration.
fn is_vmx_capability(index: u32) -> bool {
    (0x480..=0x493).contains(&index)
}

/// Why `index` is not saved, if it is on the explicit list.
pub fn not_saved_reason(index: u32) -> Option<&'static str> {
    if is_vmx_capability(index) {
        return Some("nested-VMX capability MSR: vCPU configuration, like CPUID");
    }
    NOT_SAVED.iter().find(|(i, _)| *i == index).map(|(_, why)| *why)
}

/// MSRs the architecture (and CPUID) implies that KVM_GET_MSR_INDEX_LIST omits.
/// `vcnt` is MTRRcap.VCNT as this vCPU reports it.
pub fn implied(vcnt: u32) -> Vec<u32> {
    let mut v = vec![
        IA32_MTRR_DEF_TYPE,
        IA32_MTRR_FIX64K_00000,
        IA32_MTRR_FIX16K_80000,
        IA32_MTRR_FIX16K_A0000,
    ];
    v.extend(IA32_MTRR_FIX4K_C0000..IA32_MTRR_FIX4K_C0000 + 8);
    for n in 0..vcnt.min(MAX_VARIABLE_MTRRS) {
        let (base, mask) = mtrr_var(n);
        v.extend([base, mask]);
    }
    v.extend([
        IA32_PAT,
        IA32_TSC,
        IA32_APIC_BASE,
        IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP,
        IA32_MISC_ENABLE,
        STAR,
        LSTAR,
        CSTAR,
        SFMASK,
        KERNEL_GS_BASE,
        TSC_AUX,
        IA32_TSC_DEADLINE,
        IA32_SPEC_CTRL,
        KVM_WALL_CLOCK,
        KVM_SYSTEM_TIME,
        KVM_WALL_CLOCK_NEW,
        KVM_SYSTEM_TIME_NEW,
        KVM_ASYNC_PF_EN,
        KVM_STEAL_TIME,
        KVM_PV_EOI_EN,
        KVM_POLL_CONTROL,
        KVM_ASYNC_PF_INT,
    ]);
    v
}

/// The MSR set of a machine: what is saved, and what KVM offered that is not, with why.
#[derive(Clone, Debug, Default)]
pub struct MsrSet {
    /// Saved and restored, in this order.
    pub saved: Vec<u32>,
    /// Candidates dropped at run time: KVM refused to read or write them here.
    pub refused: Vec<(u32, &'static str)>,
    /// KVM's own list, as reported (for the completeness check).
    pub kvm_list: Vec<u32>,
}

impl MsrSet {
    /// Builds the set on a freshly created vCPU whose CPUID is already set (CPUID
    /// gates which MSRs KVM lets the guest, and so us, use). Every candidate is read
    /// once and its value written back: a refusal either way drops it, with a reason.
    pub fn discover(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, kvm_ioctls::Error> {
        let kvm_list: Vec<u32> = kvm.get_msr_index_list()?.as_slice().to_vec();
        let vcnt = read_one(vcpu, IA32_MTRRCAP).map_or(0, |v| (v & MTRRCAP_VCNT_MASK) as u32);
        let mut candidates: Vec<u32> = kvm_list.iter().copied().chain(implied(vcnt)).collect();
        // Keep KVM's order, then the implied ones; drop repeats.
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|i| seen.insert(*i) && not_saved_reason(*i).is_none());
        let mut set = MsrSet { kvm_list, ..Default::default() };
        for index in candidates {
            match read_one(vcpu, index) {
                None => set.refused.push((index, "KVM refuses to read it for this vCPU (its CPUID lacks the feature)")),
                Some(value) => {
                    if write_one(vcpu, index, value) {
                        set.saved.push(index);
                    } else {
                        set.refused.push((index, "KVM refuses to write back the value it reads"));
                    }
                }
            }
        }
        Ok(set)
    }

    /// Why an MSR of KVM's list is not saved; None if it is saved.
    pub fn why_not_saved(&self, index: u32) -> Option<&'static str> {
        if self.saved.contains(&index) {
            return None;
        }
        not_saved_reason(index)
            .or_else(|| self.refused.iter().find(|(i, _)| *i == index).map(|(_, w)| *w))
            .or(Some("UNACCOUNTED: neither saved nor listed"))
    }
}

/// Reads one MSR; None when KVM refuses it.
pub fn read_one(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice().first().map(|e| e.data),
        _ => None,
    }
}

/// Writes one MSR; false when KVM refuses it.
pub fn write_one(vcpu: &VcpuFd, index: u32, data: u64) -> bool {
    let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }]) else {
        return false;
    };
    matches!(vcpu.set_msrs(&msrs), Ok(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implied_covers_every_mtrr() {
        let v = implied(8);
        // 11 fixed ranges, the default type, and 8 variable pairs.
        let mtrrs = v.iter().filter(|i| (0x200..=0x2ff).contains(*i) && **i != IA32_PAT).count();
        assert_eq!(mtrrs, 11 + 1 + 16);
        assert!(v.contains(&0x20f), "PHYSMASK7");
        assert!(!v.contains(&0x210), "no ninth pair with VCNT=8");
        for i in [0x250, 0x258, 0x259, 0x268, 0x26f, 0x2ff, IA32_PAT, LSTAR, KVM_SYSTEM_TIME_NEW] {
            assert!(v.contains(&i), "{i:#x}");
        }
        // A hostile or broken VCNT cannot run into the fixed-range MSRs.
        assert!(implied(255).iter().all(|i| !(0x250..0x268).contains(i) || [0x250, 0x258, 0x259].contains(i)));
    }

    #[test]
    fn not_saved_entries_have_reasons() {
        assert!(NOT_SAVED.iter().all(|(_, why)| !why.is_empty()));
        assert!(not_saved_reason(0x485).is_some());
        assert!(not_saved_reason(IA32_PAT).is_none());
        assert!(implied(8).iter().all(|i| not_saved_reason(*i).is_none()), "implied MSRs are saved");
    }
}
