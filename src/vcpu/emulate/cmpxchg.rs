//! CMPXCHG16B: compares RDX:RAX with 16 bytes of memory; if equal, stores RCX:RBX
//! and sets ZF, else loads the memory into RDX:RAX and clears ZF. The operand must
//! be 16-byte aligned (#GP(0)); it is written in both cases (SDM: the destination
//! is written back when the comparison fails). On RAM the exchange is atomic, as
//! `lock cmpxchg16b` is; on MMIO it is a read and a write through the bus.

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{Cx, EmuCpu, RFLAGS_ZF};
use crate::x86::paging::Access;

impl<C: EmuCpu> Cx<'_, C> {
    pub(super) fn cmpxchg16b(&mut self) -> Result<(), String> {
        let Some(gva) = self.memory_operand() else { return self.ud("cmpxchg16b (bad operand) -> #UD") };
        if !gva.is_multiple_of(16) {
            return self.gp("cmpxchg16b (unaligned) -> #GP");
        }
        let Some(span) = self.span(gva, 16, Access::Write)? else { return Ok(()) };
        let expected = u128::from(self.regs.rdx) << 64 | u128::from(self.regs.rax);
        let new = u128::from(self.regs.rcx) << 64 | u128::from(self.regs.rbx);
        // Aligned to 16, the operand is one piece.
        let piece = span.pieces().first().copied().ok_or("cmpxchg16b: empty operand")?;
        let atomic = if piece.ram { atomic_cmpxchg16b(self.cpu.mem(), piece.gpa, expected, new) } else { None };
        let old = match atomic {
            Some(old) => old,
            None => {
                let mut b = [0u8; 16];
                self.read_span(&span, 0, &mut b);
                let old = u128::from_le_bytes(b);
                let store = if old == expected { new } else { old };
                self.write_span(&span, 0, &store.to_le_bytes());
                old
            }
        };
        if old == expected {
            self.regs.rflags |= RFLAGS_ZF;
        } else {
            self.regs.rflags &= !RFLAGS_ZF;
            self.regs.rax = old as u64;
            self.regs.rdx = (old >> 64) as u64;
        }
        self.advance()?;
        self.count(if piece.ram { "cmpxchg16b" } else { "cmpxchg16b (MMIO)" });
        Ok(())
    }
}

/// Atomically compares and exchanges 16 bytes of guest RAM, as `lock cmpxchg16b` does
/// (other vCPUs may touch the same memory concurrently). Returns the old value, or
/// None if `gpa` is not 16 aligned bytes of RAM.
fn atomic_cmpxchg16b(mem: &vm_memory::GuestMemoryMmap, gpa: u64, expected: u128, new: u128) -> Option<u128> {
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

#[cfg(test)]
mod tests {
    use super::super::fake::*;

    const LOCK_CMPXCHG16B_RDI: &[u8] = &[0xf0, 0x48, 0x0f, 0xc7, 0x0f];

    #[test]
    fn equal_stores_and_sets_zf() {
        let mut f = Fake::new();
        f.poke(DATA, &0x1111_2222u128.to_le_bytes());
        f.regs.rdi = DATA;
        (f.regs.rax, f.regs.rdx, f.regs.rbx, f.regs.rcx) = (0x1111_2222, 0, 0xaaaa, 0xbbbb);
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_done(LOCK_CMPXCHG16B_RDI.len());
        assert_eq!(f.peek(DATA, 16), [0xaaaa_u64.to_le_bytes(), 0xbbbb_u64.to_le_bytes()].concat());
        assert_ne!(f.regs.rflags & super::RFLAGS_ZF, 0);
    }

    #[test]
    fn different_loads_and_clears_zf() {
        let mut f = Fake::new();
        f.poke(DATA, &(5u128 << 64 | 7).to_le_bytes());
        f.regs.rdi = DATA;
        f.regs.rflags |= super::RFLAGS_ZF;
        (f.regs.rax, f.regs.rdx, f.regs.rbx, f.regs.rcx) = (1, 2, 3, 4);
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_done(LOCK_CMPXCHG16B_RDI.len());
        assert_eq!((f.regs.rax, f.regs.rdx), (7, 5));
        assert_eq!(f.regs.rflags & super::RFLAGS_ZF, 0);
        assert_eq!(f.peek(DATA, 16), (5u128 << 64 | 7).to_le_bytes());
    }

    #[test]
    fn mmio_operand_goes_through_the_bus() {
        let mut f = Fake::new();
        f.regs.rdi = MMIO_VA;
        // Nothing claims the address: reads are all ones, so the compare fails.
        (f.regs.rax, f.regs.rdx) = (1, 2);
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_done(LOCK_CMPXCHG16B_RDI.len());
        assert_eq!((f.regs.rax, f.regs.rdx), (u64::MAX, u64::MAX));
        assert_eq!(f.mmio_writes.len(), 2, "written back as two 8-byte stores: {:?}", f.mmio_writes);
        assert_eq!(f.mmio_writes[0], (MMIO_GPA, vec![0xff; 8]));
    }

    #[test]
    fn outside_ram_through_a_present_mapping_is_not_a_page_fault() {
        let mut f = Fake::new();
        f.regs.rdi = HOLE_VA;
        (f.regs.rax, f.regs.rdx, f.regs.rbx, f.regs.rcx) = (u64::MAX, u64::MAX, 9, 9);
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_done(LOCK_CMPXCHG16B_RDI.len());
        assert_ne!(f.regs.rflags & super::RFLAGS_ZF, 0, "all ones compared equal");
    }

    #[test]
    fn faults() {
        let mut f = Fake::new();
        f.regs.rdi = DATA + 8;
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_fault(13, Some(0));
        let mut f = Fake::new();
        f.regs.rdi = UNMAPPED_VA;
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_page_fault(UNMAPPED_VA, 0b010);
        let mut f = Fake::new();
        f.regs.rdi = READ_ONLY_VA;
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_page_fault(READ_ONLY_VA, 0b011);
        let mut f = Fake::new();
        f.regs.rdi = 0x8000_0000_0000_0000;
        f.run(LOCK_CMPXCHG16B_RDI);
        f.assert_fault(13, Some(0));
    }
}
