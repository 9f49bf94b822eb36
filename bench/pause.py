#!/usr/bin/env python3
"""Pause latency: how long skiff takes to bring every vCPU out of KVM_RUN and know it.

For 1, 2 and 8 vCPUs, skiff boots the chatter test kernel (guest/out/chatter.elf: the
boot vCPU writes to the serial port without end; the others wait for INIT/SIPI inside
KVM_RUN), and 300 ms in pauses and resumes every vCPU 100 times (the `pause-bench`
test hook, vmm/run.rs), then powers off. Each pause is timed from the request to the
last vCPU's answer. The floor, in the same run: the same request and answer to every
vCPU thread while all are already out of KVM_RUN (what a pause costs beyond leaving
the guest). Runs are interleaved across vCPU counts; the figures are over every pause
of every run.

Usage: bench/pause.py [--runs N]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

from skiffbench import GUEST, SKIFF, require

LINE = re.compile(
    r"pause storm: (\d+) pauses of (\d+) vCPUs: min ([\d.]+) us, median ([\d.]+) us, max ([\d.]+) us; "
    r"floor \(paused round trip\) min ([\d.]+) us, median ([\d.]+) us, max ([\d.]+) us"
)


def one_run(cpus):
    env = dict(os.environ, SKIFF_TEST_HOOK="pause-bench")
    cmd = [SKIFF, "run", "--kernel", os.path.join(GUEST, "chatter.elf"), "--boot", "pvh", "--cpus", str(cpus)]
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    err = p.stderr.decode(errors="replace")
    m = LINE.search(err)
    if p.returncode != 0 or not m:
        sys.exit(f"bench/pause.py: skiff --cpus {cpus} exited {p.returncode} without a pause line:\n{err[-2000:]}")
    return float(m.group(4)), float(m.group(7)), float(m.group(3)), float(m.group(5))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    require("bench/pause.py", SKIFF, os.path.join(GUEST, "chatter.elf"))
    counts = (1, 2, 8)
    results = {c: [] for c in counts}
    for _ in range(args.runs):
        for c in counts:
            results[c].append(one_run(c))
    print(f"pause latency, {args.runs} runs x 100 pauses per vCPU count (medians of runs; min/max over all pauses)")
    print(f"{'vCPUs':>5}  {'min us':>8}  {'median us':>9}  {'max us':>8}  {'floor median us':>15}  {'ratio':>6}")
    for c in counts:
        med = statistics.median(r[0] for r in results[c])
        floor = statistics.median(r[1] for r in results[c])
        lo = min(r[2] for r in results[c])
        hi = max(r[3] for r in results[c])
        print(f"{c:>5}  {lo:>8.1f}  {med:>9.1f}  {hi:>8.1f}  {floor:>15.1f}  {med / floor if floor else 0:>6.2f}")


if __name__ == "__main__":
    main()
