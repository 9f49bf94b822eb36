//! The register set skiff shows gdb: x86-64's core and SSE registers (gdbstub_arch's
//! layout), then FS/GS base (gdb's `org.gnu.gdb.i386.segments` feature) and the
//! control registers and EFER in a system feature of skiff's own. The target
//! description lists them in that order, which is the `g` packet's order.

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

/// gdbstub's `Arch` for a skiff vCPU.
pub enum SkiffX86_64 {}

impl Arch for SkiffX86_64 {
    type Usize = u64;
    type Registers = GdbRegs;
    type RegId = gdbstub_arch::x86::reg::id::X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// Bytes of the core and SSE registers in the `g` packet (gdbstub_arch's layout).
const CORE_LEN: usize = 0x218;

/// The registers after the core ones, in the `g` packet's order.
const EXTRA: [&str; 8] = ["fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"];

/// The target description: gdb's x86-64 core and SSE registers by their standard
/// names, then the extras (64 bits each).
const TARGET_XML: &str = concat!(
    r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">"#,
    r#"<architecture>i386:x86-64</architecture>"#,
    r#"<feature name="org.gnu.gdb.i386.core">"#,
    r#"<reg name="rax" bitsize="64" type="int64"/><reg name="rbx" bitsize="64" type="int64"/>"#,
    r#"<reg name="rcx" bitsize="64" type="int64"/><reg name="rdx" bitsize="64" type="int64"/>"#,
    r#"<reg name="rsi" bitsize="64" type="int64"/><reg name="rdi" bitsize="64" type="int64"/>"#,
    r#"<reg name="rbp" bitsize="64" type="data_ptr"/><reg name="rsp" bitsize="64" type="data_ptr"/>"#,
    r#"<reg name="r8" bitsize="64" type="int64"/><reg name="r9" bitsize="64" type="int64"/>"#,
    r#"<reg name="r10" bitsize="64" type="int64"/><reg name="r11" bitsize="64" type="int64"/>"#,
    r#"<reg name="r12" bitsize="64" type="int64"/><reg name="r13" bitsize="64" type="int64"/>"#,
    r#"<reg name="r14" bitsize="64" type="int64"/><reg name="r15" bitsize="64" type="int64"/>"#,
    r#"<reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="int32"/>"#,
    r#"<reg name="cs" bitsize="32" type="int32"/><reg name="ss" bitsize="32" type="int32"/>"#,
    r#"<reg name="ds" bitsize="32" type="int32"/><reg name="es" bitsize="32" type="int32"/>"#,
    r#"<reg name="fs" bitsize="32" type="int32"/><reg name="gs" bitsize="32" type="int32"/>"#,
    r#"<reg name="st0" bitsize="80" type="i387_ext"/><reg name="st1" bitsize="80" type="i387_ext"/>"#,
    r#"<reg name="st2" bitsize="80" type="i387_ext"/><reg name="st3" bitsize="80" type="i387_ext"/>"#,
    r#"<reg name="st4" bitsize="80" type="i387_ext"/><reg name="st5" bitsize="80" type="i387_ext"/>"#,
    r#"<reg name="st6" bitsize="80" type="i387_ext"/><reg name="st7" bitsize="80" type="i387_ext"/>"#,
    r#"<reg name="fctrl" bitsize="32" type="int" group="float"/><reg name="fstat" bitsize="32" type="int" group="float"/>"#,
    r#"<reg name="ftag" bitsize="32" type="int" group="float"/><reg name="fiseg" bitsize="32" type="int" group="float"/>"#,
    r#"<reg name="fioff" bitsize="32" type="int" group="float"/><reg name="foseg" bitsize="32" type="int" group="float"/>"#,
    r#"<reg name="fooff" bitsize="32" type="int" group="float"/><reg name="fop" bitsize="32" type="int" group="float"/>"#,
    r#"</feature><feature name="org.gnu.gdb.i386.sse">"#,
    r#"<reg name="xmm0" bitsize="128" type="uint128"/><reg name="xmm1" bitsize="128" type="uint128"/>"#,
    r#"<reg name="xmm2" bitsize="128" type="uint128"/><reg name="xmm3" bitsize="128" type="uint128"/>"#,
    r#"<reg name="xmm4" bitsize="128" type="uint128"/><reg name="xmm5" bitsize="128" type="uint128"/>"#,
    r#"<reg name="xmm6" bitsize="128" type="uint128"/><reg name="xmm7" bitsize="128" type="uint128"/>"#,
    r#"<reg name="xmm8" bitsize="128" type="uint128"/><reg name="xmm9" bitsize="128" type="uint128"/>"#,
    r#"<reg name="xmm10" bitsize="128" type="uint128"/><reg name="xmm11" bitsize="128" type="uint128"/>"#,
    r#"<reg name="xmm12" bitsize="128" type="uint128"/><reg name="xmm13" bitsize="128" type="uint128"/>"#,
    r#"<reg name="xmm14" bitsize="128" type="uint128"/><reg name="xmm15" bitsize="128" type="uint128"/>"#,
    r#"<reg name="mxcsr" bitsize="32" type="int" group="vector"/>"#,
    r#"</feature><feature name="org.gnu.gdb.i386.segments">"#,
    r#"<reg name="fs_base" bitsize="64" type="int"/><reg name="gs_base" bitsize="64" type="int"/>"#,
    r#"</feature><feature name="org.skiff.gdb.x86.system">"#,
    r#"<reg name="cr0" bitsize="64" type="uint64" group="system"/><reg name="cr2" bitsize="64" type="uint64" group="system"/>"#,
    r#"<reg name="cr3" bitsize="64" type="uint64" group="system"/><reg name="cr4" bitsize="64" type="uint64" group="system"/>"#,
    r#"<reg name="cr8" bitsize="64" type="uint64" group="system"/><reg name="efer" bitsize="64" type="uint64" group="system"/>"#,
    r#"</feature></target>"#
);

/// Every register gdb sees.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GdbRegs {
    pub core: X86_64CoreRegs,
    /// In `EXTRA`'s order.
    pub extra: [u64; EXTRA.len()],
}

impl Registers for GdbRegs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for v in self.extra {
            for b in v.to_le_bytes() {
                write_byte(Some(b));
            }
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.core.gdb_deserialize(bytes.get(..CORE_LEN).ok_or(())?)?;
        // A client that sends fewer bytes leaves the rest as they are.
        let rest = bytes.get(CORE_LEN..).unwrap_or(&[]);
        for (v, chunk) in self.extra.iter_mut().zip(rest.chunks_exact(8)) {
            *v = u64::from_le_bytes(chunk.try_into().map_err(|_| ())?);
        }
        Ok(())
    }
}

/// gdb's view of a vCPU's KVM state.
pub fn from_kvm(r: &kvm_regs, s: &kvm_sregs, f: &kvm_fpu) -> GdbRegs {
    let mut g = GdbRegs::default();
    let c = &mut g.core;
    c.regs = [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15];
    c.rip = r.rip;
    c.eflags = r.rflags as u32;
    c.segments.cs = s.cs.selector.into();
    c.segments.ss = s.ss.selector.into();
    c.segments.ds = s.ds.selector.into();
    c.segments.es = s.es.selector.into();
    c.segments.fs = s.fs.selector.into();
    c.segments.gs = s.gs.selector.into();
    for (st, fpr) in c.st.iter_mut().zip(f.fpr.iter()) {
        for (d, b) in st.iter_mut().zip(fpr.iter()) {
            *d = *b;
        }
    }
    c.fpu.fctrl = f.fcw.into();
    c.fpu.fstat = f.fsw.into();
    c.fpu.ftag = f.ftwx.into();
    c.fpu.fioff = f.last_ip as u32;
    c.fpu.fooff = f.last_dp as u32;
    c.fpu.fop = f.last_opcode.into();
    for (x, b) in c.xmm.iter_mut().zip(f.xmm.iter()) {
        *x = u128::from_le_bytes(*b);
    }
    c.mxcsr = f.mxcsr;
    g.extra = [s.fs.base, s.gs.base, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer];
    g
}

/// Puts what gdb wrote into the vCPU's registers: the general registers, RIP and
/// RFLAGS' low 32 bits, FS/GS base, CR0/2/3/4/8 and EFER. Segment selectors (their
/// descriptors are not reloaded) and x87/SSE state are not written.
pub fn to_kvm(g: &GdbRegs, r: &mut kvm_regs, s: &mut kvm_sregs) {
    let [rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15] = g.core.regs;
    *r = kvm_regs { rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15, rip: g.core.rip, rflags: r.rflags };
    r.rflags = (r.rflags & !0xffff_ffff) | u64::from(g.core.eflags);
    let [fs_base, gs_base, cr0, cr2, cr3, cr4, cr8, efer] = g.extra;
    s.fs.base = fs_base;
    s.gs.base = gs_base;
    s.cr0 = cr0;
    s.cr2 = cr2;
    s.cr3 = cr3;
    s.cr4 = cr4;
    s.cr8 = cr8;
    s.efer = efer;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_lists_every_register_of_the_g_packet() {
        // 16 + rip + eflags + 6 selectors + 8 st + 8 fpu + 16 xmm + mxcsr + the extras.
        assert_eq!(TARGET_XML.matches("<reg ").count(), 57 + EXTRA.len());
        for name in EXTRA {
            assert!(TARGET_XML.contains(&format!("name=\"{name}\"")), "{name}");
        }
    }

    #[test]
    fn registers_round_trip_through_the_g_packet() {
        let r = kvm_regs { rax: 1, r15: 15, rip: 0xffff_ffff_8100_0000, rflags: 0x246, ..Default::default() };
        let mut s = kvm_sregs { cr0: 0x8005_0033, cr3: 0x1000, efer: 0xd01, ..Default::default() };
        s.fs.base = 0x7f00;
        s.cs.selector = 0x10;
        let g = from_kvm(&r, &s, &kvm_fpu::default());
        let mut bytes = Vec::new();
        g.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        assert_eq!(bytes.len(), CORE_LEN + 8 * EXTRA.len());
        let mut back = GdbRegs::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, g);
        let (mut r2, mut s2) = (kvm_regs { rflags: 0x1_0000_0002, ..Default::default() }, kvm_sregs::default());
        to_kvm(&back, &mut r2, &mut s2);
        assert_eq!((r2.rax, r2.r15, r2.rip, r2.rflags), (1, 15, r.rip, 0x1_0000_0246));
        assert_eq!((s2.cr0, s2.cr3, s2.efer, s2.fs.base), (s.cr0, s.cr3, s.efer, 0x7f00));
        // Short or empty packets are refused or leave the extras alone, never panic.
        assert!(back.gdb_deserialize(&bytes[..100]).is_err());
        assert!(back.gdb_deserialize(&bytes[..CORE_LEN + 3]).is_ok());
    }
}
