//! One vCPU: its boot-time register state, its thread, and the run loop that takes
//! every exit and hands it to the right place (see exit.rs for the dispatch).

pub mod cpuid;
pub mod debug;
pub mod emulate;
pub mod exit;
pub mod kick;
pub mod msr;
pub mod probe;
pub mod reset;
pub mod state;
pub mod syscall_fixup;
pub mod thread;
pub mod translate_check;
pub mod xsave;

use std::sync::Arc;

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::Buses;
use crate::stats::ExitStats;
use crate::control::{Control, StopReason};
use crate::x86::boot::{
    BOOT_GDT, SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS, kvm_segment_from_gdt,
};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0}: {1}: {2}")]
    Kvm(u8, &'static str, kvm_ioctls::Error),
    #[error("vCPU {0}: writing boot tables to guest memory failed")]
    GuestMemory(u8),
    #[error("vCPU {0}: state {1}")]
    State(u8, state::StateError),
    #[error("vCPU {0}: restoring: {1}")]
    Restore(u8, String),
}

/// What every vCPU of a machine shares about its state: which MSRs it is made of and
/// which KVM interfaces carry it (found at run time), and the reset table's inputs.
pub struct StateSpec {
    pub msrs: msr::MsrSet,
    /// KVM_CAP_XSAVE2's size (0 when only the 4 KiB KVM_GET_XSAVE exists).
    pub xsave_size: usize,
    pub sregs2: bool,
    pub tsc_khz: bool,
    pub vendor: reset::Vendor,
    /// CPUID leaf 1 EAX: what RESET leaves in EDX.
    pub signature: u32,
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = boot_params.
    Linux64 { entry: u64, boot_params: u64, pml4: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
    /// Multiboot: 32-bit protected mode, paging off, flat segments, interrupts off,
    /// EAX = 0x2BADB002, EBX = the multiboot information structure.
    Multiboot { entry: u32, info: u32 },
}

// Control-register and EFER bits used at boot.
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;


/// Held by a vCPU's thread for its whole life: however the thread ends (it returns,
/// or unwinds from a panic) while the machine is not stopping, a stop is requested,
/// so the VMM, waiting for a stop, never waits for a vCPU that is gone. (The release
/// profile aborts on panic; this matters for a vCPU loop that returns early, and for
/// builds that unwind.)
pub struct ThreadExit {
    control: Arc<Control>,
    index: u8,
}

impl ThreadExit {
    pub fn new(control: Arc<Control>, index: u8) -> Self {
        Self { control, index }
    }
}

impl Drop for ThreadExit {
    fn drop(&mut self) {
        let i = self.index;
        if std::thread::panicking() {
            self.control.request_fatal(format!("vCPU {i}'s thread ended: it panicked"));
        } else if !self.control.stopping() {
            self.control.request_stop(StopReason::Error(format!("vCPU {i}'s thread ended while the machine was running")));
        }
    }
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub mem: GuestMemoryMmap,
    pub buses: Arc<Buses>,
    pub control: Arc<Control>,
    pub stats: ExitStats,
    /// RIP of the last emulation failure, the exit count when it happened, and how
    /// often it repeated there back to back.
    pub last_failure: Option<u64>,
    pub last_failure_exit: u64,
    pub failure_repeats: u32,
    /// Where XSAVE components live, for emulating the XSAVE family.
    pub xsave_layout: Arc<xsave::XsaveLayout>,
    /// Completes guest SYSCALLs that KVM leaves half done (armed only where the probe
    /// found that quirk).
    pub syscall_fixup: Option<syscall_fixup::SyscallFixup>,
    /// Guest RIPs seen at kicks, with milliseconds since the machine started, when
    /// profiling (`SKIFF_PROFILE`).
    pub rip_samples: Option<(std::time::Instant, Vec<(u32, u64)>)>,
    /// The machine's state layout (shared by every vCPU).
    pub spec: Arc<StateSpec>,
    /// The state KVM gave this vCPU at creation (with its CPUID set): the base that
    /// RESET's table is applied to, so state outside the table gets KVM's power-up
    /// value at every reset, not whatever the last guest left.
    pub pristine: Option<state::VcpuState>,
    /// Print registers and the instruction at CS:RIP when the guest triple-faults
    /// (when that ends the run rather than rebooting it).
    pub diagnose_shutdown: bool,
    /// The last translator self-check request this vCPU answered.
    pub translate_checks_done: u32,
    /// The guest's MAXPHYADDR for the page walker, read from the vCPU's CPUID at the
    /// first emulation (0 until then).
    pub maxphyaddr: u8,
    /// Guest debugging: the debug registers' owners, gdb's breakpoints and steps.
    pub debug: debug::VcpuDebug,
    /// Where a stop for gdb is reported, while a gdb client is attached.
    pub gdb_reports: Option<std::sync::mpsc::Sender<(u8, debug::DebugStop)>>,
    /// skiff's hypercall handler (hypercall/), for the call ports and raw sites.
    pub hypercalls: Option<Arc<crate::hypercall::Hypercalls>>,
    /// KVM enforces this vCPU's PV features (KVM_CAP_ENFORCE_PV_FEATURE_CPUID).
    pub pv_enforced: bool,
    /// TPR patching (src/tpr/), when engaged.
    pub tpr: Option<Arc<crate::tpr::Tpr>>,
    /// The last exit was the TPR helper's write poll: the vAPIC slot holds a newer
    /// TPR than the APIC (tpr::on_report).
    pub tpr_after_write_poll: bool,
}

impl Vcpu {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        mem: GuestMemoryMmap,
        buses: Arc<Buses>,
        control: Arc<Control>,
        xsave_layout: Arc<xsave::XsaveLayout>,
        spec: Arc<StateSpec>,
    ) -> Self {
        Self {
            index,
            fd,
            mem,
            buses,
            control,
            stats: ExitStats::default(),
            last_failure: None,
            last_failure_exit: 0,
            failure_repeats: 0,
            xsave_layout,
            syscall_fixup: None,
            rip_samples: None,
            spec,
            pristine: None,
            diagnose_shutdown: false,
            translate_checks_done: 0,
            maxphyaddr: 0,
            debug: debug::VcpuDebug::default(),
            gdb_reports: None,
            hypercalls: None,
            pv_enforced: false,
            tpr: None,
            tpr_after_write_poll: false,
        }
    }

    /// How to read this vCPU's state.
    pub fn state_ctx(&self) -> state::VcpuCtx<'_> {
        state::VcpuCtx {
            fd: &self.fd,
            msrs: &self.spec.msrs.saved,
            xsave_size: self.spec.xsave_size,
            sregs2: self.spec.sregs2,
            tsc_khz: self.spec.tsc_khz,
        }
    }

    pub fn get_state(&self) -> Result<state::VcpuState, VcpuError> {
        state::VcpuState::get(&self.state_ctx()).map_err(|e| VcpuError::State(self.index, e))
    }

    pub fn put_state(&self, s: &state::VcpuState) -> Result<(), VcpuError> {
        s.put(&self.state_ctx()).map_err(|e| VcpuError::State(self.index, e))
    }

    /// Records KVM's creation state; call once, after KVM_SET_CPUID2, before running.
    pub fn capture_pristine(&mut self) -> Result<(), VcpuError> {
        self.pristine = Some(self.get_state()?);
        Ok(())
    }

    /// Puts the vCPU into its architectural state after `kind` (vcpu/reset.rs).
    pub fn reset(&mut self, kind: reset::ResetKind) -> Result<(), VcpuError> {
        let mut s = match (kind, &self.pristine) {
            (reset::ResetKind::Power, Some(p)) => p.clone(),
            _ => self.get_state()?,
        };
        reset::apply(kind, self.spec.vendor, &mut s, self.index, self.spec.signature);
        self.put_state(&s)?;
        // The SYSCALL fix-up arms its breakpoint again when the new kernel writes
        // LSTAR; gdb's breakpoints stay while it is attached.
        if let Some(i) = self.debug.slot_of(debug::Owner::SyscallFixup) {
            self.debug.set(i, debug::Owner::SyscallFixup, None);
        }
        self.debug.fixup_stepping = false;
        self.fd.set_guest_debug(&self.debug.guest_debug()).map_err(self.kvm_err("KVM_SET_GUEST_DEBUG"))?;
        if let Some(f) = self.syscall_fixup.as_mut() {
            *f = Default::default();
        }
        self.last_failure = None;
        self.failure_repeats = 0;
        Ok(())
    }

    /// Hands KVM the guest-debug setting composed from every owner's part.
    pub fn apply_guest_debug(&self) -> Result<(), String> {
        self.fd.set_guest_debug(&self.debug.guest_debug()).map_err(|e| format!("vCPU {}: KVM_SET_GUEST_DEBUG: {e}", self.index))
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let i = self.index;
        move |e| VcpuError::Kvm(i, what, e)
    }

    /// Puts the boot vCPU into the state its kernel entry point expects. Secondary
    /// vCPUs keep their INIT state and wait for the guest's INIT-SIPI-SIPI.
    pub fn set_boot_state(&self, entry: BootEntry) -> Result<(), VcpuError> {
        let gdt_addr = crate::vmm::layout::BOOT_GDT_START;
        for (i, e) in BOOT_GDT.iter().enumerate() {
            self.mem
                .write_obj(*e, GuestAddress(gdt_addr + i as u64 * 8))
                .map_err(|_| VcpuError::GuestMemory(self.index))?;
        }
        self.mem
            .write_obj(0u64, GuestAddress(crate::vmm::layout::BOOT_IDT_START))
            .map_err(|_| VcpuError::GuestMemory(self.index))?;

        let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        sregs.gdt.base = gdt_addr;
        sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = crate::vmm::layout::BOOT_IDT_START;
        sregs.idt.limit = 0;
        let data = kvm_segment_from_gdt(BOOT_GDT[2], SEL_DATA);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment_from_gdt(BOOT_GDT[4], SEL_TSS);

        let mut regs = self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?;
        regs.rflags = 0x2;
        match entry {
            BootEntry::Linux64 { entry, boot_params, pml4 } => {
                sregs.cs = kvm_segment_from_gdt(BOOT_GDT[1], SEL_CODE64);
                sregs.cr3 = pml4;
                sregs.cr4 |= CR4_PAE;
                sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
                sregs.efer |= EFER_LME | EFER_LMA;
                regs.rip = entry;
                regs.rsi = boot_params;
                regs.rsp = 0x8ff0;
                regs.rbp = 0x8ff0;
            }
            BootEntry::Pvh { entry, start_info } => {
                sregs.cs = kvm_segment_from_gdt(BOOT_GDT[3], SEL_CODE32);
                sregs.cr0 = CR0_PE | CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = entry;
                regs.rbx = start_info;
            }
            BootEntry::Multiboot { entry, info } => {
                sregs.cs = kvm_segment_from_gdt(BOOT_GDT[3], SEL_CODE32);
                sregs.cr0 = CR0_PE | CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = u64::from(entry);
                regs.rax = u64::from(crate::vmm::loader::multiboot::BOOTLOADER_MAGIC);
                regs.rbx = u64::from(info);
            }
        }
        self.fd.set_sregs(&sregs).map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(self.kvm_err("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Power-on: RESET (reset.rs), then what firmware would set up, then, on the
    /// bootstrap processor, the kernel's entry state. The same at a cold start and at
    /// every in-place reboot.
    pub fn power_on(&mut self, entry: BootEntry) -> Result<(), VcpuError> {
        self.reset(reset::ResetKind::Power)?;
        self.set_firmware_state()?;
        if self.index == 0 {
            self.set_boot_state(entry)?;
        }
        self.enable_tpr()
    }

    /// TPR reports and the vAPIC slot for the helper, when patching is engaged (at
    /// power-on and restore: KVM keeps both outside the vCPU's state).
    fn enable_tpr(&self) -> Result<(), VcpuError> {
        if self.tpr.is_some() {
            crate::tpr::enable_on_vcpu(&self.fd, self.index).map_err(|e| VcpuError::Restore(self.index, e))?;
        }
        Ok(())
    }

    /// Puts a snapshot's state, and re-arms what skiff keeps outside it: the SYSCALL
    /// fix-up's breakpoint, found again from the restored LSTAR and IDT.
    pub fn restore_state(&mut self, s: &state::VcpuState) -> Result<(), VcpuError> {
        self.put_state(s)?;
        self.enable_tpr()?;
        if self.syscall_fixup.is_some()
            && let Some(lstar) = s.msrs.get_value(syscall_fixup::MSR_LSTAR).filter(|v| *v != 0)
        {
            syscall_fixup::SyscallFixup::on_lstar_write(self, lstar)
                .map_err(|e| VcpuError::Restore(self.index, e))?;
        }
        Ok(())
    }

    /// What firmware sets up before handing over to a kernel, on top of RESET: the
    /// local APIC's LINT0/LINT1 wiring as on a PC (virtual-wire mode: the bootstrap
    /// processor takes the 8259's ExtINT through LINT0; LINT1 carries NMI).
    pub fn set_firmware_state(&self) -> Result<(), VcpuError> {
        use state::{apic_reg, lapic_get, lapic_set};
        const DELIVERY_MASK: u32 = 0x700;
        const DELIVERY_EXTINT: u32 = 7 << 8;
        const DELIVERY_NMI: u32 = 4 << 8;
        const MASKED: u32 = 1 << 16;
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        let lvt0 = if self.index == 0 { DELIVERY_EXTINT } else { DELIVERY_EXTINT | MASKED };
        lapic_set(&mut lapic, apic_reg::LVT0, lvt0);
        let lvt1 = (lapic_get(&lapic, apic_reg::LVT1) & !DELIVERY_MASK) | DELIVERY_NMI;
        lapic_set(&mut lapic, apic_reg::LVT1, lvt1);
        self.fd.set_lapic(&lapic).map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stand-in for a vCPU thread: runs `body` with a ThreadExit, as run_vcpus does.
    fn vcpu_thread(control: &Arc<Control>, index: u8, body: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
        let control = control.clone();
        std::thread::spawn(move || {
            let _exit = ThreadExit::new(control, index);
            body();
        })
    }

    /// Threads that run "until the machine stops", as vCPUs do.
    fn runners(control: &Arc<Control>, n: u8) -> Vec<std::thread::JoinHandle<()>> {
        (1..=n)
            .map(|i| {
                let c = control.clone();
                vcpu_thread(control, i, move || {
                    while !c.stopping() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect()
    }

    /// Waits for a stop like the VMM does, but at most 10 s.
    fn stops_within_10s(control: &Arc<Control>) -> bool {
        let c = control.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            c.wait_stopping();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10)).is_ok()
    }

    #[test]
    fn a_vcpu_thread_that_returns_stops_the_machine() {
        let control = Arc::new(Control::new());
        let others = runners(&control, 2);
        vcpu_thread(&control, 0, || {}).join().unwrap();
        assert!(stops_within_10s(&control), "the machine waits for a vCPU that is gone");
        assert_eq!(control.reason(), Some(StopReason::Error("vCPU 0's thread ended while the machine was running".into())));
        for t in others {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_vcpu_thread_that_panics_stops_the_machine() {
        let control = Arc::new(Control::new());
        let others = runners(&control, 1);
        // A reboot was already on its way: a panicked vCPU must not let it go on.
        control.request_stop(StopReason::Reboot("i8042"));
        let t = vcpu_thread(&control, 0, || panic!("a bug in the exit handler"));
        assert!(t.join().is_err());
        assert!(stops_within_10s(&control));
        assert_eq!(control.reason(), Some(StopReason::Error("vCPU 0's thread ended: it panicked".into())));
        for t in others {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_vcpu_thread_that_ends_after_the_stop_changes_nothing() {
        let control = Arc::new(Control::new());
        let others = runners(&control, 2);
        control.request_stop(StopReason::Poweroff);
        for t in others {
            t.join().unwrap();
        }
        assert_eq!(control.reason(), Some(StopReason::Poweroff));
    }
}
