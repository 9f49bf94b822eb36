//! Facts about the x86 architecture that need no KVM.

pub mod boot;
pub mod insn;
pub mod paging;
