//! The real vCPU behind [`EmuCpu`]: KVM ioctls, the machine's RAM and MMIO bus, and
//! the entry point from the run loop (`handle_failure`), which fetches the
//! instruction, tells repeats and rewritten code apart, and runs the emulation.

use std::sync::Arc;

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_xsave};
use vm_memory::GuestMemoryMmap;

use super::{EmuCpu, Emulated};
use crate::vcpu::Vcpu;
use crate::vcpu::exit::KvmInsnBytes;
use crate::vcpu::xsave::XsaveLayout;
use crate::x86::insn::{self, FetchError, FetchedInsn};
use crate::x86::paging::{PagingContext, Translation};

/// Emulation failures in a row at the same RIP after which skiff gives up (a guest
/// that keeps failing at one place would otherwise spin forever).
const MAX_REPEATS: u32 = 1000;
/// Exits between two failures at one RIP that still count as "the same failure again".
const REPEAT_WINDOW: u64 = 4;
const MSR_IA32_XSS: u32 = 0xda0;

impl EmuCpu for Vcpu {
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        self.buses.mmio_read(gpa, data);
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.buses.mmio.write(gpa, data);
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), String> {
        self.fd.set_regs(regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), String> {
        self.fd.set_sregs(sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))
    }
    fn xcr0(&mut self) -> Result<u64, String> {
        let xcrs = self.fd.get_xcrs().map_err(|e| format!("KVM_GET_XCRS: {e}"))?;
        Ok(xcrs.xcrs.iter().take(xcrs.nr_xcrs as usize).find(|x| x.xcr == 0).map_or(1, |x| x.value))
    }
    fn xss(&mut self) -> Result<u64, String> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_XSS, ..Default::default() }])
            .map_err(|e| format!("IA32_XSS: {e:?}"))?;
        // KVM without XSAVES refuses the MSR: no supervisor components then.
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) => Ok(msrs.as_slice().first().map_or(0, |e| e.data)),
            _ => Ok(0),
        }
    }
    fn get_xsave(&mut self) -> Result<kvm_xsave, String> {
        self.fd.get_xsave().map_err(|e| format!("KVM_GET_XSAVE: {e}"))
    }
    fn set_xsave(&mut self, x: &kvm_xsave) -> Result<(), String> {
        // SAFETY: `x` is a whole kvm_xsave from KVM_GET_XSAVE on this vCPU, edited
        // in place; the emulator refuses layouts larger than it.
        unsafe { self.fd.set_xsave(x) }.map_err(|e| format!("KVM_SET_XSAVE: {e}"))
    }
    fn inject(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), String> {
        let mut ev = self.fd.get_vcpu_events().map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        ev.exception.injected = 1;
        ev.exception.nr = vector;
        ev.exception.has_error_code = u8::from(error_code.is_some());
        ev.exception.error_code = error_code.unwrap_or(0);
        self.fd.set_vcpu_events(&ev).map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
    }
    fn maxphyaddr(&mut self) -> u8 {
        if self.maxphyaddr == 0 {
            self.maxphyaddr = guest_maxphyaddr(&self.fd);
        }
        self.maxphyaddr
    }
    fn xsave_layout(&self) -> Arc<XsaveLayout> {
        self.xsave_layout.clone()
    }
    fn random(&mut self, buf: &mut [u8]) -> bool {
        // SAFETY: buf is a valid writable buffer of the given length.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        n == buf.len() as isize
    }
    fn count(&mut self, what: &'static str) {
        self.stats.count_emulated(what);
    }
}

/// MAXPHYADDR from the CPUID the vCPU was given (0x80000008 EAX[7:0]); 52, the
/// architectural maximum, where that leaf is missing.
fn guest_maxphyaddr(fd: &kvm_ioctls::VcpuFd) -> u8 {
    let bits = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|c| c.as_slice().iter().find(|e| e.function == 0x8000_0008).map(|e| e.eax as u8))
        .filter(|b| (32..=52).contains(b));
    bits.unwrap_or(52)
}

/// True when the bytes KVM's emulator failed on are not the instruction memory holds
/// now (`now`): the text changed between KVM's fetch and skiff's. KVM may have
/// fetched past the instruction's end, so only the bytes both hold are compared.
pub(super) fn code_changed(kvm_saw: &[u8], now: &[u8]) -> bool {
    let n = kvm_saw.len().min(now.len());
    kvm_saw.get(..n) != now.get(..n)
}

/// Handles one emulation failure on `vcpu`. `kvm_saw` is what KVM's emulator fetched,
/// when KVM reports it.
pub fn handle_failure(vcpu: &mut Vcpu, kvm_saw: Option<&KvmInsnBytes>) -> Result<Emulated, String> {
    let regs = vcpu.fd.get_regs().map_err(|e| format!("vCPU {}: KVM_GET_REGS: {e}", vcpu.index))?;
    let sregs = vcpu.fd.get_sregs().map_err(|e| format!("vCPU {}: KVM_GET_SREGS: {e}", vcpu.index))?;
    // A repeat is a failure at the same RIP with (almost) no other exit in between;
    // counted before anything else, so no path (a code page that never becomes
    // present, for one) can spin forever.
    let now = vcpu.stats.total();
    let repeat = vcpu.last_failure == Some(regs.rip) && now.saturating_sub(vcpu.last_failure_exit) <= REPEAT_WINDOW;
    vcpu.last_failure_exit = now;
    if repeat {
        vcpu.failure_repeats += 1;
    } else {
        vcpu.last_failure = Some(regs.rip);
        vcpu.failure_repeats = 0;
    }
    // The fetch walks with the guest's MAXPHYADDR (protection keys never apply to it).
    let ctx = PagingContext::for_vcpu(&sregs, regs.rflags, 0, EmuCpu::maxphyaddr(vcpu));
    let fetched = insn::fetch_in(&vcpu.mem, &sregs, &ctx, regs.rip);
    if vcpu.failure_repeats > MAX_REPEATS {
        let what = format!("emulation failure repeats at the same instruction {MAX_REPEATS} times");
        return Ok(Emulated::Unhandled(diagnostic_text(&what, &regs, &sregs, fetched.as_ref())));
    }
    let fetched = match fetched {
        Ok(f) => f,
        Err(FetchError::Translate(Translation::Retry { .. })) => {
            // The code page is not present right now: let the guest run and fault it in.
            vcpu.stats.count_emulated("retry (code page not present)");
            return Ok(Emulated::Done);
        }
        Err(e) => {
            return Ok(Emulated::Unhandled(format!(
                "KVM could not emulate an instruction and skiff could not fetch it: {e}\n{}",
                format_regs(&regs, &sregs)
            )));
        }
    };
    if let Some(saw) = kvm_saw
        && code_changed(saw.as_slice(), fetched.bytes())
    {
        // KVM failed on bytes that are gone: another vCPU rewrote the text (jump
        // labels, alternatives, text_poke's int3 dance). Emulating either version
        // could be wrong (an int3 the kernel has already retired is fatal to it);
        // running the current bytes again is what a real CPU does after the rewrite.
        vcpu.stats.count_emulated("re-executed (code changed under KVM's emulator)");
        return Ok(Emulated::Done);
    }
    // skiff's raw hypercall site, from guest kernel mode (hypercall/trap.rs).
    if let Some(h) = vcpu.hypercalls.clone()
        && sregs.cs.selector & 3 == 0
        && let Some(patch) = crate::hypercall::trap::raw_site(fetched.bytes.get(..fetched.len).unwrap_or(&[]))
    {
        let width = crate::hypercall::Width::of_mode(&sregs);
        let out = crate::hypercall::trap::on_trap(&h, &vcpu.mem, &regs, &ctx, fetched.rip, patch, width);
        vcpu.fd.set_regs(&out).map_err(|e| format!("vCPU {}: KVM_SET_REGS: {e}", vcpu.index))?;
        vcpu.last_failure = None;
        vcpu.failure_repeats = 0;
        return Ok(Emulated::Done);
    }
    let retry_first = vcpu.failure_repeats == 0 && kvm_saw.is_none();
    match super::emulate(vcpu, regs, sregs, &fetched, retry_first)? {
        Emulated::Unhandled(what) => Ok(Emulated::Unhandled(diagnostic_text(&what, &regs, &sregs, Ok(&fetched)))),
        Emulated::Done => {
            // The instruction completed (RIP moved on): a later failure here is the
            // guest coming back to it (xsave at every context switch, with no exit
            // in between when I/O goes through ioeventfds), not a repeat.
            if vcpu.fd.get_regs().is_ok_and(|r| r.rip != regs.rip) {
                vcpu.last_failure = None;
                vcpu.failure_repeats = 0;
            }
            Ok(Emulated::Done)
        }
    }
}

/// A diagnostic for an exit skiff cannot handle: what happened, the registers, and the
/// instruction at CS:RIP (bytes and disassembly, or why it could not be fetched).
pub fn diagnose(vcpu: &Vcpu, what: &str) -> String {
    let (Ok(regs), Ok(sregs)) = (vcpu.fd.get_regs(), vcpu.fd.get_sregs()) else {
        return format!("vCPU {}: {what} (registers unavailable)", vcpu.index);
    };
    let fetched = insn::fetch(&vcpu.mem, &sregs, regs.rip, regs.rflags);
    format!("vCPU {}: {}", vcpu.index, diagnostic_text(what, &regs, &sregs, fetched.as_ref()))
}

fn diagnostic_text(what: &str, regs: &kvm_regs, sregs: &kvm_sregs, fetched: Result<&FetchedInsn, &FetchError>) -> String {
    let insn = match fetched {
        Ok(f) => {
            let bytes: Vec<String> = f.bytes().iter().take(f.insn.len().max(1)).map(|b| format!("{b:02x}")).collect();
            format!("instruction at CS:RIP: {}  {}", bytes.join(" "), f.disasm())
        }
        Err(e) => format!("instruction at CS:RIP not readable: {e}"),
    };
    format!("{what}\n{insn}\n{}", format_regs(regs, sregs))
}

pub fn format_regs(r: &kvm_regs, s: &kvm_sregs) -> String {
    format!(
        "rip={:#018x} rsp={:#018x} rflags={:#010x}\n\
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
         rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}\n\
         r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}\n\
         r13={:#018x} r14={:#018x} r15={:#018x}\n\
         cs={:#06x} base={:#x} l={} db={} dpl={}  ss={:#06x}\n\
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11,
        r.r12, r.r13, r.r14, r.r15, s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.cs.dpl, s.ss.selector,
        s.cr0, s.cr2, s.cr3, s.cr4, s.efer
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rewritten_under_kvm_is_told_apart() {
        // KVM saw the int3 of text_poke's first step; memory now holds the jmp.
        let jmp = [0xe9, 0x10, 0x00, 0x00, 0x00];
        assert!(code_changed(&[0xcc, 0x10, 0x00, 0x00, 0x00], &jmp));
        // KVM fetched past the instruction's end: only the common bytes count.
        assert!(!code_changed(&[0xe9, 0x10, 0x00, 0x00, 0x00, 0x90, 0x90], &jmp));
        assert!(!code_changed(&[0xe9, 0x10], &jmp));
        assert!(!code_changed(&[], &jmp));
    }

    #[test]
    fn kvm_reported_bytes_are_bounded() {
        let bytes = [0xcc; 15];
        assert!(KvmInsnBytes::from_exit(2, 1, 5, &bytes).is_none(), "ndata too small");
        assert!(KvmInsnBytes::from_exit(3, 0, 5, &bytes).is_none(), "flag clear");
        assert!(KvmInsnBytes::from_exit(3, 1, 0, &bytes).is_none(), "no bytes");
        assert_eq!(KvmInsnBytes::from_exit(3, 1, 200, &bytes).map(|b| b.as_slice().len()), Some(15));
        assert_eq!(KvmInsnBytes::from_exit(16, 1, 1, &bytes).map(|b| b.as_slice().to_vec()), Some(vec![0xcc]));
    }
}
