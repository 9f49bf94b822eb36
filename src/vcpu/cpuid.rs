//! CPUID as the guest sees it: KVM_GET_SUPPORTED_CPUID, normalized per vCPU.
//!
//! Per vCPU: the APIC ID in leaf 1 and the topology leaves (0xB, 0x1F, 0x8000_001E),
//! the logical-processor counts, and the hypervisor bit. KVM's own leaves
//! (0x4000_0000 signature, 0x4000_0001 features) pass through, so the guest finds
//! kvm-clock. Features listed in [`GatedFeature`] are cleared when the instruction
//! probe (vcpu/probe.rs) found that KVM cannot run them in guest kernel mode here.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Which register of a CPUID entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A CPUID feature bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn bit(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> FeatureBit {
    FeatureBit { leaf, subleaf, reg, bit }
}

/// A feature the guest kernel uses only when CPUID advertises it, whose instruction
/// KVM may fail to emulate where guest kernel mode is emulated. Each entry names the
/// bits to clear together and says why they go together.
#[derive(Clone, Copy, Debug)]
pub struct GatedFeature {
    pub name: &'static str,
    /// The bit that advertises the feature (the probe runs only if it is set).
    pub gate: FeatureBit,
    /// Further bits that must go with it.
    pub implied: &'static [FeatureBit],
    pub why: &'static str,
}

impl GatedFeature {
    /// The kernel's name for the feature (as in /proc/cpuinfo and `clearcpuid=`).
    pub fn linux_names(&self) -> Vec<&'static str> {
        match self.name {
            "lzcnt" => vec!["abm"],
            "erms" => vec!["erms", "fsrm"],
            n => vec![n],
        }
    }
}

use Reg::*;

/// The table of gated features. The probe decides per host which ones go.
pub const GATED: &[GatedFeature] = &[
    GatedFeature {
        name: "xsave",
        gate: bit(1, 0, Ecx, 26),
        // AVX, AVX2, AVX-512 and friends need XSAVE-managed state; without XSAVE the
        // kernel falls back to FXSAVE and must not see them.
        implied: &[
            bit(1, 0, Ecx, 27), // OSXSAVE
            bit(1, 0, Ecx, 28), // AVX
            bit(1, 0, Ecx, 12), // FMA
            bit(1, 0, Ecx, 29), // F16C
            bit(7, 0, Ebx, 5),  // AVX2
            bit(7, 0, Ebx, 16), // AVX512F
            bit(7, 0, Ebx, 17), // AVX512DQ
            bit(7, 0, Ebx, 21), // AVX512_IFMA
            bit(7, 0, Ebx, 28), // AVX512CD
            bit(7, 0, Ebx, 30), // AVX512BW
            bit(7, 0, Ebx, 31), // AVX512VL
            bit(7, 0, Ecx, 1),  // AVX512_VBMI
            bit(7, 0, Ecx, 6),  // AVX512_VBMI2
            bit(7, 0, Ecx, 9),  // VAES
            bit(7, 0, Ecx, 10), // VPCLMULQDQ
            bit(7, 0, Ecx, 11), // AVX512_VNNI
            bit(7, 0, Ecx, 12), // AVX512_BITALG
            bit(7, 0, Ecx, 14), // AVX512_VPOPCNTDQ
            bit(7, 0, Edx, 8),  // AVX512_VP2INTERSECT
            bit(7, 0, Edx, 23), // AVX512_FP16
            bit(7, 1, Eax, 4),  // AVX_VNNI
            bit(7, 1, Eax, 5),  // AVX512_BF16
            bit(0xd, 1, Eax, 0), // XSAVEOPT
            bit(0xd, 1, Eax, 1), // XSAVEC
            bit(0xd, 1, Eax, 3), // XSAVES
        ],
        why: "xsave/xrstor/xgetbv fail in KVM's emulator (seen: xrstor64 in Debian's boot)",
    },
    GatedFeature {
        name: "xsaves",
        gate: bit(0xd, 1, Eax, 3),
        implied: &[],
        why: "the kernel prefers the compacted supervisor form when offered",
    },
    GatedFeature {
        name: "xsavec",
        gate: bit(0xd, 1, Eax, 1),
        implied: &[],
        why: "compacted XSAVE form",
    },
    GatedFeature {
        name: "xsaveopt",
        gate: bit(0xd, 1, Eax, 0),
        implied: &[],
        why: "optimized XSAVE form",
    },
    GatedFeature {
        name: "cx16",
        gate: bit(1, 0, Ecx, 13),
        implied: &[],
        why: "lock cmpxchg16b (the kernel's this_cpu_cmpxchg_double, SLUB)",
    },
    GatedFeature {
        name: "ssse3",
        gate: bit(1, 0, Ecx, 9),
        // Linux's own dependency table drops SSE4.x, AVX and friends with it.
        implied: &[bit(1, 0, Ecx, 19), bit(1, 0, Ecx, 20)],
        why: "kernel SIMD (blake2s in the RNG, crc32c, crypto) inside kernel_fpu_begin",
    },
    GatedFeature { name: "aes", gate: bit(1, 0, Ecx, 25), implied: &[], why: "AES-NI in kernel crypto" },
    GatedFeature {
        name: "pclmulqdq",
        gate: bit(1, 0, Ecx, 1),
        implied: &[],
        why: "carry-less multiply in kernel CRC and GHASH",
    },
    GatedFeature { name: "movbe", gate: bit(1, 0, Ecx, 22), implied: &[], why: "byte-swapping moves" },
    GatedFeature { name: "popcnt", gate: bit(1, 0, Ecx, 23), implied: &[], why: "hweight via alternatives" },
    GatedFeature {
        name: "rdrand",
        gate: bit(1, 0, Ecx, 30),
        implied: &[],
        why: "the kernel's early entropy",
    },
    GatedFeature { name: "rdseed", gate: bit(7, 0, Ebx, 18), implied: &[], why: "entropy" },
    GatedFeature {
        name: "smap",
        gate: bit(7, 0, Ebx, 20),
        implied: &[],
        why: "clac/stac around every user access",
    },
    GatedFeature {
        name: "invpcid",
        gate: bit(7, 0, Ebx, 10),
        implied: &[],
        why: "TLB flushes by PCID",
    },
    GatedFeature { name: "clwb", gate: bit(7, 0, Ebx, 24), implied: &[], why: "cache-line write-back" },
    GatedFeature {
        name: "clflushopt",
        gate: bit(7, 0, Ebx, 23),
        implied: &[],
        why: "optimized cache-line flush",
    },
    GatedFeature {
        name: "fsgsbase",
        gate: bit(7, 0, Ebx, 0),
        implied: &[],
        why: "rd/wr fs/gs base on every context switch",
    },
    GatedFeature { name: "rdpid", gate: bit(7, 0, Ecx, 22), implied: &[], why: "per-CPU number lookups" },
    GatedFeature {
        name: "rdtscp",
        gate: bit(0x8000_0001, 0, Edx, 27),
        implied: &[],
        why: "getcpu and TSC reads",
    },
    GatedFeature {
        name: "rdpru",
        gate: bit(0x8000_0008, 0, Ebx, 4),
        implied: &[],
        why: "AMD's APERF/MPERF reads",
    },
    GatedFeature { name: "bmi1", gate: bit(7, 0, Ebx, 3), implied: &[], why: "andn/tzcnt in compiled code" },
    GatedFeature { name: "bmi2", gate: bit(7, 0, Ebx, 8), implied: &[], why: "shlx/rorx in compiled code" },
    GatedFeature {
        name: "erms",
        gate: bit(7, 0, Ebx, 9),
        // FSRM (fast short rep movsb) steers memmove and user copies to rep movsb too.
        implied: &[bit(7, 0, Edx, 4)],
        why: "rep stosb/movsb run byte by byte through KVM's emulator: a page cleared with \
              rep stosb costs several times rep stosq",
    },
    GatedFeature {
        name: "lzcnt",
        gate: bit(0x8000_0001, 0, Ecx, 5),
        implied: &[],
        why: "lzcnt in compiled code",
    },
];

pub fn find_entry(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == leaf && (e.index == subleaf || !is_indexed(leaf)))
}

/// Leaves whose output depends on the subleaf in ECX.
fn is_indexed(leaf: u32) -> bool {
    matches!(leaf, 4 | 7 | 0xb | 0xd | 0xf | 0x10 | 0x12 | 0x14 | 0x17 | 0x18 | 0x1d | 0x1e | 0x1f | 0x24 | 0x8000_001d | 0x8000_0020 | 0x8000_0026)
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

fn reg(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Eax => e.eax,
        Ebx => e.ebx,
        Ecx => e.ecx,
        Edx => e.edx,
    }
}

pub fn has(cpuid: &CpuId, f: FeatureBit) -> bool {
    find_entry(cpuid, f.leaf, f.subleaf).is_some_and(|e| reg(e, f.reg) & (1 << f.bit) != 0)
}

pub fn clear(cpuid: &mut CpuId, f: FeatureBit) {
    for e in cpuid.as_mut_slice() {
        if e.function == f.leaf && (e.index == f.subleaf || !is_indexed(f.leaf)) {
            *reg_mut(e, f.reg) &= !(1 << f.bit);
        }
    }
}

/// Clears a gated feature and everything it implies.
pub fn hide(cpuid: &mut CpuId, feature: &GatedFeature) {
    clear(cpuid, feature.gate);
    for f in feature.implied {
        clear(cpuid, *f);
    }
    if feature.name == "xsave" {
        // Without XSAVE, leaf 0xD describes nothing.
        for e in cpuid.as_mut_slice() {
            if e.function == 0xd {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
}

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 { 0 } else { 32 - (n - 1).leading_zeros() }
}

/// Normalizes a copy of the supported CPUID for vCPU `index` of `count`: one socket,
/// one thread per core, APIC ID = index.
pub fn normalize(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = index as u32;
    let count32 = count as u32;
    let core_bits = id_bits(count32);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX: APIC ID [31:24], logical processors per package [23:16].
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count32.max(1) & 0xff) << 16);
                // Hypervisor present.
                e.ecx |= 1 << 31;
                // HTT: more than one logical processor per package.
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            // Deterministic cache parameters (Intel): cores sharing a package.
            4 if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((count32.saturating_sub(1) & 0x3f) << 26);
                // Threads sharing this cache: one (no SMT).
                e.eax &= !(0xfff << 14);
            }
            // Extended topology: SMT level (1 thread) then core level (count cores).
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count32;
                        e.ecx = 1 | (2 << 8);
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            // AMD: number of cores in the package (NC) and the APIC ID size.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (count32.saturating_sub(1) & 0xff) | (core_bits << 12);
            }
            // AMD extended APIC ID, compute unit (core) ID, node ID.
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, flags: 0, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x00a0_0f11, 0x0000_0800, 0x7ef8_3203 | (1 << 26) | (1 << 28) | (1 << 13), 0x178b_fbff),
            entry(7, 0, 0, (1 << 20) | (1 << 5) | (1 << 16) | (1 << 10), 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 0),
            entry(0xb, 1, 4, 16, 0x201, 0),
            entry(0xd, 0, 7, 0x340, 0x340, 0),
            entry(0xd, 1, 0xf, 0, 0, 0),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x8000_0008, 0, 0x3030, 0x10, 0x7007, 0),
            entry(0x8000_001e, 0, 5, 0x105, 0x300, 0),
        ])
        .unwrap()
    }

    #[test]
    fn per_vcpu_topology() {
        let base = sample();
        let c = normalize(&base, 3, 4);
        let l1 = find_entry(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT");
        let b0 = find_entry(&c, 0xb, 0).unwrap();
        assert_eq!((b0.eax, b0.ebx, b0.ecx, b0.edx), (0, 1, 0x100, 3));
        let b1 = find_entry(&c, 0xb, 1).unwrap();
        assert_eq!((b1.eax, b1.ebx, b1.ecx, b1.edx), (2, 4, 0x201, 3));
        let amd = find_entry(&c, 0x8000_0008, 0).unwrap();
        assert_eq!(amd.ecx & 0xff, 3);
        assert_eq!((amd.ecx >> 12) & 0xf, 2);
        assert_eq!(find_entry(&c, 0x8000_001e, 0).unwrap().eax, 3);
        // KVM's leaves pass through.
        assert_eq!(find_entry(&c, 0x4000_0000, 0).unwrap().ebx, 0x4b4d_564b);
        // The base is untouched.
        assert_eq!(find_entry(&base, 1, 0).unwrap().ebx >> 24, 0);
        let one = normalize(&base, 0, 1);
        assert_eq!(find_entry(&one, 1, 0).unwrap().edx & (1 << 28), 0);
    }

    #[test]
    fn hiding_xsave_takes_avx_and_leaf_d() {
        let mut c = sample();
        let xsave = GATED.iter().find(|g| g.name == "xsave").unwrap();
        assert!(has(&c, xsave.gate));
        hide(&mut c, xsave);
        assert!(!has(&c, xsave.gate));
        assert!(!has(&c, bit(1, 0, Ecx, 28)), "AVX");
        assert!(!has(&c, bit(7, 0, Ebx, 5)), "AVX2");
        assert!(!has(&c, bit(7, 0, Ebx, 16)), "AVX512F");
        assert!(has(&c, bit(7, 0, Ebx, 20)), "SMAP untouched");
        assert_eq!(find_entry(&c, 0xd, 0).unwrap().eax, 0);
        assert_eq!(find_entry(&c, 0xd, 1).unwrap().eax, 0);
        let cx16 = GATED.iter().find(|g| g.name == "cx16").unwrap();
        hide(&mut c, cx16);
        assert!(!has(&c, bit(1, 0, Ecx, 13)));
        assert!(has(&c, bit(1, 0, Ecx, 0)), "SSE3 untouched");
    }

    #[test]
    fn gated_table_is_consistent() {
        for g in GATED {
            assert!(g.gate.bit < 32 && g.implied.iter().all(|b| b.bit < 32), "{}", g.name);
            assert!(!g.why.is_empty());
        }
        let mut names: Vec<_> = GATED.iter().map(|g| g.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), GATED.len());
    }

    #[test]
    fn linux_names_for_clearcpuid() {
        let by = |n: &str| GATED.iter().find(|g| g.name == n).unwrap().linux_names();
        assert_eq!(by("erms"), vec!["erms", "fsrm"]);
        assert_eq!(by("lzcnt"), vec!["abm"]);
        assert_eq!(by("smap"), vec!["smap"]);
        let erms = GATED.iter().find(|g| g.name == "erms").unwrap();
        assert_eq!((erms.gate.leaf, erms.gate.reg, erms.gate.bit), (7, Ebx, 9));
        assert_eq!(erms.implied, &[bit(7, 0, Edx, 4)], "FSRM goes with ERMS");
    }
}
