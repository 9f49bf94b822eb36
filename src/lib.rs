//! skiff: a virtual machine monitor for Linux guests on KVM (x86_64).
//!
//! Rooms, one concern each (see DESIGN.md in the shared folder):
//! - [`api`]: the control API (HTTP over a Unix socket) and the trait the VMM serves it through.
//! - [`config`]: every user-settable knob, validated once.
//! - [`control`]: how devices, vCPUs and signals ask the machine to stop, and wake
//!   the event loop (below `vmm`, which drives it, and beside the rooms that use it).
//! - [`vmm`]: the machine as a whole: build, run, stop.
//! - [`vcpu`]: one vCPU: run loop, exit dispatch, CPUID, emulation-failure handling.
//! - [`x86`]: architecture facts that need no KVM: boot protocol, paging, decode.
//! - [`devices`]: the I/O bus and the devices on it.
//! - [`gdb`]: the gdb stub (GDB remote protocol), on a thread that talks to vCPUs by events.
//! - [`hypercall`]: skiff's hypercall ABI: the page, the calls, trap-and-patch, the ring.
//! - [`tpr`]: TPR access decode-and-patch with a guest-side helper (seed 000).
//! - [`snapshot`]: the snapshot file format and the guest-memory file.
//! - [`output`]: skiff's own messages, which a closed or unread stdout/stderr cannot
//!   turn into a panic or a hang.

// A write to a closed pipe panics in println!/eprintln! (and the release profile
// aborts on panic): use `output`.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod api;
pub mod config;
pub mod control;
pub mod devices;
pub mod gdb;
pub mod hypercall;
pub mod tpr;
pub mod output;
pub mod snapshot;
pub mod stats;
pub mod vcpu;
pub mod vmm;
pub mod x86;
