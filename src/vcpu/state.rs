//! The whole architectural state of a vCPU, and of the VM around it, each declared
//! ONCE (the `state_list!` invocations below). `get` and `put` are generated from
//! that one declaration, so what is saved is always what is restored (seed 004: QEMU
//! put MTRRs it never got). The declaration order is the order `put` runs in, which
//! KVM cares about; the reasons are written beside each entry.
//!
//! Snapshot, restore and in-place reset all go through these two types.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data, kvm_debugregs,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_sregs2,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};
use zerocopy::{FromBytes, IntoBytes};

const KVMIO: u32 = 0xae;
ioctl_ior_nr!(KVM_GET_SREGS2, KVMIO, 0xcc, kvm_sregs2);
ioctl_iow_nr!(KVM_SET_SREGS2, KVMIO, 0xcd, kvm_sregs2);

/// A failed get or put: which part, which ioctl, and the error.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {what}: {err}")]
pub struct StateError {
    pub part: &'static str,
    pub what: &'static str,
    pub err: kvm_ioctls::Error,
}

fn fail(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> (&'static str, kvm_ioctls::Error) {
    move |e| (what, e)
}

type PartResult<T> = Result<T, (&'static str, kvm_ioctls::Error)>;

/// One piece of state: how to read it from `C` and write it back.
pub trait Part<C>: Sized {
    fn get(ctx: &C) -> PartResult<Self>;
    fn put(&self, ctx: &C) -> PartResult<()>;
    /// The bytes that must round-trip exactly.
    fn bytes(&self) -> Vec<u8>;
    /// The inverse of `bytes` (a snapshot stores parts as bytes): refuses any length
    /// or content `bytes` cannot have produced, so what is read is what was saved.
    fn from_bytes(b: &[u8]) -> Result<Self, String>;
}

/// Why a list of saved parts is not a whole state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartsError {
    #[error("part {0} is missing")]
    Missing(&'static str),
    #[error("part {0} appears more than once")]
    Duplicate(&'static str),
    #[error("part {0:?} is not part of this skiff's state")]
    Unknown(String),
    #[error("part {part}: {reason}")]
    Bad { part: &'static str, reason: String },
}

/// A kvm struct from exactly its own size in bytes.
fn exact<T: FromBytes>(b: &[u8]) -> Result<T, String> {
    T::read_from_bytes(b).map_err(|_| format!("{} bytes, expected {}", b.len(), std::mem::size_of::<T>()))
}

/// Declares a state type: its fields in `put` order, and `get`/`put`/`diff` derived
/// from that one list.
macro_rules! state_list {
    ($(#[$m:meta])* pub struct $name:ident for $ctx:ty { $( $(#[$fm:meta])* $field:ident : $ty:ty, )* }) => {
        $(#[$m])*
        #[derive(Clone)]
        pub struct $name { $( $(#[$fm])* pub $field: $ty, )* }

        impl $name {
            /// The parts, in the order `put` writes them.
            pub const PARTS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Reads every part (in declaration order).
            pub fn get(ctx: &$ctx) -> Result<Self, StateError> {
                Ok(Self { $( $field: <$ty as Part<$ctx>>::get(ctx)
                    .map_err(|(what, err)| StateError { part: stringify!($field), what, err })?, )* })
            }

            /// Writes every part, in declaration order.
            pub fn put(&self, ctx: &$ctx) -> Result<(), StateError> {
                $( <$ty as Part<$ctx>>::put(&self.$field, ctx)
                    .map_err(|(what, err)| StateError { part: stringify!($field), what, err })?; )*
                Ok(())
            }

            /// Every part as (name, bytes), in declaration order: what a snapshot stores.
            pub fn to_parts(&self) -> Vec<(&'static str, Vec<u8>)> {
                vec![$( (stringify!($field), <$ty as Part<$ctx>>::bytes(&self.$field)), )*]
            }

            /// The inverse of `to_parts`, through the same list: every declared part
            /// exactly once and nothing else, so nothing saved goes unrestored.
            pub fn from_parts<N: AsRef<str>, B: AsRef<[u8]>>(parts: &[(N, B)]) -> Result<Self, PartsError> {
                if let Some((n, _)) = parts.iter().find(|(n, _)| !Self::PARTS.contains(&n.as_ref())) {
                    return Err(PartsError::Unknown(n.as_ref().chars().take(64).collect()));
                }
                let find = |name: &'static str| {
                    let mut it = parts.iter().filter(|(n, _)| n.as_ref() == name);
                    match (it.next(), it.next()) {
                        (Some((_, b)), None) => Ok(b.as_ref()),
                        (None, _) => Err(PartsError::Missing(name)),
                        (Some(_), Some(_)) => Err(PartsError::Duplicate(name)),
                    }
                };
                Ok(Self { $( $field: <$ty as Part<$ctx>>::from_bytes(find(stringify!($field))?)
                    .map_err(|reason| PartsError::Bad { part: stringify!($field), reason })?, )* })
            }

            /// The parts whose bytes differ from `other`'s, by name.
            pub fn diff(&self, other: &Self) -> Vec<&'static str> {
                let mut d = Vec::new();
                $( if <$ty as Part<$ctx>>::bytes(&self.$field) != <$ty as Part<$ctx>>::bytes(&other.$field) {
                    d.push(stringify!($field));
                } )*
                d
            }
        }
    };
}

/// What reading a vCPU's state needs beyond its fd: which MSRs make up the state
/// (vcpu/msr.rs) and which optional interfaces this KVM has.
pub struct VcpuCtx<'a> {
    pub fd: &'a VcpuFd,
    pub msrs: &'a [u32],
    /// KVM_CAP_XSAVE2's size in bytes (0: only the 4 KiB KVM_GET_XSAVE).
    pub xsave_size: usize,
    /// KVM_CAP_SREGS2: the PAE PDPTRs are part of the state.
    pub sregs2: bool,
    /// KVM_GET_TSC_KHZ works.
    pub tsc_khz: bool,
}

state_list! {
    /// One vCPU's architectural state.
    pub struct VcpuState for VcpuCtx<'_> {
        /// First: the TSC frequency scales how the TSC MSR below is written.
        tsc_khz: TscKhz,
        /// Control registers and EFER before anything whose meaning depends on the
        /// mode (MSRs gated by EFER, XSAVE gated by CR4.OSXSAVE).
        sregs: SpecialRegs,
        regs: kvm_regs,
        /// FPU/SSE/AVX... after CPUID (set at creation) and CR4, then XCR0.
        xsave: XsaveArea,
        xcrs: kvm_xcrs,
        debugregs: kvm_debugregs,
        /// Before the MSRs: TSC_DEADLINE only sticks in the LAPIC's deadline mode.
        lapic: kvm_lapic_state,
        msrs: MsrValues,
        mp_state: kvm_mp_state,
        /// Last: pending exceptions, NMIs and interrupt shadows; setting the LAPIC or
        /// MP state may otherwise disturb them.
        events: kvm_vcpu_events,
    }
}

state_list! {
    /// The VM-wide state outside the vCPUs: the in-kernel PICs, I/O APIC and PIT.
    /// (kvm-clock is kept apart: restoring it is a policy, see `VmClock`.)
    pub struct VmState for VmFd {
        pic_master: PicMaster,
        pic_slave: PicSlave,
        ioapic: IoApic,
        pit: kvm_pit_state2,
    }
}

// ---- vCPU parts ----

/// TSC frequency in kHz (0 when KVM cannot say; then it is neither read nor written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscKhz(pub u32);

impl Part<VcpuCtx<'_>> for TscKhz {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        if !c.tsc_khz {
            return Ok(TscKhz(0));
        }
        c.fd.get_tsc_khz().map(TscKhz).map_err(fail("KVM_GET_TSC_KHZ"))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        if self.0 == 0 || !c.tsc_khz {
            return Ok(());
        }
        // Writing the frequency KVM already runs at is a no-op; a different one needs
        // TSC scaling, and a refusal is a real error (the guest's clock would drift).
        match c.fd.get_tsc_khz() {
            Ok(now) if now == self.0 => Ok(()),
            _ => c.fd.set_tsc_khz(self.0).map_err(fail("KVM_SET_TSC_KHZ")),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact::<[u8; 4]>(b).map(|a| TscKhz(u32::from_le_bytes(a)))
    }
}

/// Segment, descriptor-table and control registers: `kvm_sregs2` where KVM has it
/// (it carries the PAE PDPTRs, which `kvm_sregs` loses), else `kvm_sregs`.
#[derive(Clone, Copy, Debug)]
pub enum SpecialRegs {
    V1(kvm_sregs),
    V2(kvm_sregs2),
}

impl SpecialRegs {
    /// The common view (interrupt bitmap empty for V2: pending interrupts live in the
    /// vCPU events there).
    pub fn as_sregs(&self) -> kvm_sregs {
        match self {
            SpecialRegs::V1(s) => *s,
            SpecialRegs::V2(s) => kvm_sregs {
                cs: s.cs,
                ds: s.ds,
                es: s.es,
                fs: s.fs,
                gs: s.gs,
                ss: s.ss,
                tr: s.tr,
                ldt: s.ldt,
                gdt: s.gdt,
                idt: s.idt,
                cr0: s.cr0,
                cr2: s.cr2,
                cr3: s.cr3,
                cr4: s.cr4,
                cr8: s.cr8,
                efer: s.efer,
                apic_base: s.apic_base,
                ..Default::default()
            },
        }
    }

    /// Replaces the common registers, keeping the variant (and, for V2, dropping
    /// the PDPTRs so KVM reloads them from CR3, as a mode change would).
    pub fn set_from(&mut self, n: &kvm_sregs) {
        match self {
            SpecialRegs::V1(s) => *s = *n,
            SpecialRegs::V2(s) => {
                *s = kvm_sregs2 {
                    cs: n.cs,
                    ds: n.ds,
                    es: n.es,
                    fs: n.fs,
                    gs: n.gs,
                    ss: n.ss,
                    tr: n.tr,
                    ldt: n.ldt,
                    gdt: n.gdt,
                    idt: n.idt,
                    cr0: n.cr0,
                    cr2: n.cr2,
                    cr3: n.cr3,
                    cr4: n.cr4,
                    cr8: n.cr8,
                    efer: n.efer,
                    apic_base: n.apic_base,
                    flags: 0,
                    pdptrs: [0; 4],
                }
            }
        }
    }
}

impl Part<VcpuCtx<'_>> for SpecialRegs {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        if c.sregs2 {
            let mut s = kvm_sregs2::default();
            // SAFETY: KVM_GET_SREGS2 writes one kvm_sregs2, which `s` is; the fd is a vCPU.
            let ret = unsafe { ioctl_with_mut_ref(c.fd, KVM_GET_SREGS2(), &mut s) };
            if ret != 0 {
                return Err(("KVM_GET_SREGS2", kvm_ioctls::Error::last()));
            }
            Ok(SpecialRegs::V2(s))
        } else {
            c.fd.get_sregs().map(SpecialRegs::V1).map_err(fail("KVM_GET_SREGS"))
        }
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        match self {
            SpecialRegs::V1(s) => c.fd.set_sregs(s).map_err(fail("KVM_SET_SREGS")),
            SpecialRegs::V2(s) => {
                // SAFETY: KVM_SET_SREGS2 reads one kvm_sregs2 from `s`; the fd is a vCPU.
                let ret = unsafe { ioctl_with_ref(c.fd, KVM_SET_SREGS2(), s) };
                if ret != 0 {
                    return Err(("KVM_SET_SREGS2", kvm_ioctls::Error::last()));
                }
                Ok(())
            }
        }
    }
    fn bytes(&self) -> Vec<u8> {
        match self {
            SpecialRegs::V1(s) => s.as_bytes().to_vec(),
            // kvm_sregs2 has no padding (all u64 and packed segments), but is not
            // IntoBytes in kvm-bindings: its fields are compared through the common
            // view plus flags and PDPTRs.
            SpecialRegs::V2(s) => {
                let mut b = self.as_sregs().as_bytes().to_vec();
                b.extend(s.flags.to_le_bytes());
                for p in s.pdptrs {
                    b.extend(p.to_le_bytes());
                }
                b
            }
        }
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        // The two layouts `bytes` writes differ in length: kvm_sregs alone, or the
        // common view followed by flags and the four PDPTRs.
        let common = std::mem::size_of::<kvm_sregs>();
        if b.len() == common {
            return exact(b).map(SpecialRegs::V1);
        }
        let (head, tail) = b.split_at_checked(common).ok_or_else(|| format!("{} bytes, expected {common} or {}", b.len(), common + 40))?;
        let tail: [u64; 5] = exact(tail).map_err(|_| format!("{} bytes, expected {common} or {}", b.len(), common + 40))?;
        let n: kvm_sregs = exact(head)?;
        if n.interrupt_bitmap != [0; 4] {
            return Err("an sregs2 state with an interrupt bitmap".into());
        }
        let [flags, p0, p1, p2, p3] = tail.map(u64::from_le);
        let mut s = SpecialRegs::V2(kvm_sregs2::default());
        s.set_from(&n);
        if let SpecialRegs::V2(v2) = &mut s {
            v2.flags = flags;
            v2.pdptrs = [p0, p1, p2, p3];
        }
        Ok(s)
    }
}

impl Part<VcpuCtx<'_>> for kvm_regs {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        c.fd.get_regs().map_err(fail("KVM_GET_REGS"))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        c.fd.set_regs(self).map_err(fail("KVM_SET_REGS"))
    }
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact(b)
    }
}

/// The XSAVE area in KVM's format: 4 KiB from KVM_GET_XSAVE, or the larger area of
/// KVM_GET_XSAVE2 (AMX and other big components).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XsaveArea(pub Vec<u32>);

impl XsaveArea {
    /// The legacy x87/SSE region's first bytes: FCW, FSW, abridged FTW, ... MXCSR at 24.
    pub fn fcw(&self) -> u16 {
        self.0.first().map_or(0, |w| *w as u16)
    }
    pub fn set_fcw(&mut self, v: u16) {
        if let Some(w) = self.0.first_mut() {
            *w = (*w & 0xffff_0000) | v as u32;
        }
    }
    pub fn mxcsr(&self) -> u32 {
        self.0.get(6).copied().unwrap_or(0)
    }
    pub fn set_mxcsr(&mut self, v: u32) {
        if let Some(w) = self.0.get_mut(6) {
            *w = v;
        }
    }
}

impl Part<VcpuCtx<'_>> for XsaveArea {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        let legacy_words = std::mem::size_of::<kvm_xsave>() / 4;
        if c.xsave_size > std::mem::size_of::<kvm_xsave>() {
            let extra = (c.xsave_size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
            let mut x = kvm_bindings::Xsave::new(extra).map_err(|_| ("allocating XSAVE2", kvm_ioctls::Error::new(libc::ENOMEM)))?;
            // SAFETY: `x` was allocated with room for the whole XSAVE2 area KVM reported.
            unsafe { c.fd.get_xsave2(&mut x) }.map_err(fail("KVM_GET_XSAVE2"))?;
            let fam = x.as_fam_struct_ref();
            let mut v = fam.xsave.region.to_vec();
            v.extend_from_slice(x.as_slice());
            Ok(XsaveArea(v))
        } else {
            let x = c.fd.get_xsave().map_err(fail("KVM_GET_XSAVE"))?;
            debug_assert_eq!(x.region.len(), legacy_words);
            Ok(XsaveArea(x.region.to_vec()))
        }
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        let legacy_words = std::mem::size_of::<kvm_xsave>() / 4;
        let mut base = kvm_xsave::default();
        for (d, s) in base.region.iter_mut().zip(&self.0) {
            *d = *s;
        }
        if self.0.len() > legacy_words {
            let tail = self.0.get(legacy_words..).unwrap_or(&[]);
            let mut x = kvm_bindings::Xsave::new(tail.len()).map_err(|_| ("allocating XSAVE2", kvm_ioctls::Error::new(libc::ENOMEM)))?;
            // SAFETY: we only write the fixed header of the FAM struct, within bounds.
            unsafe { x.as_mut_fam_struct() }.xsave = base;
            x.as_mut_slice().copy_from_slice(tail);
            // SAFETY: `x` holds the whole area KVM_GET_XSAVE2 gave (same size).
            unsafe { c.fd.set_xsave2(&x) }.map_err(fail("KVM_SET_XSAVE2"))
        } else {
            // SAFETY: `base` is a whole kvm_xsave; the vCPU's XSAVE size is 4 KiB here.
            unsafe { c.fd.set_xsave(&base) }.map_err(fail("KVM_SET_XSAVE"))
        }
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        // At least the legacy 4 KiB area: a shorter one would be put as zeroes.
        if !b.len().is_multiple_of(4) || b.len() < std::mem::size_of::<kvm_xsave>() {
            return Err(format!("{} bytes: not a whole XSAVE area", b.len()));
        }
        Ok(XsaveArea(b.chunks_exact(4).map(|c| c.iter().rev().fold(0u32, |v, x| v << 8 | *x as u32)).collect()))
    }
}

impl Part<VcpuCtx<'_>> for kvm_xcrs {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        c.fd.get_xcrs().map_err(fail("KVM_GET_XCRS"))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        c.fd.set_xcrs(self).map_err(fail("KVM_SET_XCRS"))
    }
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact(b)
    }
}

impl Part<VcpuCtx<'_>> for kvm_debugregs {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        c.fd.get_debug_regs().map_err(fail("KVM_GET_DEBUGREGS"))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        c.fd.set_debug_regs(self).map_err(fail("KVM_SET_DEBUGREGS"))
    }
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact(b)
    }
}

impl Part<VcpuCtx<'_>> for kvm_lapic_state {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        c.fd.get_lapic().map_err(fail("KVM_GET_LAPIC"))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        c.fd.set_lapic(self).map_err(fail("KVM_SET_LAPIC"))
    }
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact(b)
    }
}

/// The values of the machine's saved MSRs (vcpu/msr.rs decides which).
#[derive(Clone, Debug, Default)]
pub struct MsrValues(pub Vec<kvm_msr_entry>);

impl MsrValues {
    pub fn get_value(&self, index: u32) -> Option<u64> {
        self.0.iter().find(|e| e.index == index).map(|e| e.data)
    }
    /// Sets `index` if it is part of the state (MSRs this KVM refused are absent).
    pub fn set_value(&mut self, index: u32, data: u64) {
        if let Some(e) = self.0.iter_mut().find(|e| e.index == index) {
            e.data = data;
        }
    }
}

impl Part<VcpuCtx<'_>> for MsrValues {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        let entries: Vec<kvm_msr_entry> =
            c.msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| ("building the MSR list", kvm_ioctls::Error::new(libc::E2BIG)))?;
        let n = c.fd.get_msrs(&mut msrs).map_err(fail("KVM_GET_MSRS"))?;
        if n != entries.len() {
            // KVM stops at the first MSR it refuses: name it.
            let index = entries.get(n).map_or(0, |e| e.index);
            return Err(("KVM_GET_MSRS refused an MSR of the saved set", kvm_ioctls::Error::new(libc::EINVAL)))
                .inspect_err(|_| crate::output::stderr(&format!("skiff: KVM_GET_MSRS stopped at MSR {index:#x}\n")));
        }
        Ok(MsrValues(msrs.as_slice().to_vec()))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        let msrs = Msrs::from_entries(&self.0).map_err(|_| ("building the MSR list", kvm_ioctls::Error::new(libc::E2BIG)))?;
        let n = c.fd.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
        if n != self.0.len() {
            let index = self.0.get(n).map_or(0, |e| e.index);
            crate::output::stderr(&format!("skiff: KVM_SET_MSRS stopped at MSR {index:#x}\n"));
            return Err(("KVM_SET_MSRS refused an MSR of the saved set", kvm_ioctls::Error::new(libc::EINVAL)));
        }
        Ok(())
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        let size = std::mem::size_of::<kvm_msr_entry>();
        if !b.len().is_multiple_of(size) {
            return Err(format!("{} bytes: not whole MSR entries", b.len()));
        }
        b.chunks_exact(size).map(exact).collect::<Result<_, _>>().map(MsrValues)
    }
}

impl Part<VcpuCtx<'_>> for kvm_mp_state {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        c.fd.get_mp_state().map_err(fail("KVM_GET_MP_STATE"))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        c.fd.set_mp_state(*self).map_err(fail("KVM_SET_MP_STATE"))
    }
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact(b)
    }
}

impl Part<VcpuCtx<'_>> for kvm_vcpu_events {
    fn get(c: &VcpuCtx) -> PartResult<Self> {
        c.fd.get_vcpu_events().map_err(fail("KVM_GET_VCPU_EVENTS"))
    }
    fn put(&self, c: &VcpuCtx) -> PartResult<()> {
        c.fd.set_vcpu_events(self).map_err(fail("KVM_SET_VCPU_EVENTS"))
    }
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact(b)
    }
}

// ---- VM parts ----

macro_rules! irqchip_part {
    ($name:ident, $id:expr, $what:literal) => {
        #[doc = concat!("The in-kernel ", $what, ".")]
        #[derive(Clone)]
        pub struct $name(pub kvm_irqchip);

        impl Part<VmFd> for $name {
            fn get(vm: &VmFd) -> PartResult<Self> {
                let mut chip = kvm_irqchip { chip_id: $id, ..Default::default() };
                vm.get_irqchip(&mut chip).map_err(fail("KVM_GET_IRQCHIP"))?;
                Ok($name(chip))
            }
            fn put(&self, vm: &VmFd) -> PartResult<()> {
                vm.set_irqchip(&self.0).map_err(fail("KVM_SET_IRQCHIP"))
            }
            fn bytes(&self) -> Vec<u8> {
                self.0.as_bytes().to_vec()
            }
            fn from_bytes(b: &[u8]) -> Result<Self, String> {
                let chip: kvm_irqchip = exact(b)?;
                // Another chip's state in this one's place would be put into the wrong chip.
                if chip.chip_id != $id {
                    return Err(format!("chip id {}, expected {}", chip.chip_id, $id));
                }
                Ok($name(chip))
            }
        }
    };
}

irqchip_part!(PicMaster, KVM_IRQCHIP_PIC_MASTER, "master 8259 PIC");
irqchip_part!(PicSlave, KVM_IRQCHIP_PIC_SLAVE, "slave 8259 PIC");
irqchip_part!(IoApic, KVM_IRQCHIP_IOAPIC, "I/O APIC");

impl Part<VmFd> for kvm_pit_state2 {
    fn get(vm: &VmFd) -> PartResult<Self> {
        vm.get_pit2().map_err(fail("KVM_GET_PIT2"))
    }
    fn put(&self, vm: &VmFd) -> PartResult<()> {
        vm.set_pit2(self).map_err(fail("KVM_SET_PIT2"))
    }
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Result<Self, String> {
        exact(b)
    }
}

/// kvm-clock's VM-wide value. Not part of `VmState`'s put: an in-place reset keeps
/// the clock running (guest time must not jump back), while a restore sets it.
#[derive(Clone, Copy)]
pub struct VmClock(pub kvm_clock_data);

impl VmClock {
    pub fn get(vm: &VmFd) -> Result<Self, StateError> {
        vm.get_clock().map(VmClock).map_err(|err| StateError { part: "clock", what: "KVM_GET_CLOCK", err })
    }
    pub fn put(&self, vm: &VmFd) -> Result<(), StateError> {
        // Only the clock value is settable; the flags KVM returned describe it.
        let data = kvm_clock_data { clock: self.0.clock, ..Default::default() };
        vm.set_clock(&data).map_err(|err| StateError { part: "clock", what: "KVM_SET_CLOCK", err })
    }
}

/// Byte offsets of LAPIC registers in `kvm_lapic_state.regs` (SDM table 11-1).
pub mod apic_reg {
    pub const ID: usize = 0x20;
    pub const VERSION: usize = 0x30;
    pub const TPR: usize = 0x80;
    pub const LDR: usize = 0xd0;
    pub const DFR: usize = 0xe0;
    pub const SVR: usize = 0xf0;
    pub const ISR: usize = 0x100;
    pub const TMR: usize = 0x180;
    pub const IRR: usize = 0x200;
    pub const ESR: usize = 0x280;
    pub const LVT_CMCI: usize = 0x2f0;
    pub const ICR_LOW: usize = 0x300;
    pub const ICR_HIGH: usize = 0x310;
    pub const LVT_TIMER: usize = 0x320;
    pub const LVT_THERMAL: usize = 0x330;
    pub const LVT_PERF: usize = 0x340;
    pub const LVT0: usize = 0x350;
    pub const LVT1: usize = 0x360;
    pub const LVT_ERROR: usize = 0x370;
    pub const TIMER_INITIAL: usize = 0x380;
    /// The timer's current count: volatile (it counts down while you look).
    pub const TIMER_CURRENT: usize = 0x390;
    pub const TIMER_DIVIDE: usize = 0x3e0;
}

/// Reads a 32-bit LAPIC register.
pub fn lapic_get(l: &kvm_lapic_state, off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = l.regs.get(off + i).map_or(0, |c| *c as u8);
    }
    u32::from_le_bytes(b)
}

/// Writes a 32-bit LAPIC register.
pub fn lapic_set(l: &mut kvm_lapic_state, off: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        if let Some(r) = l.regs.get_mut(off + i) {
            *r = *byte as std::os::raw::c_char;
        }
    }
}

/// Real-shaped states for tests that need no /dev/kvm: default kvm structs with
/// values that differ per `seed`, so a mixed-up part or vCPU shows.
#[cfg(test)]
pub(crate) mod samples {
    use super::*;

    pub fn vcpu(seed: u8) -> VcpuState {
        let s = seed as u64;
        let mut lapic = kvm_lapic_state::default();
        lapic_set(&mut lapic, apic_reg::ID, (seed as u32) << 24);
        lapic_set(&mut lapic, apic_reg::SVR, 0x1ff);
        let mut xsave = vec![0u32; std::mem::size_of::<kvm_xsave>() / 4 + 704];
        for (i, w) in xsave.iter_mut().enumerate() {
            *w = (i as u32).wrapping_mul(0x9e37_79b9) ^ seed as u32;
        }
        VcpuState {
            tsc_khz: TscKhz(2_100_000 + seed as u32),
            sregs: SpecialRegs::V2(kvm_sregs2 { cr0: 0x8005_0033, cr3: 0x1000 * (s + 1), cr4: 0x3706f0, efer: 0xd01, flags: 1, pdptrs: [s, 2, 3, 4], ..Default::default() }),
            regs: kvm_regs { rip: 0xffff_ffff_8100_0000 + s, rsp: 0x7fff_0000, rflags: 0x246, rax: s, ..Default::default() },
            xsave: XsaveArea(xsave),
            xcrs: kvm_xcrs { nr_xcrs: 1, ..Default::default() },
            debugregs: kvm_debugregs { dr6: 0xffff0ff0, dr7: 0x400, ..Default::default() },
            lapic,
            msrs: MsrValues((0..40).map(|i| kvm_msr_entry { index: 0xc000_0080 + i, data: s << 32 | i as u64, ..Default::default() }).collect()),
            mp_state: kvm_mp_state { mp_state: seed as u32 % 2 },
            events: kvm_vcpu_events { flags: 4, ..Default::default() },
        }
    }

    pub fn vm() -> VmState {
        let chip = |chip_id| kvm_irqchip { chip_id, ..Default::default() };
        VmState {
            pic_master: PicMaster(chip(KVM_IRQCHIP_PIC_MASTER)),
            pic_slave: PicSlave(chip(KVM_IRQCHIP_PIC_SLAVE)),
            ioapic: IoApic(chip(KVM_IRQCHIP_IOAPIC)),
            pit: kvm_pit_state2 { flags: 1, ..Default::default() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_through_the_one_list() {
        for seed in 0..3 {
            let v = samples::vcpu(seed);
            let parts = v.to_parts();
            assert_eq!(parts.iter().map(|p| p.0).collect::<Vec<_>>(), VcpuState::PARTS);
            let back = VcpuState::from_parts(&parts).unwrap();
            assert!(v.diff(&back).is_empty(), "{:?}", v.diff(&back));
            assert!(!v.diff(&samples::vcpu(seed + 1)).is_empty());
        }
        let mut v1 = samples::vcpu(0);
        v1.sregs = SpecialRegs::V1(kvm_sregs { cr3: 0x5000, interrupt_bitmap: [1, 0, 0, 0], ..Default::default() });
        assert!(v1.diff(&VcpuState::from_parts(&v1.to_parts()).unwrap()).is_empty());
        let vm = samples::vm();
        assert!(vm.diff(&VmState::from_parts(&vm.to_parts()).unwrap()).is_empty());
    }

    #[test]
    fn parts_missing_extra_or_malformed_are_refused() {
        let parts = samples::vcpu(1).to_parts();
        let mut p = parts.clone();
        p.remove(3);
        assert_eq!(VcpuState::from_parts(&p).err(), Some(PartsError::Missing("xsave")));
        let mut p = parts.clone();
        p.push(("regs", vec![0; 8]));
        assert_eq!(VcpuState::from_parts(&p).err(), Some(PartsError::Duplicate("regs")));
        let mut p: Vec<(String, Vec<u8>)> = parts.iter().map(|(n, b)| (n.to_string(), b.clone())).collect();
        p.push(("mtrr".into(), vec![]));
        assert_eq!(VcpuState::from_parts(&p).err(), Some(PartsError::Unknown("mtrr".into())));
        for (i, name) in VcpuState::PARTS.iter().enumerate() {
            let mut p = parts.clone();
            let len = p[i].1.len();
            p[i].1.truncate(len.saturating_sub(3));
            assert!(matches!(VcpuState::from_parts(&p), Err(PartsError::Bad { part, .. }) if part == *name), "{name}");
        }
        // Another chip's state in the master PIC's place.
        let vm = samples::vm().to_parts();
        let swapped = [("pic_master", vm[1].1.clone()), ("pic_slave", vm[0].1.clone()), vm[2].clone(), vm[3].clone()];
        assert!(matches!(VmState::from_parts(&swapped), Err(PartsError::Bad { part: "pic_master", .. })));
    }

    #[test]
    fn put_order_is_the_documented_one() {
        assert_eq!(
            VcpuState::PARTS,
            &["tsc_khz", "sregs", "regs", "xsave", "xcrs", "debugregs", "lapic", "msrs", "mp_state", "events"]
        );
        assert_eq!(VmState::PARTS, &["pic_master", "pic_slave", "ioapic", "pit"]);
    }

    #[test]
    fn lapic_register_access() {
        let mut l = kvm_lapic_state::default();
        lapic_set(&mut l, apic_reg::SVR, 0x1ff);
        assert_eq!(lapic_get(&l, apic_reg::SVR), 0x1ff);
        assert_eq!(lapic_get(&l, apic_reg::TPR), 0);
        // Out of range reads give 0 and writes are dropped: no panic.
        lapic_set(&mut l, 1022, 0xffff_ffff);
        assert_eq!(lapic_get(&l, 1022), 0xffff);
    }

    #[test]
    fn sregs2_view_keeps_the_common_registers() {
        let mut s = SpecialRegs::V2(kvm_sregs2 { cr3: 0x1000, pdptrs: [1, 2, 3, 4], flags: 1, ..Default::default() });
        let mut common = s.as_sregs();
        assert_eq!(common.cr3, 0x1000);
        common.cr0 = 0x6000_0010;
        s.set_from(&common);
        let SpecialRegs::V2(v2) = s else { unreachable!() };
        assert_eq!((v2.cr0, v2.cr3, v2.flags, v2.pdptrs), (0x6000_0010, 0x1000, 0, [0; 4]));
    }
}
