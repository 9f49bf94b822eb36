//! What skiff keeps about in-place reboots, and when it stops rebooting.
//!
//! A long-running guest may reboot any number of times, so the record is a bounded
//! summary: counts, the first and the latest reboots in detail, and running minimum,
//! mean and maximum of the times. A guest that cannot boot (half a bzImage, a kernel
//! built for another machine) reboots hundreds of times a second, silently: after
//! [`STORM_REBOOTS`] boots in a row that each ended within [`STORM_BOOT`] without a
//! sign of life, skiff stops with a diagnostic that says so.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

/// One in-place reboot, for `--stats` and the reboot benchmark.
#[derive(Clone, Debug)]
pub struct RebootRecord {
    /// Its number: 1 for the first reboot of the run.
    pub n: u64,
    /// What asked for it (i8042, 0xcf9, ACPI reset register, triple fault).
    pub source: &'static str,
    /// Time to reset the machine (vCPUs, devices, RAM, kernel reload), in ms.
    pub reset_ms: f64,
    /// From the reboot request to the next boot's /init marker, in ms.
    pub marker_ms: Option<f64>,
    /// skiff's own resources right after the reset: they must not grow per reboot.
    pub threads: u64,
    pub fds: u64,
    pub rss: Option<super::RssReport>,
}

impl RebootRecord {
    /// One line for `--stats`.
    pub fn describe(&self) -> String {
        let marker = self.marker_ms.map_or(String::new(), |m| format!(", /init marker {m:.1} ms after the request"));
        let rss = self.rss.map_or(String::new(), |r| {
            format!(", RSS {} KiB without guest RAM ({} KiB anonymous)", r.vmm_kib(), r.vmm_anon_kib())
        });
        format!(
            "reboot {} ({}): machine reset in place in {:.1} ms{marker}; threads {}, fds {}{rss}",
            self.n, self.source, self.reset_ms, self.threads, self.fds
        )
    }
}

/// Reboots kept in detail from the start of the run, and the most recent ones.
pub const KEEP_FIRST: usize = 16;
pub const KEEP_LAST: usize = 16;

/// Minimum, sum and maximum of a series, without keeping it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Running {
    pub n: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

impl Running {
    pub fn add(&mut self, v: f64) {
        (self.min, self.max) = if self.n == 0 { (v, v) } else { (self.min.min(v), self.max.max(v)) };
        self.n += 1;
        self.sum += v;
    }

    /// "min A, mean B, max C ms", or "n/a".
    pub fn describe(&self) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        format!("min {:.1}, mean {:.1}, max {:.1} ms", self.min, self.sum / self.n as f64, self.max)
    }
}

/// Every reboot of a run, in bounded memory.
#[derive(Clone, Debug, Default)]
pub struct RebootSummary {
    pub count: u64,
    /// Reboots per source. The sources are a fixed set of names in skiff's code.
    pub by_source: Vec<(&'static str, u64)>,
    pub first: Vec<RebootRecord>,
    pub last: VecDeque<RebootRecord>,
    pub reset_ms: Running,
    pub marker_ms: Running,
}

impl RebootSummary {
    /// Counts a reboot whose reset just finished (its marker time comes later).
    pub fn push(&mut self, source: &'static str, reset_ms: f64, threads: u64, fds: u64, rss: Option<super::RssReport>) {
        self.count += 1;
        match self.by_source.iter_mut().find(|(s, _)| *s == source) {
            Some((_, n)) => *n += 1,
            None => self.by_source.push((source, 1)),
        }
        self.reset_ms.add(reset_ms);
        let r = RebootRecord { n: self.count, source, reset_ms, marker_ms: None, threads, fds, rss };
        if self.first.len() < KEEP_FIRST {
            self.first.push(r);
        } else {
            if self.last.len() == KEEP_LAST {
                self.last.pop_front();
            }
            self.last.push_back(r);
        }
    }

    /// The latest reboot.
    pub fn latest(&self) -> Option<&RebootRecord> {
        self.last.back().or(self.first.last())
    }

    /// Records when the boot after the latest reboot reached the /init marker.
    pub fn set_latest_marker(&mut self, ms: f64) {
        self.marker_ms.add(ms);
        if let Some(r) = self.last.back_mut().or(self.first.last_mut()) {
            r.marker_ms = Some(ms);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The lines `--stats` prints: the reboots kept, then the totals.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for r in &self.first {
            let _ = writeln!(out, "{}", r.describe());
        }
        let skipped = self.count - (self.first.len() + self.last.len()) as u64;
        if skipped > 0 {
            let _ = writeln!(out, "... {skipped} reboots not kept in detail ...");
        }
        for r in &self.last {
            let _ = writeln!(out, "{}", r.describe());
        }
        let sources: Vec<String> = self.by_source.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let _ = writeln!(
            out,
            "reboots: {} in place ({}); reset {}; reboot request to /init marker {}",
            self.count,
            sources.join(", "),
            self.reset_ms.describe(),
            self.marker_ms.describe()
        );
        out
    }
}

/// Boots in a row without a sign of life, each ending in a reboot within
/// [`STORM_BOOT`] of its start, that make a reboot storm.
pub const STORM_REBOOTS: u32 = 16;
/// A boot this short that printed nothing and never reached the boot marker got
/// nowhere. Real kernels print within this even where guest kernel mode is emulated;
/// a guest that reboots quietly after a longer run is not storming.
pub const STORM_BOOT: Duration = Duration::from_secs(5);

/// Watches boots for a reboot storm.
#[derive(Clone, Copy, Debug, Default)]
pub struct StormWatch {
    /// Boots in a row that rebooted quickly without a sign of life.
    pub silent_in_a_row: u32,
}

impl StormWatch {
    /// A boot ended in a reboot after `lasted`; `showed_life`: it wrote to the console
    /// or reached the boot marker. Returns whether this reboot completes a storm.
    pub fn reboot(&mut self, lasted: Duration, showed_life: bool) -> bool {
        if showed_life || lasted >= STORM_BOOT {
            self.silent_in_a_row = 0;
            return false;
        }
        self.silent_in_a_row += 1;
        self.silent_in_a_row >= STORM_REBOOTS
    }

    /// Whether the next quick, silent reboot would complete a storm (the vCPUs then
    /// record registers at a triple fault, for the diagnostic).
    pub fn next_completes(&self) -> bool {
        self.silent_in_a_row + 1 >= STORM_REBOOTS
    }

    /// The one-line diagnostic naming the storm; `last` is what asked for the last reboot.
    pub fn describe(&self, last: &str) -> String {
        format!(
            "reboot storm: the guest rebooted {} times in a row, each within {} s of its start, \
             with no console output and no boot marker (the last through {last}): it cannot boot. \
             Is the kernel whole, and built for x86-64 with this boot protocol?",
            self.silent_in_a_row,
            STORM_BOOT.as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_is_bounded_and_counts_everything() {
        let mut s = RebootSummary::default();
        for i in 0..100_000u64 {
            let source = if i % 2 == 0 { "i8042 reset line" } else { "triple fault" };
            s.push(source, i as f64 % 7.0, 3, 12, Some(crate::vmm::RssReport { total_kib: 9000, anon_kib: 6000, guest_kib: 4000 }));
            if i % 4 == 0 {
                s.set_latest_marker(10.0);
            }
        }
        assert_eq!(s.count, 100_000);
        assert_eq!(s.first.len(), KEEP_FIRST);
        assert_eq!(s.last.len(), KEEP_LAST);
        assert!(s.first.capacity() <= 2 * KEEP_FIRST && s.last.capacity() <= 2 * KEEP_LAST);
        assert_eq!(s.by_source, vec![("i8042 reset line", 50_000), ("triple fault", 50_000)]);
        assert_eq!(s.last.back().map(|r| r.n), Some(100_000));
        assert_eq!(s.reset_ms.n, 100_000);
        assert_eq!((s.reset_ms.min, s.reset_ms.max), (0.0, 6.0));
        assert_eq!(s.marker_ms.n, 25_000);
        let report = s.report();
        assert_eq!(report.lines().count(), KEEP_FIRST + KEEP_LAST + 2, "{report}");
        assert!(report.contains("... 99968 reboots not kept in detail ..."), "{report}");
        assert!(report.contains("reboots: 100000 in place (i8042 reset line 50000, triple fault 50000)"), "{report}");
        assert!(report.lines().next().is_some_and(|l| l.starts_with("reboot 1 (i8042 reset line)")), "{report}");
        assert!(report.contains("RSS 5000 KiB without guest RAM (2000 KiB anonymous)"), "{report}");
    }

    #[test]
    fn a_few_reboots_are_all_kept() {
        let mut s = RebootSummary::default();
        for _ in 0..9 {
            s.push("0xcf9 reset control", 0.5, 3, 12, None);
            s.set_latest_marker(13.0);
        }
        let report = s.report();
        assert_eq!(report.lines().filter(|l| l.starts_with("reboot ")).count(), 9, "{report}");
        assert!(!report.contains("not kept"), "{report}");
        assert!(report.contains("/init marker 13.0 ms after the request"), "{report}");
    }

    #[test]
    fn a_storm_is_quick_silent_reboots_in_a_row() {
        let quick = Duration::from_millis(5);
        let mut w = StormWatch::default();
        for _ in 0..STORM_REBOOTS - 1 {
            assert!(!w.reboot(quick, false));
        }
        assert!(w.next_completes());
        assert!(w.reboot(quick, false), "the {STORM_REBOOTS}th quick silent reboot is a storm");
        assert!(w.describe("triple fault").starts_with("reboot storm: the guest rebooted 16 times in a row"));

        // A boot that prints, or reaches the marker, or runs a while, starts over.
        let mut w = StormWatch::default();
        for i in 0..10 * STORM_REBOOTS {
            let life = i % (STORM_REBOOTS - 1) == 0;
            assert!(!w.reboot(quick, life), "reboot {i}");
        }
        let mut w = StormWatch::default();
        for i in 0..10 * STORM_REBOOTS {
            assert!(!w.reboot(if i % 8 == 0 { STORM_BOOT } else { quick }, false), "reboot {i}");
        }
    }
}
