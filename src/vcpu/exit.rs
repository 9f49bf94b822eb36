//! The run loop and exit dispatch. An exit is handled where KVM already decoded it:
//! port I/O and MMIO go straight to the bus with the port/address, size and data KVM
//! gives (no instruction emulator); string I/O reaches the device as one buffer.
//! Writes KVM deferred in the coalesced ring are delivered first, on every exit.
//! What KVM could not emulate goes to emulate.rs; anything else unexpected gets a
//! diagnostic (registers and the instruction at CS:RIP) and stops the machine.

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuExit;

use super::Vcpu;
use super::debug::DebugStop;
use super::emulate::{self, Emulated};
use super::kick::RunPage;
use super::syscall_fixup::{MSR_LSTAR, SyscallFixup};
use crate::stats::ExitKind;
use crate::control::StopReason;

/// What the loop does after an exit was handled.
enum Next {
    Continue,
    /// Interrupted by a kick: record where the guest was, if profiling.
    Sample,
    /// KVM's emulator gave up; the bytes it fetched, when it reports them
    /// (KVM_CAP_EXIT_ON_EMULATION_FAILURE).
    EmulationFailure(Option<KvmInsnBytes>),
    /// A breakpoint, watchpoint or single step: gdb's or the SYSCALL fix-up's.
    Debug(kvm_bindings::kvm_debug_exit_arch),
    /// The guest wrote a filtered MSR (LSTAR): the value.
    LstarWrite(u64),
    /// An `out` to a hypercall port: the call is in the registers, their width what
    /// the port declares (None: a 64-bit stub's port).
    Hypercall(crate::hypercall::Path, Option<crate::hypercall::Width>),
    /// KVM_EXIT_TPR_ACCESS: the RIP and direction KVM reported (src/tpr/).
    TprAccess(u64, bool),
    Stop(StopReason),
    TripleFault,
    Unexpected(String),
}

// KVM system-event types (include/uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
// kvm_run.internal.suberror for an instruction KVM's emulator could not handle.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
// kvm_run.emulation_failure.flags: insn_size and insn_bytes are valid.
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The instruction bytes KVM's emulator fetched before it gave up: what the vCPU was
/// really executing, which may differ from what memory holds by the time skiff looks
/// (another vCPU patching kernel text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmInsnBytes {
    len: u8,
    bytes: [u8; 15],
}

impl KvmInsnBytes {
    /// From the exit's fields; None when KVM did not report bytes. Every field is
    /// bounded here: ndata counts the u64 words after suberror/ndata (flags,
    /// insn_size+bytes as two words), so 3 means the bytes are present.
    pub fn from_exit(ndata: u32, flags: u64, size: u8, bytes: &[u8; 15]) -> Option<Self> {
        if ndata < 3 || flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES == 0 || size == 0 {
            return None;
        }
        Some(Self { len: size.min(15), bytes: *bytes })
    }

    pub fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len as usize).unwrap_or(&[])
    }
}

impl Vcpu {
    /// Runs the vCPU until the machine stops or `pending` says its thread has an event
    /// (vcpu/thread.rs). The stop reason goes to `Control`.
    pub fn run(&mut self, pending: &std::sync::atomic::AtomicBool) {
        let run_page: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the kvm_run page belongs to `self.fd`, which outlives the guard (the
        // guard is dropped at the end of this function, before `self` can be).
        let _kick_target = unsafe { RunPage::enter(run_page) };
        while !self.control.stopping() && !pending.load(std::sync::atomic::Ordering::SeqCst) && self.debug.stop.is_none() {
            let next = self.run_once(run_page);
            self.on_exit(next);
        }
        // Whatever this vCPU left in the coalesced ring reaches its device at stop.
        self.buses.flush_coalesced();
    }

    /// Does what an exit calls for, after `run_once` handled what it could itself.
    fn on_exit(&mut self, next: Next) {
        // Any exit but the write poll's own (set again below) means the guest may
        // have run since: KVM has taken the slot into the APIC.
        let after_write_poll = std::mem::take(&mut self.tpr_after_write_poll);
        match next {
            Next::Continue => {}
            Next::Sample => {
                if self.control.translate_checks() != self.translate_checks_done {
                    self.translate_checks_done = self.control.translate_checks();
                    crate::output::stderr(&super::translate_check::run(self).replace('\n', "\r\n"));
                }
                if let Some((start, samples)) = self.rip_samples.as_mut()
                    && let Ok(regs) = self.fd.get_regs()
                {
                    samples.push((start.elapsed().as_millis() as u32, regs.rip));
                }
            }
            // Where KVM cannot run int3 in guest kernel mode (PVM), gdb's software
            // breakpoints arrive as emulation failures.
            Next::EmulationFailure(_) if self.debug.gdb_attached && self.at_int3() => {
                self.debug.stop = Some(DebugStop::SwBreak);
            }
            Next::EmulationFailure(kvm_saw) => match emulate::handle_failure(self, kvm_saw.as_ref()) {
                Ok(Emulated::Done) => {}
                Ok(Emulated::Unhandled(diag)) => {
                    self.control.request_stop(StopReason::Error(diag));
                }
                Err(e) => self.control.request_stop(StopReason::Error(e)),
            },
            Next::Debug(arch) => {
                if let Some(stop) = self.debug.classify(arch.exception, arch.dr6, arch.pc) {
                    self.debug.stop = Some(stop);
                } else if let Err(e) = SyscallFixup::on_debug(self) {
                    self.control.request_stop(StopReason::Error(e));
                }
            }
            Next::LstarWrite(value) => {
                if let Err(e) = SyscallFixup::on_lstar_write(self, value) {
                    self.control.request_stop(StopReason::Error(e));
                }
            }
            Next::Hypercall(path, width) => {
                if let Err(e) = self.hypercall(path, width) {
                    self.control.request_stop(StopReason::Error(e));
                }
            }
            Next::TprAccess(rip, is_write) => self.tpr_report(rip, is_write, after_write_poll),
            Next::Stop(reason) => self.control.request_stop(reason),
            Next::TripleFault => {
                if self.diagnose_shutdown {
                    self.control.set_diagnostic(emulate::diagnose(self, "triple fault (KVM_EXIT_SHUTDOWN)"));
                }
                self.control.request_stop(StopReason::Reboot("triple fault"));
            }
            Next::Unexpected(what) => {
                let diag = emulate::diagnose(self, &what);
                self.control.request_stop(StopReason::Error(diag));
            }
        }
    }

    /// Whether the instruction at CS:RIP is an int3 (fetched through the guest's
    /// tables) that is not skiff's raw hypercall site (hypercall/trap.rs: that one is
    /// the hypercall path's, with or without gdb).
    fn at_int3(&self) -> bool {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else { return false };
        crate::x86::insn::fetch(&self.mem, &sregs, regs.rip, regs.rflags).is_ok_and(|f| {
            f.insn.mnemonic() == iced_x86::Mnemonic::Int3
                && (self.hypercalls.is_none() || crate::hypercall::trap::raw_site(f.bytes.get(..f.len).unwrap_or(&[])).is_none())
        })
    }

    /// The state to snapshot, on this (paused) vCPU's thread. An exit skiff answered
    /// (port or MMIO read data, an MSR write's verdict) is only complete in the
    /// registers once KVM_RUN is entered again, and completing a string instruction
    /// can exit again with more data; so KVM_RUN is entered with `immediate_exit` set
    /// until it returns EINTR (nothing left to complete, no guest instruction run),
    /// each exit on the way handled as usual.
    pub fn save_state(&mut self) -> Result<super::state::VcpuState, super::VcpuError> {
        /// Exits one completion may chain (a string instruction's pages): far more.
        const MAX_COMPLETIONS: usize = 4096;
        let run_page: *mut kvm_run = self.fd.get_kvm_run();
        for _ in 0..MAX_COMPLETIONS {
            // SAFETY: the kvm_run page of this vCPU, mapped while `self.fd` lives;
            // only this thread (the vCPU's own) touches it now.
            unsafe { (*run_page).immediate_exit = 1 };
            match self.run_once(run_page) {
                // EINTR (run_once cleared the flag): everything is complete.
                Next::Sample => return self.get_state(),
                next => self.on_exit(next),
            }
        }
        // SAFETY: as above.
        unsafe { (*run_page).immediate_exit = 0 };
        Err(super::VcpuError::Restore(self.index, format!("the last exit did not complete within {MAX_COMPLETIONS} exits")))
    }

    /// A call through a hypercall port: RAX = number, RBX/RCX/RDX/RSI = arguments;
    /// the result goes to RAX (KVM completes the `out` itself when it runs the vCPU
    /// again, and RIP moves past it then). A 32-bit port's call uses the registers'
    /// low halves; a 64-bit port's asks KVM for the mode only when a high half it reads is set
    /// (KVM_GET_SREGS costs a quarter of a call here: hypercall/mod.rs).
    fn hypercall(&mut self, path: crate::hypercall::Path, port_says: Option<crate::hypercall::Width>) -> Result<(), String> {
        let Some(h) = self.hypercalls.clone() else { return Ok(()) };
        let mut regs = self.fd.get_regs().map_err(|e| format!("vCPU {}: KVM_GET_REGS: {e}", self.index))?;
        if let Some(t) = &self.tpr {
            self.tpr_after_write_poll = crate::tpr::on_poll(t, &self.fd, &self.mem, self.index, regs.rax & 0xffff_ffff)?;
        }
        let width = crate::hypercall::Width::of_port_call(port_says, &regs, || {
            h.counters.mode_asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sregs = self.fd.get_sregs().map_err(|e| format!("vCPU {}: KVM_GET_SREGS: {e}", self.index))?;
            Ok::<_, String>(crate::hypercall::Width::of_mode(&sregs))
        })?;
        regs.rax = h.call_regs(path, width, &regs);
        self.fd.set_regs(&regs).map_err(|e| format!("vCPU {}: KVM_SET_REGS: {e}", self.index))
    }

    /// A TPR-access report: when it names a real TPR access (src/tpr/site.rs checks),
    /// its rewrite is queued and the event loop applies it with every vCPU paused.
    fn tpr_report(&mut self, rip: u64, is_write: bool, after_write_poll: bool) {
        let Some(t) = self.tpr.clone() else { return };
        t.reports.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = crate::tpr::on_report(&t, &self.fd, &self.mem, self.index, after_write_poll) {
            self.control.request_stop(StopReason::Error(e));
            return;
        }
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else { return };
        let verdict = crate::tpr::site::examine(&self.mem, &regs, &sregs, rip, is_write);
        if std::env::var_os("SKIFF_TPR_DEBUG").is_some() {
            crate::output::stderr(&format!("tpr report: rip {rip:#x} write {is_write}, vCPU rip {:#x} esp {:#x}: {:?}\n", regs.rip, regs.rsp, verdict.as_ref().map(|p| p.gpa)));
        }
        match verdict {
            Ok(p) => {
                if t.push(p) {
                    crate::control::wake_event_loop();
                } else {
                    t.refuse(crate::tpr::Refusal::Changed);
                }
            }
            Err(why) => t.refuse(why),
        }
    }

    fn run_once(&mut self, run_page: *mut kvm_run) -> Next {
        let Vcpu { fd, buses, stats, .. } = self;
        let result = fd.run();
        // Writes deferred before this exit reach their devices before it is handled,
        // so devices see the guest's accesses in program order.
        buses.flush_coalesced();
        match result {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    stats.count(ExitKind::IoOut);
                    stats.count_port(port);
                    if let Some((path, width)) = crate::hypercall::call_port(port) {
                        return Next::Hypercall(path, width);
                    }
                    // SAFETY: KVM just filled the io member of the union for this exit.
                    let size = unsafe { (*run_page).__bindgen_anon_1.io.size } as usize;
                    if data.len() > size && size > 0 {
                        buses.pio.write_string(port as u64, size, data);
                    } else {
                        buses.pio.write(port as u64, data);
                    }
                    Next::Continue
                }
                VcpuExit::IoIn(port, data) => {
                    stats.count(ExitKind::IoIn);
                    stats.count_port(port);
                    // SAFETY: as above.
                    let size = unsafe { (*run_page).__bindgen_anon_1.io.size } as usize;
                    if data.len() > size && size > 0 {
                        buses.pio_read_string(port as u64, size, data);
                    } else {
                        buses.pio_read(port as u64, data);
                    }
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    stats.count(ExitKind::MmioRead);
                    stats.count_mmio(addr);
                    buses.mmio_read(addr, data);
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    stats.count(ExitKind::MmioWrite);
                    stats.count_mmio(addr);
                    buses.mmio.write(addr, data);
                    Next::Continue
                }
                VcpuExit::Hlt => {
                    // Only without an in-kernel irqchip; nothing will wake this vCPU.
                    stats.count(ExitKind::Hlt);
                    Next::Stop(StopReason::Poweroff)
                }
                VcpuExit::Shutdown => {
                    // A triple fault: on a PC the chipset resets the machine.
                    stats.count(ExitKind::Shutdown);
                    Next::TripleFault
                }
                VcpuExit::SystemEvent(kind, _) => {
                    stats.count(ExitKind::SystemEvent);
                    match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(StopReason::Poweroff),
                        KVM_SYSTEM_EVENT_RESET => Next::Stop(StopReason::Reboot("KVM system reset")),
                        KVM_SYSTEM_EVENT_CRASH => Next::Unexpected("guest crash (KVM system event)".into()),
                        other => Next::Unexpected(format!("unknown KVM system event {other}")),
                    }
                }
                VcpuExit::InternalError => {
                    stats.count(ExitKind::InternalError);
                    // SAFETY: KVM filled the internal member of the union for this exit.
                    let suberror = unsafe { (*run_page).__bindgen_anon_1.internal.suberror };
                    if suberror == KVM_INTERNAL_ERROR_EMULATION {
                        // SAFETY: for this suberror KVM fills the emulation_failure
                        // overlay; its flags say which fields are valid.
                        let failure = unsafe { (*run_page).__bindgen_anon_1.emulation_failure };
                        // SAFETY: the overlay's only member; plain bytes, any value valid.
                        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
                        Next::EmulationFailure(KvmInsnBytes::from_exit(failure.ndata, failure.flags, insn.insn_size, &insn.insn_bytes))
                    } else {
                        Next::Unexpected(format!("KVM internal error, suberror {suberror}"))
                    }
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    stats.count(ExitKind::FailEntry);
                    Next::Unexpected(format!(
                        "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
                    ))
                }
                VcpuExit::TprAccess => {
                    stats.count(ExitKind::TprAccess);
                    // SAFETY: KVM filled the tpr_access member of the union for this exit.
                    let report = unsafe { (*run_page).__bindgen_anon_1.tpr_access };
                    Next::TprAccess(report.rip, report.is_write != 0)
                }
                VcpuExit::Debug(arch) => {
                    stats.count(ExitKind::Debug);
                    Next::Debug(arch)
                }
                VcpuExit::X86Wrmsr(exit) => {
                    stats.count(ExitKind::MsrWrite);
                    if exit.index == MSR_LSTAR {
                        // Handled: skiff writes the value itself.
                        *exit.error = 0;
                        Next::LstarWrite(exit.data)
                    } else {
                        // Only LSTAR is filtered; anything else is refused (#GP).
                        *exit.error = 1;
                        Next::Continue
                    }
                }
                other => {
                    stats.count(ExitKind::Other);
                    Next::Unexpected(format!("unexpected exit {other:?}"))
                }
            },
            Err(e) if e.errno() == libc::EINTR => {
                // A kick: clear the flag the signal handler set and look at Control.
                stats.count(ExitKind::Interrupted);
                // SAFETY: this thread owns the vCPU and its kvm_run page.
                unsafe { (*run_page).immediate_exit = 0 };
                Next::Sample
            }
            Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Unexpected(format!("KVM_RUN failed: {e}")),
        }
    }
}
