//! What the probe's results depend on: the host CPU, its microcode, the host kernel,
//! KVM (API version, capabilities, module parameters) and skiff's own probe code.
//! A cached result is reused only under an identical key.

use std::collections::BTreeMap;
use std::io::Read;

use kvm_bindings::CpuId;
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};

/// Bumped when the cache file's layout or the meaning of a stored field changes.
pub const PROBE_FORMAT: u32 = 5;

/// A hash of the source that decides the probe's results (the probe itself, the
/// gated-feature table, the boot structures its VMs use), fixed at build time: a
/// rebuilt skiff whose probe changed never trusts an older skiff's results.
const PROBE_SOURCE_HASH: u64 = {
    let mut h = FNV_OFFSET;
    h = fnv1a(h, include_bytes!("../probe.rs"));
    h = fnv1a(h, include_bytes!("hypercall.rs"));
    h = fnv1a(h, include_bytes!("pv.rs"));
    h = fnv1a(h, include_bytes!("tpr.rs"));
    h = fnv1a(h, include_bytes!("../../../guest/tpr/helper.bin"));
    h = fnv1a(h, include_bytes!("../cpuid.rs"));
    h = fnv1a(h, include_bytes!("../../x86/boot.rs"));
    h
};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits: stable across Rust versions and builds (std's hashers are not).
pub const fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// KVM capabilities the probe's VMs rely on, with KVM's answer for each.
const CAPS: &[(&str, Cap)] = &[
    ("xsave", Cap::Xsave),
    ("xsave2", Cap::Xsave2),
    ("xcrs", Cap::Xcrs),
    ("ext_cpuid", Cap::ExtCpuid),
    ("immediate_exit", Cap::ImmediateExit),
    ("exit_hypercall", Cap::ExitHypercall),
    ("internal_error_data", Cap::InternalErrorData),
    ("x86_user_space_msr", Cap::X86UserSpaceMsr),
    ("tsc_control", Cap::TscControl),
];
/// KVM_CAP_X86_DISABLE_EXITS, KVM_CAP_VM_TYPES and KVM_CAP_ENFORCE_PV_FEATURE_CPUID
/// (not in kvm-ioctls' Cap).
const RAW_CAPS: &[(&str, u64)] = &[("x86_disable_exits", 143), ("vm_types", 235), ("enforce_pv_feature_cpuid", 190)];

/// Caps on what is read from /proc and /sys: the key is small, and a strange host
/// (thousands of parameters, a huge file) must not make it large.
const MAX_FILE: u64 = 4096;
const MAX_PARAMS: usize = 512;

/// Everything the probe's results depend on. Compared field by field, so a mismatch
/// can say what changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeKey {
    pub format: u32,
    /// skiff's version and the probe source hash.
    pub skiff: String,
    /// Host CPUID: vendor, family, model, stepping (as the host CPU reports them).
    pub cpu: String,
    /// The microcode revision, where the host says (None: unreadable).
    pub microcode: Option<String>,
    /// FNV-1a of KVM_GET_SUPPORTED_CPUID's entries.
    pub supported_cpuid: String,
    pub kernel_release: String,
    pub kernel_version: String,
    pub kvm_api: i32,
    /// (capability, KVM's answer).
    pub kvm_caps: BTreeMap<String, i32>,
    /// (module/parameter or module/srcversion, value) for every loaded kvm* module.
    pub kvm_modules: BTreeMap<String, String>,
}

impl ProbeKey {
    /// Reads this host's key (well under a millisecond: no VM is made).
    pub fn collect(kvm: &Kvm, supported: &CpuId) -> ProbeKey {
        let mut caps: BTreeMap<String, i32> = CAPS.iter().map(|(n, c)| (n.to_string(), kvm.check_extension_int(*c))).collect();
        caps.extend(RAW_CAPS.iter().map(|(n, c)| (n.to_string(), kvm.check_extension_raw(*c))));
        ProbeKey {
            format: PROBE_FORMAT,
            skiff: skiff_id(),
            cpu: host_cpu(),
            microcode: microcode(),
            supported_cpuid: format!("{:016x}", cpuid_hash(supported)),
            kernel_release: read_small("/proc/sys/kernel/osrelease").unwrap_or_default(),
            kernel_version: read_small("/proc/sys/kernel/version").unwrap_or_default(),
            kvm_api: kvm.get_api_version(),
            kvm_caps: caps,
            kvm_modules: kvm_modules(std::path::Path::new("/sys/module")),
        }
    }

    /// The key's short name for `--stats`: FNV-1a of its JSON, in hex.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{:016x}", fnv1a(FNV_OFFSET, &json))
    }

    /// What differs from `other`, in words (None: the keys are equal).
    pub fn difference(&self, other: &ProbeKey) -> Option<&'static str> {
        let fields: [(bool, &'static str); 10] = [
            (self.format != other.format, "the cache format"),
            (self.skiff != other.skiff, "skiff's probe code"),
            (self.cpu != other.cpu, "the host CPU"),
            (self.microcode != other.microcode, "the CPU microcode"),
            (self.supported_cpuid != other.supported_cpuid, "KVM's supported CPUID"),
            (self.kernel_release != other.kernel_release, "the host kernel release"),
            (self.kernel_version != other.kernel_version, "the host kernel build"),
            (self.kvm_api != other.kvm_api, "KVM's API version"),
            (self.kvm_caps != other.kvm_caps, "KVM's capabilities"),
            (self.kvm_modules != other.kvm_modules, "the kvm modules or their parameters"),
        ];
        fields.into_iter().find_map(|(differs, what)| differs.then_some(what))
    }
}

fn skiff_id() -> String {
    format!("{} probe {:016x}", env!("CARGO_PKG_VERSION"), PROBE_SOURCE_HASH)
}

/// Vendor, family, model and stepping from the host's own CPUID (leaves 0 and 1).
fn host_cpu() -> String {
    use std::arch::x86_64::__cpuid;
    let l0 = __cpuid(0);
    let l1 = __cpuid(1);
    let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    format!("{} signature {:#010x}", String::from_utf8_lossy(&vendor), l1.eax)
}

/// The microcode revision: sysfs (Intel and AMD drivers expose it per CPU), else the
/// first CPU's `microcode` line in /proc/cpuinfo (only its first record is read).
fn microcode() -> Option<String> {
    if let Some(v) = read_small("/sys/devices/system/cpu/cpu0/microcode/version") {
        return Some(v);
    }
    let mut text = String::new();
    std::fs::File::open("/proc/cpuinfo").ok()?.take(8192).read_to_string(&mut text).ok()?;
    text.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("microcode")?.split_once(':').map(|(_, v)| v.trim().to_string()))
}

/// FNV-1a of KVM's supported CPUID without what depends on the CPU the caller ran
/// on: the APIC IDs (leaf 1 EBX[31:24], leaves 0xB and 0x1F EDX, AMD's 0x8000_001E
/// IDs), and leaves that differ between a hybrid CPU's core types (0x1A core type,
/// 4 and 0x8000_001D caches), none of which the probe depends on.
fn cpuid_hash(cpuid: &CpuId) -> u64 {
    cpuid.as_slice().iter().fold(FNV_OFFSET, |h, e| {
        let (mut eax, mut ebx, mut ecx, mut edx) = (e.eax, e.ebx, e.ecx, e.edx);
        match e.function {
            1 => ebx &= 0x00ff_ffff,
            0xb | 0x1f => edx = 0,
            0x1a | 4 | 0x8000_001d => (eax, ebx, ecx, edx) = (0, 0, 0, 0),
            0x8000_001e => (eax, ebx, ecx) = (0, ebx & 0xff00, ecx & 0x700),
            _ => {}
        }
        let words = [e.function, e.index, e.flags, eax, ebx, ecx, edx];
        words.iter().fold(h, |h, w| fnv1a(h, &w.to_le_bytes()))
    })
}

/// A small text file, trimmed (None: missing, unreadable or not text).
fn read_small(path: impl AsRef<std::path::Path>) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path).ok()?.take(MAX_FILE).read_to_string(&mut text).ok()?;
    Some(text.trim().to_string())
}

/// The parameters (and srcversion, for out-of-tree builds) of every module under
/// `root` whose name starts with "kvm". An unreadable parameter is recorded as such:
/// its presence still counts.
fn kvm_modules(root: &std::path::Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(modules) = std::fs::read_dir(root) else { return out };
    for module in modules.flatten() {
        let name = module.file_name().to_string_lossy().into_owned();
        if !name.starts_with("kvm") {
            continue;
        }
        for extra in ["srcversion", "version"] {
            if let Some(v) = read_small(module.path().join(extra)) {
                out.insert(format!("{name}/{extra}"), v);
            }
        }
        let Ok(params) = std::fs::read_dir(module.path().join("parameters")) else { continue };
        for p in params.flatten().take(MAX_PARAMS) {
            let value = read_small(p.path()).unwrap_or_else(|| "(unreadable)".to_string());
            out.insert(format!("{name}/{}", p.file_name().to_string_lossy()), value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProbeKey {
        ProbeKey {
            format: PROBE_FORMAT,
            skiff: skiff_id(),
            cpu: "AuthenticAMD signature 0x00a00f11".into(),
            microcode: Some("0xa0011d1".into()),
            supported_cpuid: "0123456789abcdef".into(),
            kernel_release: "6.1.0-18-amd64".into(),
            kernel_version: "#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1".into(),
            kvm_api: 12,
            kvm_caps: [("xcrs".to_string(), 1), ("immediate_exit".to_string(), 1)].into(),
            kvm_modules: [("kvm/halt_poll_ns".to_string(), "200000".to_string()), ("kvm_amd/npt".into(), "Y".into())].into(),
        }
    }

    #[test]
    fn every_changed_field_is_a_different_key_and_says_which() {
        let base = sample();
        assert_eq!(base.difference(&base.clone()), None);
        type Change = (fn(&mut ProbeKey), &'static str);
        let changes: [Change; 10] = [
            (|k| k.format += 1, "the cache format"),
            (|k| k.skiff.push('x'), "skiff's probe code"),
            (|k| k.cpu = "AuthenticAMD signature 0x00a00f12".into(), "the host CPU"),
            (|k| k.microcode = None, "the CPU microcode"),
            (|k| k.supported_cpuid = "0123456789abcdee".into(), "KVM's supported CPUID"),
            (|k| k.kernel_release = "6.1.0-19-amd64".into(), "the host kernel release"),
            (|k| k.kernel_version.push('!'), "the host kernel build"),
            (|k| k.kvm_api = 13, "KVM's API version"),
            (|k| _ = k.kvm_caps.insert("xcrs".into(), 0), "KVM's capabilities"),
            (|k| _ = k.kvm_modules.insert("kvm_amd/npt".into(), "N".into()), "the kvm modules or their parameters"),
        ];
        for (change, what) in changes {
            let mut k = base.clone();
            change(&mut k);
            assert_eq!(k.difference(&base), Some(what));
            assert_ne!(k.id(), base.id(), "{what}");
        }
    }

    #[test]
    fn module_parameters_are_read_only_for_kvm_modules() {
        let dir = std::env::temp_dir().join(format!("skiff-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, value) in [
            ("kvm_amd/parameters/npt", "Y\n"),
            ("kvm/parameters/halt_poll_ns", "200000\n"),
            ("kvm_pvm/srcversion", "ABC123\n"),
            ("nvme/parameters/poll_queues", "0\n"),
        ] {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, value).unwrap();
        }
        let got = kvm_modules(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let want = [("kvm/halt_poll_ns", "200000"), ("kvm_amd/npt", "Y"), ("kvm_pvm/srcversion", "ABC123")];
        let want: BTreeMap<String, String> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn this_host_s_key_is_stable_and_names_the_cpu() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let a = ProbeKey::collect(&kvm, &cpuid);
        let b = ProbeKey::collect(&kvm, &cpuid);
        assert_eq!(a.difference(&b), None, "{a:?}\n{b:?}");
        assert!(a.cpu.contains("signature 0x"), "{}", a.cpu);
        assert!(!a.kernel_release.is_empty());
        assert_eq!(a.kvm_api, 12);
    }

    #[test]
    fn the_cpuid_hash_ignores_which_cpu_asked_but_not_features() {
        let entry = |function, ebx, ecx, edx| kvm_bindings::kvm_cpuid_entry2 { function, ebx, ecx, edx, ..Default::default() };
        let on_cpu = |apic: u32| {
            CpuId::from_entries(&[entry(1, 0x0002_0800 | apic << 24, 0x8120_2000, 0x078b_fbff), entry(0xb, 0, 0, apic)]).unwrap()
        };
        assert_eq!(cpuid_hash(&on_cpu(0)), cpuid_hash(&on_cpu(1)));
        let no_cx16 = CpuId::from_entries(&[entry(1, 0x0002_0800, 0x8120_0000, 0x078b_fbff), entry(0xb, 0, 0, 0)]).unwrap();
        assert_ne!(cpuid_hash(&on_cpu(0)), cpuid_hash(&no_cx16));
    }

    #[test]
    fn fnv1a_matches_its_published_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }
}
