//! Which MSRs make up a vCPU's state. The saved set is built at run time from what
//! KVM reports (KVM_GET_MSR_INDEX_LIST) plus the MSRs that CPUID implies but KVM's list
//! leaves out (the MTRRs above all: seed 004's bug), minus a short list of MSRs that
//! are deliberately not state, each with its reason. MSRs this KVM refuses to read or
//! to write back are found by trying, never assumed from the host's name; each one a
//! host may refuse is on a hand-written list with the reason a person found
//! ([`MAY_BE_REFUSED`]), and a refusal that is not on it is reported as unexplained.

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
/// In KVM's MSR list, and saved where KVM takes the value back (see [`MAY_BE_REFUSED`]).
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
pub const KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;
pub const KVM_MIGRATION_CONTROL: u32 = 0x4b56_4d08;

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

/// MSRs that discovery may drop (KVM refuses to read them, or to take back the value it
/// read), each with why, as a person found it: the reason is written here, not made up
/// by the code that saw the refusal. A refusal of an MSR that is not on this list is
/// unexplained: [`MsrSet::unexplained`] names it, and tests/state.rs fails for it. Add
/// an entry only after finding out why KVM refuses it on the host where it happens.
///
/// Empty for now: on the hosts tried so far (PVM nested on AMD EPYC) KVM refuses
/// none of the candidates, whatever CPUID skiff gives the vCPU (tests/state.rs tries
/// KVM's supported CPUID, the one the probe leaves, and one with every gated feature
/// hidden). KVM may refuse host-initiated accesses where the vCPU's CPUID lacks a
/// feature (IA32_ARCH_CAPABILITIES and IA32_TSC_AUX are candidates), so a host that
/// does will fail that test until someone finds out why and writes it here.
pub const MAY_BE_REFUSED: &[(u32, &str)] = &[];

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

/// How KVM refused an MSR during discovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// KVM_GET_MSRS refused to read it for this vCPU.
    Read,
    /// KVM_SET_MSRS refused the value KVM_GET_MSRS had just read.
    WriteBack,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Read => "KVM_GET_MSRS refuses to read it",
            Refusal::WriteBack => "KVM_SET_MSRS refuses the value KVM_GET_MSRS read",
        }
    }
}

/// One MSR discovery dropped: its index, what KVM did, and the written reason from
/// [`MAY_BE_REFUSED`] (None: nobody has explained it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub index: u32,
    pub refusal: Refusal,
    pub why: Option<&'static str>,
}

/// The MSR set of a machine: what is saved, and what KVM offered that is not, with why.
#[derive(Clone, Debug, Default)]
pub struct MsrSet {
    /// Saved and restored, in this order.
    pub saved: Vec<u32>,
    /// Candidates dropped at run time: KVM refused to read or write them here.
    pub refused: Vec<Dropped>,
    /// KVM's own list, as reported (for the completeness check).
    pub kvm_list: Vec<u32>,
}

impl MsrSet {
    /// Builds the set on a freshly created vCPU whose CPUID is already set (CPUID
    /// gates which MSRs KVM lets the guest, and so us, use). Every candidate is read
    /// once and its value written back: a refusal either way drops it, and the
    /// reason comes from [`MAY_BE_REFUSED`] (or is missing: see [`Self::unexplained`]).
    ///
    /// `hidden` adds MSRs KVM refuses because this vCPU's CPUID hides their feature
    /// and KVM enforces it (the paravirtual MSRs, probe/pv.rs), with that reason.
    pub fn discover(kvm: &Kvm, vcpu: &VcpuFd, hidden: &[(u32, &'static str)]) -> Result<Self, kvm_ioctls::Error> {
        let kvm_list: Vec<u32> = kvm.get_msr_index_list()?.as_slice().to_vec();
        let vcnt = read_one(vcpu, IA32_MTRRCAP).map_or(0, |v| (v & MTRRCAP_VCNT_MASK) as u32);
        let reasons: Vec<(u32, &'static str)> = MAY_BE_REFUSED.iter().chain(hidden).copied().collect();
        Ok(Self::sort_out(kvm_list, vcnt, |i| read_one(vcpu, i), |i, v| write_one(vcpu, i, v), &reasons))
    }

    /// Discovery without KVM: `read` and `write` stand for KVM_GET_MSRS and
    /// KVM_SET_MSRS of one MSR, `reasons` for [`MAY_BE_REFUSED`].
    fn sort_out(
        kvm_list: Vec<u32>,
        vcnt: u32,
        mut read: impl FnMut(u32) -> Option<u64>,
        mut write: impl FnMut(u32, u64) -> bool,
        reasons: &[(u32, &'static str)],
    ) -> Self {
        let mut candidates: Vec<u32> = kvm_list.iter().copied().chain(implied(vcnt)).collect();
        // Keep KVM's order, then the implied ones; drop repeats.
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|i| seen.insert(*i) && not_saved_reason(*i).is_none());
        let mut set = MsrSet { kvm_list, ..Default::default() };
        for index in candidates {
            let refusal = match read(index) {
                None => Refusal::Read,
                Some(value) if write(index, value) => {
                    set.saved.push(index);
                    continue;
                }
                Some(_) => Refusal::WriteBack,
            };
            let why = reasons.iter().find(|(i, _)| *i == index).map(|(_, why)| *why);
            set.refused.push(Dropped { index, refusal, why });
        }
        set
    }

    /// The MSRs discovery dropped that [`MAY_BE_REFUSED`] does not explain.
    pub fn unexplained(&self) -> Vec<Dropped> {
        self.refused.iter().filter(|d| d.why.is_none()).copied().collect()
    }

    /// Why an MSR is not saved; None if it is saved. An MSR that is neither saved nor
    /// explained (not on [`NOT_SAVED`], or refused here but not on [`MAY_BE_REFUSED`])
    /// gives a text starting with "UNACCOUNTED".
    pub fn why_not_saved(&self, index: u32) -> Option<&'static str> {
        if self.saved.contains(&index) {
            return None;
        }
        if let Some(why) = not_saved_reason(index) {
            return Some(why);
        }
        match self.refused.iter().find(|d| d.index == index) {
            Some(Dropped { why: Some(why), .. }) => Some(why),
            Some(Dropped { why: None, .. }) => Some("UNACCOUNTED: refused here, and no written reason on msr::MAY_BE_REFUSED"),
            None => Some("UNACCOUNTED: neither saved nor listed"),
        }
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

    /// A fake KVM: lists `listed`, refuses to read `no_read`, refuses the write-back
    /// of `no_write`, and takes everything else.
    fn fake(listed: &[u32], no_read: &[u32], no_write: &[u32], reasons: &[(u32, &'static str)]) -> MsrSet {
        MsrSet::sort_out(
            listed.to_vec(),
            2,
            |i| (!no_read.contains(&i)).then_some(0x1234),
            |i, v| v == 0x1234 && !no_write.contains(&i),
            reasons,
        )
    }

    #[test]
    fn a_refusal_nobody_explained_is_unaccounted() {
        // KVM refuses to read TSC_AUX and to take back ARCH_CAPABILITIES; nobody has
        // written down why: both are unexplained, whatever KVM did.
        let set = fake(&[IA32_ARCH_CAPABILITIES, LSTAR], &[TSC_AUX], &[IA32_ARCH_CAPABILITIES], &[]);
        assert!(set.saved.contains(&LSTAR) && set.saved.contains(&IA32_PAT));
        assert!(!set.saved.contains(&TSC_AUX) && !set.saved.contains(&IA32_ARCH_CAPABILITIES));
        let unexplained = set.unexplained();
        assert_eq!(
            unexplained,
            vec![
                Dropped { index: IA32_ARCH_CAPABILITIES, refusal: Refusal::WriteBack, why: None },
                Dropped { index: TSC_AUX, refusal: Refusal::Read, why: None },
            ]
        );
        for index in [IA32_ARCH_CAPABILITIES, TSC_AUX] {
            let why = set.why_not_saved(index).unwrap();
            assert!(why.starts_with("UNACCOUNTED"), "{index:#x}: {why}");
        }
    }

    #[test]
    fn a_refusal_on_the_list_carries_the_written_reason() {
        let reasons = [(TSC_AUX, "written by a person")];
        let set = fake(&[LSTAR], &[TSC_AUX], &[], &reasons);
        assert!(set.unexplained().is_empty());
        assert_eq!(set.why_not_saved(TSC_AUX), Some("written by a person"));
        assert_eq!(set.why_not_saved(LSTAR), None);
        // A listed MSR that KVM does not refuse is simply saved.
        let set = fake(&[LSTAR], &[], &[], &reasons);
        assert!(set.saved.contains(&TSC_AUX) && set.refused.is_empty());
    }

    #[test]
    fn the_written_reasons_are_real_entries() {
        let mut seen = std::collections::HashSet::new();
        for (index, why) in MAY_BE_REFUSED {
            assert!(seen.insert(index), "{index:#x} listed twice");
            assert!(why.len() > 20, "{index:#x}: a reason, not a word");
            assert!(not_saved_reason(*index).is_none(), "{index:#x} is deliberately not saved, never refused");
        }
    }
}
