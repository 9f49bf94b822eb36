#!/usr/bin/env python3
"""In-place reboot against cold start: skiff's own clock, same process, same guest.

cold start   skiff's start to the guest's boot marker (port 0x440), first boot
reboot       the guest's reboot request to the next boot's marker (the machine reset
             in place: vCPUs to RESET, devices reset, RAM cleared, kernel reloaded)

Guests:
  tiny    guest/out/reboot.elf (guest/tiny/reboot.S): 10 boots a run, rebooting
          through the i8042, 0xcf9 and a triple fault in turn.
  debian  the default guest: boot, `reboot`, boot again, poweroff (slow where guest
          kernel mode is emulated: minutes a boot).

Usage: bench/reboot.py [--runs N] [--guest tiny|debian]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from skiffbench import GUEST, SKIFF, Console, spread

COLD = re.compile(r"^boot: first console byte .*?/init marker ([\d.]+) ms")
REBOOT = re.compile(r"^reboot \d+ \(.*\): machine reset in place in ([\d.]+) ms, /init marker ([\d.]+) ms after")


def figures(stderr):
    cold, reset, reboot = None, [], []
    for line in stderr.splitlines():
        m = COLD.match(line)
        if m:
            cold = float(m.group(1))
        m = REBOOT.match(line)
        if m:
            reset.append(float(m.group(1)))
            reboot.append(float(m.group(2)))
    return cold, reset, reboot


def run_tiny():
    p = subprocess.run([SKIFF, "run", "--kernel", os.path.join(GUEST, "reboot.elf"), "--boot", "pvh", "--boot-time"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        sys.exit(f"skiff failed ({p.returncode}): {p.stderr[-500:]}")
    return figures(p.stderr)


def run_debian():
    g = Console([SKIFF, "run", "--boot-time"], "bench/reboot.py")
    g.read_until("skiff-guest: ready", 3600)
    time.sleep(1)
    g.send("reboot\n")
    g.read_until("skiff-guest: ready", 3600)
    time.sleep(1)
    stderr = g.finish()
    if g.p.returncode != 0:
        sys.exit(f"skiff failed ({g.p.returncode}): {stderr[-500:]}")
    return figures(stderr)


def summary(name, v):
    ms = spread(v, "min {min:10.1f} ms  median {median:10.1f} ms  max {max:10.1f} ms")
    return f"{name:<22} {ms}  (n={len(v)})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--guest", choices=["tiny", "debian"], default="tiny")
    a = ap.parse_args()
    if not os.path.exists(SKIFF):
        sys.exit("build skiff first: cargo build --release")
    cold, reset, reboot = [], [], []
    for i in range(a.runs):
        c, rs, rb = run_tiny() if a.guest == "tiny" else run_debian()
        if c is None or not rb:
            sys.exit(f"run {i + 1}: no boot marker or no reboot in skiff's report")
        cold.append(c)
        reset.extend(rs)
        reboot.extend(rb)
        print(f"  run {i + 1}: cold start {c:.1f} ms; reboots {', '.join(f'{x:.1f}' for x in rb)} ms")
    print(f"== guest: {a.guest} ==")
    print(summary("cold start to marker", cold))
    print(summary("reboot to marker", reboot))
    print(summary("in-place reset itself", reset))
    print(f"  ratio reboot/cold start (medians): {statistics.median(reboot) / statistics.median(cold):.3f}  (goal <= 0.6)")


if __name__ == "__main__":
    main()
