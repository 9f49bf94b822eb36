//! What this host does with the raw hypercall site's `int3` (hypercall/trap.rs):
//! where guest kernel mode runs through KVM's emulator, `int3` at CPL 0 fails
//! emulation and exits to skiff, which then recognises the site; on hardware-assisted
//! KVM it is delivered inside the guest without an exit, and path (a) does not exist.

use super::{ProbeResult, ProbeVm};

/// Whether `int3` at CPL 0 exits to user space as an emulation failure. `vm`'s vCPU
/// stays usable (its registers are set afresh for every run).
pub(super) fn int3_traps(vm: &mut ProbeVm) -> bool {
    vm.run(&[0xcc], 0) == ProbeResult::EmulationFailure
}
