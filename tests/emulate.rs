//! skiff's instruction emulator against a hostile test kernel (guest/tiny/emulate.S):
//! in 64-bit kernel mode it runs, one case a line, the instructions this host's KVM
//! gives up on (XSAVE family, cmpxchg16b, ldmxcsr/stmxcsr, invpcid, icebp) with
//! operands a hostile kernel chooses: in MMIO space or outside RAM through present
//! mappings, areas with reserved MXCSR bits or XSTATE_BV bits outside XCR0, an
//! invalid INVPCID type, operands across pages and into not-present pages. Each line
//! must say what hardware does. Where the host runs guest kernel mode natively the
//! same lines hold (the CPU answers instead of skiff). About a second.

mod common;

use std::process::{Command, Stdio};

/// What hardware does for each case (the kernel prints `<case>: ok ...` or
/// `<case>: #<vector> err=<code> [cr2=<address>]`).
const EXPECTED: &[&str] = &[
    // A present mapping of no RAM: no #PF; the bus reads all ones, drops writes.
    "cmpxchg16b-hole: ok zf=1",
    "cmpxchg16b-mmio: ok zf=0 ffffffff",
    "xsave-hole: ok",
    "xsave-mmio: ok",
    // The same instruction emulated 2000 times back to back is progress (the
    // machine stopped here: "emulation failure repeats at the same instruction").
    "xsave-2000-times: ok",
    // An area read as all ones has a reserved header: #GP(0).
    "xrstor-mmio: #13 err=0",
    // Was: the machine stopped (KVM_SET_XSAVE: Invalid argument).
    "xrstor-reserved-mxcsr: #13 err=0",
    "xrstor-xstate-bv-outside-xcr0: #13 err=0",
    "xrstor-valid: ok",
    "invpcid-type-4: #13 err=0",
    // ICEBP (int1) is a #DB trap, not #UD.
    "icebp: #1 err=0",
    // MXCSR set by an emulated ldmxcsr reads back through stmxcsr and xsave.
    "ldmxcsr-stmxcsr-xsave: ok 1fa0 1fa0",
    "stmxcsr-page-crossing: ok 1f80 0",
    // The compacted area ends where a not-present page begins.
    "xsavec-compacted-size: ok",
    "xsave-not-present: #14 err=2 cr2=401000",
    "xrstor-second-page-not-present: #14 err=0 cr2=401000",
];

/// The emulator's outcomes that must show in --stats where KVM emulates guest
/// kernel mode (so the lines above came from skiff, not from the CPU).
const EMULATED: &[&str] = &[
    "cmpxchg16b (MMIO)",
    "xrstor (reserved MXCSR bits) -> #GP",
    "xrstor (bad header) -> #GP",
    "invpcid (bad type) -> #GP",
    "icebp -> #DB",
    "ldmxcsr",
    "stmxcsr",
    "xsavec",
];

#[test]
fn hostile_operands_get_what_hardware_gives() {
    common::require_kvm();
    let kernel = common::tiny_kernel("emulate");
    let out = Command::new(common::SKIFF)
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--boot", "pvh", "--stats"])
        .stdin(Stdio::null())
        .output()
        .expect("run skiff");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "skiff failed ({}):\n{console}\n{stderr}", out.status);
    assert!(console.contains("emulate: done"), "the kernel did not finish:\n{console}\n{stderr}");
    let cases: Vec<&str> = console.lines().filter(|l| !l.starts_with("emulate:") && !l.starts_with("xcr0=")).collect();
    let wrong: Vec<String> = EXPECTED
        .iter()
        .zip(&cases)
        .filter(|(want, got)| want != got)
        .map(|(want, got)| format!("  expected {want:?}\n       got {got:?}"))
        .collect();
    assert!(wrong.is_empty() && cases.len() == EXPECTED.len(), "{}\nconsole:\n{console}", wrong.join("\n"));
    if stderr.contains("guest kernel-mode instruction") && stderr.contains("emulated by KVM") {
        for what in EMULATED {
            assert!(stderr.lines().any(|l| l.trim_start().starts_with(what)), "{what:?} not in --stats:\n{stderr}");
        }
    }
}
