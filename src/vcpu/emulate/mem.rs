//! Memory operands: a guest-virtual range translated page by page through the
//! guest's own tables (x86/paging.rs) into pieces of RAM or MMIO, and the faults a
//! translation raises, as hardware raises them:
//! - a present mapping never page-faults for what it maps: a page outside RAM is
//!   MMIO, reached through the bus (nothing there: reads all ones, writes dropped);
//! - not present: #PF with P=0; forbidden by the tables: #PF with P=1, and RSVD
//!   (reserved bits) or PK (protection keys) where those decided it;
//! - a non-canonical address: #GP(0), or #SS(0) through the stack segment.
//!
//! An operand may cross pages; each page is translated on its own.

use vm_memory::{Bytes, GuestAddress};

use super::{Cx, EmuCpu, VEC_PF, VEC_SS};
use crate::x86::paging::{self, Access, FailReason, Translation};

/// Longest operand emulated (the XSAVE area is the longest, under 4 KiB here).
pub const MAX_OPERAND: usize = 16 << 10;
/// Pages a MAX_OPERAND range can touch.
const MAX_PIECES: usize = MAX_OPERAND / 4096 + 1;

// Page-fault error code bits (SDM vol. 3, 4.7).
const PF_P: u32 = 1 << 0;
const PF_W: u32 = 1 << 1;
const PF_U: u32 = 1 << 2;
const PF_RSVD: u32 = 1 << 3;
const PF_I: u32 = 1 << 4;
const PF_PK: u32 = 1 << 5;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    pub gpa: u64,
    pub len: usize,
    /// RAM (false: MMIO, through the bus).
    pub ram: bool,
}

/// A translated operand: its pieces in order. No allocation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Span {
    pieces: [Piece; MAX_PIECES],
    n: usize,
}

impl Span {
    pub fn pieces(&self) -> &[Piece] {
        self.pieces.get(..self.n).unwrap_or(&[])
    }

    /// The parts of `[offset, offset + len)` in each piece: (piece, offset into the
    /// piece, offset into the caller's buffer, length).
    fn parts(&self, offset: usize, len: usize) -> impl Iterator<Item = (Piece, usize, usize, usize)> + '_ {
        let mut start = 0usize;
        self.pieces().iter().filter_map(move |p| {
            let (p_start, p_end) = (start, start + p.len);
            start = p_end;
            let lo = offset.max(p_start);
            let hi = (offset + len).min(p_end);
            (lo < hi).then(|| (*p, lo - p_start, lo - offset, hi - lo))
        })
    }
}

/// The #PF error code for a translation that failed at `access` from `cpl`.
pub fn pf_error_code(t: &Translation, access: Access, cpl: u8) -> u32 {
    let mut code = match t {
        Translation::Retry { .. } => 0,
        Translation::Fail(FailReason::Reserved { .. } | FailReason::TableNotRam { .. }) => PF_P | PF_RSVD,
        Translation::Fail(FailReason::ProtectionKey(_)) => PF_P | PF_PK,
        _ => PF_P,
    };
    if access == Access::Write {
        code |= PF_W;
    }
    if access == Access::Execute {
        code |= PF_I;
    }
    if cpl == 3 {
        code |= PF_U;
    }
    code
}

impl<C: EmuCpu> Cx<'_, C> {
    /// Translates `len` bytes at `gva` for `access`. On a fault, injects what
    /// hardware raises and returns None.
    pub(super) fn span(&mut self, gva: u64, len: usize, access: Access) -> Result<Option<Span>, String> {
        if len > MAX_OPERAND {
            return Err(format!("emulated access of {len} bytes is larger than {MAX_OPERAND}"));
        }
        let ctx = self.paging()?;
        let mut span = Span::default();
        let mut done = 0usize;
        while done < len {
            let addr = gva.wrapping_add(done as u64);
            let n = ((0x1000 - (addr & 0xfff)) as usize).min(len - done);
            let piece = match paging::translate(self.cpu.mem(), &ctx, addr, access) {
                Translation::Ok(gpa) => Piece { gpa, len: n, ram: true },
                Translation::Fail(FailReason::NotRam { gpa, .. }) => Piece { gpa, len: n, ram: false },
                Translation::Fail(FailReason::NonCanonical(_)) => {
                    self.non_canonical()?;
                    return Ok(None);
                }
                t => {
                    self.page_fault(addr, &t, access)?;
                    return Ok(None);
                }
            };
            let slot = span.pieces.get_mut(span.n).ok_or("operand has too many pieces")?;
            *slot = piece;
            span.n += 1;
            done += n;
        }
        Ok(Some(span))
    }

    fn non_canonical(&mut self) -> Result<(), String> {
        if self.insn.insn.memory_segment() == iced_x86::Register::SS {
            self.fault(VEC_SS, Some(0), "non-canonical stack operand -> #SS")
        } else {
            self.gp("non-canonical operand -> #GP")
        }
    }

    pub(super) fn page_fault(&mut self, gva: u64, t: &Translation, access: Access) -> Result<(), String> {
        let code = pf_error_code(t, access, self.sregs.cs.dpl);
        self.sregs.cr2 = gva;
        self.cpu.set_sregs(&self.sregs)?;
        self.fault(VEC_PF, Some(code), "page fault on emulated access -> #PF")
    }

    /// Reads `out.len()` bytes at `offset` into the span.
    pub(super) fn read_span(&mut self, span: &Span, offset: usize, out: &mut [u8]) {
        for (p, p_off, o_off, n) in span.parts(offset, out.len()) {
            let Some(dst) = out.get_mut(o_off..o_off + n) else { continue };
            let gpa = p.gpa + p_off as u64;
            if !p.ram || self.cpu.mem().read_slice(dst, GuestAddress(gpa)).is_err() {
                self.mmio(gpa, MmioOp::Read(dst));
            }
        }
    }

    /// Writes `data` at `offset` into the span.
    pub(super) fn write_span(&mut self, span: &Span, offset: usize, data: &[u8]) {
        for (p, p_off, d_off, n) in span.parts(offset, data.len()) {
            let Some(src) = data.get(d_off..d_off + n) else { continue };
            let gpa = p.gpa + p_off as u64;
            if !p.ram || self.cpu.mem().write_slice(src, GuestAddress(gpa)).is_err() {
                self.mmio(gpa, MmioOp::Write(src));
            }
        }
    }

    /// An MMIO range as naturally aligned bus accesses of at most 8 bytes.
    fn mmio(&mut self, gpa: u64, op: MmioOp) {
        let len = match &op {
            MmioOp::Read(d) => d.len(),
            MmioOp::Write(d) => d.len(),
        };
        let mut op = op;
        let mut done = 0usize;
        while done < len {
            let addr = gpa + done as u64;
            let size = [8usize, 4, 2, 1].into_iter().find(|s| addr.is_multiple_of(*s as u64) && done + s <= len).unwrap_or(1);
            match &mut op {
                MmioOp::Read(d) => {
                    if let Some(chunk) = d.get_mut(done..done + size) {
                        self.cpu.mmio_read(addr, chunk);
                    }
                }
                MmioOp::Write(d) => {
                    if let Some(chunk) = d.get(done..done + size) {
                        self.cpu.mmio_write(addr, chunk);
                    }
                }
            }
            done += size;
        }
    }

    /// Reads a little-endian value of `size` (<= 8) bytes at `gva`; None after a fault.
    pub(super) fn read_value(&mut self, gva: u64, size: usize) -> Result<Option<u64>, String> {
        let Some(span) = self.span(gva, size.min(8), Access::Read)? else { return Ok(None) };
        let mut b = [0u8; 8];
        if let Some(dst) = b.get_mut(..size.min(8)) {
            self.read_span(&span, 0, dst);
        }
        Ok(Some(u64::from_le_bytes(b)))
    }
}

enum MmioOp<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        let retry = Translation::Retry { level: 1, entry: 0 };
        assert_eq!(pf_error_code(&retry, Access::Read, 0), 0);
        assert_eq!(pf_error_code(&retry, Access::Write, 3), PF_W | PF_U);
        assert_eq!(pf_error_code(&retry, Access::Execute, 0), PF_I);
        let wp = Translation::Fail(FailReason::WriteProtect { level: 1 });
        assert_eq!(pf_error_code(&wp, Access::Write, 0), PF_P | PF_W);
        let rsvd = Translation::Fail(FailReason::Reserved { level: 2, entry: 0 });
        assert_eq!(pf_error_code(&rsvd, Access::Read, 0), PF_P | PF_RSVD);
        let pk = Translation::Fail(FailReason::ProtectionKey(1));
        assert_eq!(pf_error_code(&pk, Access::Write, 3), PF_P | PF_W | PF_U | PF_PK);
    }

    #[test]
    fn parts_split_across_pieces() {
        let mut s = Span::default();
        s.pieces[0] = Piece { gpa: 0x9c00, len: 0x400, ram: true };
        s.pieces[1] = Piece { gpa: 0x6000, len: 0x1000, ram: false };
        s.pieces[2] = Piece { gpa: 0x3000, len: 0x400, ram: true };
        s.n = 3;
        let parts: Vec<_> = s.parts(0x3f0, 0x1020).map(|(p, po, bo, n)| (p.gpa + po as u64, bo, n)).collect();
        assert_eq!(parts, vec![(0x9ff0, 0, 0x10), (0x6000, 0x10, 0x1000), (0x3000, 0x1010, 0x10)]);
        assert_eq!(s.parts(0x1800, 4).count(), 0);
    }
}
