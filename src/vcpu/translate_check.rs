//! The page walker checked against KVM's own: on request (SIGUSR1 to skiff), each vCPU
//! enumerates the present mappings of the address space it is running in, samples
//! about ten thousand addresses across them (user pages, kernel text, the kernel's
//! large-page mappings such as the direct map, its 4 KiB mappings such as vmalloc),
//! plus as many random addresses, and translates each both with x86/paging.rs and
//! with KVM_TRANSLATE. Every disagreement is reported; so is the cost of each.
//!
//! KVM_TRANSLATE reports only "valid" and the physical address (no access rights),
//! so the comparison is a supervisor read with SMAP and protection keys out of it.

use std::fmt::Write as _;
use std::time::Instant;

use super::Vcpu;
use crate::x86::paging::{self, Access, FailReason, Mapping, PagingContext, PagingMode, Translation};

/// Addresses sampled per class, and random ones on top.
const PER_CLASS: usize = 2560;
/// Page-table entries the enumeration may read.
const MAX_ENTRIES: usize = 1 << 21;
/// Disagreements printed in full.
const SHOWN: usize = 8;

const CLASSES: [&str; 5] = ["user", "kernel text", "kernel large pages", "kernel 4 KiB pages", "random"];

fn class_of(m: &Mapping) -> usize {
    if m.gva < 1 << 47 {
        0
    } else if m.gva >= 0xffff_ffff_8000_0000 {
        1
    } else if m.size > 0x1000 {
        2
    } else {
        3
    }
}

/// A small deterministic generator: the check is repeatable for one address space
/// (translate_bench draws its addresses from it too).
pub struct XorShift(pub u64);
impl XorShift {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the two translators said about one address.
fn agree(ours: &Translation, kvm: Option<u64>) -> bool {
    match (ours, kvm) {
        (Translation::Ok(g), Some(k)) => *g == k,
        // A mapping of something that is not RAM (an APIC page, say) still translates.
        (Translation::Fail(FailReason::NotRam { level: 1..=5, gpa }), Some(k)) => *gpa == k,
        (Translation::Ok(_) | Translation::Fail(FailReason::NotRam { level: 1..=5, .. }), None) => false,
        (_, Some(_)) => false,
        (_, None) => true,
    }
}

/// Runs the check on `vcpu` (stopped outside KVM_RUN); returns the report.
pub fn run(vcpu: &Vcpu) -> String {
    let (regs, sregs) = match (vcpu.fd.get_regs(), vcpu.fd.get_sregs()) {
        (Ok(r), Ok(s)) => (r, s),
        _ => return format!("translate self-check, vCPU {}: registers unavailable\n", vcpu.index),
    };
    let mut ctx = PagingContext::from_sregs(&sregs, regs.rflags);
    ctx.cpl = 0;
    ctx.cr4 &= !((1 << 21) | (1 << 22)); // SMAP, PKE: not part of KVM_TRANSLATE's answer
    let mode = ctx.mode();
    if mode == PagingMode::None {
        return format!("translate self-check, vCPU {}: paging is off, nothing to check\n", vcpu.index);
    }

    // A uniform sample of each class's present leaves (reservoir sampling: memory
    // stays at PER_CLASS mappings a class however many the guest maps).
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ sregs.cr3);
    let mut by_class: [(Vec<Mapping>, u64); 4] = Default::default();
    let entries = paging::for_each_mapping(&vcpu.mem, &ctx, MAX_ENTRIES, |m| {
        if let Some((kept, seen)) = by_class.get_mut(class_of(m)) {
            *seen += 1;
            if kept.len() < PER_CLASS {
                kept.push(*m);
            } else if let Some(slot) = kept.get_mut((rng.next() % *seen) as usize) {
                *slot = *m;
            }
        }
    });

    // Sample addresses: each kept mapping in turn, a random offset each time.
    let mut samples: Vec<(usize, u64)> = Vec::with_capacity(PER_CLASS * CLASSES.len());
    for (class, (kept, _)) in by_class.iter().enumerate() {
        for m in kept.iter().cycle().take(if kept.is_empty() { 0 } else { PER_CLASS }) {
            samples.push((class, m.gva.wrapping_add(rng.next() % m.size)));
        }
    }
    let va_bits = if mode == PagingMode::Level5 { 57 } else if mode == PagingMode::Level4 { 48 } else { 32 };
    for _ in 0..PER_CLASS {
        let raw = rng.next() & ((1u64 << va_bits) - 1);
        // Canonical: sign-extend from the top implemented bit.
        let gva = if va_bits == 32 { raw } else { (((raw << (64 - va_bits)) as i64) >> (64 - va_bits)) as u64 };
        samples.push((4, gva));
    }

    // Ours, timed alone.
    let t = Instant::now();
    let ours: Vec<Translation> = samples.iter().map(|&(_, gva)| paging::translate(&vcpu.mem, &ctx, gva, Access::Read)).collect();
    let ours_ns = t.elapsed().as_nanos() as f64 / samples.len().max(1) as f64;
    // KVM's, timed alone.
    let t = Instant::now();
    let mut kvm: Vec<Option<u64>> = Vec::with_capacity(samples.len());
    for &(_, gva) in &samples {
        match vcpu.fd.translate_gva(gva) {
            Ok(tr) => kvm.push((tr.valid != 0).then_some(tr.physical_address)),
            Err(e) => return format!("translate self-check, vCPU {}: KVM_TRANSLATE failed: {e}\n", vcpu.index),
        }
    }
    let kvm_ns = t.elapsed().as_nanos() as f64 / samples.len().max(1) as f64;

    let mut counts = [0usize; 5];
    let mut disagree = Vec::new();
    for ((&(class, gva), o), k) in samples.iter().zip(&ours).zip(&kvm) {
        if let Some(c) = counts.get_mut(class) {
            *c += 1;
        }
        if !agree(o, *k) {
            disagree.push((gva, o.clone(), *k));
        }
    }
    let mut out = format!(
        "translate self-check, vCPU {} (CR3 {:#x}, {:?} paging, {entries} table entries read): {} addresses (",
        vcpu.index,
        sregs.cr3,
        mode,
        samples.len()
    );
    for (i, (name, n)) in CLASSES.iter().zip(counts).enumerate() {
        let _ = write!(out, "{}{name} {n}", if i > 0 { ", " } else { "" });
    }
    let _ = writeln!(
        out,
        "): {} disagree; skiff {ours_ns:.0} ns, KVM_TRANSLATE {kvm_ns:.0} ns per address",
        disagree.len()
    );
    for (gva, o, k) in disagree.iter().take(SHOWN) {
        let kvm_text = k.map_or("not valid".to_string(), |g| format!("{g:#x}"));
        let _ = writeln!(out, "  {gva:#018x}: skiff says {o}; KVM_TRANSLATE says {kvm_text}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_rules() {
        assert!(agree(&Translation::Ok(0x1000), Some(0x1000)));
        assert!(!agree(&Translation::Ok(0x1000), Some(0x2000)));
        assert!(!agree(&Translation::Ok(0x1000), None));
        assert!(agree(&Translation::Retry { level: 1, entry: 0 }, None));
        assert!(!agree(&Translation::Retry { level: 1, entry: 0 }, Some(0)));
        let apic = Translation::Fail(FailReason::NotRam { level: 1, gpa: 0xfee0_0000 });
        assert!(agree(&apic, Some(0xfee0_0000)));
        assert!(!agree(&apic, None));
        // A table outside RAM: KVM cannot walk it either.
        assert!(agree(&Translation::Fail(FailReason::TableNotRam { level: 3, gpa: 1 << 40 }), None));
    }
}
