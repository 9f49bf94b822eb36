//! One vCPU: its boot-time register state, its thread, and the run loop that takes
//! every exit and hands it to the right place (see exit.rs for the dispatch).

pub mod cpuid;
pub mod emulate;
pub mod exit;
pub mod kick;
pub mod probe;
pub mod syscall_fixup;
pub mod xsave;

use std::sync::Arc;

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::Buses;
use crate::stats::ExitStats;
use crate::vmm::control::Control;
use crate::x86::boot::{
    BOOT_GDT, SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS, kvm_segment_from_gdt,
};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0}: {1}: {2}")]
    Kvm(u8, &'static str, kvm_ioctls::Error),
    #[error("vCPU {0}: writing boot tables to guest memory failed")]
    GuestMemory(u8),
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = boot_params.
    Linux64 { entry: u64, boot_params: u64, pml4: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
}

// Control-register and EFER bits used at boot.
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSR numbers the boot state sets.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: firmware would have done this.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

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
}

impl Vcpu {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        mem: GuestMemoryMmap,
        buses: Arc<Buses>,
        control: Arc<Control>,
        xsave_layout: Arc<xsave::XsaveLayout>,
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
        }
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
        }
        self.fd.set_sregs(&sregs).map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(self.kvm_err("KVM_SET_REGS"))?;
        Ok(())
    }

    /// State every vCPU gets before it first runs: x87/SSE control words, the boot
    /// MSRs, and the local APIC's LINT0/LINT1 wiring (ExtINT and NMI, as on a PC).
    pub fn set_initial_state(&self) -> Result<(), VcpuError> {
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(self.kvm_err("KVM_SET_FPU"))?;

        let entries = [
            kvm_msr_entry { index: MSR_IA32_MISC_ENABLE, data: MISC_ENABLE_FAST_STRING, ..Default::default() },
            kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: MTRR_DEF_TYPE_WB_ENABLED, ..Default::default() },
        ];
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm(self.index, "building MSR list", kvm_ioctls::Error::new(libc::E2BIG)))?;
        // Some MSRs may be refused by a given KVM; what was set is what counts.
        let _ = self.fd.set_msrs(&msrs);

        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_EXTINT: u32 = 7 << 8;
        const DELIVERY_NMI: u32 = 4 << 8;
        let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
            let mut b = [0u8; 4];
            for (i, v) in b.iter_mut().enumerate() {
                *v = regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | mode;
            for (i, byte) in v.to_le_bytes().iter().enumerate() {
                regs[off + i] = *byte as std::os::raw::c_char;
            }
        };
        set(&mut lapic.regs, APIC_LVT0, DELIVERY_EXTINT);
        set(&mut lapic.regs, APIC_LVT1, DELIVERY_NMI);
        self.fd.set_lapic(&lapic).map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        Ok(())
    }
}
