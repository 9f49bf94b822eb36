//! The machine as gdbstub sees it: every vCPU a thread (tid = index + 1), all-stop.
//! Registers and debug settings go to a vCPU's own thread as `DebugOp` events; guest
//! memory is read and written here, by guest virtual address through skiff's page
//! walker with the chosen vCPU's control registers (never zeroes for a page that
//! does not translate: an error, which gdb shows as "Cannot access memory").

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::Arc;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint,
    SwBreakpointOps, WatchKind,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::arch::{self, GdbRegs, SkiffX86_64};
use crate::vcpu::debug::{DebugStop, HwBreak, HwKind};
use crate::vcpu::thread::{DebugOp, DebugPort, DebugReply};
use crate::x86::paging::{self, Access, PagingContext, PhysMem, Translation};

/// How long a vCPU may take to answer the debugger.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// RFLAGS.AC: SMAP does not keep a debugger out of user pages.
const RFLAGS_AC: u64 = 1 << 18;
const INT3: u8 = 0xcc;
const PAGE: u64 = 4096;

/// What gdb asked a vCPU to do at the next resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Continue,
    Step,
}

pub struct SkiffTarget {
    ports: Vec<DebugPort>,
    mem: GuestMemoryMmap,
    reports: Receiver<(u8, DebugStop)>,
    reports_tx: Sender<(u8, DebugStop)>,
    /// Software breakpoints: address -> (guest physical address, the byte int3 replaced).
    sw: BTreeMap<u64, (u64, u8)>,
    /// Hardware breakpoints and watchpoints, the same on every vCPU.
    hw: Vec<HwBreak>,
    actions: Vec<Option<Action>>,
    /// Threads gdb did not name stay stopped (scheduler locking).
    locked: bool,
    /// The vCPU whose address space memory accesses use (the last one that stopped).
    current: usize,
    /// The machine is ending: report that and let gdb go.
    pub shutdown: Arc<AtomicBool>,
}

impl SkiffTarget {
    pub fn new(ports: Vec<DebugPort>, mem: GuestMemoryMmap, shutdown: Arc<AtomicBool>) -> Self {
        let (reports_tx, reports) = channel();
        let n = ports.len();
        SkiffTarget {
            ports,
            mem,
            reports,
            reports_tx,
            sw: BTreeMap::new(),
            hw: Vec::new(),
            actions: vec![None; n],
            locked: false,
            current: 0,
            shutdown,
        }
    }

    fn request(&self, i: usize, op: DebugOp) -> Result<DebugReply, String> {
        let port = self.ports.get(i).ok_or_else(|| format!("no vCPU {i}"))?;
        match port.request(op, ANSWER_WITHIN)? {
            DebugReply::Failed(e) => Err(e),
            r => Ok(r),
        }
    }

    /// Sends one request to every vCPU; the first failure after all were asked.
    fn each(&self, op: impl Fn() -> DebugOp) -> Result<(), String> {
        let mut first = Ok(());
        for i in 0..self.ports.len() {
            if let Err(e) = self.request(i, op())
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// Stops every vCPU (all-stop) and forgets stops that raced with it.
    pub fn halt_all(&mut self) -> Result<(), String> {
        self.each(|| DebugOp::Halt)?;
        while self.reports.try_recv().is_ok() {}
        Ok(())
    }

    /// A client connected: every vCPU halted and reporting its stops here.
    pub fn attach(&mut self) -> Result<(), String> {
        self.halt_all()?;
        let tx = self.reports_tx.clone();
        self.each(|| DebugOp::Attach(tx.clone()))
    }

    /// The client left (detach or a lost connection): breakpoints out of memory and
    /// out of the debug registers, every vCPU running again.
    pub fn detach(&mut self) {
        for (gpa, byte) in std::mem::take(&mut self.sw).into_values() {
            let _ = self.mem.write_slice(&[byte], GuestAddress(gpa));
        }
        self.hw.clear();
        if let Err(e) = self.each(|| DebugOp::Detach) {
            crate::output::stderr(&format!("skiff: gdb detach: {e}\r\n"));
        }
    }

    fn index(&self, tid: Tid) -> Result<usize, TargetError<String>> {
        let i = tid.get() - 1;
        if i < self.ports.len() { Ok(i) } else { Err(TargetError::NonFatal) }
    }

    fn kvm_regs(&self, i: usize) -> Result<(kvm_regs, kvm_sregs, kvm_fpu), String> {
        match self.request(i, DebugOp::GetRegs)? {
            DebugReply::Regs(r) => Ok(*r),
            _ => Err("the vCPU answered out of turn".into()),
        }
    }

    /// The walk for a debugger's accesses in vCPU `i`'s address space: CPL 0, SMAP
    /// and write protection not in the way.
    fn paging(&self, i: usize) -> Result<PagingContext, String> {
        let (_, sregs, _) = self.kvm_regs(i)?;
        let mut ctx = PagingContext::from_sregs(&sregs, RFLAGS_AC);
        ctx.cpl = 0;
        Ok(ctx)
    }

    /// The guest physical address of `gva`, where it translates to RAM.
    fn phys(&self, ctx: &PagingContext, gva: u64) -> Option<u64> {
        match paging::translate(&self.mem, ctx, gva, Access::Read) {
            Translation::Ok(gpa) if self.mem.is_ram(gpa) => Some(gpa),
            _ => None,
        }
    }

    /// Reads from `gva` page by page; how many bytes could be read.
    fn read_virt(&self, ctx: &PagingContext, gva: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let at = gva.wrapping_add(done as u64);
            let room = (PAGE - (at & (PAGE - 1))) as usize;
            let Some(chunk) = buf.get_mut(done..(done + room).min(buf.len())) else { break };
            let Some(gpa) = self.phys(ctx, at) else { break };
            if !self.mem.read_bytes(gpa, chunk) {
                break;
            }
            done += chunk.len();
        }
        done
    }

    /// Writes at `gva` page by page; false if any page does not translate to RAM
    /// (pages before it are written).
    fn write_virt(&self, ctx: &PagingContext, gva: u64, data: &[u8]) -> bool {
        let mut done = 0;
        while done < data.len() {
            let at = gva.wrapping_add(done as u64);
            let room = (PAGE - (at & (PAGE - 1))) as usize;
            let Some(chunk) = data.get(done..(done + room).min(data.len())) else { return false };
            let Some(gpa) = self.phys(ctx, at) else { return false };
            if self.mem.write_slice(chunk, GuestAddress(gpa)).is_err() {
                return false;
            }
            done += chunk.len();
        }
        true
    }

    /// Hands every vCPU the hardware list; on failure the old list is put back and
    /// the user told why on stderr.
    fn set_hw(&mut self, new: Vec<HwBreak>) -> bool {
        let old = std::mem::replace(&mut self.hw, new);
        let list = self.hw.clone();
        match self.each(|| DebugOp::SetHw(list.clone())) {
            Ok(()) => true,
            Err(e) => {
                crate::output::stderr(&format!("skiff: gdb: {e}\r\n"));
                self.hw = old;
                let list = self.hw.clone();
                let _ = self.each(|| DebugOp::SetHw(list.clone()));
                false
            }
        }
    }

    /// A vCPU's stop as gdb's stop reason.
    fn stop_reason(&mut self, index: u8, stop: DebugStop) -> MultiThreadStopReason<u64> {
        self.current = usize::from(index);
        let tid = tid_of(usize::from(index));
        match stop {
            DebugStop::SwBreak => MultiThreadStopReason::SwBreak(tid),
            DebugStop::HwBreak => MultiThreadStopReason::HwBreak(tid),
            // With the thread, so gdb need not guess which one stepped.
            DebugStop::Step => MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGTRAP },
            DebugStop::Watch(b) => MultiThreadStopReason::Watch {
                tid,
                kind: if b.kind == HwKind::Write { WatchKind::Write } else { WatchKind::ReadWrite },
                addr: b.addr,
            },
        }
    }
}

fn tid_of(index: usize) -> Tid {
    NonZeroUsize::new(index + 1).unwrap_or(NonZeroUsize::MIN)
}

fn fatal(e: String) -> TargetError<String> {
    TargetError::Fatal(e)
}

impl Target for SkiffTarget {
    type Arch = SkiffX86_64;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    // skiff restores the replaced bytes itself, also when gdb goes away.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl MultiThreadBase for SkiffTarget {
    fn read_registers(&mut self, regs: &mut GdbRegs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.index(tid)?;
        let (r, s, f) = self.kvm_regs(i).map_err(fatal)?;
        *regs = arch::from_kvm(&r, &s, &f);
        Ok(())
    }

    fn write_registers(&mut self, regs: &GdbRegs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.index(tid)?;
        let (mut r, mut s, _) = self.kvm_regs(i).map_err(fatal)?;
        arch::to_kvm(regs, &mut r, &mut s);
        self.request(i, DebugOp::SetRegs(Box::new((r, s)))).map_err(|e| {
            crate::output::stderr(&format!("skiff: gdb: {e}\r\n"));
            TargetError::NonFatal
        })?;
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let i = self.index(tid)?;
        let ctx = self.paging(i).map_err(fatal)?;
        match self.read_virt(&ctx, start, data) {
            0 if !data.is_empty() => Err(TargetError::NonFatal),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let i = self.index(tid)?;
        let ctx = self.paging(i).map_err(fatal)?;
        if self.write_virt(&ctx, start, data) { Ok(()) } else { Err(TargetError::NonFatal) }
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), String> {
        for i in 0..self.ports.len() {
            active(tid_of(i));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for SkiffTarget {
    fn resume(&mut self) -> Result<(), String> {
        let default = if self.locked { None } else { Some(Action::Continue) };
        for i in 0..self.ports.len() {
            if let Some(a) = self.actions.get(i).copied().flatten().or(default) {
                self.request(i, DebugOp::Resume { step: a == Action::Step })?;
            }
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), String> {
        self.actions.iter_mut().for_each(|a| *a = None);
        self.locked = false;
        Ok(())
    }

    fn set_resume_action_continue(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), String> {
        if let Some(a) = self.actions.get_mut(tid.get() - 1) {
            *a = Some(Action::Continue);
        }
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSingleStep for SkiffTarget {
    fn set_resume_action_step(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), String> {
        if let Some(a) = self.actions.get_mut(tid.get() - 1) {
            *a = Some(Action::Step);
        }
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for SkiffTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), String> {
        self.locked = true;
        Ok(())
    }
}

impl Breakpoints for SkiffTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for SkiffTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.sw.contains_key(&addr) {
            return Ok(true);
        }
        let ctx = self.paging(self.current).map_err(fatal)?;
        let Some(gpa) = self.phys(&ctx, addr) else { return Ok(false) };
        let mut byte = [0u8; 1];
        if !self.mem.read_bytes(gpa, &mut byte) || self.mem.write_slice(&[INT3], GuestAddress(gpa)).is_err() {
            return Ok(false);
        }
        self.sw.insert(addr, (gpa, byte[0]));
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some((gpa, byte)) = self.sw.remove(&addr) else { return Ok(false) };
        Ok(self.mem.write_slice(&[byte], GuestAddress(gpa)).is_ok())
    }
}

impl HwBreakpoint for SkiffTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let mut list = self.hw.clone();
        list.push(HwBreak { addr, kind: HwKind::Execute, len: 1 });
        Ok(self.set_hw(list))
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        remove_hw(self, HwBreak { addr, kind: HwKind::Execute, len: 1 })
    }
}

/// x86 watches 1, 2, 4 or 8 aligned bytes, for writes or for any access.
fn watch(addr: u64, len: u64, kind: WatchKind) -> Option<HwBreak> {
    let len = u8::try_from(len).ok().filter(|l| matches!(l, 1 | 2 | 4 | 8) && addr.is_multiple_of(u64::from(*l)))?;
    let kind = match kind {
        WatchKind::Write => HwKind::Write,
        // No read-only watch on x86: reads and writes.
        WatchKind::Read | WatchKind::ReadWrite => HwKind::ReadWrite,
    };
    Some(HwBreak { addr, kind, len })
}

fn remove_hw(t: &mut SkiffTarget, b: HwBreak) -> TargetResult<bool, SkiffTarget> {
    let Some(pos) = t.hw.iter().position(|h| *h == b) else { return Ok(false) };
    let mut list = t.hw.clone();
    list.remove(pos);
    Ok(t.set_hw(list))
}

impl HwWatchpoint for SkiffTarget {
    fn add_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        let Some(b) = watch(addr, len, kind) else {
            crate::output::stderr(&format!("skiff: gdb: a watchpoint of {len} bytes at {addr:#x} does not fit a debug register (1, 2, 4 or 8 aligned bytes)\r\n"));
            return Ok(false);
        };
        let mut list = self.hw.clone();
        list.push(b);
        Ok(self.set_hw(list))
    }

    fn remove_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        match watch(addr, len, kind) {
            Some(b) => remove_hw(self, b),
            None => Ok(false),
        }
    }
}

/// gdbstub's blocking loop: waits for a vCPU's stop or a byte from gdb (Ctrl-C),
/// polling the socket in short slices so that a machine that ends is noticed.
pub struct Waiter;

/// The connection: any stream gdbstub can drive, with its fd for poll.
pub struct Conn {
    pub stream: Box<dyn ConnectionExt<Error = std::io::Error>>,
    pub fd: RawFd,
}

impl Connection for Conn {
    type Error = std::io::Error;
    fn write(&mut self, byte: u8) -> Result<(), std::io::Error> {
        self.stream.write(byte)
    }
    fn write_all(&mut self, buf: &[u8]) -> Result<(), std::io::Error> {
        self.stream.write_all(buf)
    }
    fn flush(&mut self) -> Result<(), std::io::Error> {
        self.stream.flush()
    }
    fn on_session_start(&mut self) -> Result<(), std::io::Error> {
        self.stream.on_session_start()
    }
}

impl ConnectionExt for Conn {
    fn read(&mut self) -> Result<u8, std::io::Error> {
        self.stream.read()
    }
    fn peek(&mut self) -> Result<Option<u8>, std::io::Error> {
        self.stream.peek()
    }
}

/// Whether `fd` has input within `ms` milliseconds.
fn readable(fd: RawFd, ms: i32) -> Result<bool, std::io::Error> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    match n {
        n if n < 0 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

impl BlockingEventLoop for Waiter {
    type Target = SkiffTarget;
    type Connection = Conn;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut SkiffTarget,
        conn: &mut Conn,
    ) -> Result<Event<Self::StopReason>, WaitForStopReasonError<String, std::io::Error>> {
        loop {
            match target.reports.try_recv() {
                Ok((index, stop)) => {
                    // All-stop: the others halt too.
                    target.halt_all().map_err(WaitForStopReasonError::Target)?;
                    return Ok(Event::TargetStopped(target.stop_reason(index, stop)));
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    return Err(WaitForStopReasonError::Target("the vCPUs' report channel closed".into()));
                }
            }
            if target.shutdown.load(Ordering::SeqCst) {
                return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(0)));
            }
            if readable(conn.fd, 10).map_err(WaitForStopReasonError::Connection)? {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut SkiffTarget) -> Result<Option<Self::StopReason>, String> {
        target.halt_all()?;
        Ok(Some(MultiThreadStopReason::SignalWithThread { tid: tid_of(target.current), signal: Signal::SIGINT }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchpoints_that_fit_a_debug_register() {
        assert_eq!(watch(0x1000, 4, WatchKind::Write), Some(HwBreak { addr: 0x1000, kind: HwKind::Write, len: 4 }));
        assert_eq!(watch(0x1008, 8, WatchKind::Read).map(|b| b.kind), Some(HwKind::ReadWrite));
        assert_eq!(watch(0x1002, 4, WatchKind::Write), None, "unaligned");
        assert_eq!(watch(0x1000, 3, WatchKind::Write), None);
        assert_eq!(watch(0x1000, 1 << 40, WatchKind::Write), None);
    }

    /// Memory through the page walker: a mapped page reads, an unmapped one is an
    /// error (no bytes), a read across into it stops there; writes likewise.
    #[test]
    fn memory_by_virtual_address_stops_at_unmapped_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; PT[0x10] maps
        // 0x10000 to physical 0x20000, PT[0x11] is not present.
        mem.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x4003u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x20003u64, GuestAddress(0x4000 + 0x10 * 8)).unwrap();
        mem.write_slice(b"skiff", GuestAddress(0x20ffb)).unwrap();
        let t = SkiffTarget::new(Vec::new(), mem.clone(), Arc::new(AtomicBool::new(false)));
        let ctx = PagingContext { cr0: 0x8000_0011, cr3: 0x1000, cr4: 1 << 5, efer: 0x500, ..Default::default() };
        let mut buf = [0u8; 16];
        assert_eq!(t.read_virt(&ctx, 0x10ffb, &mut buf), 5);
        assert_eq!(&buf[..5], b"skiff");
        assert_eq!(t.read_virt(&ctx, 0x11000, &mut buf), 0);
        assert_eq!(t.read_virt(&ctx, u64::MAX - 3, &mut buf), 0, "non-canonical");
        assert!(t.write_virt(&ctx, 0x10000, b"ok"));
        assert_eq!(mem.read_obj::<[u8; 2]>(GuestAddress(0x20000)).unwrap(), *b"ok");
        assert!(!t.write_virt(&ctx, 0x10fff, b"xy"));
    }
}
