//! A vCPU's thread as a small state machine: paused, running, gone. It lives as long
//! as the machine (across in-place reboots), owns its `Vcpu`, and is moved only by
//! events on its channel; each event is answered on a second channel, so the VMM
//! knows when every vCPU has really left KVM_RUN ("paused" means that, not "asked").
//!
//! ```text
//!            Resume                    Pause / machine stop
//!  Paused ──────────▶ Running ─────────────────────────────▶ Paused
//!    │  PowerOn, TakeStats, SaveState answered while paused       │
//!    └─────────────────────── Exit ──────────────────────────────┴──▶ gone
//! ```
//!
//! A sender that wants a running vCPU's attention sets its `pending` flag and kicks
//! the thread (a signal that makes KVM_RUN return); the run loop checks the flag
//! before every KVM_RUN, so a kick that lands between the check and the ioctl is not
//! lost (vcpu/kick.rs sets `immediate_exit`). Single-step for a debugger is one more
//! event here.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::debug::{DebugStop, HwBreak};
use super::state::VcpuState;
use super::{BootEntry, ThreadExit, Vcpu, VcpuError, kick};
use crate::control::Control;
use crate::stats::ExitStats;

/// What the VMM asks of a vCPU thread.
pub enum VcpuEvent {
    /// Leave KVM_RUN and wait (answered once out of it).
    Pause,
    /// Run the guest (unless the machine is stopping).
    Resume,
    /// RESET, firmware state and (on the boot vCPU) the kernel entry; only while
    /// paused. The flag: explain a triple fault that would end the run.
    PowerOn(BootEntry, bool),
    /// Hand over the exit statistics and profile samples gathered so far.
    TakeStats,
    /// Hand over the vCPU's whole state, for a snapshot; only while paused.
    SaveState,
    /// Answer at once (measures the round trip itself).
    Ping,
    /// A debugger's request, answered on its own channel (the gdb stub's thread
    /// talks to vCPUs alongside the VMM).
    Debug(DebugOp, Sender<DebugReply>),
    /// End the thread.
    Exit,
}

/// What a debugger asks of a vCPU. A vCPU halted for the debugger stays out of
/// KVM_RUN whatever the VMM's Pause and Resume say, until `Resume` or `Detach`.
pub enum DebugOp {
    /// Leave KVM_RUN and stay halted.
    Halt,
    /// A debugger is attached: #BP comes to skiff, stops go to this channel.
    Attach(Sender<(u8, DebugStop)>),
    /// All of the debugger's state off; run again.
    Detach,
    /// Run again, for one instruction when `step`.
    Resume { step: bool },
    GetRegs,
    /// General registers, and the special registers' writable parts.
    SetRegs(Box<(kvm_regs, kvm_sregs)>),
    /// The debugger's hardware breakpoints and watchpoints, all of them.
    SetHw(Vec<HwBreak>),
}

pub enum DebugReply {
    Done,
    Regs(Box<(kvm_regs, kvm_sregs, kvm_fpu)>),
    Failed(String),
}

/// A debugger's end of one vCPU thread: requests go on the VMM's event channel,
/// answers come back on a channel made for each.
pub struct DebugPort {
    pub index: u8,
    events: Sender<VcpuEvent>,
    pending: Arc<AtomicBool>,
    pthread: Option<libc::pthread_t>,
}

impl DebugPort {
    /// Sends `op` and waits for its answer (bounded by `wait`).
    pub fn request(&self, op: DebugOp, wait: Duration) -> Result<DebugReply, String> {
        let (tx, rx) = channel();
        self.events.send(VcpuEvent::Debug(op, tx)).map_err(|_| format!("vCPU {}'s thread is gone", self.index))?;
        self.pending.store(true, Ordering::SeqCst);
        if let Some(t) = self.pthread {
            // SAFETY: the gdb stub that holds this port is stopped before the vCPU
            // threads are joined (vmm/run.rs), so the id names an unjoined thread.
            unsafe { libc::pthread_kill(t, kick::kick_signal()) };
        }
        rx.recv_timeout(wait).map_err(|_| format!("vCPU {} did not answer the debugger within {wait:?}", self.index))
    }
}

/// A vCPU thread's answer to one event.
pub enum VcpuResponse {
    Paused,
    Resumed,
    PoweredOn(Result<(), VcpuError>),
    Stats(Box<ExitStats>, Vec<(u32, u64)>),
    State(Result<Box<VcpuState>, VcpuError>),
    Pong,
    Exited,
}

/// The VMM's end of one vCPU thread.
pub struct VcpuHandle {
    pub index: u8,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    pending: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("vCPU {0}'s thread is gone")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?} (stuck in KVM_RUN?)")]
    Timeout(u8, Duration),
    #[error("vCPU {0} answered out of turn")]
    OutOfTurn(u8),
    #[error("creating vCPU {0}'s thread: {1}")]
    Spawn(u8, std::io::Error),
}

impl VcpuHandle {
    /// Starts `vcpu`'s thread, paused. `returns_at_once` is a test hook: the thread
    /// ends at once, as a crashed one would.
    pub fn spawn(mut vcpu: Vcpu, control: Arc<Control>, returns_at_once: bool) -> Result<Self, ThreadError> {
        let index = vcpu.index;
        let (events, event_rx) = channel();
        let (response_tx, responses) = channel();
        let pending = Arc::new(AtomicBool::new(false));
        let flag = pending.clone();
        let thread = std::thread::Builder::new()
            .name(format!("skiff-vcpu{index}"))
            .spawn(move || {
                // However this thread ends, the machine does not wait for it.
                let _exit = ThreadExit::new(control.clone(), index);
                if !returns_at_once {
                    thread_main(&mut vcpu, &control, &flag, &event_rx, &response_tx);
                }
            })
            .map_err(|e| ThreadError::Spawn(index, e))?;
        Ok(Self { index, events, responses, pending, thread: Some(thread) })
    }

    /// A debugger's port to this thread (valid while the thread is not joined).
    pub fn debug_port(&self) -> DebugPort {
        DebugPort { index: self.index, events: self.events.clone(), pending: self.pending.clone(), pthread: self.pthread() }
    }

    /// The pthread to kick, while the thread is not joined.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        self.thread.as_ref().map(|t| t.as_pthread_t())
    }

    /// Sends `event` and makes sure a running vCPU notices it.
    pub fn send(&self, event: VcpuEvent) -> Result<(), ThreadError> {
        self.events.send(event).map_err(|_| ThreadError::Gone(self.index))?;
        self.pending.store(true, Ordering::SeqCst);
        if let Some(t) = self.pthread() {
            // SAFETY: the thread is not joined yet (`thread` is Some), so its id is
            // valid; the kick handler is installed before any vCPU thread exists.
            unsafe { libc::pthread_kill(t, kick::kick_signal()) };
        }
        Ok(())
    }

    /// Waits for the answer to the last event, until `deadline`.
    pub fn answer(&self, deadline: Instant) -> Result<VcpuResponse, ThreadError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.responses.recv_timeout(wait) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(ThreadError::Timeout(self.index, wait)),
            Err(RecvTimeoutError::Disconnected) => Err(ThreadError::Gone(self.index)),
        }
    }

    /// Ends the thread and joins it (bounded: a thread that does not answer within
    /// `wait` is left to the process's exit rather than hanging it).
    pub fn exit(mut self, wait: Duration) -> Result<(), ThreadError> {
        let sent = self.send(VcpuEvent::Exit);
        let answered = sent.and_then(|()| self.answer(Instant::now() + wait));
        // A thread that is gone (it crashed or ended) can be joined at once.
        if matches!(answered, Ok(VcpuResponse::Exited) | Err(ThreadError::Gone(_)))
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
        answered.map(|_| ())
    }
}

/// The thread's life: answer events while paused; run the guest while running.
fn thread_main(
    vcpu: &mut Vcpu,
    control: &Control,
    pending: &AtomicBool,
    events: &Receiver<VcpuEvent>,
    responses: &Sender<VcpuResponse>,
) {
    let mut running = false;
    // Halted for a debugger: out of KVM_RUN until the debugger lets it go.
    let mut halted = false;
    loop {
        let event = if running && !halted {
            match events.try_recv() {
                Ok(e) => Some(e),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            }
        } else {
            match events.recv() {
                Ok(e) => Some(e),
                Err(_) => return,
            }
        };
        let Some(event) = event else {
            // Cleared before the last look at the channel: an event sent after this
            // sets it again and ends the next run at once.
            pending.store(false, Ordering::SeqCst);
            if let Ok(e) = events.try_recv() {
                running = handle(vcpu, control, e, running, &mut halted, responses);
                continue;
            }
            vcpu.run(pending);
            if let Some(stop) = vcpu.debug.stop.take() {
                halted = true;
                if let Some(tx) = &vcpu.gdb_reports {
                    let _ = tx.send((vcpu.index, stop));
                }
            }
            // A machine stop (poweroff, reboot, error) parks every vCPU; the VMM then
            // pauses them all to know they are out.
            if control.stopping() {
                running = false;
            }
            continue;
        };
        if matches!(event, VcpuEvent::Exit) {
            let _ = responses.send(VcpuResponse::Exited);
            return;
        }
        running = handle(vcpu, control, event, running, &mut halted, responses);
    }
}

/// Handles one event (never `Exit`); returns whether the vCPU runs after it.
fn handle(
    vcpu: &mut Vcpu,
    control: &Control,
    event: VcpuEvent,
    running: bool,
    halted: &mut bool,
    responses: &Sender<VcpuResponse>,
) -> bool {
    let (answer, run) = match event {
        VcpuEvent::Debug(op, reply) => {
            let _ = reply.send(debug_op(vcpu, op, halted));
            return running;
        }
        VcpuEvent::Pause => (VcpuResponse::Paused, false),
        VcpuEvent::Resume => (VcpuResponse::Resumed, !control.stopping()),
        VcpuEvent::PowerOn(entry, diagnose) => {
            vcpu.diagnose_shutdown = diagnose;
            (VcpuResponse::PoweredOn(vcpu.power_on(entry)), running)
        }
        VcpuEvent::TakeStats => {
            record_tpr(vcpu);
            let stats = Box::new(std::mem::take(&mut vcpu.stats));
            let samples = vcpu.rip_samples.as_mut().map(|(_, s)| std::mem::take(s)).unwrap_or_default();
            (VcpuResponse::Stats(stats, samples), running)
        }
        // A running vCPU's state would be stale when it arrives: refused.
        VcpuEvent::SaveState if running => (VcpuResponse::State(Err(VcpuError::Restore(vcpu.index, "state asked for while running".into()))), running),
        VcpuEvent::SaveState => (VcpuResponse::State(vcpu.save_state().map(Box::new)), running),
        VcpuEvent::Ping => (VcpuResponse::Pong, running),
        VcpuEvent::Exit => (VcpuResponse::Exited, false),
    };
    let _ = responses.send(answer);
    run
}

/// With TPR patching engaged: this vCPU's TPR as KVM_GET_LAPIC has it, beside the
/// vAPIC slot's byte, for `--stats` (the tests compare both with what the guest wrote).
fn record_tpr(vcpu: &Vcpu) {
    let Some(t) = &vcpu.tpr else { return };
    let Ok(lapic) = vcpu.fd.get_lapic() else { return };
    let tpr = super::state::lapic_get(&lapic, super::state::apic_reg::TPR);
    let mut byte = [0u8; 1];
    let _ = vm_memory::Bytes::read_slice(&vcpu.mem, &mut byte, vm_memory::GuestAddress(crate::tpr::vapic_gpa(vcpu.index)));
    let mut list = t.final_tpr.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|(i, _, _)| *i != vcpu.index);
    list.push((vcpu.index, tpr, byte[0]));
    list.sort_unstable();
}

/// Does a debugger's request on the vCPU's own thread.
fn debug_op(vcpu: &mut Vcpu, op: DebugOp, halted: &mut bool) -> DebugReply {
    let applied = |vcpu: &Vcpu| match vcpu.apply_guest_debug() {
        Ok(()) => DebugReply::Done,
        Err(e) => DebugReply::Failed(e),
    };
    match op {
        DebugOp::Halt => {
            *halted = true;
            DebugReply::Done
        }
        DebugOp::Attach(reports) => {
            vcpu.gdb_reports = Some(reports);
            vcpu.debug.gdb_attached = true;
            applied(vcpu)
        }
        DebugOp::Detach => {
            vcpu.gdb_reports = None;
            vcpu.debug.clear_gdb();
            *halted = false;
            applied(vcpu)
        }
        DebugOp::Resume { step } => {
            vcpu.debug.gdb_step = step;
            *halted = false;
            applied(vcpu)
        }
        DebugOp::GetRegs => match (vcpu.fd.get_regs(), vcpu.fd.get_sregs(), vcpu.fd.get_fpu()) {
            (Ok(r), Ok(s), Ok(f)) => DebugReply::Regs(Box::new((r, s, f))),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => DebugReply::Failed(format!("reading vCPU {}'s registers: {e}", vcpu.index)),
        },
        DebugOp::SetRegs(regs) => {
            let (r, s) = *regs;
            match vcpu.fd.set_regs(&r).and_then(|()| vcpu.fd.set_sregs(&s)) {
                Ok(()) => DebugReply::Done,
                Err(e) => DebugReply::Failed(format!("writing vCPU {}'s registers: {e}", vcpu.index)),
            }
        }
        DebugOp::SetHw(breaks) => match vcpu.debug.set_gdb(&breaks) {
            Ok(()) => applied(vcpu),
            Err(free) => DebugReply::Failed(format!(
                "vCPU {}: {} hardware breakpoints and watchpoints asked for, {free} debug registers free (the SYSCALL fix-up holds the others)",
                vcpu.index,
                breaks.len()
            )),
        },
    }
}
