//! One owner for a vCPU's guest-debug setting (KVM_SET_GUEST_DEBUG): the four debug
//! address registers DR0-DR3 are shared by the SYSCALL fix-up (one execute
//! breakpoint) and a gdb client (breakpoints and watchpoints), and single step and
//! software breakpoints belong to gdb. Each user changes its own part here and the
//! whole `kvm_guest_debug` is composed from all of them, so neither undoes the other.

use kvm_bindings::{
    KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP, kvm_guest_debug,
};

/// Debug address registers the architecture has.
pub const SLOTS: usize = 4;

/// Who holds a debug register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    SyscallFixup,
    Gdb,
}

/// What a debug register watches (DR7's R/W field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwKind {
    Execute,
    Write,
    ReadWrite,
}

/// One hardware breakpoint or watchpoint: the address, what it watches and its
/// length (1, 2, 4 or 8 bytes; 1 for execute).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwBreak {
    pub addr: u64,
    pub kind: HwKind,
    pub len: u8,
}

impl HwBreak {
    /// DR7's R/W and LEN bits for this slot's four-bit field (SDM vol. 3, 18.2.4).
    fn dr7_field(&self) -> u64 {
        let rw = match self.kind {
            HwKind::Execute => 0b00,
            HwKind::Write => 0b01,
            HwKind::ReadWrite => 0b11,
        };
        let len = match (self.kind, self.len) {
            (HwKind::Execute, _) | (_, 1) => 0b00,
            (_, 2) => 0b01,
            (_, 8) => 0b10,
            _ => 0b11,
        };
        rw | len << 2
    }
}

/// Why a vCPU stopped for gdb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugStop {
    /// A software breakpoint (int3) at this address.
    SwBreak,
    /// A hardware execute breakpoint.
    HwBreak,
    /// A watchpoint in this slot fired (its address and kind).
    Watch(HwBreak),
    /// A single step finished.
    Step,
}

/// DR6 bits: B0-B3 (which slot fired) and BS (single step).
pub const DR6_SLOTS: u64 = 0xf;
pub const DR6_BS: u64 = 1 << 14;
/// DR7 bit 10 reads as one.
const DR7_FIXED: u64 = 1 << 10;
/// Exception vectors a debug exit reports.
pub const DB_VECTOR: u32 = 1;
pub const BP_VECTOR: u32 = 3;

/// A vCPU's guest-debug state.
#[derive(Debug, Default)]
pub struct VcpuDebug {
    /// Each slot: its owner, and what it watches now (None: reserved, disabled).
    slots: [Option<(Owner, Option<HwBreak>)>; SLOTS],
    /// The fix-up is single-stepping (its breakpoint is off meanwhile).
    pub fixup_stepping: bool,
    /// A gdb client is attached: #BP exits come to skiff.
    pub gdb_attached: bool,
    /// gdb asked for one instruction.
    pub gdb_step: bool,
    /// KVM can hold interrupts back during a single step (KVM_GUESTDBG_BLOCKIRQ).
    pub block_irq_on_step: bool,
    /// Set by the run loop when the vCPU stopped for gdb; taken by its thread.
    pub stop: Option<DebugStop>,
}

impl VcpuDebug {
    /// Reserves a slot for `owner`; None when all four are taken.
    pub fn reserve(&mut self, owner: Owner) -> Option<usize> {
        let i = self.slots.iter().position(Option::is_none)?;
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some((owner, None));
        }
        Some(i)
    }

    /// The first slot `owner` holds.
    pub fn slot_of(&self, owner: Owner) -> Option<usize> {
        self.slots.iter().position(|s| matches!(s, Some((o, _)) if *o == owner))
    }

    /// Points `owner`'s slot `i` at `what` (None disables it).
    pub fn set(&mut self, i: usize, owner: Owner, what: Option<HwBreak>) {
        if let Some(s @ Some(_)) = self.slots.get_mut(i)
            && matches!(s, Some((o, _)) if *o == owner)
        {
            *s = Some((owner, what));
        }
    }

    /// Gives gdb exactly these hardware breakpoints, in the slots nobody else holds.
    /// Err names how many slots were free; nothing changes then.
    pub fn set_gdb(&mut self, wanted: &[HwBreak]) -> Result<(), usize> {
        let free = self.slots.iter().filter(|s| !matches!(s, Some((Owner::SyscallFixup, _)))).count();
        if wanted.len() > free {
            return Err(free);
        }
        let mut next = wanted.iter();
        for s in self.slots.iter_mut() {
            if matches!(s, Some((Owner::SyscallFixup, _))) {
                continue;
            }
            *s = next.next().map(|b| (Owner::Gdb, Some(*b)));
        }
        Ok(())
    }

    /// Who holds each slot, for reports.
    pub fn owners(&self) -> [Option<Owner>; SLOTS] {
        self.slots.map(|s| s.map(|(o, _)| o))
    }

    /// What slot `i` watches, if gdb owns it.
    pub fn gdb_slot(&self, i: usize) -> Option<HwBreak> {
        match self.slots.get(i) {
            Some(Some((Owner::Gdb, b))) => *b,
            _ => None,
        }
    }

    /// The whole KVM_SET_GUEST_DEBUG argument from every owner's part.
    pub fn guest_debug(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        let mut dr7 = 0u64;
        for (i, s) in self.slots.iter().enumerate() {
            let Some((owner, Some(b))) = s else { continue };
            // The fix-up's breakpoint is off while it steps past it.
            if *owner == Owner::SyscallFixup && self.fixup_stepping {
                continue;
            }
            if let Some(r) = dbg.arch.debugreg.get_mut(i) {
                *r = b.addr;
            }
            dr7 |= (1 << (i * 2)) | b.dr7_field() << (16 + i * 4);
        }
        if dr7 != 0 {
            dbg.control |= KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[7] = dr7 | DR7_FIXED;
        }
        if self.fixup_stepping || self.gdb_step {
            dbg.control |= KVM_GUESTDBG_SINGLESTEP;
        }
        // gdb's step is one instruction of the code it stopped in, as on QEMU.
        if self.gdb_step && self.block_irq_on_step {
            dbg.control |= KVM_GUESTDBG_BLOCKIRQ;
        }
        if self.gdb_attached {
            dbg.control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if dbg.control != 0 {
            dbg.control |= KVM_GUESTDBG_ENABLE;
        }
        dbg
    }

    /// What a KVM_EXIT_DEBUG means for gdb (None: it is the fix-up's). `exception`,
    /// `dr6` and `pc` are the exit's; `rip` the vCPU's.
    pub fn classify(&mut self, exception: u32, dr6: u64, pc: u64) -> Option<DebugStop> {
        if !self.gdb_attached {
            return None;
        }
        if exception == BP_VECTOR {
            return Some(DebugStop::SwBreak);
        }
        // A slot of gdb's that fired: a watchpoint or an execute breakpoint.
        for i in 0..SLOTS {
            if dr6 & (1 << i) != 0
                && let Some(b) = self.gdb_slot(i)
            {
                return Some(if b.kind == HwKind::Execute { DebugStop::HwBreak } else { DebugStop::Watch(b) });
            }
        }
        if self.gdb_step && !self.fixup_stepping {
            self.gdb_step = false;
            return Some(DebugStop::Step);
        }
        // DR6 may come back empty; an execute breakpoint of gdb's at the PC is gdb's.
        let exec_here = (0..SLOTS).any(|i| self.gdb_slot(i).is_some_and(|b| b.kind == HwKind::Execute && b.addr == pc));
        exec_here.then_some(DebugStop::HwBreak)
    }

    /// Everything of gdb's off (detach, reset), the fix-up's part kept.
    pub fn clear_gdb(&mut self) {
        for s in self.slots.iter_mut() {
            if matches!(s, Some((Owner::Gdb, _))) {
                *s = None;
            }
        }
        self.gdb_attached = false;
        self.gdb_step = false;
        self.stop = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(addr: u64) -> HwBreak {
        HwBreak { addr, kind: HwKind::Execute, len: 1 }
    }

    #[test]
    fn the_fixup_keeps_its_slot_and_gdb_gets_the_rest() {
        let mut d = VcpuDebug::default();
        assert_eq!(d.reserve(Owner::SyscallFixup), Some(0));
        d.set(0, Owner::SyscallFixup, Some(exec(0x1000)));
        let three = [exec(1), exec(2), HwBreak { addr: 0x3000, kind: HwKind::Write, len: 4 }];
        assert_eq!(d.set_gdb(&three), Ok(()));
        assert_eq!(d.set_gdb(&[exec(1), exec(2), exec(3), exec(4)]), Err(3));
        // The failed request changed nothing.
        assert_eq!(d.gdb_slot(3), Some(three[2]));
        let g = d.guest_debug();
        assert_eq!(g.arch.debugreg[..4], [0x1000, 1, 2, 0x3000]);
        // L0-L3, and slot 3 is a 4-byte write watchpoint (R/W 01, LEN 11).
        assert_eq!(g.arch.debugreg[7], 0x55 | DR7_FIXED | 0b1101 << 28);
        assert_eq!(g.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        d.clear_gdb();
        assert_eq!(d.owners(), [Some(Owner::SyscallFixup), None, None, None]);
        assert_eq!(d.guest_debug().arch.debugreg[7], 1 | DR7_FIXED);
    }

    #[test]
    fn gdb_steps_with_interrupts_held_back_where_kvm_can() {
        let mut d = VcpuDebug { gdb_attached: true, gdb_step: true, ..Default::default() };
        assert_eq!(d.guest_debug().control & KVM_GUESTDBG_BLOCKIRQ, 0);
        d.block_irq_on_step = true;
        assert_ne!(d.guest_debug().control & KVM_GUESTDBG_BLOCKIRQ, 0);
        // The fix-up's own step is not gdb's: interrupts are not held for it.
        d.gdb_step = false;
        d.fixup_stepping = true;
        assert_eq!(d.guest_debug().control & KVM_GUESTDBG_BLOCKIRQ, 0);
    }

    #[test]
    fn a_stepping_fixup_turns_its_breakpoint_off() {
        let mut d = VcpuDebug::default();
        let i = d.reserve(Owner::SyscallFixup).unwrap();
        d.set(i, Owner::SyscallFixup, Some(exec(0x1000)));
        d.fixup_stepping = true;
        let g = d.guest_debug();
        assert_eq!(g.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
        assert_eq!(g.arch.debugreg[7], 0);
        // gdb may not set a slot it does not own.
        d.set(i, Owner::Gdb, None);
        d.fixup_stepping = false;
        assert_eq!(d.guest_debug().arch.debugreg[0], 0x1000);
    }

    #[test]
    fn nothing_set_means_debugging_off() {
        assert_eq!(VcpuDebug::default().guest_debug().control, 0);
    }

    #[test]
    fn debug_exits_are_told_apart() {
        let mut d = VcpuDebug::default();
        let f = d.reserve(Owner::SyscallFixup).unwrap();
        d.set(f, Owner::SyscallFixup, Some(exec(0x1000)));
        // Without gdb everything is the fix-up's.
        assert_eq!(d.classify(BP_VECTOR, 0, 0), None);
        d.gdb_attached = true;
        let w = HwBreak { addr: 0x2000, kind: HwKind::Write, len: 4 };
        d.set_gdb(&[exec(0x5000), w]).unwrap();
        assert_eq!(d.classify(BP_VECTOR, 0, 0x10), Some(DebugStop::SwBreak));
        assert_eq!(d.classify(DB_VECTOR, 1 << 0, 0x1000), None, "slot 0 is the fix-up's");
        assert_eq!(d.classify(DB_VECTOR, 1 << 1, 0x5000), Some(DebugStop::HwBreak));
        assert_eq!(d.classify(DB_VECTOR, 1 << 2, 0x77), Some(DebugStop::Watch(w)));
        assert_eq!(d.classify(DB_VECTOR, 0, 0x5000), Some(DebugStop::HwBreak), "empty DR6 at gdb's breakpoint");
        d.gdb_step = true;
        assert_eq!(d.classify(DB_VECTOR, DR6_BS, 0x77), Some(DebugStop::Step));
        assert!(!d.gdb_step);
        // The fix-up's own step is not gdb's.
        d.fixup_stepping = true;
        assert_eq!(d.classify(DB_VECTOR, DR6_BS, 0x77), None);
    }

    #[test]
    fn watchpoint_lengths_encode_as_dr7_says() {
        let f = |kind, len| HwBreak { addr: 0, kind, len }.dr7_field();
        assert_eq!(f(HwKind::Write, 1), 0b0001);
        assert_eq!(f(HwKind::Write, 2), 0b0101);
        assert_eq!(f(HwKind::ReadWrite, 8), 0b1011);
        assert_eq!(f(HwKind::ReadWrite, 4), 0b1111);
        assert_eq!(f(HwKind::Execute, 4), 0b0000);
    }
}
