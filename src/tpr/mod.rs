//! TPR access decode-and-patch (seed 000), after QEMU's kvmvapic, written afresh.
//!
//! A 32-bit guest that reads and writes the local APIC's task-priority register
//! (offset 0x80 of the APIC page) through MMIO exits on every access where the host
//! has no TPR virtualisation. skiff asks KVM to report TPR accesses
//! (KVM_TPR_ACCESS_REPORTING), decodes the instruction a report names, and rewrites
//! it into a call of a small guest-side helper (guest/tpr/helper.S) that keeps the
//! TPR in a vAPIC slot KVM synchronises with the APIC (KVM_SET_VAPIC_ADDR): KVM takes
//! the slot's TPR byte after every exit and writes the TPR, the in-service class and
//! the highest requested vector into it before entries that handle an event. When
//! lowering the TPR unmasks a requested interrupt, the helper makes an exit (the poll
//! hypercall, through skiff's hypercall page) so KVM takes the new TPR and delivers
//! it at once. Where KVM takes the byte too late for that (guest kernel mode run
//! through KVM's emulator: the probe checks), every write polls and skiff gives the
//! TPR to KVM itself ([`give_tpr_to_kvm`]), and every read asks skiff first
//! ([`apic_tpr_to_slot`]).
//!
//! One TPR, two homes: the APIC's register (what MMIO accesses through sites not
//! yet patched reach) and the vAPIC slot (what the helper reads and writes). KVM
//! copies the slot into the APIC after every exit, so a slot left behind by an MMIO
//! write would undo that write. Every TPR-access report therefore copies the APIC's
//! TPR into the slot (its access went to the APIC), unless the exit before it was a
//! helper's write poll: then the slot holds the newer value ([`on_report`]).
//!
//! Guest-physical layout, three pages in the BIOS area the e820 map reserves:
//!   [`HELPER_GPA`] the helper's code; [`VAPIC_GPA`] the vAPIC slots, 16 bytes per
//!   vCPU (KVM needs 4 bytes that do not cross a page; one page holds 256 slots, as
//!   many as a vCPU index byte names); [`crate::hypercall::PAGE_GPA`] the hypercall
//!   page. The helper finds the other two relative to itself, so it works wherever the
//!   guest maps the three pages contiguously (checked through the guest's page tables
//!   before any site is patched). The helper takes its vCPU number from CPUID leaf
//!   1's initial APIC ID, which skiff sets per vCPU to its index (vcpu/cpuid.rs) and
//!   the guest cannot change; with one vCPU it skips the lookup ([`helper_for`]).
//!
//! The helper's bytes are `guest/tpr/helper.bin`, built by `guest/tpr/build` from the
//! assembly and checked in (320 bytes; GNU as and ld produce it byte for byte again,
//! which a unit test checks when they are installed), so building skiff needs no
//! assembler and no build.rs.
//!
//! Reports are never trusted (site.rs): the instruction at the reported RIP (or, for a
//! write, the one ending there) must be one of the six forms (decode.rs), name the
//! APIC page's TPR through the guest's own page tables, and still be there when the
//! event loop patches it with every vCPU paused.

pub mod decode;
pub mod site;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::snapshot::PatchedSite;

/// The helper's page, the vAPIC slots' page (the next), then the hypercall page.
pub const HELPER_GPA: u64 = 0xdd000;
pub const VAPIC_GPA: u64 = 0xde000;
pub const VAPIC_SLOT: u64 = 16;
/// The helper (guest/tpr/helper.S, built by guest/tpr/build).
pub static HELPER: &[u8] = include_bytes!("../../guest/tpr/helper.bin");

/// The TPR's offset in the APIC page.
pub const TPR_OFFSET: u64 = 0x80;

/// `--tpr-patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Engage where the probe measured patching to be cheaper than the MMIO access.
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            other => Err(format!("--tpr-patch {other}: must be auto, on or off")),
        }
    }
}

/// Why a report patched nothing; counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not 32-bit protected-mode code (the six forms are 32-bit encodings).
    NotCode32,
    /// ESP is 0: the patched code pushes (QEMU saw Windows 2003's SMP start-up do this).
    EspZero,
    /// The vCPU is no longer just past the access: it ran on before the report's exit,
    /// so its registers (ESP) are not those of the access.
    Stale,
    /// The bytes at (or, for a write, ending at) RIP are none of the six forms: a late,
    /// merged or wrong report.
    NotAForm,
    /// A form, but its address is not the TPR of this vCPU's APIC page.
    NotTpr,
    /// The site's bytes could not be read, or cross a page.
    Unreadable,
    /// The helper pages are not mapped contiguously where the guest could call them.
    NoHelper,
    /// The bytes changed before the patch was applied, or the queue was full.
    Changed,
}

pub const REFUSALS: [(Refusal, &str); 8] = [
    (Refusal::NotCode32, "not 32-bit code"),
    (Refusal::EspZero, "ESP 0"),
    (Refusal::Stale, "vCPU ran on past the access (stale report)"),
    (Refusal::NotAForm, "no TPR form at RIP (late or wrong report)"),
    (Refusal::NotTpr, "address not the TPR"),
    (Refusal::Unreadable, "site unreadable or across a page"),
    (Refusal::NoHelper, "helper not mapped"),
    (Refusal::Changed, "bytes changed before patching"),
];

/// A rewrite waiting for the event loop (all vCPUs paused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SitePatch {
    pub gpa: u64,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
    pub form: usize,
}

/// At most this many patches wait; a site whose patch was dropped is reported again.
const MAX_PENDING: usize = 64;
/// At most this many sites are patched per boot: a guest cannot grow skiff's memory
/// (or a snapshot) without bound by laying out TPR accesses.
pub const MAX_SITES: usize = 4096;

/// The machine's TPR patching state, shared by the vCPUs and the event loop.
pub struct Tpr {
    /// Why patching is on or off (`--stats`).
    pub why: String,
    pub reports: AtomicU64,
    pub polls: AtomicU64,
    /// Read polls: the helper's reads that asked skiff first (where KVM takes the
    /// slot late).
    pub read_polls: AtomicU64,
    /// Reports and read polls where the APIC's TPR was not the slot's, and skiff
    /// copied it into the slot.
    pub from_apic: AtomicU64,
    /// Polls where KVM's TPR class was not the vAPIC byte's, and skiff set it.
    pub synced: AtomicU64,
    patched: [AtomicU64; 6],
    refused: [AtomicU64; REFUSALS.len()],
    queue: Mutex<Vec<SitePatch>>,
    sites: Mutex<Vec<PatchedSite>>,
    /// Per vCPU at the end of the run: (index, KVM_GET_LAPIC's TPR, the vAPIC byte).
    pub final_tpr: Mutex<Vec<(u8, u32, u8)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tpr {
    pub fn new(why: String) -> Self {
        Tpr {
            why,
            reports: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            read_polls: AtomicU64::new(0),
            from_apic: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            patched: Default::default(),
            refused: Default::default(),
            queue: Mutex::new(Vec::new()),
            sites: Mutex::new(Vec::new()),
            final_tpr: Mutex::new(Vec::new()),
        }
    }

    pub fn refuse(&self, r: Refusal) {
        if let Some(i) = REFUSALS.iter().position(|(x, _)| *x == r)
            && let Some(c) = self.refused.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refused(&self, r: Refusal) -> u64 {
        REFUSALS.iter().position(|(x, _)| *x == r).and_then(|i| self.refused.get(i)).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Queues a rewrite (once per site); false when the queue is full.
    pub fn push(&self, p: SitePatch) -> bool {
        let mut q = lock(&self.queue);
        if q.iter().any(|x| x.gpa == p.gpa) {
            return true;
        }
        if q.len() >= MAX_PENDING {
            return false;
        }
        q.push(p);
        true
    }

    pub fn has_pending(&self) -> bool {
        !lock(&self.queue).is_empty()
    }

    /// Writes each queued rewrite whose site still holds its old bytes. Call with every
    /// vCPU paused: no vCPU can fetch half of a site (a paused vCPU is at an
    /// instruction boundary, and each old site is one instruction).
    pub fn apply(&self, mem: &GuestMemoryMmap) -> u64 {
        let pending = std::mem::take(&mut *lock(&self.queue));
        let mut sites = lock(&self.sites);
        let mut done = 0;
        for p in pending {
            let mut now = vec![0u8; p.old.len()];
            let fresh = !sites.iter().any(|s| s.guest_addr == p.gpa);
            if fresh
                && sites.len() < MAX_SITES
                && mem.read_slice(&mut now, GuestAddress(p.gpa)).is_ok()
                && now == p.old
                && mem.write_slice(&p.new, GuestAddress(p.gpa)).is_ok()
            {
                if let Some(c) = self.patched.get(p.form) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                sites.push(PatchedSite { guest_addr: p.gpa, original: p.old, patched: p.new });
                done += 1;
            } else {
                self.refuse(Refusal::Changed);
            }
        }
        done
    }

    /// The sites patched since power-on (for a snapshot).
    pub fn sites(&self) -> Vec<PatchedSite> {
        lock(&self.sites).clone()
    }

    /// A restored machine's sites (its memory already holds the patched bytes).
    pub fn set_sites(&self, sites: Vec<PatchedSite>) {
        *lock(&self.sites) = sites.into_iter().take(MAX_SITES).collect();
    }

    pub fn patched_total(&self) -> u64 {
        self.patched.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Back to power-up: guest memory was cleared, so no site is patched any more.
    pub fn reset(&self) {
        lock(&self.queue).clear();
        lock(&self.sites).clear();
    }

    /// The `--stats` lines.
    pub fn report(&self) -> String {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let forms: Vec<String> = decode::FORM_NAMES
            .iter()
            .zip(&self.patched)
            .filter(|(_, c)| n(c) > 0)
            .map(|(name, c)| format!("{name} {}", n(c)))
            .collect();
        let refused: Vec<String> = REFUSALS
            .iter()
            .zip(&self.refused)
            .filter(|(_, c)| n(c) > 0)
            .map(|((_, why), c)| format!("{why} {}", n(c)))
            .collect();
        let mut out = format!(
            "tpr: reports {}, sites patched {} ({}), live sites {}, refused {} ({}), helper polls {} (TPR given to KVM {}), read polls {}, slot set from the APIC {}\n",
            n(&self.reports),
            self.patched_total(),
            if forms.is_empty() { "none".into() } else { forms.join(", ") },
            lock(&self.sites).len(),
            self.refused.iter().map(n).sum::<u64>(),
            if refused.is_empty() { "none".into() } else { refused.join(", ") },
            n(&self.polls),
            n(&self.synced),
            n(&self.read_polls),
            n(&self.from_apic),
        );
        for (i, lapic, vapic) in lock(&self.final_tpr).iter() {
            out.push_str(&format!("tpr: vCPU {i} TPR {lapic:#04x} (KVM_GET_LAPIC), vAPIC byte {vapic:#04x}\n"));
        }
        out
    }
}

/// Where the helper's variants are: a table at [`LAYOUT`] in the helper (never
/// executed) of 16-bit offsets in its page, written by the assembler.
pub const LAYOUT: usize = 0xb0;

/// The offsets the table at [`LAYOUT`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The 2-byte `jmp rel8` that starts the vCPU lookup.
    pub slot: usize,
    /// Its target with one vCPU: slot 0, no lookup.
    pub slot_one: usize,
    /// Its target with several: the index from CPUID leaf 1's initial APIC ID.
    pub slot_cpuid: usize,
    /// The 2-byte `jmp rel8` after a TPR write.
    pub after_write: usize,
    /// Its target where KVM takes the vAPIC TPR at the next exit: poll only when the
    /// write unmasks a requested interrupt.
    pub poll_if_unmasked: usize,
    /// Its target where KVM takes it late: poll after every write.
    pub poll: usize,
    /// The 2-byte `jmp rel8` before a TPR read.
    pub before_read: usize,
    /// Its target where KVM takes the slot at once: read the slot.
    pub read_slot: usize,
    /// Its target where KVM takes it late: ask skiff first (HC_TPR_READ).
    pub read_poll: usize,
}

impl Layout {
    pub fn of(helper: &[u8]) -> Option<Layout> {
        let word = |i: usize| helper.get(LAYOUT + 2 * i..LAYOUT + 2 * i + 2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
        Some(Layout {
            slot: word(0)?,
            slot_one: word(1)?,
            slot_cpuid: word(2)?,
            after_write: word(3)?,
            poll_if_unmasked: word(4)?,
            poll: word(5)?,
            before_read: word(6)?,
            read_slot: word(7)?,
            read_poll: word(8)?,
        })
    }
}

/// Which helper a machine gets (chosen at boot from its vCPU count and the host
/// probe; QEMU's ROM has UP and MP handler sets likewise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub cpus: u8,
    /// KVM takes a TPR written into the vAPIC slot only late here (probe/tpr.rs):
    /// every write and every read is handed to skiff.
    pub late: bool,
}

impl Variant {
    /// The `--stats` words for it.
    pub fn describe(&self) -> String {
        format!(
            "helper: {}, {}",
            if self.cpus <= 1 { "one vCPU (slot 0)" } else { "vCPU slot by CPUID's initial APIC ID" },
            if self.late { "every access handed to skiff (KVM takes the vAPIC TPR late here)" } else { "polls only when a lowering unmasks an interrupt" }
        )
    }
}

/// Points the `jmp rel8` at `at` in `h` to `target`; false where it is not a short
/// jump or the target is out of its reach.
fn aim(h: &mut [u8], at: usize, target: usize) -> bool {
    let Ok(rel) = i8::try_from(target as i64 - (at as i64 + 2)) else { return false };
    match h.get_mut(at..at + 2) {
        Some([0xeb, disp]) => {
            *disp = rel as u8;
            true
        }
        _ => false,
    }
}

/// The helper as `v` says: with one vCPU the lookup of the vCPU's slot is skipped;
/// where KVM takes the vAPIC TPR late, every write and every read polls.
pub fn helper_for(v: Variant) -> Vec<u8> {
    let mut h = HELPER.to_vec();
    if let Some(l) = Layout::of(HELPER) {
        aim(&mut h, l.slot, if v.cpus <= 1 { l.slot_one } else { l.slot_cpuid });
        aim(&mut h, l.after_write, if v.late { l.poll } else { l.poll_if_unmasked });
        aim(&mut h, l.before_read, if v.late { l.read_poll } else { l.read_slot });
    }
    h
}

/// Writes the helper (at boot and after every reset: RAM was cleared). The vAPIC page
/// is RAM the reset cleared, which is what KVM expects of it.
pub fn write_helper(mem: &GuestMemoryMmap, v: Variant) -> Result<(), String> {
    mem.write_slice(&helper_for(v), GuestAddress(HELPER_GPA)).map_err(|e| format!("the TPR helper: {e}"))
}

/// The vAPIC slot of vCPU `index`.
pub fn vapic_gpa(index: u8) -> u64 {
    VAPIC_GPA + u64::from(index) * VAPIC_SLOT
}

// KVM's ioctls for the vAPIC (include/uapi/linux/kvm.h), which kvm-ioctls does not wrap:
// _IOWR(KVMIO, 0x92, struct kvm_tpr_access_ctl) and _IOW(KVMIO, 0x93, struct kvm_vapic_addr).
const KVM_TPR_ACCESS_REPORTING: libc::c_ulong = 0xc028_ae92;
const KVM_SET_VAPIC_ADDR: libc::c_ulong = 0x4008_ae93;
/// KVM_CAP_VAPIC.
pub const KVM_CAP_VAPIC: i32 = 6;

/// Turns TPR-access reports and the vAPIC slot on for a vCPU (`fd`, index `index`).
pub fn enable_on_vcpu(fd: &kvm_ioctls::VcpuFd, index: u8) -> Result<(), String> {
    report_accesses(fd, index)?;
    set_vapic(fd, index)
}

/// The helper's poll, on the vCPU that made it: KVM takes the vAPIC byte after the
/// vCPU leaves the CPU, which (where guest kernel mode is emulated) came before the
/// helper wrote it; and before its next entry KVM may write its own TPR over the
/// byte. So skiff gives the byte's class to KVM itself when KVM's differs, through
/// CR8 (KVM_SET_SREGS): KVM then re-evaluates what it may deliver before the guest
/// runs again. CR8 carries the class only (TPR bits 7:4, all that masking uses); the
/// sub-class bits 3:0 reach KVM with its next read of the byte, unless KVM writes its
/// own TPR there first. Nothing else in the APIC is touched: KVM_SET_LAPIC would
/// replace the IRR, and lose an interrupt another vCPU or a device requested
/// meanwhile. Returns whether KVM's TPR was changed.
pub fn give_tpr_to_kvm(fd: &kvm_ioctls::VcpuFd, mem: &GuestMemoryMmap, index: u8) -> Result<bool, String> {
    let mut byte = [0u8; 1];
    mem.read_slice(&mut byte, GuestAddress(vapic_gpa(index))).map_err(|e| format!("vCPU {index}: the vAPIC slot: {e}"))?;
    let class = u64::from(byte[0] >> 4);
    let mut sregs = fd.get_sregs().map_err(|e| format!("vCPU {index}: KVM_GET_SREGS: {e}"))?;
    if sregs.cr8 == class {
        return Ok(false);
    }
    sregs.cr8 = class;
    fd.set_sregs(&sregs).map_err(|e| format!("vCPU {index}: KVM_SET_SREGS: {e}"))?;
    Ok(true)
}

/// Copies the APIC's TPR (KVM_GET_LAPIC) into vCPU `index`'s vAPIC slot, byte 0:
/// on a report, whose access went to the APIC, and on a read poll, where the APIC is
/// the newer home (see the module's note). A change is counted (`from_apic`).
pub fn apic_tpr_to_slot(t: &Tpr, fd: &kvm_ioctls::VcpuFd, mem: &GuestMemoryMmap, index: u8) -> Result<(), String> {
    let lapic = fd.get_lapic().map_err(|e| format!("vCPU {index}: KVM_GET_LAPIC: {e}"))?;
    let tpr = lapic.regs.get(TPR_OFFSET as usize).map_or(0, |b| *b as u8);
    let at = GuestAddress(vapic_gpa(index));
    let mut byte = [0u8; 1];
    mem.read_slice(&mut byte, at).map_err(|e| format!("vCPU {index}: the vAPIC slot: {e}"))?;
    if byte[0] != tpr {
        mem.write_slice(&[tpr], at).map_err(|e| format!("vCPU {index}: the vAPIC slot: {e}"))?;
        t.from_apic.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A report's effect on the slot. `after_write_poll`: the exit just before this one
/// was the helper's write poll, so no guest instruction ran since ([`give_tpr_to_kvm`]
/// gave KVM only the class, and the slot holds the whole byte): the slot is the newer
/// home and stays. Otherwise the reported access (and any other since the last exit,
/// all MMIO: patched accesses poll where reports come late) went to the APIC.
pub fn on_report(t: &Tpr, fd: &kvm_ioctls::VcpuFd, mem: &GuestMemoryMmap, index: u8, after_write_poll: bool) -> Result<(), String> {
    if after_write_poll { Ok(()) } else { apic_tpr_to_slot(t, fd, mem, index) }
}

/// The helper's hypercalls (`nr`, the call's number), on the vCPU that made them:
/// the write poll gives the slot's TPR to KVM, the read poll the APIC's TPR to the
/// slot. Returns whether this was a write poll.
pub fn on_poll(t: &Tpr, fd: &kvm_ioctls::VcpuFd, mem: &GuestMemoryMmap, index: u8, nr: u64) -> Result<bool, String> {
    match nr {
        crate::hypercall::HC_TPR_POLL => {
            t.polls.fetch_add(1, Ordering::Relaxed);
            if give_tpr_to_kvm(fd, mem, index)? {
                t.synced.fetch_add(1, Ordering::Relaxed);
            }
            Ok(true)
        }
        crate::hypercall::HC_TPR_READ => {
            t.read_polls.fetch_add(1, Ordering::Relaxed);
            apic_tpr_to_slot(t, fd, mem, index)?;
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// KVM_TPR_ACCESS_REPORTING on: every TPR access through the APIC page exits.
pub fn report_accesses(fd: &kvm_ioctls::VcpuFd, index: u8) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let ctl = kvm_bindings::kvm_tpr_access_ctl { enabled: 1, ..Default::default() };
    // SAFETY: the ioctl reads and writes a kvm_tpr_access_ctl (40 bytes, the size the
    // number encodes) that lives on this stack for the call; the fd is a vCPU's.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_TPR_ACCESS_REPORTING, &ctl as *const _) };
    if r < 0 {
        return Err(format!("vCPU {index}: KVM_TPR_ACCESS_REPORTING: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// KVM_SET_VAPIC_ADDR: vCPU `index`'s vAPIC slot.
pub fn set_vapic(fd: &kvm_ioctls::VcpuFd, index: u8) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let addr = kvm_bindings::kvm_vapic_addr { vapic_addr: vapic_gpa(index) };
    // SAFETY: the ioctl reads a kvm_vapic_addr (8 bytes) that lives on this stack.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_SET_VAPIC_ADDR, &addr as *const _) };
    if r < 0 {
        return Err(format!("vCPU {index}: KVM_SET_VAPIC_ADDR: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_helper_is_what_its_source_builds() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let have_tools = ["as", "ld", "objcopy"].iter().all(|t| std::process::Command::new(t).arg("--version").output().is_ok());
        if !have_tools {
            eprintln!("skipped: GNU as/ld/objcopy are not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("skiff-tpr-helper-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new(here.join("guest/tpr/build")).arg(&dir).output().unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let built = std::fs::read(dir.join("helper.bin")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(built, HELPER, "guest/tpr/helper.bin is stale: run guest/tpr/build");
    }

    #[test]
    fn the_helper_fits_its_page_and_its_entries_are_code() {
        assert!(HELPER.len() < 0x1000);
        // Each entry slot starts with an instruction (not padding).
        for off in [0x00usize, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x80, 0x90, 0xa0] {
            assert_ne!(HELPER.get(off).copied().unwrap_or(0), 0, "entry {off:#x}");
        }
        // No rdtscp (KVM cannot emulate it at CPL 0 where kernel mode is emulated).
        assert_eq!(HELPER.windows(3).filter(|w| *w == [0x0f, 0x01, 0xf9]).count(), 0);
        // Slot 256 would be past the vAPIC page: the index is one byte.
        assert_eq!(vapic_gpa(255) + VAPIC_SLOT, VAPIC_GPA + 0x1000);
        assert_eq!(VAPIC_GPA + 0x1000, crate::hypercall::PAGE_GPA);
        assert_eq!(HELPER_GPA + 0x1000, VAPIC_GPA);
    }

    #[test]
    fn the_vcpu_lookup_is_chosen_by_the_number_of_vcpus() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        let l = Layout::of(HELPER).unwrap();
        assert!(l.slot < l.slot_cpuid && l.slot_cpuid < l.slot_one && l.slot_one < HELPER.len());
        assert!(l.after_write < l.poll_if_unmasked && l.poll_if_unmasked < l.poll && l.poll < l.slot);
        // Follows the code from `from` as a vCPU would (jumps taken, conditional ones
        // not), listing what it runs up to the first `ret`.
        let walk = |h: &[u8], from: usize| -> Vec<Mnemonic> {
            let mut d = Decoder::with_ip(32, h, 0, DecoderOptions::NONE);
            d.set_position(from).unwrap();
            d.set_ip(from as u64);
            let mut out = vec![];
            for _ in 0..16 {
                let i = d.decode();
                out.push(i.mnemonic());
                match i.mnemonic() {
                    Mnemonic::Jmp => {
                        d.set_position(i.near_branch_target() as usize).unwrap();
                        d.set_ip(i.near_branch_target());
                    }
                    Mnemonic::Ret => break,
                    _ => {}
                }
            }
            out
        };
        let v = |cpus, late| helper_for(Variant { cpus, late });
        let one = walk(&v(1, false), l.slot);
        assert!(!one.contains(&Mnemonic::Cpuid) && one.contains(&Mnemonic::Xor), "{one:?}");
        for n in [2, 8, 255] {
            let many = walk(&v(n, false), l.slot);
            assert!(many.contains(&Mnemonic::Cpuid) && !many.contains(&Mnemonic::Xor), "{many:?}");
        }
        // The checked-in default is the lookup (sound for any count).
        assert_eq!(walk(HELPER, l.slot), walk(&v(2, false), l.slot));
        // After a write: the class comparison first (a conditional jump over the
        // poll), or straight to the poll's call.
        let checked = walk(&v(1, false), l.after_write);
        assert!(checked.contains(&Mnemonic::Jbe) && checked.contains(&Mnemonic::Call), "{checked:?}");
        let always = walk(&v(1, true), l.after_write);
        assert_eq!(always, [Mnemonic::Jmp, Mnemonic::Mov, Mnemonic::Call, Mnemonic::Pop, Mnemonic::Ret]);
        assert_eq!(walk(HELPER, l.after_write), checked);
        // Before a read: the slot at once, or the read poll first.
        assert!(l.before_read < l.read_poll && l.read_poll < l.read_slot, "{l:?}");
        let slot_read = [Mnemonic::Call, Mnemonic::Movzx, Mnemonic::Pop, Mnemonic::Pop, Mnemonic::Popfd, Mnemonic::Ret];
        let plain = walk(&v(1, false), l.before_read);
        assert_eq!(plain, [&[Mnemonic::Jmp][..], &slot_read].concat(), "straight to the slot");
        let asks = walk(&v(1, true), l.before_read);
        assert_eq!(asks, [&[Mnemonic::Jmp, Mnemonic::Mov, Mnemonic::Call][..], &slot_read].concat(), "the read poll first");
        assert_eq!(walk(HELPER, l.before_read), plain);
        // Every choice together, and nothing else changed.
        let all = v(2, true);
        let differ = all.iter().zip(HELPER).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 2, "only the after-write and before-read jumps' displacements");
    }

    #[test]
    fn apply_checks_the_old_bytes_and_patches_a_site_once() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let t = Tpr::new(String::new());
        let old = vec![0xa1, 0x80, 0x00, 0xe0, 0xfe];
        mem.write_slice(&old, GuestAddress(0x1000)).unwrap();
        let p = |gpa| SitePatch { gpa, old: old.clone(), new: vec![0xe8, 1, 2, 3, 4], form: 2 };
        assert!(t.push(p(0x1000)));
        assert!(t.push(p(0x1000)));
        assert!(t.push(p(0x2000)));
        assert_eq!(t.apply(&mem), 1);
        assert_eq!(t.refused(Refusal::Changed), 1, "0x2000 held other bytes");
        let mut now = [0u8; 5];
        mem.read_slice(&mut now, GuestAddress(0x1000)).unwrap();
        assert_eq!(now, [0xe8, 1, 2, 3, 4]);
        assert_eq!(t.sites().len(), 1);
        // Asked again (a second report before the first patch landed): refused, not redone.
        assert!(t.push(p(0x1000)));
        assert_eq!(t.apply(&mem), 0);
        t.reset();
        assert!(t.sites().is_empty());
    }
}
