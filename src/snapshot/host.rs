//! Whether this host can run a snapshot's guest: the same CPU vendor, and every CPU
//! feature the guest was given one that KVM offers here. A guest that found AVX-512
//! at boot and lands on a host without it dies at its next vector instruction.

use super::{CpuidEntry, Header, SnapshotError};

#[derive(Clone, Copy, Debug)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A CPUID register that is a feature bitmap, and the bits in it that are not
/// features of the host (skiff or the CPU sets them per guest).
struct FeatureReg {
    leaf: u32,
    subleaf: Option<u32>,
    reg: Reg,
    ignore: u32,
}

const fn fr(leaf: u32, subleaf: Option<u32>, reg: Reg, ignore: u32) -> FeatureReg {
    FeatureReg { leaf, subleaf, reg, ignore }
}

const FEATURE_REGS: &[FeatureReg] = &[
    // OSXSAVE (27) follows the guest's CR4; "hypervisor" (31) is skiff's.
    fr(1, None, Reg::Ecx, 1 << 27 | 1 << 31),
    // HTT (28) says how many logical processors skiff gave the guest.
    fr(1, None, Reg::Edx, 1 << 28),
    fr(7, Some(0), Reg::Ebx, 0),
    // OSPKE (4) follows the guest's CR4.
    fr(7, Some(0), Reg::Ecx, 1 << 4),
    fr(7, Some(0), Reg::Edx, 0),
    fr(7, Some(1), Reg::Eax, 0),
    fr(0xd, Some(1), Reg::Eax, 0),
    fr(0x8000_0001, None, Reg::Ecx, 0),
    fr(0x8000_0001, None, Reg::Edx, 0),
    // KVM's paravirtual features (kvm-clock, async PF, ...).
    fr(0x4000_0001, None, Reg::Eax, 0),
];

fn value(table: &[CpuidEntry], f: &FeatureReg) -> u32 {
    let e = table.iter().find(|e| e.function == f.leaf && f.subleaf.is_none_or(|s| e.index == s));
    e.map_or(0, |e| match f.reg {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    })
}

/// Refuses a snapshot this host cannot run: another CPU vendor, or a feature bit the
/// guest was given that `supported` (KVM_GET_SUPPORTED_CPUID here) lacks.
pub fn check_host(header: &Header, host_vendor: &str, supported: &[CpuidEntry]) -> Result<(), SnapshotError> {
    if header.cpu_vendor != host_vendor {
        return Err(SnapshotError::Host(format!("the snapshot was made on a {:?} CPU, this host's is {host_vendor:?}", header.cpu_vendor)));
    }
    let missing: Vec<String> = FEATURE_REGS
        .iter()
        .filter_map(|f| {
            let lacking = value(&header.cpuid, f) & !value(supported, f) & !f.ignore;
            (lacking != 0).then(|| format!("leaf {:#x}.{} {:?} bits {lacking:#x}", f.leaf, f.subleaf.unwrap_or(0), f.reg))
        })
        .collect();
    if !missing.is_empty() {
        return Err(SnapshotError::Host(format!("this host lacks CPU features the guest was given: {}", missing.join(", "))));
    }
    Ok(())
}
