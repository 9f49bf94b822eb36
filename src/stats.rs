//! Exit accounting: cheap enough to leave on. Each vCPU thread owns its own counters
//! (plain integers, no atomics, no sharing); they are summed when the threads join.
//! Nothing on the exit path allocates: ports count into a fixed array (one slot a
//! port, zero pages until touched), MMIO pages into a fixed-size table whose overflow
//! is one counter, so a guest touching ever new addresses cannot grow skiff.

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
    /// KVM_EXIT_TPR_ACCESS (a TPR-access report, src/tpr/).
    TprAccess,
    Other,
}

impl ExitKind {
    pub const ALL: [ExitKind; 14] = [
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
        ExitKind::TprAccess,
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
            ExitKind::TprAccess => "tpr-access",
            ExitKind::Other => "other",
        }
    }
}

/// Distinct MMIO pages (or ports) counted one by one; exits to further ones count
/// together. A fixed table keeps the counters small (they are per vCPU and summed).
const MMIO_SLOTS: usize = 64;
const NO_PAGE: u64 = u64::MAX;

/// Exits per key (a 4 KiB MMIO page, or a port): open addressing in a fixed table.
#[derive(Clone, Debug)]
pub struct PageCounts {
    slots: [(u64, u64); MMIO_SLOTS],
    /// Exits to pages that found the table full.
    pub other: u64,
}

impl Default for PageCounts {
    fn default() -> Self {
        Self { slots: [(NO_PAGE, 0); MMIO_SLOTS], other: 0 }
    }
}

impl PageCounts {
    #[inline]
    pub fn add(&mut self, page: u64, n: u64) {
        // Fibonacci hashing of the key picks the first slot to probe.
        let start = (page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize;
        for i in 0..MMIO_SLOTS {
            if let Some(slot) = self.slots.get_mut((start + i) % MMIO_SLOTS) {
                if slot.0 == page {
                    slot.1 += n;
                    return;
                }
                if slot.0 == NO_PAGE {
                    *slot = (page, n);
                    return;
                }
            }
        }
        self.other += n;
    }

    pub fn get(&self, page: u64) -> u64 {
        self.iter().find(|(p, _)| *p == page).map_or(0, |(_, n)| n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots.iter().filter(|s| s.0 != NO_PAGE).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.other == 0 && self.iter().next().is_none()
    }
}

/// One vCPU's counters.
#[derive(Clone, Debug)]
pub struct ExitStats {
    pub by_kind: [u64; ExitKind::ALL.len()],
    /// Port-I/O exits per port (in and out together); ports beyond the table's 64
    /// count under `ports.other`.
    pub ports: PageCounts,
    /// MMIO exits per 4 KiB page.
    pub mmio_pages: PageCounts,
    /// Instructions skiff emulated or answered after KVM failed to emulate them, by
    /// mnemonic (e.g. "cmpxchg16b" or "int3 -> #BP").
    pub emulated: BTreeMap<String, u64>,
}

impl Default for ExitStats {
    fn default() -> Self {
        Self {
            by_kind: [0; ExitKind::ALL.len()],
            ports: PageCounts::default(),
            mmio_pages: PageCounts::default(),
            emulated: BTreeMap::new(),
        }
    }
}

impl ExitStats {
    #[inline]
    pub fn count(&mut self, kind: ExitKind) {
        if let Some(n) = self.by_kind.get_mut(kind as usize) {
            *n += 1;
        }
    }

    #[inline]
    pub fn count_port(&mut self, port: u16) {
        self.ports.add(port as u64, 1);
    }

    #[inline]
    pub fn count_mmio(&mut self, addr: u64) {
        self.mmio_pages.add(addr & !0xfff, 1);
    }

    /// Exits counted for `port`.
    pub fn port(&self, port: u16) -> u64 {
        self.ports.get(port as u64)
    }

    /// Every port with exits, with its count.
    pub fn ports(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.ports.iter().map(|(p, n)| (p as u16, n))
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
        for (port, n) in other.ports.iter() {
            self.ports.add(port, n);
        }
        self.ports.other += other.ports.other;
        for (page, n) in other.mmio_pages.iter() {
            self.mmio_pages.add(page, n);
        }
        self.mmio_pages.other += other.mmio_pages.other;
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
        fn top<K: Copy>(counts: impl Iterator<Item = (K, u64)>) -> Vec<(K, u64)> {
            let mut v: Vec<_> = counts.collect();
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
        let ports = top(self.ports());
        if !ports.is_empty() {
            let _ = writeln!(out, "top ports:");
            for (port, n) in ports {
                let _ = writeln!(out, "  {port:#06x} {n:>10}");
            }
            if self.ports.other > 0 {
                let _ = writeln!(out, "  {:<6} {:>10}", "others", self.ports.other);
            }
        }
        if !self.mmio_pages.is_empty() {
            let _ = writeln!(out, "top MMIO pages:");
            for (page, n) in top(self.mmio_pages.iter()) {
                let _ = writeln!(out, "  {page:#014x} {n:>10}");
            }
            if self.mmio_pages.other > 0 {
                let _ = writeln!(out, "  {:<14} {:>10}", "other pages", self.mmio_pages.other);
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
        assert_eq!(a.port(0x3f8), 2);
        assert_eq!(a.mmio_pages.get(0xfee0_0000), 1);
        let r = a.report();
        assert!(r.contains("io-out"), "{r}");
        assert!(r.contains("0x03f8"), "{r}");
        assert!(r.contains("int3 -> #BP"), "{r}");
    }

    #[test]
    fn mmio_table_is_bounded() {
        let mut s = ExitStats::default();
        for page in 0..1000u64 {
            s.count_mmio(page << 12 | 0x10);
            s.count_mmio(page << 12);
        }
        let counted: u64 = s.mmio_pages.iter().map(|(_, n)| n).sum();
        assert_eq!(s.mmio_pages.iter().count(), MMIO_SLOTS);
        assert_eq!(counted + s.mmio_pages.other, 2000, "every exit is counted somewhere");
        assert!(s.mmio_pages.iter().all(|(_, n)| n == 2));
        assert!(s.report().contains("other pages"));
        s.count_port(0xffff);
        assert_eq!(s.port(0xffff), 1);
        assert_eq!(s.ports().collect::<Vec<_>>(), vec![(0xffff, 1)]);
    }
}
