//! The instruction probe: before a machine is built, skiff runs each instruction
//! behind a [`GatedFeature`] in a throw-away VM, in guest kernel mode (long mode,
//! CPL 0), and watches what KVM does with it. Where guest kernel mode is emulated by
//! KVM (nested PVM, for one), some of them fail emulation; those features are hidden
//! from the guest's CPUID so the kernel never uses them. On ordinary hardware-assisted
//! KVM they all run natively and nothing is hidden. Everything here is decided from
//! what this host's KVM does at run time, never from the host's name.
//!
//! The probe also times a short loop at CPL 0, so `--stats` can say what a guest
//! kernel instruction costs on this host.

use std::time::Instant;

use kvm_bindings::{CpuId, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::cpuid::{GATED, GatedFeature, has};

mod cache;
mod hypercall;
mod key;
pub mod pv;
pub mod tpr;

pub use cache::{CACHE_FILE, CacheError, ProbeOrigin, ProbePolicy, cache_dir, probe_host_cached};
pub use key::{PROBE_FORMAT, ProbeKey};
use crate::x86::boot::{BOOT_GDT, SEL_CODE64, SEL_DATA, gdt_entry, kvm_segment_from_gdt, write_identity_page_tables};

const MEM_SIZE: usize = 2 << 20;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000; // four pages: 0x3000..0x7000
const PDPT_HIGH: u64 = 0x8000;
/// Where the probe's physical page 0 appears virtually: Linux's kernel text base.
const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;
const CODE: u64 = 0x10000;
const DATA: u64 = 0x20000; // 4 KiB, page aligned (XSAVE needs 64-byte alignment)
const DONE_PORT: u16 = 0x10;
/// `out 0x10, al`: the end of every snippet.
const DONE: [u8; 2] = [0xe6, DONE_PORT as u8];

/// The state FXSAVE covers: XCR0 bits 0 (x87) and 1 (SSE).
const XCR0_X87_SSE: u64 = 0x3;

/// Marks the XSAVE snippets, whose EDX:EAX is the supported XCR0.
const XSAVE_ALL: u64 = 0xffff_ffff;

/// What one probed instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Works,
    /// KVM_EXIT_INTERNAL_ERROR: KVM's emulator cannot run it.
    EmulationFailure,
    /// It faulted (no IDT in the probe, so any exception ends as a triple fault).
    Faults,
    /// Some other exit or error; the text says which.
    Other(&'static str),
    /// It runs, but this many times slower than the kernel's alternative.
    Slow(u32),
}

/// Linux initcalls skipped where guest kernel mode is emulated: each costs tens of
/// seconds to minutes there (measured with `initcall_debug` on Debian's 6.1 kernel at
/// ~600 ns an instruction), and a guest on a serial console does without it.
pub const SLOW_WHEN_EMULATED: &[(&str, &str)] = &[
    ("slab_sysfs_init", "120 s: a sysfs directory per slab cache (/sys/kernel/slab stays empty)"),
    // Each of these registers BPF kfuncs, and the first to run parses the whole vmlinux
    // BTF (250 s). TCP falls back to Reno without CUBIC.
    ("cubictcp_register", "BTF parse for CUBIC's kfuncs"),
    ("bpf_tcp_ca_kfunc_init", "BTF parse for TCP congestion-control kfuncs"),
    ("bpf_prog_test_run_init", "BTF parse for BPF test-run kfuncs"),
    ("bpf_key_sig_kfuncs_init", "BTF parse for key and signature kfuncs"),
    ("bpf_rstat_kfunc_init", "BTF parse for cgroup rstat kfuncs"),
    ("kfunc_init", "BTF parse for generic BPF kfuncs"),
    ("init_kprobe_trace", "140 s: kprobe events and their self-checks"),
    ("init_blk_tracer", "40 s: the blktrace tracer"),
    ("ftrace_check_for_weak_functions", "ftrace self-checks"),
    ("ftrace_check_sync", "ftrace self-checks"),
    ("crypto_kdf108_init", "10 s: the SP800-108 KDF self-test"),
    ("blake2s_mod_init", "10 s: the BLAKE2s self-test (the library works without it)"),
    ("load_system_certificate_list", "11 s: Debian's built-in X.509 keys (modules then load unverified, tainted)"),
    ("trace_eval_init", "3% of a boot: rewriting every trace event's format with enum values (tracing only)"),
];

/// Kernel options added where guest kernel mode is emulated, and what each costs.
pub const OPTIONS_WHEN_EMULATED: &[(&str, &str)] = &[
    (
        "rodata=off",
        "skips write-protecting kernel text and rodata and, with it, the W+X check that \
         walks every kernel page table (espfix's thousands of aliases included): minutes \
         here. The guest kernel's text and rodata stay writable.",
    ),
    // Guest kernel code is executed by KVM's emulator, not by the CPU, so speculation
    // on its return instructions cannot happen; user-mode mitigations (IBPB, STIBP)
    // are untouched.
    ("retbleed=off", "return thunks on every kernel `ret` (with the next: 8% of a boot)"),
    ("spec_rstack_overflow=off", "the SRSO safe-RET sequence on every kernel `ret`"),
    // A vCPU whose kernel work runs a thousand times slower than wall time looks stuck
    // to the lockup detectors: they would print false "soft lockup" reports (and
    // their backtraces) into the console in the middle of the user's output.
    ("nowatchdog", "the soft- and hard-lockup detectors (false reports where kernel work is emulated)"),
    ("rcupdate.rcu_cpu_stall_suppress=1", "RCU CPU-stall warnings (false reports, as above)"),
];

/// The options of [`OPTIONS_WHEN_EMULATED`] that turn off a protection of the guest
/// kernel (write-protected text and rodata, speculation mitigations).
pub const WEAKENS_SECURITY: &[&str] = &["rodata=off", "retbleed=off", "spec_rstack_overflow=off"];

/// What the probe learned about this host's KVM.
#[derive(Clone, Debug, Default)]
pub struct HostQuirks {
    /// Features to hide, with what the probe saw.
    pub hidden: Vec<(&'static GatedFeature, ProbeResult)>,
    /// Nanoseconds per instruction of a simple loop at guest CPL 0.
    pub cpl0_ns_per_insn: f64,
    /// Hidden features the guest still sees (the host's bit passes through KVM): the
    /// emulation-failure path handles them when the guest uses them.
    pub unhideable: Vec<&'static GatedFeature>,
    /// Whether the guest's `cpuid` returns what KVM_SET_CPUID2 set. Where it does
    /// not (the guest sees the host's CPUID), hiding features cannot work, and the
    /// emulation-failure path (vcpu/emulate.rs) must handle what the guest runs.
    pub cpuid_honoured: bool,
    /// A user-mode SYSCALL does not enter kernel mode at an upper-half LSTAR (see
    /// vcpu/syscall_fixup.rs, which then completes it).
    pub user_syscall_broken: bool,
    /// A KVM hypercall at CPL 0 never comes back from KVM_RUN: the paravirtual
    /// features that make hypercalls are hidden (see [`HYPERCALL_FEATURES`]).
    pub hypercall_hangs: bool,
    /// `int3` at CPL 0 exits to skiff as an emulation failure: skiff's raw hypercall
    /// sites trap to it (hypercall/trap.rs).
    pub int3_traps: bool,
    /// XCR0 as guest user mode sees it while the guest kernel has not enabled XSAVE
    /// (None: `xgetbv` faults there, as on hardware). See [`Self::user_state_needs_xsave`].
    pub user_xcr0: Option<u64>,
    /// The XSAVE probe's result where XSAVE stays on all the same (user state needs it).
    pub xsave_kept: Option<ProbeResult>,
    /// The XCR0 bits KVM lets the guest enable (CPUID leaf 0xD).
    pub guest_xcr0: u64,
    /// KVM's paravirtual features: which work here (probe/pv.rs).
    pub pv: pv::PvFindings,
    /// A TPR write through MMIO against the patched helper (`--tpr-patch=auto`).
    pub tpr_cost: Option<tpr::TprCost>,
    pub probe_ms: f64,
}

impl HostQuirks {
    /// A guest kernel instruction costing more than this means KVM emulates guest
    /// kernel mode instead of running it on the CPU.
    pub const EMULATED_NS: f64 = 50.0;

    pub fn kernel_mode_emulated(&self) -> bool {
        self.cpl0_ns_per_insn > Self::EMULATED_NS
    }

    /// Whether guest user mode can use register state beyond x87 and SSE (AVX,
    /// AVX-512) without the guest kernel enabling it. A kernel that then falls back
    /// to FXSAVE saves only x87/SSE across context switches, and processes corrupt
    /// each other's YMM/ZMM registers: XSAVE must stay on, however slow.
    pub fn user_state_needs_xsave(&self) -> bool {
        self.user_xcr0.is_some_and(|x| x & !XCR0_X87_SSE != 0)
    }

    /// Kernel command-line options that make a Linux guest avoid what KVM cannot run
    /// in its kernel mode but CPUID cannot hide: `clearcpuid=` with the kernel's
    /// feature names (Linux clears dependent features too, e.g. AVX with XSAVE).
    /// Where guest kernel mode is emulated, and unless `guest_defaults` asks to keep
    /// the guest's own defaults, also the options that trade the guest's security or
    /// features for boot time there: `initcall_blacklist=` with the initcalls that
    /// take tens of seconds and [`OPTIONS_WHEN_EMULATED`] (rodata=off and the
    /// mitigations among them). `clearcpuid=` is never dropped: without it the guest
    /// kernel runs instructions that fail here.
    pub fn linux_cmdline_extras(&self, guest_defaults: bool) -> Option<String> {
        let mut extras = Vec::new();
        let names: Vec<&str> = self.unhideable.iter().flat_map(|f| f.linux_names()).collect();
        if !names.is_empty() {
            extras.push(format!("clearcpuid={}", names.join(",")));
        }
        if self.kernel_mode_emulated() && !guest_defaults {
            let calls: Vec<&str> = SLOW_WHEN_EMULATED.iter().map(|(name, _)| *name).collect();
            extras.push(format!("initcall_blacklist={}", calls.join(",")));
            extras.extend(OPTIONS_WHEN_EMULATED.iter().map(|(opt, _)| opt.to_string()));
        }
        (!extras.is_empty()).then(|| extras.join(" "))
    }

    /// Lines for `--stats`: what skiff added to the guest's command line and why,
    /// naming the options that weaken the guest's security.
    pub fn cmdline_report(&self, guest_defaults: bool) -> String {
        let mut out = String::from("guest kernel options added by skiff:\n");
        let names: Vec<&str> = self.unhideable.iter().flat_map(|f| f.linux_names()).collect();
        if !names.is_empty() {
            out.push_str(&format!("  clearcpuid={}: instructions that fail in guest kernel mode here (needed)\n", names.join(",")));
        }
        if !self.kernel_mode_emulated() {
            return out;
        }
        if guest_defaults {
            out.push_str("  none for boot time: --guest-defaults keeps the guest kernel's defaults\n");
            return out;
        }
        out.push_str(&format!(
            "  initcall_blacklist= ({} initcalls that take tens of seconds where kernel mode is emulated; \
             the guest loses what they set up, and modules load unverified)\n",
            SLOW_WHEN_EMULATED.len()
        ));
        for (opt, why) in OPTIONS_WHEN_EMULATED {
            let weakens = WEAKENS_SECURITY.contains(opt);
            out.push_str(&format!("  {opt}{}: {why}\n", if weakens { " (weakens the guest's security)" } else { "" }));
        }
        out.push_str("  (--guest-defaults drops all but clearcpuid=)\n");
        out
    }

    /// Lines for `--stats`.
    pub fn report(&self) -> String {
        let mut out = format!(
            "host quirks (probed in {:.1} ms):\n  guest kernel-mode instruction: {:.0} ns{}\n",
            self.probe_ms,
            self.cpl0_ns_per_insn,
            if self.kernel_mode_emulated() { " (emulated by KVM, not run natively)" } else { "" }
        );
        if !self.cpuid_honoured {
            out.push_str("  KVM_SET_CPUID2 is not honoured: the guest sees the host's CPUID\n");
        }
        if self.hidden.is_empty() {
            out.push_str("  no CPUID features hidden\n");
        }
        for (f, r) in &self.hidden {
            let fate = if self.unhideable.iter().any(|u| u.name == f.name) {
                "cannot hide: the guest sees the host's bit; cleared through the kernel command line"
            } else {
                "hidden from CPUID"
            };
            let what = match r {
                ProbeResult::Slow(x) => format!("is {x}x slower than the alternative in guest kernel mode"),
                r => format!("fails in guest kernel mode ({r:?})"),
            };
            out.push_str(&format!("  {:<11} {what} ({}): {fate}\n", f.name, f.why));
        }
        match self.user_xcr0 {
            Some(x) => out.push_str(&format!("  user mode   xgetbv with the guest's CR4.OSXSAVE clear returns XCR0 {x:#x}\n")),
            None => out.push_str("  user mode   xgetbv with the guest's CR4.OSXSAVE clear faults, as on hardware\n"),
        }
        if let (Some(r), Some(x)) = (self.xsave_kept, self.user_xcr0) {
            out.push_str(&format!(
                "  xsave       fails in guest kernel mode ({r:?}): kept on, because guest user mode runs with XCR0 \
                 {x:#x} whatever the guest kernel enables; the kernel must save that state across context \
                 switches (skiff emulates xsave/xrstor/xgetbv: an exit per context switch)\n"
            ));
            if x & !self.guest_xcr0 != 0 {
                out.push_str(&format!(
                    "  WARNING     user-mode state {:#x} is outside what KVM lets the guest enable ({:#x}): \
                     guest processes can corrupt each other's registers there\n",
                    x & !self.guest_xcr0,
                    self.guest_xcr0
                ));
            }
        }
        if self.hypercall_hangs {
            out.push_str("  hypercall   at CPL 0 never returns from KVM_RUN: the paravirtual features that make them are hidden\n");
        }
        if self.user_syscall_broken {
            out.push_str(
                "  syscall     from user mode stays at CPL 3 at an upper-half LSTAR: completed by skiff \
                 (breakpoint on the guest's #PF handler)\n",
            );
        }
        out
    }
}

/// The instruction bytes that exercise each gated feature (64-bit mode, RDI = a
/// page-aligned scratch buffer, RAX/RCX/RDX set per snippet).
fn snippet(name: &str) -> Option<(&'static [u8], u64 /* rax */)> {
    Some(match name {
        // What the kernel does at boot: xsetbv (XCR0 = EDX:EAX = every supported
        // component), xrstor64 [rdi] from a zeroed header (load init state), xsave64
        // [rdi], xgetbv.
        "xsave" => (
            &[0x0f, 0x01, 0xd1, 0x48, 0x0f, 0xae, 0x2f, 0x48, 0x0f, 0xae, 0x27, 0x0f, 0x01, 0xd0],
            XSAVE_ALL,
        ),
        "xsaveopt" => (&[0x48, 0x0f, 0xae, 0x37], XSAVE_ALL),
        "xsavec" => (&[0x48, 0x0f, 0xc7, 0x27], XSAVE_ALL),
        // xsaves64 [rdi], xrstors64 [rdi]
        "xsaves" => (&[0x48, 0x0f, 0xc7, 0x2f, 0x48, 0x0f, 0xc7, 0x1f], XSAVE_ALL),
        "cx16" => (&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], 0),
        // pshufb xmm0, xmm1
        "ssse3" => (&[0x66, 0x0f, 0x38, 0x00, 0xc1], 0),
        // aesenc xmm0, xmm1
        "aes" => (&[0x66, 0x0f, 0x38, 0xdc, 0xc1], 0),
        // pclmulqdq xmm0, xmm1, 0
        "pclmulqdq" => (&[0x66, 0x0f, 0x3a, 0x44, 0xc1, 0x00], 0),
        "movbe" => (&[0x0f, 0x38, 0xf0, 0x07], 0),
        "popcnt" => (&[0xf3, 0x48, 0x0f, 0xb8, 0xc0], 0),
        "rdrand" => (&[0x48, 0x0f, 0xc7, 0xf0], 0),
        "rdseed" => (&[0x48, 0x0f, 0xc7, 0xf8], 0),
        // clac; stac
        "smap" => (&[0x0f, 0x01, 0xca, 0x0f, 0x01, 0xcb], 0),
        // invpcid rax,[rdi] with type 2 (all contexts, globals included)
        "invpcid" => (&[0x66, 0x0f, 0x38, 0x82, 0x07], 2),
        "clwb" => (&[0x66, 0x0f, 0xae, 0x37], 0),
        "clflushopt" => (&[0x66, 0x0f, 0xae, 0x3f], 0),
        "fsgsbase" => (&[0xf3, 0x48, 0x0f, 0xae, 0xc0], 0),
        "rdpid" => (&[0xf3, 0x0f, 0xc7, 0xf8], 0),
        "rdtscp" => (&[0x0f, 0x01, 0xf9], 0),
        "rdpru" => (&[0x0f, 0x01, 0xfd], 0),
        // andn rax,rax,rax
        "bmi1" => (&[0xc4, 0xe2, 0xf8, 0xf2, 0xc0], 0),
        // shlx rax,rax,rax
        "bmi2" => (&[0xc4, 0xe2, 0xf9, 0xf7, 0xc0], 0),
        "lzcnt" => (&[0xf3, 0x48, 0x0f, 0xbd, 0xc0], 0),
        _ => return None,
    })
}

/// A throw-away VM with one vCPU in use. A probe that needs a clean vCPU (after a
/// triple fault) or another CPUID gets a fresh vCPU in the same VM: a new vCPU costs
/// a fraction of a new VM.
struct ProbeVm {
    vm: VmFd,
    vcpu: VcpuFd,
    /// vCPUs made so far (the next one's ID).
    vcpus: u64,
    mem: GuestMemoryMmap,
    xcr0: u64,
    /// The VM has an in-kernel irqchip: vCPUs other than 0 then wait for INIT and
    /// SIPI, so each fresh one is made runnable.
    irqchip: bool,
}

// CR and EFER bits for the probe's long mode.
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_FSGSBASE: u64 = 1 << 16;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PGE: u64 = 1 << 7;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

impl ProbeVm {
    fn new(kvm: &Kvm, cpuid: &CpuId) -> Result<Self, String> {
        Self::new_with(kvm, cpuid, false)
    }

    /// A probe VM, with an in-kernel irqchip (PIC, I/O APIC, LAPICs) when `irqchip`.
    fn new_with(kvm: &Kvm, cpuid: &CpuId, irqchip: bool) -> Result<Self, String> {
        let vm = kvm.create_vm().map_err(|e| format!("probe: KVM_CREATE_VM: {e}"))?;
        if irqchip {
            vm.create_irq_chip().map_err(|e| format!("probe: KVM_CREATE_IRQCHIP: {e}"))?;
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| format!("probe: guest memory: {e}"))?;
        let host = mem.get_host_address(GuestAddress(0)).map_err(|e| format!("probe: {e}"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region maps `mem`, which lives as long as the VM (both are owned
        // by the ProbeVm and dropped together, the VM first).
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("probe: KVM_SET_USER_MEMORY_REGION: {e}"))?;
        for (i, e) in BOOT_GDT.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(GDT + i as u64 * 8)).map_err(|e| format!("probe: {e}"))?;
        }
        write_identity_page_tables(&mem, PML4, PDPT, PD).map_err(|e| format!("probe: {e}"))?;
        // Also map the first GiB at the kernel's text address (PML4 511, PDPT 510), where
        // the probe runs: the emulator may treat kernel-half addresses differently.
        mem.write_obj(PDPT_HIGH | 3, GuestAddress(PML4 + 511 * 8)).map_err(|e| format!("probe: {e}"))?;
        mem.write_obj(PD | 3, GuestAddress(PDPT_HIGH + 510 * 8)).map_err(|e| format!("probe: {e}"))?;
        let vcpu = Self::make_vcpu(&vm, 0, cpuid)?;
        Ok(Self { vm, vcpu, vcpus: 1, mem, xcr0: supported_xcr0(cpuid), irqchip })
    }

    /// Replaces the vCPU in use with a fresh one that sees `cpuid`.
    fn fresh_vcpu(&mut self, cpuid: &CpuId) -> Result<(), String> {
        self.vcpu = Self::make_vcpu(&self.vm, self.vcpus, cpuid)?;
        self.vcpus += 1;
        if self.irqchip {
            let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
            self.vcpu.set_mp_state(runnable).map_err(|e| format!("probe: KVM_SET_MP_STATE: {e}"))?;
        }
        self.xcr0 = supported_xcr0(cpuid);
        Ok(())
    }

    /// A vCPU in 64-bit kernel mode on the probe's GDT and page tables.
    fn make_vcpu(vm: &VmFd, id: u64, cpuid: &CpuId) -> Result<VcpuFd, String> {
        let vcpu = vm.create_vcpu(id).map_err(|e| format!("probe: KVM_CREATE_VCPU: {e}"))?;
        vcpu.set_cpuid2(cpuid).map_err(|e| format!("probe: KVM_SET_CPUID2: {e}"))?;
        let mut sregs = vcpu.get_sregs().map_err(|e| format!("probe: KVM_GET_SREGS: {e}"))?;
        sregs.gdt.base = GDT;
        sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
        sregs.cs = kvm_segment_from_gdt(BOOT_GDT[1], SEL_CODE64);
        let data = kvm_segment_from_gdt(BOOT_GDT[2], SEL_DATA);
        sregs.ds = data;
        sregs.es = data;
        sregs.ss = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.cr3 = PML4;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
        // The control bits a Linux kernel runs with (SMEP/SMAP/UMIP only if offered).
        sregs.cr4 = CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        for (leaf_bit, cr4_bit) in [(7u8, CR4_SMEP), (20, CR4_SMAP)] {
            if has(cpuid, super::cpuid::FeatureBit { leaf: 7, subleaf: 0, reg: super::cpuid::Reg::Ebx, bit: leaf_bit }) {
                sregs.cr4 |= cr4_bit;
            }
        }
        if has(cpuid, super::cpuid::GATED[0].gate) {
            sregs.cr4 |= CR4_OSXSAVE;
        }
        if has(cpuid, super::cpuid::FeatureBit { leaf: 7, subleaf: 0, reg: super::cpuid::Reg::Ebx, bit: 0 }) {
            sregs.cr4 |= CR4_FSGSBASE;
        }
        sregs.efer = EFER_LME | EFER_LMA;
        vcpu.set_sregs(&sregs).map_err(|e| format!("probe: KVM_SET_SREGS: {e}"))?;
        if sregs.cr4 & CR4_OSXSAVE != 0 {
            // Enable every state component KVM supports, as the guest kernel will: the
            // emulator may handle x87/SSE state and still fail on AVX-512 state.
            let mut xcrs = vcpu.get_xcrs().map_err(|e| format!("probe: KVM_GET_XCRS: {e}"))?;
            xcrs.nr_xcrs = 1;
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = supported_xcr0(cpuid);
            vcpu.set_xcrs(&xcrs).map_err(|e| format!("probe: KVM_SET_XCRS: {e}"))?;
        }
        Ok(vcpu)
    }

    /// Makes the vCPU start `code` (then the done marker) in 64-bit user mode at CODE:
    /// user bit on the low identity map (the kernel-half map stays supervisor-only),
    /// user code and data segments in the GDT (STAR's user base 0x20), RFLAGS
    /// `rflags`. `adjust` may change the special registers before they are set.
    fn enter_user_mode(&mut self, code: &[u8], rflags: u64, adjust: impl FnOnce(&mut kvm_bindings::kvm_sregs)) -> Result<(), String> {
        let m = &self.mem;
        let err = |e: vm_memory::GuestMemoryError| format!("probe: {e}");
        let set_user = |a: u64| -> Result<(), String> {
            let v: u64 = m.read_obj(GuestAddress(a)).map_err(err)?;
            m.write_obj(v | 4, GuestAddress(a)).map_err(err)
        };
        set_user(PML4)?;
        set_user(PDPT)?;
        for i in 0..512 {
            set_user(PD + i * 8)?;
        }
        let user_data = gdt_entry(0xc0f3, 0, 0xfffff);
        let user_code = gdt_entry(0xa0fb, 0, 0xfffff);
        m.write_obj(user_data, GuestAddress(GDT + 5 * 8)).map_err(err)?;
        m.write_obj(user_code, GuestAddress(GDT + 6 * 8)).map_err(err)?;
        let mut bytes = code.to_vec();
        bytes.extend_from_slice(&DONE);
        m.write_slice(&bytes, GuestAddress(CODE)).map_err(err)?;
        let mut sregs = self.vcpu.get_sregs().map_err(|e| format!("probe: KVM_GET_SREGS: {e}"))?;
        sregs.gdt.limit = 7 * 8 - 1;
        sregs.cr4 &= !(CR4_SMEP | CR4_SMAP);
        sregs.cs = kvm_segment_from_gdt(user_code, 0x33);
        let ds = kvm_segment_from_gdt(user_data, 0x2b);
        (sregs.ss, sregs.ds, sregs.es) = (ds, ds, ds);
        adjust(&mut sregs);
        self.vcpu.set_sregs(&sregs).map_err(|e| format!("probe: KVM_SET_SREGS: {e}"))?;
        let mut regs = self.vcpu.get_regs().map_err(|e| format!("probe: KVM_GET_REGS: {e}"))?;
        regs.rip = CODE;
        regs.rflags = rflags;
        regs.rsp = DATA + 0x800;
        self.vcpu.set_regs(&regs).map_err(|e| format!("probe: KVM_SET_REGS: {e}"))
    }

    /// Runs `code` (followed by the done marker) once.
    fn run(&mut self, code: &[u8], rax: u64) -> ProbeResult {
        self.run_with(code, rax, 0)
    }

    /// Runs `code` with RAX and RCX set (RCX for CPUID subleaves).
    fn run_with(&mut self, code: &[u8], rax: u64, rcx: u64) -> ProbeResult {
        let mut bytes = code.to_vec();
        bytes.extend_from_slice(&DONE);
        if self.mem.write_slice(&bytes, GuestAddress(CODE)).is_err()
            || self.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).is_err()
        {
            return ProbeResult::Other("guest memory write");
        }
        let Ok(mut regs) = self.vcpu.get_regs() else { return ProbeResult::Other("KVM_GET_REGS") };
        regs.rip = KERNEL_BASE + CODE;
        regs.rflags = 2;
        regs.rcx = rcx;
        // XSAVE-family snippets take their component mask in EDX:EAX: every component
        // KVM supports (xsetbv refuses bits it does not).
        (regs.rax, regs.rdx) = if rax == XSAVE_ALL { (self.xcr0 & 0xffff_ffff, self.xcr0 >> 32) } else { (rax, 0) };
        regs.rdi = KERNEL_BASE + DATA;
        regs.rsp = KERNEL_BASE + DATA + 0x1000;
        if self.vcpu.set_regs(&regs).is_err() {
            return ProbeResult::Other("KVM_SET_REGS");
        }
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => ProbeResult::Works,
            Ok(VcpuExit::InternalError) => ProbeResult::EmulationFailure,
            Ok(VcpuExit::Shutdown) => ProbeResult::Faults,
            Ok(_) => ProbeResult::Other("unexpected exit"),
            Err(_) => ProbeResult::Other("KVM_RUN error"),
        }
    }
}

/// Sets a marker APIC ID in leaf 1 and clears a feature bit KVM offers (CX16, else
/// x2APIC), then checks that guest `cpuid` reports both changes. Some KVMs return
/// the host's feature bits whatever KVM_SET_CPUID2 said.
/// Runs on a fresh vCPU of `vm`.
fn cpuid_honoured(vm: &mut ProbeVm, cpuid: &CpuId) -> Result<bool, String> {
    const MARKER: u32 = 0x5a;
    let mut marked = cpuid.clone();
    let feature = [13u32, 21].into_iter().find(|b| super::cpuid::find_entry(cpuid, 1, 0).is_some_and(|e| e.ecx & (1 << b) != 0));
    for e in marked.as_mut_slice() {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00ff_ffff) | (MARKER << 24);
            if let Some(b) = feature {
                e.ecx &= !(1 << b);
            }
        }
    }
    vm.fresh_vcpu(&marked)?;
    // cpuid with EAX=1
    if vm.run(&[0x0f, 0xa2], 1) != ProbeResult::Works {
        return Ok(false);
    }
    let regs = vm.vcpu.get_regs().map_err(|e| format!("probe: KVM_GET_REGS: {e}"))?;
    let marker_seen = (regs.rbx >> 24) & 0xff == MARKER as u64;
    let feature_hidden = feature.is_none_or(|b| regs.rcx & (1 << b) == 0);
    Ok(marker_seen && feature_hidden)
}

/// Whether byte-granular `rep stosb` (what ERMS makes Linux use for clearing pages
/// and memset) costs much more than `rep stosq` over the same 1 KiB. Where KVM's
/// emulator runs guest kernel mode, each iteration costs about one emulated
/// instruction, so the byte form is up to 8 times slower. 1 KiB (not a page) keeps
/// this under 2 ms there; the ratio is the same.
fn rep_string_cost(vm: &mut ProbeVm) -> ProbeResult {
    const STOSB: [u8; 2] = [0xf3, 0xaa]; // rep stosb (rcx bytes at rdi)
    const STOSQ: [u8; 3] = [0xf3, 0x48, 0xab]; // rep stosq (rcx quadwords at rdi)
    const BYTES: u64 = 1024;
    // Below this a 1 KiB clear is cheap whatever the form (native KVM: well under a
    // microsecond; the exit around it dominates).
    const CHEAP_NS: u128 = 12_500;
    let mut best = [u128::MAX; 2];
    for _ in 0..2 {
        for (i, (code, count)) in [(&STOSB[..], BYTES), (&STOSQ[..], BYTES / 8)].into_iter().enumerate() {
            let t = Instant::now();
            let r = vm.run_with(code, 0, count);
            if r != ProbeResult::Works {
                return r;
            }
            best[i] = best[i].min(t.elapsed().as_nanos());
        }
    }
    let ratio = best[0] / best[1].max(1);
    if best[0] > CHEAP_NS && ratio >= 3 { ProbeResult::Slow(ratio as u32) } else { ProbeResult::Works }
}

/// Nanoseconds per instruction at CPL 0: a 2,000-instruction loop (`mov ecx, 1000;
/// 1: dec ecx; jnz 1b`) less an empty run (the exit around it), best of two each.
fn cpl0_ns_per_insn(vm: &mut ProbeVm) -> Option<f64> {
    const LOOP: [u8; 9] = [0xb9, 0xe8, 0x03, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xfc];
    const INSNS: f64 = 2000.0;
    let mut best = [u128::MAX; 2];
    for _ in 0..2 {
        for (i, code) in [&[][..], &LOOP[..]].into_iter().enumerate() {
            let t = Instant::now();
            if vm.run(code, 0) != ProbeResult::Works {
                return None;
            }
            best[i] = best[i].min(t.elapsed().as_nanos());
        }
    }
    Some(best[1].saturating_sub(best[0]) as f64 / INSNS)
}

/// Whether SYSCALL from 64-bit user mode enters kernel mode at an LSTAR in the upper
/// half, on a supervisor-only page, as Linux's entry is. The probe VM runs user
/// code (CPL 3, user pages) that executes `syscall`; LSTAR points at `out` on a
/// kernel-only page. Right: the `out` runs (CPL 0). Wrong: the fetch at LSTAR faults
/// as a user access (no IDT here, so a triple fault).
/// `vm`'s vCPU must be unused.
fn user_syscall_enters_kernel(vm: &mut ProbeVm) -> Result<bool, String> {
    use kvm_bindings::{Msrs, kvm_msr_entry};
    // User code: syscall. Kernel entry (at CODE + 0x100 through the kernel half): the done marker.
    vm.enter_user_mode(&[0x0f, 0x05], 0x202, |_| {})?;
    let err = |e: vm_memory::GuestMemoryError| format!("probe: {e}");
    vm.mem.write_slice(&DONE, GuestAddress(CODE + 0x100)).map_err(err)?;
    let mut sregs = vm.vcpu.get_sregs().map_err(|e| format!("probe: KVM_GET_SREGS: {e}"))?;
    sregs.efer |= EFER_SCE;
    vm.vcpu.set_sregs(&sregs).map_err(|e| format!("probe: KVM_SET_SREGS: {e}"))?;
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry { index: 0xc000_0081, data: (0x20 << 48) | (0x08 << 32), ..Default::default() },
        kvm_msr_entry { index: 0xc000_0082, data: KERNEL_BASE + CODE + 0x100, ..Default::default() },
        kvm_msr_entry { index: 0xc000_0084, data: 0x200, ..Default::default() },
    ])
    .map_err(|e| format!("probe: {e:?}"))?;
    vm.vcpu.set_msrs(&msrs).map_err(|e| format!("probe: KVM_SET_MSRS: {e}"))?;
    Ok(matches!(vm.vcpu.run(), Ok(VcpuExit::IoOut(DONE_PORT, _))))
}

/// The state components guest user mode can use whatever the guest kernel enabled:
/// `xgetbv` (XCR0) run at CPL 3 while the guest's CR4.OSXSAVE is clear, as a kernel
/// that manages only x87/SSE state (FXSAVE) leaves it. On hardware that raises #UD
/// (None here). Where guest user mode runs on the host's own XCR0 (PVM), it returns
/// it, and user code can use AVX or AVX-512 registers the guest kernel would then
/// never save across context switches.
/// `vm`'s vCPU must be unused.
fn user_xcr0_without_osxsave(vm: &mut ProbeVm) -> Result<Option<u64>, String> {
    // xor ecx, ecx; xgetbv; then the done marker (`out` at CPL 3 with IOPL 3).
    vm.enter_user_mode(&[0x31, 0xc9, 0x0f, 0x01, 0xd0], 0x3002, |s| s.cr4 &= !CR4_OSXSAVE)?;
    match vm.vcpu.run() {
        Ok(VcpuExit::IoOut(DONE_PORT, _)) => {
            let regs = vm.vcpu.get_regs().map_err(|e| format!("probe: KVM_GET_REGS: {e}"))?;
            Ok(Some((regs.rdx & 0xffff_ffff) << 32 | (regs.rax & 0xffff_ffff)))
        }
        _ => Ok(None),
    }
}

/// KVM paravirtual features (CPUID 0x4000_0001 EAX) that make hypercalls: Linux
/// kicks a waiting vCPU out of a PV spinlock (PV_UNHALT, bit 7), sends IPIs (bit 11)
/// and yields to a preempted vCPU (bit 13) with them.
pub const HYPERCALL_FEATURES: [u8; 3] = [7, 11, 13];

/// A hypercall probe in flight: started first, it waits on its own thread while the
/// other probes run, so a host where hypercalls hang costs no extra probe time.
struct HypercallProbe {
    runner: std::thread::JoinHandle<ProbeResult>,
    returned: std::sync::mpsc::Receiver<()>,
    /// When the runner was about to enter KVM_RUN.
    entered: std::sync::Arc<std::sync::OnceLock<Instant>>,
    started: Instant,
}

/// A hypercall takes microseconds, even emulated; a false "hangs" only hides PV
/// features. Counted from KVM_RUN, so a busy host's slow thread start does not count.
const HYPERCALL_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(10);
/// How long the runner may take to reach KVM_RUN before the hypercall counts as hanging.
const HYPERCALL_ENTRY_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts the check whether a hypercall at CPL 0 (`vmmcall` on AMD, `vmcall` on
/// Intel; an unknown number, which KVM answers with -KVM_ENOSYS) returns. It runs on
/// its own thread and is interrupted with the kick signal after a while: where it
/// hangs, KVM_RUN would otherwise never come back.
fn start_hypercall_probe(kvm: &Kvm, cpuid: &CpuId) -> Result<HypercallProbe, String> {
    super::kick::install_handler().map_err(|e| format!("probe: signal handler: {e}"))?;
    let amd = super::cpuid::find_entry(cpuid, 0, 0).is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth") || e.ebx == u32::from_le_bytes(*b"Hygo"));
    let code: &'static [u8] = if amd { &[0x0f, 0x01, 0xd9] } else { &[0x0f, 0x01, 0xc1] };
    let mut vm = ProbeVm::new(kvm, cpuid)?;
    let (tx, returned) = std::sync::mpsc::channel();
    let entered = std::sync::Arc::new(std::sync::OnceLock::new());
    let entering = entered.clone();
    let started = Instant::now();
    let runner = std::thread::Builder::new()
        .name("skiff-probe-hc".into())
        .spawn(move || {
            // A kick sets this vCPU's immediate_exit, so one that lands before KVM_RUN
            // is not lost (KVM_RUN then returns EINTR at once).
            // SAFETY: the kvm_run page belongs to `vm.vcpu`, which outlives the guard.
            let _kick_target = unsafe { super::kick::RunPage::enter(vm.vcpu.get_kvm_run()) };
            let _ = entering.set(Instant::now());
            #[cfg(test)]
            std::thread::sleep(tests_hypercall::runner_delay());
            let r = vm.run(code, 0xffff);
            let _ = tx.send(());
            r
        })
        .map_err(|e| format!("probe: thread: {e}"))?;
    Ok(HypercallProbe { runner, returned, entered, started })
}

impl HypercallProbe {
    /// Whether the hypercall came back within HYPERCALL_TIMEOUT of entering KVM_RUN.
    fn returns(self) -> Result<bool, String> {
        use std::os::unix::thread::JoinHandleExt;
        let returned = self.wait();
        if !returned {
            // Kick until the runner is out of KVM_RUN: a kick that lands before the
            // runner registered its kvm_run page (see above) would be lost.
            loop {
                // SAFETY: the thread is alive until joined below; the kick signal has
                // a handler (installed when the probe started), so it only interrupts
                // KVM_RUN with EINTR (or sets immediate_exit before it).
                unsafe { libc::pthread_kill(self.runner.as_pthread_t(), super::kick::kick_signal()) };
                match self.returned.recv_timeout(std::time::Duration::from_millis(5)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            }
        }
        let result = self.runner.join().map_err(|_| "probe: hypercall thread panicked".to_string())?;
        Ok(returned && result == ProbeResult::Works)
    }

    /// Waits for the runner's answer: HYPERCALL_TIMEOUT from its KVM_RUN, and at most
    /// HYPERCALL_ENTRY_LIMIT for it to get there. Bounded by the two.
    fn wait(&self) -> bool {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            let now = Instant::now();
            let deadline = match self.entered.get() {
                Some(t) => *t + HYPERCALL_TIMEOUT,
                None if now.duration_since(self.started) >= HYPERCALL_ENTRY_LIMIT => return false,
                None => now + std::time::Duration::from_millis(1),
            };
            match self.returned.recv_timeout(deadline.saturating_duration_since(now)) {
                Ok(()) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
                Err(RecvTimeoutError::Timeout) => {
                    if self.entered.get().is_some_and(|t| t.elapsed() >= HYPERCALL_TIMEOUT) {
                        return false;
                    }
                }
            }
        }
    }
}

/// The hypercall probe when its kick comes before KVM_RUN (the runner held back).
#[cfg(test)]
mod tests_hypercall {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    static RUNNER_DELAY_MS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn runner_delay() -> std::time::Duration {
        std::time::Duration::from_millis(RUNNER_DELAY_MS.load(Ordering::Relaxed))
    }

    #[test]
    fn a_kick_before_kvm_run_is_not_lost() {
        let Ok(kvm) = Kvm::new() else { panic!("this test needs /dev/kvm") };
        let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        // The runner enters KVM_RUN well after the probe's timeout: the kick lands
        // first. Where a hypercall hangs, a lost kick hangs the join for good.
        RUNNER_DELAY_MS.store(HYPERCALL_TIMEOUT.as_millis() as u64 * 5, Ordering::Relaxed);
        let probe = start_hypercall_probe(&kvm, &cpuid).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(probe.returns());
        });
        let answer = rx.recv_timeout(std::time::Duration::from_secs(20));
        RUNNER_DELAY_MS.store(0, Ordering::Relaxed);
        let answer = answer.expect("the hypercall probe's join hangs: its kick was lost");
        assert_eq!(answer, Ok(false), "a hypercall that came back late counts as hanging");
    }
}

/// The XCR0 bits KVM supports (CPUID leaf 0xD, subleaf 0: EDX:EAX).
fn supported_xcr0(cpuid: &CpuId) -> u64 {
    super::cpuid::find_entry(cpuid, 0xd, 0).map_or(1, |e| (e.edx as u64) << 32 | e.eax as u64) | 1
}

/// Probes this host. `cpuid` is what KVM supports; features it does not advertise are
/// not probed (the guest will not see them anyway).
pub fn probe_host(kvm: &Kvm, cpuid: &CpuId) -> Result<HostQuirks, String> {
    let start = Instant::now();
    let mut quirks = HostQuirks::default();
    let hypercall = start_hypercall_probe(kvm, cpuid)?;
    // The user-mode probes get a VM of their own: they open the low mapping to user
    // mode, which the kernel-mode snippets should not run beside.
    let mut user = ProbeVm::new(kvm, cpuid)?;
    quirks.user_xcr0 = user_xcr0_without_osxsave(&mut user)?;
    quirks.guest_xcr0 = supported_xcr0(cpuid);
    let mut vm = ProbeVm::new(kvm, cpuid)?;
    for feature in GATED {
        // Probed whether or not KVM advertises it: some KVMs pass host feature bits
        // through to the guest regardless, and then the guest may use it.
        // A feature implied away by an earlier one (xsaveopt after xsave) needs no probe.
        if quirks.hidden.iter().any(|(h, _)| h.implied.contains(&feature.gate)) {
            continue;
        }
        let result = if feature.name == "erms" {
            rep_string_cost(&mut vm)
        } else {
            let Some((code, rax)) = snippet(feature.name) else { continue };
            vm.run(code, rax)
        };
        if result != ProbeResult::Works && feature.name == "xsave" && quirks.user_state_needs_xsave() {
            quirks.xsave_kept = Some(result);
        } else if result != ProbeResult::Works {
            quirks.hidden.push((feature, result));
        }
        // After an emulation failure the vCPU is still usable (its registers are set
        // afresh for every snippet); after a triple fault it is shut down.
        if !matches!(result, ProbeResult::Works | ProbeResult::EmulationFailure) {
            vm.fresh_vcpu(cpuid)?;
        }
    }
    if let Some(ns) = cpl0_ns_per_insn(&mut vm) {
        quirks.cpl0_ns_per_insn = ns;
    }
    quirks.int3_traps = hypercall::int3_traps(&mut vm);
    quirks.cpuid_honoured = cpuid_honoured(&mut vm, cpuid)?;
    // Check which hidden features the guest really stops seeing.
    let mut hidden_cpuid = cpuid.clone();
    for (f, _) in &quirks.hidden {
        super::cpuid::hide(&mut hidden_cpuid, f);
    }
    vm.fresh_vcpu(&hidden_cpuid)?;
    for (f, _) in &quirks.hidden {
        let g = f.gate;
        if vm.run_with(&[0x0f, 0xa2], g.leaf as u64, g.subleaf as u64) == ProbeResult::Works {
            let regs = vm.vcpu.get_regs().map_err(|e| format!("probe: KVM_GET_REGS: {e}"))?;
            let value = match g.reg {
                super::cpuid::Reg::Eax => regs.rax,
                super::cpuid::Reg::Ebx => regs.rbx,
                super::cpuid::Reg::Ecx => regs.rcx,
                super::cpuid::Reg::Edx => regs.rdx,
            };
            if value & (1 << g.bit) != 0 {
                quirks.unhideable.push(f);
            }
        }
    }
    user.fresh_vcpu(cpuid)?;
    quirks.user_syscall_broken = !user_syscall_enters_kernel(&mut user)?;
    quirks.hypercall_hangs = !hypercall.returns()?;
    quirks.pv = pv::probe(kvm, cpuid, !quirks.hypercall_hangs)?;
    quirks.tpr_cost = tpr::measure(kvm, cpuid)?;
    quirks.probe_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(quirks)
}



#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_stays_on_when_user_mode_has_more_than_fxsave_state() {
        let q = |user_xcr0| HostQuirks { user_xcr0, ..Default::default() };
        assert!(q(Some(0xe7)).user_state_needs_xsave(), "AVX-512 state in user mode");
        assert!(q(Some(0x7)).user_state_needs_xsave(), "AVX state in user mode");
        assert!(!q(Some(0x3)).user_state_needs_xsave(), "x87/SSE only: FXSAVE covers it");
        assert!(!q(None).user_state_needs_xsave(), "xgetbv faults in user mode, as on hardware");
        let kept = HostQuirks { user_xcr0: Some(0xe7), xsave_kept: Some(ProbeResult::Faults), guest_xcr0: 0x7, ..Default::default() };
        let report = kept.report();
        assert!(report.contains("xsave       fails in guest kernel mode (Faults): kept on"), "{report}");
        assert!(report.contains("WARNING     user-mode state 0xe0 is outside"), "{report}");
        assert_eq!(kept.linux_cmdline_extras(false), None, "no clearcpuid=xsave");
    }

    #[test]
    fn cmdline_extras_follow_the_quirks() {
        let native = HostQuirks { cpl0_ns_per_insn: 0.5, ..Default::default() };
        assert_eq!(native.linux_cmdline_extras(false), None, "nothing to add on hardware-assisted KVM");

        let erms = GATED.iter().find(|g| g.name == "erms").unwrap();
        let emulated = HostQuirks { cpl0_ns_per_insn: 600.0, unhideable: vec![erms], ..Default::default() };
        let kept = emulated.linux_cmdline_extras(true).unwrap();
        assert_eq!(kept, "clearcpuid=erms,fsrm", "--guest-defaults keeps only what correctness needs");
        let extras = emulated.linux_cmdline_extras(false).unwrap();
        assert!(extras.starts_with("clearcpuid=erms,fsrm "), "{extras}");
        let blacklist = extras.split(' ').find_map(|w| w.strip_prefix("initcall_blacklist=")).unwrap();
        assert!(blacklist.split(',').any(|c| c == "slab_sysfs_init"), "{blacklist}");
        assert_eq!(blacklist.split(',').count(), SLOW_WHEN_EMULATED.len());
        assert!(SLOW_WHEN_EMULATED.iter().all(|(name, why)| !name.contains(',') && !why.is_empty()));
        assert!(extras.split(' ').any(|w| w == "rodata=off"), "{extras}");
        assert!(extras.split(' ').any(|w| w == "nowatchdog"), "{extras}");
    }
}


