//! A TPR-access report, on the vCPU that made it: find the instruction, check that it
//! really is a TPR access, and queue its rewrite for the event loop.
//!
//! Nothing in a report is trusted. Where guest kernel mode runs through KVM's
//! emulator (this project's PVM hosts), reports arrive hundreds of instructions late,
//! several merge into one, and one can carry another exit's RIP; elsewhere a write may
//! be reported with RIP already past it. So: the bytes at RIP must be one of the six
//! forms, or, for a write, one of the three write forms must end exactly at RIP (the
//! look-back rule); its address, through DS and the guest's own page tables, must be
//! the TPR of this vCPU's APIC page (IA32_APIC_BASE); ESP must not be 0 (the patched
//! code pushes); the site must lie in one page; and the helper's three pages must be
//! mapped contiguously where the site can call them. The event loop then writes the
//! new bytes only if the old ones are still there.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryMmap;

use super::decode::{self, TprAccess};
use super::{HELPER_GPA, Refusal, SitePatch, TPR_OFFSET, VAPIC_GPA};
use crate::x86::insn::bitness;
use crate::x86::paging::{self, Access, FailReason, PagingContext, Segment, Translation, linear_address};

/// The physical address a linear one reaches (RAM or not: the APIC page is MMIO).
fn phys(mem: &GuestMemoryMmap, ctx: &PagingContext, lin: u64, access: Access) -> Option<u64> {
    match paging::translate(mem, ctx, lin, access) {
        Translation::Ok(gpa) | Translation::Fail(FailReason::NotRam { gpa, .. }) => Some(gpa),
        _ => None,
    }
}

/// Reads `buf.len()` bytes of code at linear `lin` (execute access; RAM only).
fn read_code(mem: &GuestMemoryMmap, ctx: &PagingContext, lin: u64, buf: &mut [u8]) -> bool {
    use crate::x86::paging::PhysMem;
    let mut ok = true;
    let r = paging::for_each_piece(mem, ctx, lin, buf.len(), Access::Execute, |gpa, done, n| {
        ok &= buf.get_mut(done..done + n).is_some_and(|dst| mem.read_bytes(gpa, dst));
    });
    ok && r.is_ok()
}

/// The access at EIP `rip` (or, for a write, ending there): its form, the EIP where it
/// starts, and its bytes.
fn find_access(mem: &GuestMemoryMmap, ctx: &PagingContext, cs: &Segment, rip: u32, is_write: bool) -> Option<(TprAccess, u32)> {
    let lin = linear_address(cs, u64::from(rip), 1, 32).ok()?;
    // At RIP: up to 10 bytes (the longest form), fewer at the end of what is mapped.
    for want in [10usize, 6, 5] {
        let mut b = [0u8; 10];
        let Some(buf) = b.get_mut(..want) else { continue };
        if read_code(mem, ctx, lin, buf) {
            if let Some(a) = decode::match_form(buf) {
                return Some((a, rip));
            }
            break;
        }
    }
    if !is_write {
        return None;
    }
    // Look back: a write reported with RIP past it.
    for len in [5u32, 6, 10] {
        let start = rip.wrapping_sub(len);
        let Ok(lin) = linear_address(cs, u64::from(start), u64::from(len), 32) else { continue };
        let mut b = [0u8; 10];
        let Some(buf) = b.get_mut(..len as usize) else { continue };
        if read_code(mem, ctx, lin, buf)
            && let Some((a, l)) = decode::match_write_ending(buf)
            && l == len as usize
        {
            return Some((a, start));
        }
    }
    None
}

/// Where the guest can call the helper from this site: a linear address whose next
/// three pages are the helper's code (executable), the vAPIC slots (writable) and the
/// hypercall page (executable), as the helper expects. Tried: the identity mapping
/// (paging off, or low memory mapped 1:1), and the physical address at the site's
/// 256 MiB-aligned base (kernels that map low memory at 0xc0000000 or 0x80000000).
fn helper_linear(mem: &GuestMemoryMmap, ctx: &PagingContext, site_lin: u64) -> Option<u64> {
    let candidates = [HELPER_GPA, (site_lin & 0xf000_0000) + HELPER_GPA];
    candidates.into_iter().find(|&h| {
        phys(mem, ctx, h, Access::Execute) == Some(HELPER_GPA)
            && phys(mem, ctx, h + 0x1000, Access::Write) == Some(VAPIC_GPA)
            && phys(mem, ctx, h + 0x2000, Access::Execute) == Some(crate::hypercall::PAGE_GPA)
    })
}

/// Checks a report and, when it names a real TPR access, returns its rewrite.
pub fn examine(mem: &GuestMemoryMmap, regs: &kvm_regs, sregs: &kvm_sregs, rip: u64, is_write: bool) -> Result<SitePatch, Refusal> {
    if bitness(sregs) != 32 {
        return Err(Refusal::NotCode32);
    }
    let ctx = PagingContext::from_sregs(sregs, regs.rflags);
    let cs = Segment::from_kvm(&sregs.cs);
    let (access, start) = find_access(mem, &ctx, &cs, (rip & 0xffff_ffff) as u32, is_write).ok_or(Refusal::NotAForm)?;
    // The operand: DS-relative (no override prefix is ever matched).
    let ds = Segment::from_kvm(&sregs.ds);
    let tpr = (sregs.apic_base & !0xfff) + TPR_OFFSET;
    let operand = linear_address(&ds, u64::from(access.addr), 4, 32).map_err(|_| Refusal::NotTpr)?;
    if phys(mem, &ctx, operand, Access::Read) != Some(tpr) {
        return Err(Refusal::NotTpr);
    }
    let len = access.form.size();
    // The registers must be the access's: the vCPU stopped right after it (or, for a
    // report made before the instruction completed, at it). Where reports come late
    // (KVM's emulator on this project's hosts exits at the next host tick, naming
    // the latest access), ESP may have been 0 at the access and restored since.
    let end = start.wrapping_add(len as u32);
    let now = (regs.rip & 0xffff_ffff) as u32;
    if now != end && now != start {
        return Err(Refusal::Stale);
    }
    let site_lin = linear_address(&cs, u64::from(start), len as u64, 32).map_err(|_| Refusal::Unreadable)?;
    if site_lin & 0xfff > 0x1000 - len as u64 {
        return Err(Refusal::Unreadable);
    }
    if regs.rsp & 0xffff_ffff == 0 {
        return Err(Refusal::EspZero);
    }
    let Translation::Ok(gpa) = paging::translate(mem, &ctx, site_lin, Access::Execute) else { return Err(Refusal::Unreadable) };
    let mut old = vec![0u8; len];
    if !read_code(mem, &ctx, site_lin, &mut old) || decode::match_form(&old) != Some(access) {
        return Err(Refusal::Unreadable);
    }
    let helper_lin = helper_linear(mem, &ctx, site_lin).ok_or(Refusal::NoHelper)?;
    // `call rel32` is relative to EIP, which is the linear address less CS's base.
    let helper_eip = helper_lin.wrapping_sub(cs.base) as u32;
    let new = decode::patched(access.form, start, helper_eip);
    Ok(SitePatch { gpa, old, new, form: access.form.index() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const APIC: u64 = 0xfee0_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// 32-bit protected mode, paging off, flat segments, the APIC at its default base.
    fn flat() -> (kvm_regs, kvm_sregs) {
        let mut s = kvm_sregs { cr0: 0x11, apic_base: APIC | 0x900, ..Default::default() };
        for seg in [&mut s.cs, &mut s.ds] {
            seg.limit = 0xffff_ffff;
            seg.db = 1;
            seg.s = 1;
            seg.present = 1;
        }
        s.cs.type_ = 0xb;
        s.ds.type_ = 0x3;
        (kvm_regs { rsp: 0x8000, rflags: 2, ..Default::default() }, s)
    }

    const STORE: [u8; 5] = [0xa3, 0x80, 0x00, 0xe0, 0xfe];

    #[test]
    fn a_report_at_the_access_patches_it() {
        let m = mem();
        let (r, s) = flat();
        m.write_slice(&STORE, GuestAddress(0x10_0000)).unwrap();
        let r = kvm_regs { rip: 0x10_0005, ..r };
        let p = examine(&m, &r, &s, 0x10_0000, true).unwrap();
        assert_eq!(p.gpa, 0x10_0000);
        // The vCPU ran on before the exit: its ESP is not the access's.
        let later = kvm_regs { rip: 0x10_0007, ..r };
        assert_eq!(examine(&m, &later, &s, 0x10_0000, true), Err(Refusal::Stale));
        assert_eq!(p.old, STORE);
        assert_eq!(p.new, decode::patched(decode::Form::StoreEax, 0x10_0000, HELPER_GPA as u32));
    }

    #[test]
    fn a_write_reported_past_itself_is_found_by_looking_back() {
        let m = mem();
        let (r, s) = flat();
        m.write_slice(&STORE, GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&[0x90, 0x90], GuestAddress(0x10_0005)).unwrap();
        let r = kvm_regs { rip: 0x10_0005, ..r };
        assert_eq!(examine(&m, &r, &s, 0x10_0005, true).unwrap().gpa, 0x10_0000);
        // A read report is never looked back for.
        assert_eq!(examine(&m, &r, &s, 0x10_0005, false), Err(Refusal::NotAForm));
        // Nor is a write that does not end at RIP.
        assert_eq!(examine(&m, &r, &s, 0x10_0006, true), Err(Refusal::NotAForm));
    }

    #[test]
    fn hostile_and_wrong_reports_patch_nothing() {
        let m = mem();
        let (r, s) = flat();
        // A late report: RIP at a later, unrelated instruction.
        m.write_slice(&[0x40, 0x40, 0x90], GuestAddress(0x10_0000)).unwrap();
        assert_eq!(examine(&m, &r, &s, 0x10_0000, false), Err(Refusal::NotAForm));
        // A form whose address is RAM, not the TPR; the TPR of another APIC base.
        m.write_slice(&[0xa1, 0x80, 0x00, 0x10, 0x00], GuestAddress(0x10_0000)).unwrap();
        assert_eq!(examine(&m, &r, &s, 0x10_0000, false), Err(Refusal::NotTpr));
        m.write_slice(&STORE, GuestAddress(0x10_0000)).unwrap();
        let mut moved = s;
        moved.apic_base = 0xfed0_0900;
        assert_eq!(examine(&m, &r, &moved, 0x10_0000, true), Err(Refusal::NotTpr));
        // Another register of the APIC page (the EOI register at 0xb0).
        m.write_slice(&[0xa3, 0xb0, 0x00, 0xe0, 0xfe], GuestAddress(0x10_0000)).unwrap();
        assert_eq!(examine(&m, &r, &s, 0x10_0000, true), Err(Refusal::NotTpr));
        // ESP 0.
        m.write_slice(&STORE, GuestAddress(0x10_0000)).unwrap();
        let zero = kvm_regs { rsp: 0, rip: 0x10_0005, ..r };
        assert_eq!(examine(&m, &zero, &s, 0x10_0000, true), Err(Refusal::EspZero));
        // 64-bit code: the encodings mean something else there.
        let mut long = s;
        long.efer = 0x500;
        long.cs.l = 1;
        long.cs.db = 0;
        assert_eq!(examine(&m, &r, &long, 0x10_0000, true), Err(Refusal::NotCode32));
        // A site across a page boundary.
        m.write_slice(&STORE, GuestAddress(0x10_0ffe)).unwrap();
        assert_eq!(examine(&m, &kvm_regs { rip: 0x10_1003, ..r }, &s, 0x10_0ffe, true), Err(Refusal::Unreadable));
        // RIP outside RAM.
        assert_eq!(examine(&m, &r, &s, 0x7000_0000, false), Err(Refusal::NotAForm));
    }

    #[test]
    fn a_segment_base_moves_the_operand_and_the_call() {
        let m = mem();
        let (r, mut s) = flat();
        // DS based at 0x1000_0000: the operand 0xee00080 lands on the TPR.
        s.ds.base = 0x1000_0000;
        m.write_slice(&[0xa1, 0x80, 0x00, 0xe0, 0xee], GuestAddress(0x10_0000)).unwrap();
        let r = kvm_regs { rip: 0x10_0005, ..r };
        assert!(examine(&m, &r, &s, 0x10_0000, false).is_ok());
        // CS based at 0x10_0000: EIP 0 is linear 0x10_0000; the call is EIP-relative.
        let (r, mut s) = flat();
        s.cs.base = 0x10_0000;
        m.write_slice(&[0xa1, 0x80, 0x00, 0xe0, 0xfe], GuestAddress(0x10_0000)).unwrap();
        let r = kvm_regs { rip: 5, ..r };
        let p = examine(&m, &r, &s, 0, false).unwrap();
        assert_eq!(p.gpa, 0x10_0000);
        assert_eq!(p.new, decode::patched(decode::Form::LoadEax, 0, (HELPER_GPA as u32).wrapping_sub(0x10_0000)));
    }
}
