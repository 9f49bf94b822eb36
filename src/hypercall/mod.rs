//! skiff's own hypercall ABI: guest-to-VMM calls in KVM's register convention
//! (RAX = number, RBX/RCX/RDX/RSI = arguments, result in RAX; unknown numbers return
//! -KVM_ENOSYS), numbers in a range of skiff's own ([`HC_BASE`]...).
//!
//! Discovery: CPUID leaf 0x4000_0100 says "SkiffSkiffSk" (EBX, ECX, EDX; EAX = the
//! highest skiff leaf); leaf 0x4000_0101 gives the hypercall page's guest-physical
//! address (EAX low, EBX high), the paths available (ECX, [`CAP_TRAP`]...) and the
//! ring's doorbell port and size (EDX). The page sits in the BIOS area the e820 map
//! already reserves (below the ACPI tables), so no guest allocates over it.
//!
//! Paths:
//! - **direct** (b): `call` the page's stub. The stub is chosen for the host: a
//!   `vmcall`/`vmmcall` reaches a VMM only through KVM_EXIT_HYPERCALL, which KVM
//!   offers for MAP_GPA_RANGE alone (and on PVM hosts the instruction never returns
//!   at CPL 0), so every stub is `out %al, $PORT` (2 bytes, no register clobbered, no
//!   DX needed: the port is an immediate) + `ret`; skiff reads and writes the
//!   registers at the port exit (KVM_GET_REGS/KVM_SET_REGS).
//! - **trap and emulate** (a): a raw site, `int3` followed by `nopl 0x53(%rax)`
//!   (5 bytes: cc 0f 1f 40 53), reaches skiff through KVM's emulation failure where
//!   guest kernel mode is emulated (the probe checks `int3` there); see trap.rs.
//! - **patched** (c): a raw site whose marker byte allows it is rewritten, after its
//!   first trap, into `call` of the page's patched stub (or the stub's instruction
//!   inline when the guest did not say where it mapped the page); trap.rs.
//! - **ring**: batched calls in guest memory, flushed by a doorbell (ioeventfd, no
//!   exit) or a call; ring.rs.
//!
//! **The 32-bit register subset.** Outside 64-bit mode (EFER.LMA or CS.L clear) the
//! convention is KVM's: EAX = number, EBX/ECX/EDX/ESI = arguments, the result in EAX
//! (truncated to 32 bits: -1000 is 0xfffffc18 with a clear high half). Asking KVM for
//! the mode (KVM_GET_SREGS) costs about 5 us a call on this host, a quarter of a direct
//! call, so the mode comes from what skiff already has instead: a 32-bit caller calls
//! the page's 32-bit stub ([`STUB_DIRECT32`], port [`PORT_DIRECT32`]), whose port says
//! "32-bit registers" at no cost; a raw site's trap has the segment registers anyway
//! (it fetches through the guest's tables), and patches a 32-bit site into a call of
//! the 32-bit patched stub. A call on a 64-bit port asks KVM only when the high half
//! of RAX or of an argument the call reads is set (a 32-bit caller that took the
//! 64-bit stub, with whatever a mode switch left there, or a 64-bit caller passing a
//! value of 4 GiB or more, such as an upper-half page address, once): see
//! [`Width::of_port_call`]. The ring's entries are 64-bit fields in memory, not
//! registers: nothing to mask.

pub mod ring;
pub mod trap;

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::{Control, StopReason};
use crate::devices::BusDevice;
use crate::devices::legacy::BootMarker;
use crate::devices::serial::ConsoleOut;
use crate::devices::state::{DeviceState, RestoreError};

/// CPUID leaves.
pub const LEAF_SIGNATURE: u32 = 0x4000_0100;
pub const LEAF_INFO: u32 = 0x4000_0101;
pub const SIGNATURE: &[u8; 12] = b"SkiffSkiffSk";

/// The hypercall page (guest-physical), in the reserved BIOS area below the ACPI tables.
pub const PAGE_GPA: u64 = 0xdf000;
/// The direct stub's offset in the page, and the patched sites' stub.
pub const STUB_DIRECT: u64 = 0;
pub const STUB_PATCHED: u64 = 0x10;
/// Ports: the direct stub's, the patched stub's (the same call, counted apart), the
/// ring's doorbell. Below 0x100 so the stub needs no DX.
pub const PORT_DIRECT: u16 = 0x9a;
pub const PORT_PATCHED: u16 = 0x9b;
pub const PORT_RING: u16 = 0x9c;
/// The 32-bit stubs (the same bytes; their ports say the caller uses the 32-bit
/// register subset) and their ports.
pub const STUB_DIRECT32: u64 = 0x20;
pub const STUB_PATCHED32: u64 = 0x30;
pub const PORT_DIRECT32: u16 = 0x9d;
pub const PORT_PATCHED32: u16 = 0x9e;
pub const PORTS_LEN: u64 = 5;

/// CPUID 0x4000_0101 ECX bits.
pub const CAP_TRAP: u32 = 1 << 0;
pub const CAP_RING: u32 = 1 << 1;
/// The page holds the 32-bit stubs ([`STUB_DIRECT32`]).
pub const CAP_STUB32: u32 = 1 << 2;

/// Call numbers.
pub const HC_BASE: u64 = 0x5300;
pub const HC_NOP: u64 = HC_BASE;
/// RBX = guest-physical buffer, RCX = length (at most [`CONSOLE_MAX`]): bytes written.
pub const HC_CONSOLE_WRITE: u64 = HC_BASE + 1;
/// The boot marker (`--boot-time`), as the port-0x440 write.
pub const HC_READY: u64 = HC_BASE + 2;
pub const HC_POWEROFF: u64 = HC_BASE + 3;
pub const HC_REBOOT: u64 = HC_BASE + 4;
/// CLOCK_REALTIME in nanoseconds.
pub const HC_TIME: u64 = HC_BASE + 5;
/// RBX = guest-physical address of the ring (a page of RAM, page-aligned; 0: none).
pub const HC_RING_SET: u64 = HC_BASE + 6;
/// Runs the ring's queued calls now: how many ran.
pub const HC_RING_FLUSH: u64 = HC_BASE + 7;
/// RBX = the linear address where the guest mapped the hypercall page (executable):
/// patched sites then become a `call` of the patched stub.
pub const HC_SET_PAGE_VA: u64 = HC_BASE + 8;
/// The TPR helper's poll (src/tpr/, guest/tpr/helper.S): the exit itself is the point
/// (KVM takes the vAPIC's new TPR at every exit and then delivers what it unmasked);
/// returns 0.
pub const HC_TPR_POLL: u64 = HC_BASE + 9;
/// The TPR helper's read poll, where KVM takes the vAPIC TPR late: skiff copies the
/// APIC's TPR into the calling vCPU's vAPIC slot before the helper reads it; returns 0.
pub const HC_TPR_READ: u64 = HC_BASE + 10;

/// KVM's error numbers (include/uapi/linux/kvm_para.h), returned negated.
pub const KVM_ENOSYS: i64 = 1000;
pub const KVM_EFAULT: i64 = 14;
pub const KVM_EINVAL: i64 = 22;
pub const KVM_E2BIG: i64 = 7;

/// The longest console write one call takes.
pub const CONSOLE_MAX: u64 = 4096;

/// Which way a call arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Direct,
    Trapped,
    Patched,
    Ring,
}

/// Which registers a call uses: all 64 bits (64-bit mode), or the low 32 (KVM's
/// convention outside 64-bit mode: number, arguments and result masked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    Bits64,
    Bits32,
}

const EFER_LMA: u64 = 1 << 10;

impl Width {
    /// The vCPU's mode: 64-bit only with EFER.LMA and CS.L both set (compatibility
    /// mode and legacy protected mode are 32-bit callers).
    pub fn of_mode(sregs: &kvm_bindings::kvm_sregs) -> Self {
        if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 { Self::Bits64 } else { Self::Bits32 }
    }

    /// For a call on a port: the 32-bit ports say so; on a 64-bit port the high halves
    /// of the registers the call reads (RAX, and its arguments: [`args_read`]) decide
    /// whether the mode matters. All clear: masking changes no input, and the call is
    /// taken as 64-bit without asking (a 32-bit caller there gets a result whose high
    /// half it cannot see: 32-bit modes leave GPRs' high halves undefined). Any set:
    /// `mode` is asked (KVM_GET_SREGS), the one cost. Registers the call does not read
    /// are not looked at: a 64-bit caller leaves anything there (the benchmark's RDX
    /// holds the TSC).
    pub fn of_port_call<E>(port_says: Option<Self>, regs: &kvm_bindings::kvm_regs, mode: impl FnOnce() -> Result<Self, E>) -> Result<Self, E> {
        let args = [regs.rbx, regs.rcx, regs.rdx, regs.rsi];
        match port_says {
            Some(w) => Ok(w),
            None if regs.rax >> 32 == 0 && args.iter().take(args_read(regs.rax)).all(|r| r >> 32 == 0) => Ok(Self::Bits64),
            None => mode(),
        }
    }

    pub fn mask(self, v: u64) -> u64 {
        match self {
            Self::Bits64 => v,
            Self::Bits32 => v & 0xffff_ffff,
        }
    }
}

/// How many arguments (RBX, RCX, RDX, RSI in order) call `nr` reads.
pub fn args_read(nr: u64) -> usize {
    match nr {
        HC_CONSOLE_WRITE => 2,
        HC_RING_SET | HC_SET_PAGE_VA => 1,
        _ => 0,
    }
}

/// A call port: which path it is, and the width it declares (None: the 64-bit
/// stubs', whose callers are taken as 64-bit unless their registers say otherwise).
pub fn call_port(port: u16) -> Option<(Path, Option<Width>)> {
    match port {
        PORT_DIRECT => Some((Path::Direct, None)),
        PORT_PATCHED => Some((Path::Patched, None)),
        PORT_DIRECT32 => Some((Path::Direct, Some(Width::Bits32))),
        PORT_PATCHED32 => Some((Path::Patched, Some(Width::Bits32))),
        _ => None,
    }
}

/// The page's contents: the direct and patched stubs for 64-bit and for 32-bit
/// callers, each `out %al, $port; ret` (the same bytes in 16-, 32- and 64-bit code),
/// the rest `int3`.
pub fn page_image() -> [u8; 4096] {
    let mut page = [0xccu8; 4096];
    for (off, port) in [(STUB_DIRECT, PORT_DIRECT), (STUB_PATCHED, PORT_PATCHED), (STUB_DIRECT32, PORT_DIRECT32), (STUB_PATCHED32, PORT_PATCHED32)] {
        let stub = [0xe6, port as u8, 0xc3];
        if let Some(dst) = page.get_mut(off as usize..off as usize + stub.len()) {
            dst.copy_from_slice(&stub);
        }
    }
    page
}

/// Writes the page into guest RAM (at boot and after every reset: RAM was cleared).
pub fn write_page(mem: &GuestMemoryMmap) -> Result<(), String> {
    mem.write_slice(&page_image(), GuestAddress(PAGE_GPA)).map_err(|e| format!("the hypercall page: {e}"))
}

/// skiff's CPUID leaves, added to (or replacing) any the table has.
pub fn add_cpuid_leaves(cpuid: &mut kvm_bindings::CpuId, trap: bool) -> Result<(), String> {
    use kvm_bindings::kvm_cpuid_entry2;
    let sig = |i: usize| SIGNATURE.get(i..i + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes);
    let caps = CAP_RING | CAP_STUB32 | if trap { CAP_TRAP } else { 0 };
    let entries = [
        kvm_cpuid_entry2 { function: LEAF_SIGNATURE, eax: LEAF_INFO, ebx: sig(0), ecx: sig(4), edx: sig(8), ..Default::default() },
        kvm_cpuid_entry2 {
            function: LEAF_INFO,
            eax: PAGE_GPA as u32,
            ebx: (PAGE_GPA >> 32) as u32,
            ecx: caps,
            edx: u32::from(PORT_RING) | ((ring::ENTRIES as u32) << 16),
            ..Default::default()
        },
    ];
    let mut all: Vec<kvm_cpuid_entry2> = cpuid.as_slice().iter().filter(|e| e.function != LEAF_SIGNATURE && e.function != LEAF_INFO).copied().collect();
    all.extend(entries);
    *cpuid = kvm_bindings::CpuId::from_entries(&all).map_err(|e| format!("CPUID table with skiff's leaves: {e:?}"))?;
    Ok(())
}

/// Counters shared by every path (atomics: vCPU threads and the event loop add).
#[derive(Default)]
pub struct Counters {
    pub direct: AtomicU64,
    pub trapped: AtomicU64,
    pub patched: AtomicU64,
    pub ring_calls: AtomicU64,
    pub ring_flushes: AtomicU64,
    pub ring_refused: AtomicU64,
    /// Calls in the 32-bit register subset, and 64-bit-port calls whose mode KVM was asked.
    pub calls32: AtomicU64,
    pub mode_asked: AtomicU64,
    pub sites_patched: AtomicU64,
    pub patches_refused: AtomicU64,
    pub unknown: AtomicU64,
}

/// The hypercall handler and its ports (declared once in the device manager).
pub struct Hypercalls {
    mem: GuestMemoryMmap,
    control: Arc<Control>,
    console: Mutex<ConsoleOut>,
    marker: Arc<BootMarker>,
    pub ring: Mutex<ring::Ring>,
    /// Where the guest mapped the page (HC_SET_PAGE_VA), 0 if it did not say.
    page_va: AtomicU64,
    /// Whether a raw site traps to skiff on this host (the probe's finding).
    pub trap: AtomicBool,
    pub patches: trap::PatchQueue,
    pub counters: Counters,
}

impl Hypercalls {
    pub fn new(mem: GuestMemoryMmap, control: Arc<Control>, console: ConsoleOut, marker: Arc<BootMarker>) -> Self {
        Self {
            mem,
            control,
            console: Mutex::new(console),
            marker,
            ring: Mutex::new(ring::Ring::default()),
            page_va: AtomicU64::new(0),
            trap: AtomicBool::new(false),
            patches: trap::PatchQueue::default(),
            counters: Counters::default(),
        }
    }

    pub fn page_va(&self) -> Option<u64> {
        Some(self.page_va.load(Ordering::Relaxed)).filter(|&v| v != 0)
    }

    /// Runs the call in `regs` (RAX = number, RBX/RCX/RDX/RSI = arguments), in
    /// `width`'s registers, that came by `path`: the new RAX (masked for 32-bit callers).
    pub fn call_regs(&self, path: Path, width: Width, regs: &kvm_bindings::kvm_regs) -> u64 {
        if width == Width::Bits32 {
            self.counters.calls32.fetch_add(1, Ordering::Relaxed);
        }
        let m = |v| width.mask(v);
        width.mask(self.call(path, m(regs.rax), [m(regs.rbx), m(regs.rcx), m(regs.rdx), m(regs.rsi)]))
    }

    /// Runs call `nr` with `args` (RBX, RCX, RDX, RSI) that came by `path`.
    pub fn call(&self, path: Path, nr: u64, args: [u64; 4]) -> u64 {
        let c = &self.counters;
        match path {
            Path::Direct => &c.direct,
            Path::Trapped => &c.trapped,
            Path::Patched => &c.patched,
            Path::Ring => &c.ring_calls,
        }
        .fetch_add(1, Ordering::Relaxed);
        let r: i64 = match nr {
            HC_NOP | HC_TPR_POLL | HC_TPR_READ => 0,
            HC_CONSOLE_WRITE => self.console_write(args[0], args[1]),
            HC_READY => {
                self.marker.write(0, &[0]);
                0
            }
            HC_POWEROFF => {
                self.control.request_stop(StopReason::Poweroff);
                0
            }
            HC_REBOOT => {
                self.control.request_stop(StopReason::Reboot("reboot hypercall"));
                0
            }
            HC_TIME => realtime_ns(),
            // The ring cannot be managed from inside itself.
            HC_RING_SET | HC_RING_FLUSH if path == Path::Ring => -KVM_EINVAL,
            HC_RING_SET => self.ring_lock().register(&self.mem, args[0]),
            HC_RING_FLUSH => self.flush_ring(),
            HC_SET_PAGE_VA => {
                self.page_va.store(args[0], Ordering::Relaxed);
                0
            }
            _ => {
                c.unknown.fetch_add(1, Ordering::Relaxed);
                -KVM_ENOSYS
            }
        };
        r as u64
    }

    fn ring_lock(&self) -> std::sync::MutexGuard<'_, ring::Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs what the ring holds (the doorbell, a flush call, a full ring).
    pub fn flush_ring(&self) -> i64 {
        let mut ring = self.ring_lock();
        self.counters.ring_flushes.fetch_add(1, Ordering::Relaxed);
        let r = ring.flush(&self.mem, |nr, args| self.call(Path::Ring, nr, args));
        if r < 0 {
            self.counters.ring_refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Console write: a bounded buffer in guest RAM to the console, as the UART's bytes go.
    fn console_write(&self, gpa: u64, len: u64) -> i64 {
        if len > CONSOLE_MAX {
            return -KVM_E2BIG;
        }
        let mut buf = vec![0u8; len as usize];
        if gpa.checked_add(len).is_none() || self.mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
            return -KVM_EFAULT;
        }
        let mut out = self.console.lock().unwrap_or_else(|e| e.into_inner());
        match out.write_all(&buf).and_then(|()| out.flush()) {
            Ok(()) => len as i64,
            Err(_) => -KVM_EFAULT,
        }
    }

    /// `--stats` lines.
    pub fn report(&self) -> String {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = format!(
            "hypercalls: direct {}, trap-and-emulate {}, patched {}, ring {} ({} flushes, refused {}); \
             sites patched {} (not patched {}); unknown numbers {}\n",
            n(&c.direct),
            n(&c.trapped),
            n(&c.patched),
            n(&c.ring_calls),
            n(&c.ring_flushes),
            n(&c.ring_refused),
            n(&c.sites_patched),
            n(&c.patches_refused),
            n(&c.unknown)
        );
        out.push_str(&format!(
            "  32-bit register subset: {} calls (64-bit-port calls whose mode KVM was asked: {})\n",
            n(&c.calls32),
            n(&c.mode_asked)
        ));
        out.push_str(&format!(
            "  hypercall page at {PAGE_GPA:#x}: stub out %al,${PORT_DIRECT:#x} (vmcall/vmmcall reach skiff only through \
             KVM_EXIT_HYPERCALL, which KVM offers for MAP_GPA_RANGE alone); raw int3 sites {}\n",
            if self.trap.load(Ordering::Relaxed) { "trap to skiff (int3 at CPL 0 fails KVM's emulation here)" } else { "do not trap here (no emulation failure for int3): path (a) unavailable" }
        ));
        out
    }

    /// Back to power-up: no ring, no page address, no pending patches.
    pub fn reset_state(&self) {
        *self.ring_lock() = ring::Ring::default();
        self.page_va.store(0, Ordering::Relaxed);
        self.patches.clear();
    }
}

fn realtime_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; it lives on this stack.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return -KVM_EFAULT;
    }
    ts.tv_sec.saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec)
}

/// The ports on the bus: the call ports are handled in the vCPU's exit path (they need
/// the registers); a write that reaches here (a string `outs` to them) does nothing.
/// The ring's doorbell flushes the ring.
impl BusDevice for Hypercalls {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&self, offset: u64, _data: &[u8]) {
        if offset == u64::from(PORT_RING - PORT_DIRECT) {
            self.flush_ring();
        }
    }
    fn doorbell(&self, offset: u64) {
        self.write(offset, &[0]);
    }
    fn state(&self) -> DeviceState {
        let ring = self.ring_lock();
        DeviceState::Hypercall { ring_gpa: ring.gpa().unwrap_or(0), ring_tail: ring.tail(), page_va: self.page_va.load(Ordering::Relaxed) }
    }
    fn restore(&self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::Hypercall { ring_gpa, ring_tail, page_va } => {
                *self.ring_lock() = ring::Ring::restored(&self.mem, *ring_gpa, *ring_tail);
                self.page_va.store(*page_va, Ordering::Relaxed);
                Ok(())
            }
            other => Err(RestoreError::wrong_kind(other, "hypercall")),
        }
    }
    fn reset(&self) {
        self.reset_state();
    }
}

#[cfg(test)]
mod tests;
