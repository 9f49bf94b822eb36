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
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.environ.get("SKIFF_GUEST_DIR", os.path.join(ROOT, "guest", "out"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
SKIFF = os.path.join(TARGET, "release", "skiff")

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
    p = subprocess.Popen([SKIFF, "run", "--boot-time"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    readies, buf = 0, b""
    while True:
        chunk = p.stdout.read1(4096)
        if not chunk:
            break
        buf += chunk
        while b"skiff-guest: ready" in buf:
            buf = buf.split(b"skiff-guest: ready", 1)[1]
            readies += 1
            time.sleep(1)
            p.stdin.write(b"reboot\n" if readies == 1 else b"poweroff\n")
            p.stdin.flush()
    p.wait()
    reader.join(10)
    if p.returncode != 0:
        sys.exit(f"skiff failed ({p.returncode}): {b''.join(err).decode(errors='replace')[-500:]}")
    return figures(b"".join(err).decode(errors="replace"))


def summary(name, v):
    return f"{name:<22} min {min(v):10.1f} ms  median {statistics.median(v):10.1f} ms  max {max(v):10.1f} ms  (n={len(v)})"


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
