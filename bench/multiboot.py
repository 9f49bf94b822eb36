#!/usr/bin/env python3
"""Wall time from process start to exit for a multiboot kernel that reports through the
exit device: skiff against QEMU on the same kernel.

The kernel is guest/out/mb-long.elf (guest/tiny/mb-long.S, built by guest/tiny/build):
an ELF32 multiboot kernel, the form QEMU's -kernel takes, that switches to long mode,
prints one line and writes 0x21 to port 0xf4 (exit status 67 under both VMMs).

  skiff   skiff run --kernel K --exit-device
  qemu    qemu-system-x86_64 -enable-kvm -M pc -m 256 -nographic -nodefaults
          -serial stdio -no-reboot -kernel K -device isa-debug-exit,iobase=0xf4,iosize=1

Same KVM, same memory (256 MiB), one vCPU. Runs are interleaved (skiff, QEMU, skiff,
...); each must print the kernel's line and end with status 67. Prints min/median/max
of each and the ratio of the medians; the goal is skiff at most 0.1x QEMU.

Usage: bench/multiboot.py [--runs N]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from skiffbench import GUEST, SKIFF, spread

KERNEL = os.path.join(GUEST, "mb-long.elf")
LINE = "mb-long: in long mode"
STATUS = (0x21 << 1) | 1
GOAL = 0.1


def skiff_cmd():
    return [SKIFF, "run", "--kernel", KERNEL, "--exit-device"]


def qemu_cmd():
    return ["qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-m", "256", "-nographic", "-nodefaults",
            "-serial", "stdio", "-no-reboot", "-kernel", KERNEL, "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]


def timed(cmd, timeout):
    """Seconds from start to exit; fails unless the kernel's line and status came."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    t = time.monotonic() - t0
    out = p.stdout.decode(errors="replace")
    if p.returncode != STATUS or LINE not in out:
        sys.exit(f"{cmd[0]}: status {p.returncode} (want {STATUS}), console {out[-300:]!r}, "
                 f"stderr {p.stderr.decode(errors='replace')[-300:]!r}")
    return t


def summary(name, values):
    ms = spread([v * 1e3 for v in values], "min {min:8.1f} ms  median {median:8.1f} ms  max {max:8.1f} ms")
    return f"{name:6} {ms}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--qemu-timeout", type=float, default=120)
    a = ap.parse_args()
    for path, how in [(SKIFF, "cargo build --release"), (KERNEL, "guest/tiny/build")]:
        if not os.path.exists(path):
            sys.exit(f"{path} missing: run {how}")
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    print(f"kernel: {KERNEL}")
    print("skiff: " + " ".join(skiff_cmd()))
    print("qemu:  " + " ".join(qemu_cmd()))
    s, q = [], []
    for i in range(a.runs):
        s.append(timed(skiff_cmd(), 60))
        q.append(timed(qemu_cmd(), a.qemu_timeout))
        print(f"  run {i + 1}: skiff {s[-1] * 1e3:.1f} ms, qemu {q[-1] * 1e3:.1f} ms", flush=True)
    print(summary("skiff", s))
    print(summary("qemu", q))
    ratio = statistics.median(s) / statistics.median(q)
    print(f"ratio skiff/qemu (medians): {ratio:.4f}  (goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
