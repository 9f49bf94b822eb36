//! The probe's results, kept between runs: a JSON file per user, reused only when
//! everything they depend on ([`ProbeKey`]) is unchanged, so a start of skiff costs
//! a few file reads instead of a dozen throw-away VMs.
//!
//! Where: `$SKIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/skiff`, else `~/.cache/skiff`
//! (root included: a per-user file needs no trust between users). Trusted only if
//! the file is a regular file owned by the effective user and writable by nobody
//! else; written atomically (a 0600 temporary file renamed over it). Anything
//! missing, unreadable, corrupt, foreign or stale means probing afresh and
//! rewriting it; nothing writable means probing every time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use super::key::ProbeKey;
use super::pv::{PvFindings, PvVerdict};
use super::{HostQuirks, ProbeResult};
use crate::vcpu::cpuid::{GATED, GatedFeature};

pub const CACHE_FILE: &str = "host-probe.json";
/// A cache file is a few KiB; anything much larger is not one.
const MAX_CACHE_BYTES: u64 = 256 * 1024;

/// Whether a start may reuse earlier results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbePolicy {
    /// Reuse the cache when its key matches this host; probe (and save) otherwise.
    UseCache,
    /// Probe afresh and rewrite the cache (`skiff probe`, `skiff run --reprobe`).
    Refresh,
}

/// Where a start's host quirks came from.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeOrigin {
    /// Read from the cache; no probe VM was made.
    Cached { path: PathBuf, key: String, ms: f64 },
    /// Probed (`why`: why the cache was not used) and saved to `path`.
    Fresh { ms: f64, path: PathBuf, why: String },
    /// Probed; not saved (`why`).
    FreshUncached { ms: f64, why: String },
}

impl ProbeOrigin {
    /// One line for `--stats` and `skiff probe`.
    pub fn report_line(&self) -> String {
        match self {
            ProbeOrigin::Cached { path, key, ms } => {
                format!("host probe: reused from {} (key {key}, read in {ms:.2} ms)\n", path.display())
            }
            ProbeOrigin::Fresh { ms, path, why } => {
                format!("host probe: ran in {ms:.1} ms ({why}), saved to {}\n", path.display())
            }
            ProbeOrigin::FreshUncached { ms, why } => format!("host probe: ran in {ms:.1} ms, not saved: {why}\n"),
        }
    }

    pub fn was_cached(&self) -> bool {
        matches!(self, ProbeOrigin::Cached { .. })
    }
}

/// Why the cache could not be used or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("no cache directory: set SKIFF_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoDirectory,
    #[error("cache directory {0}: {1}")]
    Directory(PathBuf, String),
    #[error("no cache yet")]
    Missing,
    #[error("cache {0} unreadable: {1}")]
    Unreadable(PathBuf, std::io::Error),
    #[error("cache {0} not trusted: {1}")]
    NotTrusted(PathBuf, &'static str),
    #[error("cache {0} is not a skiff probe cache: {1}")]
    Corrupt(PathBuf, String),
    #[error("cache stale: {0} changed")]
    Stale(&'static str),
    #[error("cache stale: it names feature {0:?}, which this skiff does not gate")]
    UnknownFeature(String),
    #[error("the probe saw an unexpected exit ({0}); a fresh probe may not")]
    Transient(&'static str),
    #[error("writing cache {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("a fresh probe was asked for")]
    Refresh,
}

/// Host quirks for `kvm`, from the cache where `policy` allows and its key matches,
/// else from a fresh probe that is then saved.
pub fn probe_host_cached(kvm: &Kvm, supported: &CpuId, policy: ProbePolicy) -> Result<(HostQuirks, ProbeOrigin), String> {
    let started = Instant::now();
    let key = ProbeKey::collect(kvm, supported);
    let path = cache_dir().map(|d| d.join(CACHE_FILE));
    let why_fresh = match (&path, policy) {
        (_, ProbePolicy::Refresh) => CacheError::Refresh.to_string(),
        // FreshUncached below says why.
        (Err(_), _) => String::new(),
        (Ok(p), ProbePolicy::UseCache) => match load(p, &key) {
            Ok(quirks) => {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                return Ok((quirks, ProbeOrigin::Cached { path: p.clone(), key: key.id(), ms }));
            }
            Err(e) => e.to_string(),
        },
    };
    let quirks = super::probe_host(kvm, supported)?;
    let ms = quirks.probe_ms;
    let origin = match path.and_then(|p| store(&p, &key, &quirks).map(|()| p)) {
        Ok(path) => ProbeOrigin::Fresh { ms, path, why: why_fresh },
        Err(e) => ProbeOrigin::FreshUncached { ms, why: e.to_string() },
    };
    Ok((quirks, origin))
}

/// The cache directory, created (0700) if missing and checked: owned by the
/// effective user, writable by nobody else.
pub fn cache_dir() -> Result<PathBuf, CacheError> {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    let dir = std::env::var_os("SKIFF_CACHE_DIR")
        .and_then(absolute)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").and_then(absolute).map(|d| d.join("skiff")))
        .or_else(|| std::env::var_os("HOME").and_then(absolute).map(|d| d.join(".cache/skiff")))
        .ok_or(CacheError::NoDirectory)?;
    let fail = |why: String| CacheError::Directory(dir.clone(), why);
    if !dir.is_dir() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| fail(e.to_string()))?;
    }
    let meta = std::fs::metadata(&dir).map_err(|e| fail(e.to_string()))?;
    if let Err(why) = trusted(&meta, true) {
        return Err(fail(why.to_string()));
    }
    Ok(dir)
}

/// Why `meta` (of the cache directory or file) is not to be trusted, if it is not.
fn trusted(meta: &std::fs::Metadata, dir: bool) -> Result<(), &'static str> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if dir && !meta.is_dir() {
        Err("not a directory")
    } else if !dir && !meta.is_file() {
        Err("not a regular file")
    } else if meta.uid() != euid {
        Err("owned by another user")
    } else if meta.mode() & 0o022 != 0 {
        Err("writable by group or others")
    } else {
        Ok(())
    }
}

/// The cached quirks at `path` if the file is trusted, well formed and its key is `key`.
pub fn load(path: &Path, key: &ProbeKey) -> Result<HostQuirks, CacheError> {
    // O_NOFOLLOW: a symlink is not the file we wrote; O_NONBLOCK: nor is a FIFO, and
    // opening one must not wait. The checks below are on what was opened.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CacheError::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(CacheError::NotTrusted(path.into(), "a symbolic link")),
        Err(e) => return Err(CacheError::Unreadable(path.into(), e)),
    };
    let meta = file.metadata().map_err(|e| CacheError::Unreadable(path.into(), e))?;
    trusted(&meta, false).map_err(|why| CacheError::NotTrusted(path.into(), why))?;
    let mut text = String::new();
    file.take(MAX_CACHE_BYTES).read_to_string(&mut text).map_err(|e| CacheError::Unreadable(path.into(), e))?;
    let stored: CacheFile = serde_json::from_str(&text).map_err(|e| CacheError::Corrupt(path.into(), e.to_string()))?;
    if let Some(what) = key.difference(&stored.key) {
        return Err(CacheError::Stale(what));
    }
    stored.quirks.restore()
}

/// Writes `quirks` under `key` to `path`: a 0600 temporary file in the same
/// directory, renamed over the old one (a reader sees the old file or the new one).
pub fn store(path: &Path, key: &ProbeKey, quirks: &HostQuirks) -> Result<(), CacheError> {
    let file = CacheFile { key: key.clone(), quirks: StoredQuirks::from_quirks(quirks)? };
    let mut text = serde_json::to_string_pretty(&file).map_err(|e| CacheError::Corrupt(path.into(), e.to_string()))?;
    text.push('\n');
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_file_name(format!(".{CACHE_FILE}.{}.{nanos}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        // The umask may have taken bits away; exactly 0600 either way.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CacheError::Write(path.into(), e)
    })
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    key: ProbeKey,
    quirks: StoredQuirks,
}

/// [`ProbeResult`] as stored. `Other` (an unexpected exit or error) is never stored:
/// it may not happen again.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
enum StoredResult {
    Works,
    EmulationFailure,
    Faults,
    Slow(u32),
}

impl StoredResult {
    fn from_result(r: ProbeResult) -> Result<Self, CacheError> {
        Ok(match r {
            ProbeResult::Works => StoredResult::Works,
            ProbeResult::EmulationFailure => StoredResult::EmulationFailure,
            ProbeResult::Faults => StoredResult::Faults,
            ProbeResult::Slow(x) => StoredResult::Slow(x),
            ProbeResult::Other(what) => return Err(CacheError::Transient(what)),
        })
    }

    fn result(self) -> ProbeResult {
        match self {
            StoredResult::Works => ProbeResult::Works,
            StoredResult::EmulationFailure => ProbeResult::EmulationFailure,
            StoredResult::Faults => ProbeResult::Faults,
            StoredResult::Slow(x) => ProbeResult::Slow(x),
        }
    }
}

/// [`HostQuirks`] with gated features by name.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredQuirks {
    hidden: Vec<(String, StoredResult)>,
    cpl0_ns_per_insn: f64,
    unhideable: Vec<String>,
    cpuid_honoured: bool,
    user_syscall_broken: bool,
    hypercall_hangs: bool,
    int3_traps: bool,
    user_xcr0: Option<u64>,
    xsave_kept: Option<StoredResult>,
    guest_xcr0: u64,
    pv: StoredPv,
    tpr_cost: Option<super::tpr::TprCost>,
    probe_ms: f64,
}

/// [`super::pv::PvFindings`] as stored: verdicts by bit.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPv {
    offered: u32,
    verdicts: Vec<(u8, PvVerdict)>,
    enforced: bool,
    clock_stable: bool,
}

impl StoredQuirks {
    fn from_quirks(q: &HostQuirks) -> Result<Self, CacheError> {
        let hidden = q.hidden.iter().map(|(f, r)| Ok((f.name.to_string(), StoredResult::from_result(*r)?)));
        Ok(StoredQuirks {
            hidden: hidden.collect::<Result<_, CacheError>>()?,
            cpl0_ns_per_insn: q.cpl0_ns_per_insn,
            unhideable: q.unhideable.iter().map(|f| f.name.to_string()).collect(),
            cpuid_honoured: q.cpuid_honoured,
            user_syscall_broken: q.user_syscall_broken,
            hypercall_hangs: q.hypercall_hangs,
            int3_traps: q.int3_traps,
            user_xcr0: q.user_xcr0,
            xsave_kept: q.xsave_kept.map(StoredResult::from_result).transpose()?,
            guest_xcr0: q.guest_xcr0,
            pv: StoredPv {
                offered: q.pv.offered,
                verdicts: q.pv.verdicts.clone(),
                enforced: q.pv.enforced,
                clock_stable: q.pv.clock_stable,
            },
            tpr_cost: q.tpr_cost,
            probe_ms: q.probe_ms,
        })
    }

    /// Back to [`HostQuirks`]; a feature name this skiff does not gate means the file
    /// came from another skiff.
    fn restore(self) -> Result<HostQuirks, CacheError> {
        let feature = |name: String| -> Result<&'static GatedFeature, CacheError> {
            GATED.iter().find(|g| g.name == name).ok_or(CacheError::UnknownFeature(name))
        };
        let mut hidden = Vec::with_capacity(self.hidden.len().min(GATED.len()));
        for (name, r) in self.hidden {
            hidden.push((feature(name)?, r.result()));
        }
        let unhideable = self.unhideable.into_iter().map(feature).collect::<Result<_, _>>()?;
        // 32 bits at most: a longer list is not from a skiff.
        if let Some((bit, _)) = self.pv.verdicts.iter().find(|(b, _)| *b >= 32) {
            return Err(CacheError::UnknownFeature(format!("paravirtual bit {bit}")));
        }
        if self.pv.verdicts.len() > 32 {
            return Err(CacheError::UnknownFeature("more than 32 paravirtual bits".into()));
        }
        Ok(HostQuirks {
            hidden,
            cpl0_ns_per_insn: self.cpl0_ns_per_insn,
            unhideable,
            cpuid_honoured: self.cpuid_honoured,
            user_syscall_broken: self.user_syscall_broken,
            hypercall_hangs: self.hypercall_hangs,
            int3_traps: self.int3_traps,
            user_xcr0: self.user_xcr0,
            xsave_kept: self.xsave_kept.map(StoredResult::result),
            guest_xcr0: self.guest_xcr0,
            pv: PvFindings { offered: self.pv.offered, verdicts: self.pv.verdicts, enforced: self.pv.enforced, clock_stable: self.pv.clock_stable },
            tpr_cost: self.tpr_cost,
            probe_ms: self.probe_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory (0700, like the real one), removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("skiff-cache-test-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
            Scratch(dir)
        }
        fn file(&self) -> PathBuf {
            self.0.join(CACHE_FILE)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn gated(name: &str) -> &'static GatedFeature {
        GATED.iter().find(|g| g.name == name).unwrap()
    }

    /// Quirks as a PVM host reports them, with timings no decimal prints exactly.
    fn sample() -> HostQuirks {
        HostQuirks {
            hidden: vec![
                (gated("cx16"), ProbeResult::EmulationFailure),
                (gated("movbe"), ProbeResult::Faults),
                (gated("erms"), ProbeResult::Slow(6)),
            ],
            cpl0_ns_per_insn: 584.123_456_789_012_3,
            unhideable: vec![gated("movbe"), gated("erms")],
            cpuid_honoured: true,
            user_syscall_broken: true,
            hypercall_hangs: true,
            int3_traps: true,
            user_xcr0: Some(0xe7),
            xsave_kept: Some(ProbeResult::Faults),
            guest_xcr0: 0x2e7,
            pv: PvFindings {
                offered: 0x0100_7efb,
                verdicts: vec![(3, PvVerdict::Works), (7, PvVerdict::HypercallsHang), (9, PvVerdict::Needs(5)), (31, PvVerdict::Unknown)],
                enforced: true,
                clock_stable: false,
            },
            tpr_cost: Some(super::super::tpr::TprCost { mmio_ns: 800.5, patched_ns: 17_000.25, iterations: 64, vapic_at_exit: false, exit_ns: 9_500.5 }),
            probe_ms: 0.1 + 0.2,
        }
    }

    fn key() -> ProbeKey {
        ProbeKey {
            format: super::super::PROBE_FORMAT,
            skiff: "test".into(),
            cpu: "GenuineIntel signature 0x000906ea".into(),
            microcode: None,
            supported_cpuid: "00".into(),
            kernel_release: "6.1".into(),
            kernel_version: "#1".into(),
            kvm_api: 12,
            kvm_caps: Default::default(),
            kvm_modules: [("kvm_intel/ept".to_string(), "Y".to_string())].into(),
        }
    }

    #[test]
    fn quirks_round_trip_exactly() {
        let dir = Scratch::new("round-trip");
        let q = sample();
        store(&dir.file(), &key(), &q).unwrap();
        let back = load(&dir.file(), &key()).unwrap();
        // Debug prints every field, floats to the last bit.
        assert_eq!(format!("{back:?}"), format!("{q:?}"));
        assert_eq!(back.cpl0_ns_per_insn.to_bits(), q.cpl0_ns_per_insn.to_bits());
        assert_eq!(back.probe_ms.to_bits(), q.probe_ms.to_bits());
        assert_eq!(back.unhideable[1].linux_names(), ["erms", "fsrm"], "mapped back to the table's entry");
        let mode = std::fs::metadata(dir.file()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(&dir.0).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(CACHE_FILE)], "no temporary file left behind");
    }

    #[test]
    fn a_different_key_is_stale() {
        let dir = Scratch::new("stale");
        store(&dir.file(), &key(), &sample()).unwrap();
        let mut other = key();
        other.kvm_modules.insert("kvm_intel/ept".into(), "N".into());
        let err = load(&dir.file(), &other).unwrap_err();
        assert!(matches!(err, CacheError::Stale("the kvm modules or their parameters")), "{err}");
        assert_eq!(err.to_string(), "cache stale: the kvm modules or their parameters changed");
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_not_used() {
        let dir = Scratch::new("corrupt");
        store(&dir.file(), &key(), &sample()).unwrap();
        let good = std::fs::read_to_string(dir.file()).unwrap();
        let renamed = good.replace("\"cx16\"", "\"cx17\"");
        let cases: [(&str, &str); 6] = [
            ("", "empty"),
            (&good[..good.len() / 2], "truncated"),
            ("\0\0\0\u{1}garbage", "binary"),
            ("{\"name\": \"something else\", \"version\": 3}", "another program's JSON"),
            (&good.replace("\"probe_ms\"", "\"probe_ms\": 1, \"extra\""), "an unknown field"),
            (&renamed, "an unknown feature"),
        ];
        for (text, what) in cases {
            std::fs::write(dir.file(), text).unwrap();
            std::fs::set_permissions(dir.file(), std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = load(&dir.file(), &key()).unwrap_err();
            let expected = match what {
                "an unknown feature" => matches!(&err, CacheError::UnknownFeature(n) if n == "cx17"),
                _ => matches!(err, CacheError::Corrupt(..)),
            };
            assert!(expected, "{what}: {err}");
        }
        // And a fresh store replaces whatever was there.
        store(&dir.file(), &key(), &sample()).unwrap();
        assert!(load(&dir.file(), &key()).is_ok());
    }

    #[test]
    fn files_others_could_have_written_are_not_trusted() {
        let dir = Scratch::new("trust");
        store(&dir.file(), &key(), &sample()).unwrap();
        std::fs::set_permissions(dir.file(), std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = load(&dir.file(), &key()).unwrap_err();
        assert!(matches!(err, CacheError::NotTrusted(_, "writable by group or others")), "{err}");

        std::fs::set_permissions(dir.file(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.0.join("link.json");
        std::os::unix::fs::symlink(dir.file(), &link).unwrap();
        let err = load(&link, &key()).unwrap_err();
        assert!(matches!(err, CacheError::NotTrusted(_, "a symbolic link")), "{err}");

        // Owned by someone else: as root, hand the file to nobody; otherwise a file
        // root owns will do.
        // SAFETY: geteuid has no preconditions.
        let other = if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(dir.file(), Some(65534), Some(65534)).unwrap();
            dir.file()
        } else {
            PathBuf::from("/etc/passwd")
        };
        let err = load(&other, &key()).unwrap_err();
        assert!(matches!(err, CacheError::NotTrusted(_, "owned by another user")), "{err}");

        let err = load(&dir.0, &key()).unwrap_err();
        assert!(matches!(err, CacheError::NotTrusted(_, "not a regular file")), "{err}");
        assert!(matches!(load(&dir.0.join("none.json"), &key()), Err(CacheError::Missing)));
    }

    #[test]
    fn transient_results_are_not_saved() {
        let dir = Scratch::new("transient");
        let mut q = sample();
        q.hidden.push((gated("rdpid"), ProbeResult::Other("KVM_RUN error")));
        let err = store(&dir.file(), &key(), &q).unwrap_err();
        assert!(matches!(err, CacheError::Transient("KVM_RUN error")), "{err}");
        assert!(!dir.file().exists());
    }

    #[test]
    fn origin_lines_say_where_the_quirks_came_from() {
        let cached = ProbeOrigin::Cached { path: "/c/host-probe.json".into(), key: "0123".into(), ms: 0.25 };
        assert_eq!(cached.report_line(), "host probe: reused from /c/host-probe.json (key 0123, read in 0.25 ms)\n");
        assert!(cached.was_cached());
        let fresh = ProbeOrigin::Fresh { ms: 12.34, path: "/c/host-probe.json".into(), why: "no cache yet".into() };
        assert_eq!(fresh.report_line(), "host probe: ran in 12.3 ms (no cache yet), saved to /c/host-probe.json\n");
        let uncached = ProbeOrigin::FreshUncached { ms: 9.0, why: "no cache directory".into() };
        assert_eq!(uncached.report_line(), "host probe: ran in 9.0 ms, not saved: no cache directory\n");
        assert!(!uncached.was_cached());
    }
}
