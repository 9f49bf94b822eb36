//! Kicking a vCPU out of KVM_RUN: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit`, so a kick that lands just before KVM_RUN is not lost
//! (KVM_CAP_IMMEDIATE_EXIT).

use std::cell::Cell;
use std::os::raw::{c_int, c_void};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

thread_local! {
    /// This thread's kvm_run page, while a vCPU runs on it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    KVM_RUN.with(|r| {
        let p = r.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's mapped kvm_run page, set by
            // `RunPage::enter` and cleared before the mapping goes away; a byte store is
            // async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), on_kick)
}

/// Registers this thread's kvm_run page for the kick handler while it lives.
pub struct RunPage;

impl RunPage {
    /// # Safety
    /// `run` must stay mapped until the returned guard is dropped, and belong to the
    /// vCPU that runs on this thread.
    pub unsafe fn enter(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|r| r.set(run));
        RunPage
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }
}
