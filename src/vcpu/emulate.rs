//! What skiff does when KVM's instruction emulator gives up (KVM_EXIT_INTERNAL_ERROR,
//! emulation failure). Where guest kernel mode is emulated by KVM, instructions the
//! emulator lacks land here. skiff fetches the instruction at CS:RIP through the
//! guest's own page tables (x86/insn.rs), decodes it, and either emulates it, injects
//! the exception real hardware would raise for it, or stops with a diagnostic.
//! Every outcome is counted per instruction in the vCPU's stats.

use iced_x86::{Code, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::Vcpu;
use super::exit::KvmInsnBytes;
use super::xsave;
use crate::x86::insn::{self, FetchError, FetchedInsn};
use crate::x86::paging::{self, Access, PagingContext, Translation};

/// Outcome of handling an emulation failure.
pub enum Emulated {
    /// The guest can continue.
    Done,
    /// skiff cannot handle it; the text is the diagnostic.
    Unhandled(String),
}

#[derive(Clone, Copy)]
enum XsaveOp {
    Restore,
    Save { compact: bool },
}

const VEC_BP: u32 = 3;
const VEC_UD: u32 = 6;
const VEC_GP: u32 = 13;
const VEC_PF: u32 = 14;
const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_AC: u64 = 1 << 18;
/// Emulation failures in a row at the same RIP after which skiff gives up (a guest
/// that keeps failing at one place would otherwise spin forever).
const MAX_REPEATS: u32 = 1000;
/// Exits between two failures at one RIP that still count as "the same failure again".
const REPEAT_WINDOW: u64 = 4;

/// True when the bytes KVM's emulator failed on are not the instruction memory holds
/// now (`now`): the text changed between KVM's fetch and skiff's. KVM may have
/// fetched past the instruction's end, so only the bytes both hold are compared.
fn code_changed(kvm_saw: &[u8], now: &[u8]) -> bool {
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
    let fetched = insn::fetch(&vcpu.mem, &sregs, regs.rip, regs.rflags);
    if vcpu.failure_repeats > MAX_REPEATS {
        return Ok(Emulated::Unhandled(diagnostic_text(
            &format!("emulation failure repeats at the same instruction {MAX_REPEATS} times"),
            &regs,
            &sregs,
            fetched.as_ref(),
        )));
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
    let mut cx = Cx { vcpu, regs, sregs, insn: &fetched, kvm_reported: kvm_saw.is_some() };
    cx.emulate()
}

struct Cx<'a> {
    vcpu: &'a mut Vcpu,
    regs: kvm_regs,
    sregs: kvm_sregs,
    insn: &'a FetchedInsn,
    /// KVM reported the bytes it failed on, and they are the ones fetched here.
    kvm_reported: bool,
}

impl Cx<'_> {
    fn emulate(&mut self) -> Result<Emulated, String> {
        let i = &self.insn.insn;
        let len = self.insn.insn.len() as u64;
        // KVM hands over failures in user mode too (KVM_CAP_EXIT_ON_EMULATION_FAILURE):
        // what only the kernel may run faults there, as on hardware.
        if self.sregs.cs.dpl != 0 {
            match i.mnemonic() {
                Mnemonic::Clac | Mnemonic::Stac => {
                    self.fault(VEC_UD, None, "clac/stac at CPL > 0 -> #UD")?;
                    return Ok(Emulated::Done);
                }
                Mnemonic::Invpcid => {
                    self.fault(VEC_GP, Some(0), "invpcid at CPL > 0 -> #GP")?;
                    return Ok(Emulated::Done);
                }
                _ => {}
            }
        }
        match i.mnemonic() {
            Mnemonic::Int3 => {
                // A trap: the saved RIP is the next instruction.
                self.regs.rip = self.regs.rip.wrapping_add(len);
                self.set_regs()?;
                self.inject(VEC_BP, None)?;
                self.count("int3 -> #BP");
            }
            Mnemonic::Clac | Mnemonic::Stac => {
                if i.mnemonic() == Mnemonic::Clac {
                    self.regs.rflags &= !RFLAGS_AC;
                } else {
                    self.regs.rflags |= RFLAGS_AC;
                }
                self.advance(len)?;
                self.count(if i.mnemonic() == Mnemonic::Clac { "clac" } else { "stac" });
            }
            Mnemonic::Clwb | Mnemonic::Clflushopt | Mnemonic::Clflush | Mnemonic::Lfence
            | Mnemonic::Sfence | Mnemonic::Mfence => {
                // Guest memory is ordinary host memory, coherent with every vCPU.
                self.advance(len)?;
                self.count(&format!("{:?}", i.mnemonic()).to_lowercase());
            }
            Mnemonic::Xgetbv => {
                let xcrs = self.vcpu.fd.get_xcrs().map_err(|e| format!("KVM_GET_XCRS: {e}"))?;
                let ecx = self.regs.rcx as u32;
                match xcrs.xcrs.iter().take(xcrs.nr_xcrs as usize).find(|x| x.xcr == ecx) {
                    Some(x) => {
                        self.regs.rax = x.value & 0xffff_ffff;
                        self.regs.rdx = x.value >> 32;
                        self.advance(len)?;
                        self.count("xgetbv");
                    }
                    None => self.fault(VEC_GP, Some(0), "xgetbv -> #GP")?,
                }
            }
            Mnemonic::Invpcid => {
                // Reloading the special registers makes KVM drop the guest's cached
                // translations: a full flush, which covers any INVPCID type.
                self.regs.rip = self.regs.rip.wrapping_add(len);
                self.set_regs()?;
                self.vcpu.fd.set_sregs(&self.sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
                self.count("invpcid (full flush)");
            }
            Mnemonic::Rdrand | Mnemonic::Rdseed => {
                let mut bytes = [0u8; 8];
                let ok = getrandom(&mut bytes);
                let reg = i.op0_register();
                self.set_gpr(reg, u64::from_le_bytes(bytes))?;
                // CF=1 means a value was delivered; OF, SF, ZF, AF, PF are cleared.
                self.regs.rflags &= !0x8d5;
                if ok {
                    self.regs.rflags |= RFLAGS_CF;
                }
                self.advance(len)?;
                self.count(if i.mnemonic() == Mnemonic::Rdrand { "rdrand" } else { "rdseed" });
            }
            Mnemonic::Cmpxchg16b => self.cmpxchg16b(len)?,
            Mnemonic::Wait => {
                // fwait: no x87 exception is ever pending (skiff never unmasks them).
                self.advance(len)?;
                self.count("fwait");
            }
            Mnemonic::Fninit => {
                let mut fpu = self.vcpu.fd.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
                // x87 state after FNINIT (SDM vol. 1, 8.1.x): FCW 0x37f, all else 0, tags empty.
                fpu.fcw = 0x37f;
                fpu.fsw = 0;
                fpu.ftwx = 0;
                fpu.last_opcode = 0;
                fpu.last_ip = 0;
                fpu.last_dp = 0;
                self.vcpu.fd.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))?;
                self.advance(len)?;
                self.count("fninit");
            }
            Mnemonic::Fnclex => {
                let mut fpu = self.vcpu.fd.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
                // Clears the exception flags, the summary and busy bits.
                fpu.fsw &= !0x80ff;
                self.vcpu.fd.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))?;
                self.advance(len)?;
                self.count("fnclex");
            }
            Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => self.mxcsr(len)?,
            Mnemonic::Xrstor | Mnemonic::Xrstor64 => self.xsave_family(len, XsaveOp::Restore)?,
            Mnemonic::Xsave | Mnemonic::Xsave64 | Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => {
                self.xsave_family(len, XsaveOp::Save { compact: false })?
            }
            Mnemonic::Xsavec | Mnemonic::Xsavec64 => self.xsave_family(len, XsaveOp::Save { compact: true })?,
            Mnemonic::Movbe => self.movbe(len)?,
            Mnemonic::Jmp if near_jmp(i) => self.jmp_near()?,
            _ if self.vcpu.failure_repeats == 0 && !self.kvm_reported => {
                // An instruction KVM's emulator normally handles, and KVM did not say
                // which bytes it saw: they may not be the ones here now (another vCPU
                // patching kernel text races with KVM's fetch). Run it again once
                // before calling it unsupported.
                self.count("re-executed (code may have changed under KVM's emulator)");
            }
            _ => {
                // Anything else, failing again: what a CPU without the instruction does.
                // Counted by mnemonic (a bounded set), not by operands the guest chooses.
                let name = format!("{:?} -> #UD", self.insn.insn.mnemonic()).to_lowercase();
                self.fault(VEC_UD, None, &name)?;
            }
        }
        Ok(Emulated::Done)
    }

    fn count(&mut self, what: &str) {
        self.vcpu.stats.count_emulated(what);
    }

    /// A near JMP (relative, register or memory operand): one KVM normally runs, here
    /// in case it gives up on it. The target must be canonical in 64-bit mode and
    /// within CS's limit elsewhere, else #GP(0), as on hardware.
    fn jmp_near(&mut self) -> Result<(), String> {
        let i = self.insn.insn;
        let target = match i.op0_kind() {
            OpKind::Register => self.gpr(i.op0_register()),
            OpKind::Memory => {
                let size = i.memory_size().size() as u64;
                let Some(gva) = self.memory_operand() else {
                    return self.fault(VEC_UD, None, "jmp (bad operand) -> #UD");
                };
                let Some(bytes) = self.read_virt(gva, size, Access::Read)? else { return Ok(()) };
                let mut word = [0u8; 8];
                for (dst, src) in word.iter_mut().zip(&bytes) {
                    *dst = *src;
                }
                Some(u64::from_le_bytes(word))
            }
            _ => Some(i.near_branch_target()),
        };
        let Some(target) = target else {
            return self.fault(VEC_UD, None, "jmp (bad operand) -> #UD");
        };
        let ok = if self.insn.bitness == 64 {
            paging::is_canonical(target, self.sregs.cr4 & (1 << 12) != 0)
        } else {
            target <= u64::from(self.sregs.cs.limit)
        };
        if !ok {
            return self.fault(VEC_GP, Some(0), "jmp to a bad target -> #GP");
        }
        self.regs.rip = target;
        self.set_regs()?;
        self.count("jmp (near)");
        Ok(())
    }

    fn advance(&mut self, len: u64) -> Result<(), String> {
        self.regs.rip = self.regs.rip.wrapping_add(len);
        self.set_regs()
    }

    fn set_regs(&mut self) -> Result<(), String> {
        self.vcpu.fd.set_regs(&self.regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
    }

    /// Injects a fault-type exception at the current RIP.
    fn fault(&mut self, vector: u32, error_code: Option<u32>, what: &str) -> Result<(), String> {
        self.inject(vector, error_code)?;
        self.count(what);
        Ok(())
    }

    fn inject(&mut self, vector: u32, error_code: Option<u32>) -> Result<(), String> {
        let mut ev = self.vcpu.fd.get_vcpu_events().map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        ev.exception.injected = 1;
        ev.exception.nr = vector as u8;
        ev.exception.has_error_code = error_code.is_some() as u8;
        ev.exception.error_code = error_code.unwrap_or(0);
        self.vcpu.fd.set_vcpu_events(&ev).map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
    }

    /// The linear address of the instruction's memory operand.
    fn memory_operand(&self) -> Option<u64> {
        let i = &self.insn.insn;
        let base = match i.memory_base() {
            Register::None => 0,
            // iced already folded RIP into the displacement.
            Register::RIP | Register::EIP => 0,
            r => self.gpr(r)?,
        };
        let index = match i.memory_index() {
            Register::None => 0,
            r => self.gpr(r)?.wrapping_mul(i.memory_index_scale() as u64),
        };
        let seg_base = match i.memory_segment() {
            Register::FS => self.sregs.fs.base,
            Register::GS => self.sregs.gs.base,
            _ if self.insn.bitness == 64 => 0,
            Register::ES => self.sregs.es.base,
            Register::CS => self.sregs.cs.base,
            Register::SS => self.sregs.ss.base,
            _ => self.sregs.ds.base,
        };
        let mut addr = base.wrapping_add(index).wrapping_add(i.memory_displacement64()).wrapping_add(seg_base);
        if self.insn.bitness != 64 {
            addr &= 0xffff_ffff;
        }
        Some(addr)
    }

    /// Translates a data access, injecting #PF when the guest's tables forbid it or the
    /// page is not present. Returns None after injecting.
    fn data_gpa(&mut self, gva: u64, len: u64, access: Access) -> Result<Option<u64>, String> {
        let ctx = PagingContext::from_sregs(&self.sregs, self.regs.rflags);
        // Both ends must translate; the operands handled here never cross a page when
        // aligned, and unaligned ones fault below.
        let end = gva.wrapping_add(len.saturating_sub(1));
        if gva >> 12 != end >> 12 {
            self.fault(VEC_GP, Some(0), "page-crossing operand -> #GP")?;
            return Ok(None);
        }
        match paging::translate(&self.vcpu.mem, &ctx, gva, access) {
            Translation::Ok(gpa) => Ok(Some(gpa)),
            Translation::Retry { .. } => {
                self.page_fault(gva, false, access)?;
                Ok(None)
            }
            Translation::Fail(_) => {
                self.page_fault(gva, true, access)?;
                Ok(None)
            }
        }
    }

    fn page_fault(&mut self, gva: u64, present: bool, access: Access) -> Result<(), String> {
        let cpl = self.sregs.cs.dpl as u32;
        let code = present as u32 | ((access == Access::Write) as u32) << 1 | ((cpl == 3) as u32) << 2;
        self.sregs.cr2 = gva;
        self.vcpu.fd.set_sregs(&self.sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        self.fault(VEC_PF, Some(code), "page fault on emulated access -> #PF")
    }

    fn cmpxchg16b(&mut self, len: u64) -> Result<(), String> {
        let Some(gva) = self.memory_operand() else {
            return self.fault(VEC_UD, None, "cmpxchg16b (bad operand) -> #UD");
        };
        if gva % 16 != 0 {
            return self.fault(VEC_GP, Some(0), "cmpxchg16b (unaligned) -> #GP");
        }
        let Some(gpa) = self.data_gpa(gva, 16, Access::Write)? else { return Ok(()) };
        let expected = (self.regs.rdx as u128) << 64 | self.regs.rax as u128;
        let new = (self.regs.rcx as u128) << 64 | self.regs.rbx as u128;
        let Some(old) = atomic_cmpxchg16b(&self.vcpu.mem, gpa, expected, new) else {
            return self.fault(VEC_GP, Some(0), "cmpxchg16b (not RAM) -> #GP");
        };
        if old == expected {
            self.regs.rflags |= RFLAGS_ZF;
        } else {
            self.regs.rflags &= !RFLAGS_ZF;
            self.regs.rax = old as u64;
            self.regs.rdx = (old >> 64) as u64;
        }
        self.advance(len)?;
        self.count("cmpxchg16b");
        Ok(())
    }

    /// XSAVE/XSAVEOPT/XSAVEC/XRSTOR against KVM's copy of the extended state.
    fn xsave_family(&mut self, len: u64, op: XsaveOp) -> Result<(), String> {
        let name = self.insn.insn.mnemonic();
        let Some(gva) = self.memory_operand() else {
            return self.fault(VEC_UD, None, "xsave family (bad operand) -> #UD");
        };
        if gva % 64 != 0 {
            return self.fault(VEC_GP, Some(0), "xsave family (unaligned) -> #GP");
        }
        let xcrs = self.vcpu.fd.get_xcrs().map_err(|e| format!("KVM_GET_XCRS: {e}"))?;
        let xcr0 = xcrs.xcrs.iter().take(xcrs.nr_xcrs as usize).find(|x| x.xcr == 0).map_or(1, |x| x.value);
        let rfbm = ((self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff)) & xcr0;
        let layout = self.vcpu.xsave_layout.clone();
        let size = layout.standard_size.max(xsave::LEGACY_AND_HEADER) as u64;
        let access = if matches!(op, XsaveOp::Restore) { Access::Read } else { Access::Write };
        let Some(mut buf) = self.read_virt(gva, size, access)? else { return Ok(()) };
        let mut state = self.vcpu.fd.get_xsave().map_err(|e| format!("KVM_GET_XSAVE: {e}"))?;
        match op {
            XsaveOp::Restore => {
                if xsave::xrstor(&mut state, &buf, rfbm, &layout).is_err() {
                    return self.fault(VEC_GP, Some(0), "xrstor (bad header) -> #GP");
                }
                // SAFETY: `state` came from KVM_GET_XSAVE on this vCPU and keeps its size.
                unsafe { self.vcpu.fd.set_xsave(&state) }.map_err(|e| format!("KVM_SET_XSAVE: {e}"))?;
            }
            XsaveOp::Save { compact } => {
                xsave::xsave(&state, &mut buf, rfbm, compact, &layout);
                if !self.write_virt(gva, &buf)? {
                    return Ok(());
                }
            }
        }
        self.advance(len)?;
        self.count(&format!("{name:?}").to_lowercase());
        Ok(())
    }

    /// Reads `len` bytes at guest-virtual `gva`, page by page through the guest's
    /// tables; injects #PF and returns None where a page does not translate.
    fn read_virt(&mut self, gva: u64, len: u64, access: Access) -> Result<Option<Vec<u8>>, String> {
        let Some(pieces) = self.translate_pieces(gva, len, access)? else { return Ok(None) };
        let mut out = vec![0u8; len as usize];
        let mut done = 0usize;
        for (gpa, n) in pieces {
            let Some(dst) = out.get_mut(done..done + n) else { break };
            if self.vcpu.mem.read_slice(dst, GuestAddress(gpa)).is_err() {
                self.fault(VEC_GP, Some(0), "access outside RAM -> #GP")?;
                return Ok(None);
            }
            done += n;
        }
        Ok(Some(out))
    }

    /// Writes `data` at guest-virtual `gva`; false if a fault was injected instead.
    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<bool, String> {
        let Some(pieces) = self.translate_pieces(gva, data.len() as u64, Access::Write)? else { return Ok(false) };
        let mut done = 0usize;
        for (gpa, n) in pieces {
            let Some(src) = data.get(done..done + n) else { break };
            if self.vcpu.mem.write_slice(src, GuestAddress(gpa)).is_err() {
                self.fault(VEC_GP, Some(0), "access outside RAM -> #GP")?;
                return Ok(false);
            }
            done += n;
        }
        Ok(true)
    }

    /// Splits a virtual range (at most 16 KiB) into physical pieces, one per page.
    fn translate_pieces(&mut self, gva: u64, len: u64, access: Access) -> Result<Option<Vec<(u64, usize)>>, String> {
        const MAX: u64 = 16 << 10;
        if len > MAX {
            return Err(format!("emulated access of {len} bytes is larger than {MAX}"));
        }
        let ctx = PagingContext::from_sregs(&self.sregs, self.regs.rflags);
        let mut pieces = Vec::new();
        let walked = paging::for_each_piece(&self.vcpu.mem, &ctx, gva, len as usize, access, |gpa, _, n| {
            pieces.push((gpa, n));
        });
        match walked {
            Ok(()) => Ok(Some(pieces)),
            Err((addr, Translation::Retry { .. })) => {
                self.page_fault(addr, false, access)?;
                Ok(None)
            }
            Err((addr, _)) => {
                self.page_fault(addr, true, access)?;
                Ok(None)
            }
        }
    }

    /// LDMXCSR / STMXCSR through KVM's FPU state.
    fn mxcsr(&mut self, len: u64) -> Result<(), String> {
        let load = self.insn.insn.mnemonic() == Mnemonic::Ldmxcsr;
        let Some(gva) = self.memory_operand() else {
            return self.fault(VEC_UD, None, "ldmxcsr/stmxcsr (bad operand) -> #UD");
        };
        let mut fpu = self.vcpu.fd.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
        if load {
            let Some(bytes) = self.read_virt(gva, 4, Access::Read)? else { return Ok(()) };
            let mut v = [0u8; 4];
            v.copy_from_slice(bytes.get(..4).ok_or("mxcsr read")?);
            let value = u32::from_le_bytes(v);
            // Reserved bits set raise #GP (MXCSR_MASK on current CPUs is 0xffff).
            if value & !0xffff != 0 {
                return self.fault(VEC_GP, Some(0), "ldmxcsr (reserved bits) -> #GP");
            }
            fpu.mxcsr = value;
            self.vcpu.fd.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))?;
        } else if !self.write_virt(gva, &fpu.mxcsr.to_le_bytes())? {
            return Ok(());
        }
        self.advance(len)?;
        self.count(if load { "ldmxcsr" } else { "stmxcsr" });
        Ok(())
    }

    fn movbe(&mut self, len: u64) -> Result<(), String> {
        let i = self.insn.insn;
        let size = match i.code() {
            Code::Movbe_r16_m16 | Code::Movbe_m16_r16 => 2,
            Code::Movbe_r32_m32 | Code::Movbe_m32_r32 => 4,
            _ => 8,
        };
        let Some(gva) = self.memory_operand() else {
            return self.fault(VEC_UD, None, "movbe (bad operand) -> #UD");
        };
        let load = i.op0_kind() == OpKind::Register;
        let access = if load { Access::Read } else { Access::Write };
        let Some(gpa) = self.data_gpa(gva, size, access)? else { return Ok(()) };
        let mut buf = [0u8; 8];
        let bytes = buf.get_mut(..size as usize).ok_or("movbe size")?;
        if load {
            if self.vcpu.mem.read_slice(bytes, GuestAddress(gpa)).is_err() {
                return self.fault(VEC_GP, Some(0), "movbe (not RAM) -> #GP");
            }
            bytes.reverse();
            let v = u64::from_le_bytes(buf);
            let reg = i.op0_register();
            let old = self.gpr(reg).unwrap_or(0);
            // A 16-bit load keeps the register's upper bits; a 32-bit one zeroes them.
            let merged = if size == 2 { (old & !0xffff) | v } else { v };
            self.set_gpr(reg, merged)?;
        } else {
            let v = self.gpr(i.op1_register()).unwrap_or(0);
            buf = v.to_le_bytes();
            let bytes = buf.get_mut(..size as usize).ok_or("movbe size")?;
            bytes.reverse();
            if self.vcpu.mem.write_slice(bytes, GuestAddress(gpa)).is_err() {
                return self.fault(VEC_GP, Some(0), "movbe (not RAM) -> #GP");
            }
        }
        self.advance(len)?;
        self.count("movbe");
        Ok(())
    }

    fn gpr(&self, r: Register) -> Option<u64> {
        let full = r.full_register();
        let v = match full {
            Register::RAX => self.regs.rax,
            Register::RBX => self.regs.rbx,
            Register::RCX => self.regs.rcx,
            Register::RDX => self.regs.rdx,
            Register::RSI => self.regs.rsi,
            Register::RDI => self.regs.rdi,
            Register::RSP => self.regs.rsp,
            Register::RBP => self.regs.rbp,
            Register::R8 => self.regs.r8,
            Register::R9 => self.regs.r9,
            Register::R10 => self.regs.r10,
            Register::R11 => self.regs.r11,
            Register::R12 => self.regs.r12,
            Register::R13 => self.regs.r13,
            Register::R14 => self.regs.r14,
            Register::R15 => self.regs.r15,
            _ => return None,
        };
        Some(match r.size() {
            1 if r.is_gpr8() && matches!(r, Register::AH | Register::BH | Register::CH | Register::DH) => (v >> 8) & 0xff,
            1 => v & 0xff,
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        })
    }

    /// Writes a register as the CPU would: a 32-bit write zeroes the upper half, 8/16-bit
    /// writes merge.
    fn set_gpr(&mut self, r: Register, value: u64) -> Result<(), String> {
        let size = r.size();
        let slot = match r.full_register() {
            Register::RAX => &mut self.regs.rax,
            Register::RBX => &mut self.regs.rbx,
            Register::RCX => &mut self.regs.rcx,
            Register::RDX => &mut self.regs.rdx,
            Register::RSI => &mut self.regs.rsi,
            Register::RDI => &mut self.regs.rdi,
            Register::RSP => &mut self.regs.rsp,
            Register::RBP => &mut self.regs.rbp,
            Register::R8 => &mut self.regs.r8,
            Register::R9 => &mut self.regs.r9,
            Register::R10 => &mut self.regs.r10,
            Register::R11 => &mut self.regs.r11,
            Register::R12 => &mut self.regs.r12,
            Register::R13 => &mut self.regs.r13,
            Register::R14 => &mut self.regs.r14,
            Register::R15 => &mut self.regs.r15,
            other => return Err(format!("cannot write register {other:?}")),
        };
        *slot = match size {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => (*slot & !0xffff) | (value & 0xffff),
            _ => (*slot & !0xff) | (value & 0xff),
        };
        Ok(())
    }
}

/// A JMP that stays in the code segment (not a far jump through a selector).
fn near_jmp(i: &iced_x86::Instruction) -> bool {
    match i.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 | OpKind::Register => true,
        // jmp m16:16/m16:32/m16:64 is far; only the plain memory forms are near.
        OpKind::Memory => matches!(i.memory_size().size(), 2 | 4 | 8) && !i.is_jmp_far_indirect(),
        _ => false,
    }
}

/// Atomically compares and exchanges 16 bytes of guest RAM, as `lock cmpxchg16b` does
/// (other vCPUs may touch the same memory concurrently). Returns the old value, or
/// None if `gpa` is not 16 bytes of RAM.
fn atomic_cmpxchg16b(mem: &vm_memory::GuestMemoryMmap, gpa: u64, expected: u128, new: u128) -> Option<u128> {
    use vm_memory::GuestMemoryBackend;
    let slice = mem.get_slice(GuestAddress(gpa), 16).ok()?;
    let ptr = slice.ptr_guard_mut().as_ptr() as *mut u128;
    if !(ptr as usize).is_multiple_of(16) || !std::arch::is_x86_feature_detected!("cmpxchg16b") {
        return None;
    }
    // SAFETY: `ptr` points to 16 bytes of mapped guest RAM (checked by get_slice),
    // 16-byte aligned (checked above), and the host CPU has CMPXCHG16B.
    Some(unsafe { cmpxchg16b_host(ptr, expected, new) })
}

/// `lock cmpxchg16b` on host memory. RBX is reserved by the compiler, so the new low
/// half goes through another register and RBX is restored afterwards.
///
/// # Safety
/// `ptr` must be valid for reads and writes of 16 bytes and 16-byte aligned, and the
/// host CPU must have CMPXCHG16B.
unsafe fn cmpxchg16b_host(ptr: *mut u128, expected: u128, new: u128) -> u128 {
    let mut lo = expected as u64;
    let mut hi = (expected >> 64) as u64;
    // SAFETY: the caller guarantees `ptr` is valid, 16-byte aligned, and that the CPU
    // has CMPXCHG16B; RBX is saved and restored around the instruction.
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{p}]",
            "mov rbx, {new_lo}",
            p = in(reg) ptr,
            new_lo = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    (hi as u128) << 64 | lo as u128
}

fn getrandom(buf: &mut [u8]) -> bool {
    // SAFETY: buf is a valid writable buffer of the given length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    n == buf.len() as isize
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

/// Instructions skiff emulates after KVM's emulator fails (everything else gets #UD,
/// except int3, which gets #BP). Kept beside `Cx::emulate`'s match, which it mirrors.
pub const EMULATED: &[Mnemonic] = &[
    Mnemonic::Clac,
    Mnemonic::Stac,
    Mnemonic::Clwb,
    Mnemonic::Clflushopt,
    Mnemonic::Clflush,
    Mnemonic::Lfence,
    Mnemonic::Sfence,
    Mnemonic::Mfence,
    Mnemonic::Xgetbv,
    Mnemonic::Invpcid,
    Mnemonic::Rdrand,
    Mnemonic::Rdseed,
    Mnemonic::Cmpxchg16b,
    Mnemonic::Wait,
    Mnemonic::Fninit,
    Mnemonic::Fnclex,
    Mnemonic::Ldmxcsr,
    Mnemonic::Stmxcsr,
    Mnemonic::Xrstor,
    Mnemonic::Xrstor64,
    Mnemonic::Xsave,
    Mnemonic::Xsave64,
    Mnemonic::Xsaveopt,
    Mnemonic::Xsaveopt64,
    Mnemonic::Xsavec,
    Mnemonic::Xsavec64,
    Mnemonic::Movbe,
    Mnemonic::Jmp,
];

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> iced_x86::Instruction {
        Decoder::with_ip(64, bytes, 0xffff_ffff_8100_0000, DecoderOptions::NONE).decode()
    }

    /// Instruction bytes recorded from emulation failures of Debian's 6.1 kernel under
    /// PVM-backed KVM, and what skiff does with each.
    #[test]
    fn recorded_failures_are_handled() {
        let cases: &[(&[u8], Mnemonic, usize)] = &[
            (&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], Mnemonic::Cmpxchg16b, 5), // lock cmpxchg16b [rdi]
            (&[0x48, 0x0f, 0xae, 0x2f], Mnemonic::Xrstor64, 4),         // xrstor64 [rdi]
            (&[0x0f, 0x38, 0xf0, 0x07], Mnemonic::Movbe, 4),            // movbe eax,[rdi]
            (&[0x0f, 0x01, 0xd0], Mnemonic::Xgetbv, 3),
            (&[0x0f, 0x01, 0xca], Mnemonic::Clac, 3),
            (&[0x66, 0x0f, 0xae, 0x37], Mnemonic::Clwb, 4),
            (&[0x66, 0x0f, 0x38, 0x82, 0x07], Mnemonic::Invpcid, 5),
            (&[0x9b], Mnemonic::Wait, 1),                               // fwait
            (&[0x0f, 0xae, 0x54, 0x24, 0x04], Mnemonic::Ldmxcsr, 5),    // ldmxcsr [rsp+4]
            (&[0xdb, 0xe3], Mnemonic::Fninit, 2),
        ];
        for (bytes, mnemonic, len) in cases {
            let i = decode(bytes);
            assert_eq!(i.mnemonic(), *mnemonic, "{bytes:02x?}");
            assert_eq!(i.len(), *len, "{bytes:02x?}");
            assert!(EMULATED.contains(mnemonic), "{mnemonic:?} is emulated");
        }
        // int3 is answered with #BP; rdpru, for one, with #UD.
        assert_eq!(decode(&[0xcc]).mnemonic(), Mnemonic::Int3);
        let rdpru = decode(&[0x0f, 0x01, 0xfd]);
        assert_eq!(rdpru.mnemonic(), Mnemonic::Rdpru);
        assert!(!EMULATED.contains(&Mnemonic::Rdpru));
    }

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
    fn near_and_far_jumps() {
        assert!(near_jmp(&decode(&[0xe9, 0x10, 0x00, 0x00, 0x00]))); // jmp rel32
        assert!(near_jmp(&decode(&[0xeb, 0xfe]))); // jmp rel8
        assert!(near_jmp(&decode(&[0xff, 0xe0]))); // jmp rax
        assert!(near_jmp(&decode(&[0xff, 0x20]))); // jmp qword [rax]
        assert!(!near_jmp(&decode(&[0xff, 0x28]))); // jmp far [rax]
        let j = decode(&[0xe9, 0x10, 0x00, 0x00, 0x00]);
        assert_eq!(j.near_branch_target(), 0xffff_ffff_8100_0015);
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

    #[test]
    fn memory_operand_decoding_for_ldmxcsr() {
        let i = decode(&[0x0f, 0xae, 0x54, 0x24, 0x04]);
        assert_eq!(i.memory_base(), Register::RSP);
        assert_eq!(i.memory_displacement64(), 4);
        assert_eq!(i.memory_index(), Register::None);
    }
}
