//! What a guest page walk costs: skiff's translator (x86/paging.rs) against KVM's own
//! (KVM_TRANSLATE, the peer that Firecracker and Cloud Hypervisor use), on the same
//! 4-level page tables, plus skiff's instruction fetch and decode (x86/insn.rs).
//!
//! The tables map 1 GiB of virtual space with 4 KiB pages: 2 MiB of page tables, more
//! than a core's L2 cache, so "cold" (a random address each time) walks mostly miss in
//! it; "warm" translates one address over and over. Runs are interleaved (skiff, then
//! KVM, per run) and each figure is the nanoseconds per translation of one run; the
//! table shows min/median/max over the runs and the ratio of the medians.
//!
//! cargo run --release --example translate_bench -- [RUNS]

use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd};
use skiff::vcpu::translate_check::XorShift;
use skiff::x86::{insn, paging};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 32 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// 512 page tables, one per 2 MiB of the mapped gigabyte.
const PTS: u64 = 0x20_0000;
/// The mapped gigabyte of virtual space, and the physical pages behind it (4 MiB,
/// reused round-robin: only the tables need to be large).
const VA_BASE: u64 = 0x4000_0000;
const DATA: u64 = 0x100_0000;
const DATA_PAGES: u64 = 1024;
const COLD_N: usize = 20_000;
const KVM_N: usize = 2_000;

fn main() {
    if let Err(e) = run() {
        eprintln!("translate_bench: {e}");
        std::process::exit(1);
    }
}

fn build_tables(mem: &GuestMemoryMmap) -> Result<(), String> {
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(|e| format!("guest memory: {e}"));
    w(PDPT | 3, PML4)?;
    w(PD | 3, PDPT + 8)?; // PDPT index 1: 1 GiB..2 GiB
    for t in 0..512u64 {
        w((PTS + t * 0x1000) | 3, PD + t * 8)?;
        for e in 0..512u64 {
            let page = (t * 512 + e) % DATA_PAGES;
            w((DATA + page * 0x1000) | 3, PTS + t * 0x1000 + e * 8)?;
        }
    }
    // An instruction in every data page for the fetch benchmark: lock cmpxchg16b [rdi].
    for p in 0..DATA_PAGES {
        mem.write_slice(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], GuestAddress(DATA + p * 0x1000 + 0x10))
            .map_err(|e| format!("guest memory: {e}"))?;
    }
    Ok(())
}

fn long_mode_sregs(vcpu: &VcpuFd) -> Result<kvm_bindings::kvm_sregs, String> {
    let mut s = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    s.cr0 = 0x8000_0011; // PG, ET, PE
    s.cr3 = PML4;
    s.cr4 = 1 << 5; // PAE
    s.efer = 0x500; // LME, LMA
    s.cs.l = 1;
    s.cs.db = 0;
    s.cs.s = 1;
    s.cs.type_ = 0xb;
    s.cs.present = 1;
    vcpu.set_sregs(&s).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    Ok(s)
}

fn ns_per(n: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_nanos() as f64 / n as f64
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let med = if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] };
    (v[0], med, v[v.len() - 1])
}

fn run() -> Result<(), String> {
    let runs: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| format!("RUNS must be a number, not {a:?}"))?,
        None => 10,
    };
    if runs == 0 {
        return Err("RUNS must be at least 1".into());
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).map_err(|e| format!("guest memory: {e}"))?;
    build_tables(&mem)?;
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let host = mem.get_host_address(GuestAddress(0)).map_err(|e| format!("guest memory: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the mapping belongs to `mem`, which lives until the end of this function,
    // after the VM (dropped first, declared later) is gone.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let sregs = long_mode_sregs(&vcpu)?;
    let ctx = paging::PagingContext::from_sregs(&sregs, 2);

    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let cold: Vec<u64> = (0..COLD_N).map(|_| VA_BASE + (rng.next() % (1 << 30))).collect();
    let warm = VA_BASE + 0x1234_5678;
    let fetch_at: Vec<u64> = (0..COLD_N).map(|_| VA_BASE + (rng.next() % (1 << 18)) * 0x1000 + 0x10).collect();

    // Every address must agree before anything is timed.
    for &a in cold.iter().take(KVM_N) {
        let ours = paging::translate(&mem, &ctx, a, paging::Access::Read);
        let theirs = vcpu.translate_gva(a).map_err(|e| format!("KVM_TRANSLATE: {e}"))?;
        if ours != paging::Translation::Ok(theirs.physical_address) || theirs.valid == 0 {
            return Err(format!("{a:#x}: skiff says {ours}, KVM_TRANSLATE says {:#x}", theirs.physical_address));
        }
    }

    let fetched = fetch_at.iter().filter(|&&rip| insn::fetch(&mem, &sregs, rip, 2).is_ok()).count();
    if fetched != fetch_at.len() {
        let e = insn::fetch(&mem, &sregs, fetch_at[0], 2).err();
        return Err(format!("only {fetched} of {} fetches decoded: {e:?}", fetch_at.len()));
    }

    let names = ["skiff translate, cold", "KVM_TRANSLATE, cold", "skiff translate, warm", "KVM_TRANSLATE, warm", "skiff fetch+decode"];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut sink = 0u64;
    for _ in 0..runs {
        results[0].push(ns_per(cold.len(), || {
            for &a in &cold {
                if let paging::Translation::Ok(g) = paging::translate(&mem, &ctx, a, paging::Access::Read) {
                    sink = sink.wrapping_add(g);
                }
            }
        }));
        results[1].push(ns_per(KVM_N, || {
            for &a in cold.iter().take(KVM_N) {
                if let Ok(t) = vcpu.translate_gva(a) {
                    sink = sink.wrapping_add(t.physical_address);
                }
            }
        }));
        results[2].push(ns_per(cold.len(), || {
            for _ in 0..cold.len() {
                if let paging::Translation::Ok(g) = paging::translate(&mem, &ctx, std::hint::black_box(warm), paging::Access::Read) {
                    sink = sink.wrapping_add(g);
                }
            }
        }));
        results[3].push(ns_per(KVM_N, || {
            for _ in 0..KVM_N {
                if let Ok(t) = vcpu.translate_gva(std::hint::black_box(warm)) {
                    sink = sink.wrapping_add(t.physical_address);
                }
            }
        }));
        results[4].push(ns_per(fetch_at.len(), || {
            for &rip in &fetch_at {
                if let Ok(f) = insn::fetch(&mem, &sregs, rip, 2) {
                    sink = sink.wrapping_add(f.insn.len() as u64);
                }
            }
        }));
    }
    std::hint::black_box(sink);

    println!("ns per operation over {runs} interleaved runs (4-level paging, 4 KiB pages over 1 GiB)");
    println!("{:<24} {:>10} {:>10} {:>10}", "operation", "min", "median", "max");
    let mut medians = Vec::new();
    for (name, v) in names.iter().zip(results.iter_mut()) {
        let (lo, med, hi) = stats(v);
        medians.push(med);
        println!("{name:<24} {lo:>10.1} {med:>10.1} {hi:>10.1}");
    }
    println!("ratio skiff/KVM_TRANSLATE: cold {:.4}, warm {:.4}", medians[0] / medians[1], medians[2] / medians[3]);
    let goal = medians[0] <= 100.0 && medians[2] <= 100.0;
    println!("goal (<= 100 ns per translate, cold and warm): {}", if goal { "met" } else { "NOT met" });
    Ok(())
}
