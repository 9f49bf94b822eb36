//! Exit accounting: cheap enough to leave on. Each vCPU thread owns its own counters
//! (plain integers, no atomics, no sharing); they are summed when the threads join.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Why a vCPU left KVM_RUN, as skiff counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    SystemEvent,
    InternalError,
    FailEntry,
    Interrupted,
    /// KVM_EXIT_DEBUG (the SYSCALL fix-up's breakpoint).
    Debug,
    /// KVM_EXIT_X86_WRMSR (a filtered MSR write).
    MsrWrite,
    Other,
}

impl ExitKind {
    pub const ALL: [ExitKind; 13] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::Interrupted,
        ExitKind::Debug,
        ExitKind::MsrWrite,
        ExitKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system-event",
            ExitKind::InternalError => "internal-error (emulation failure)",
            ExitKind::FailEntry => "fail-entry",
            ExitKind::Interrupted => "interrupted (kick)",
            ExitKind::Debug => "debug (syscall fix-up breakpoint)",
            ExitKind::MsrWrite => "msr-write (filtered)",
            ExitKind::Other => "other",
        }
    }
}

/// One vCPU's counters.
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    pub by_kind: [u64; ExitKind::ALL.len()],
    /// Port-I/O exits per port (in and out together).
    pub ports: BTreeMap<u16, u64>,
    /// MMIO exits per 4 KiB page.
    pub mmio_pages: BTreeMap<u64, u64>,
    /// Instructions skiff emulated or answered after KVM failed to emulate them, by
    /// mnemonic (e.g. "cmpxchg16b" or "int3 -> #BP").
    pub emulated: BTreeMap<String, u64>,
}

impl ExitStats {
    #[inline]
    pub fn count(&mut self, kind: ExitKind) {
        self.by_kind[kind as usize] += 1;
    }

    #[inline]
    pub fn count_port(&mut self, port: u16) {
        *self.ports.entry(port).or_insert(0) += 1;
    }

    #[inline]
    pub fn count_mmio(&mut self, addr: u64) {
        *self.mmio_pages.entry(addr & !0xfff).or_insert(0) += 1;
    }

    pub fn count_emulated(&mut self, what: &str) {
        match self.emulated.get_mut(what) {
            Some(n) => *n += 1,
            None => {
                self.emulated.insert(what.to_string(), 1);
            }
        }
    }

    pub fn merge(&mut self, other: &ExitStats) {
        for (a, b) in self.by_kind.iter_mut().zip(other.by_kind.iter()) {
            *a += b;
        }
        for (k, v) in &other.ports {
            *self.ports.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.mmio_pages {
            *self.mmio_pages.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.emulated {
            *self.emulated.entry(k.clone()).or_insert(0) += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.by_kind.iter().sum()
    }

    pub fn emulated_total(&self) -> u64 {
        self.emulated.values().sum()
    }

    /// A human-readable report: exits per reason, the top ports and MMIO pages, and
    /// emulated instructions.
    pub fn report(&self) -> String {
        fn top<K: Copy>(map: &BTreeMap<K, u64>) -> Vec<(K, u64)> {
            let mut v: Vec<_> = map.iter().map(|(k, n)| (*k, *n)).collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1));
            v.truncate(8);
            v
        }
        let mut out = String::new();
        let _ = writeln!(out, "exits: {} total", self.total());
        for kind in ExitKind::ALL {
            let n = self.by_kind[kind as usize];
            if n > 0 {
                let _ = writeln!(out, "  {:<36} {n:>10}", kind.name());
            }
        }
        if !self.ports.is_empty() {
            let _ = writeln!(out, "top ports:");
            for (port, n) in top(&self.ports) {
                let _ = writeln!(out, "  {port:#06x} {n:>10}");
            }
        }
        if !self.mmio_pages.is_empty() {
            let _ = writeln!(out, "top MMIO pages:");
            for (page, n) in top(&self.mmio_pages) {
                let _ = writeln!(out, "  {page:#014x} {n:>10}");
            }
        }
        let _ = writeln!(
            out,
            "emulated after KVM emulation failure: {}",
            self.emulated_total()
        );
        for (what, n) in &self.emulated {
            let _ = writeln!(out, "  {what:<36} {n:>10}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_report() {
        let mut a = ExitStats::default();
        a.count(ExitKind::IoOut);
        a.count_port(0x3f8);
        a.count_emulated("int3 -> #BP");
        let mut b = ExitStats::default();
        b.count(ExitKind::IoOut);
        b.count(ExitKind::Hlt);
        b.count_port(0x3f8);
        b.count_mmio(0xfee0_0310);
        a.merge(&b);
        assert_eq!(a.by_kind[ExitKind::IoOut as usize], 2);
        assert_eq!(a.total(), 3);
        assert_eq!(a.ports[&0x3f8], 2);
        assert_eq!(a.mmio_pages[&0xfee0_0000], 1);
        let r = a.report();
        assert!(r.contains("io-out"), "{r}");
        assert!(r.contains("0x03f8"), "{r}");
        assert!(r.contains("int3 -> #BP"), "{r}");
    }
}
