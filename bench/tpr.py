#!/usr/bin/env python3
"""TPR benchmark: ns per TPR access for each of the six forms, unpatched vs patched, measured in the guest.

The guest is guest/out/tprbench.elf (guest/tiny/tprbench.S): 32-bit protected mode at
CPL 0, one vCPU. For each form (mov [tpr],r32; mov r32,[tpr]; mov eax,[tpr];
mov [tpr],eax; mov [tpr],imm32; push [tpr]) it times, with the TSC, a loop of N accesses
and the same loop without the access, lowest of 3 each, after warming the loop up until
skiff has rewritten its site (with patching on). Each run starts skiff twice,
`--tpr-patch=off` (every access an MMIO access) and `--tpr-patch=on` (each site a call
of skiff's guest-side helper), in alternating order; the TSC is converted with skiff's
own clock (HC_TIME around a spin).

Then a model, not a measurement, of a host where every TPR access exits to the VMM:
an unpatched access there costs about one exit to skiff and back (the figure skiff's
host probe measures, from `--stats`), a patched one what the patched path costs here.

Usage: bench/tpr.py [--runs N]
Needs: cargo build --release; guest/tiny/build.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

from skiffbench import GUEST, SKIFF, require
from skiffbench import spread as spread3

KERNEL = os.path.join(GUEST, "tprbench.elf")
FORMS = ["mov[tpr],r32", "movr32,[tpr]", "moveax,[tpr]", "mov[tpr],eax", "mov[tpr],imm32", "push[tpr]"]
NAMES = {f: f.replace("mov[", "mov [").replace("movr32", "mov r32").replace("moveax", "mov eax").replace("push[", "push [") for f in FORMS}
CAL = re.compile(r"tprbench: cal ticks=([0-9a-f]+) ns=([0-9a-f]+)")
FORM = re.compile(r"tprbench: form=(\S+) patched=([01]) accesses=([0-9a-f]+) ticks=([0-9a-f]+) base=([0-9a-f]+)")
EXIT = re.compile(r"an exit to skiff and back (\d+) ns")
HELPER = re.compile(r"helper: (.*)\)$", re.MULTILINE)


def run_once(mode):
    """ns per access by form, whether each site was patched, and skiff's --stats."""
    p = subprocess.run([SKIFF, "run", "--kernel", KERNEL, "--boot", "pvh", "--stats", f"--tpr-patch={mode}"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=300)
    if p.returncode != 0 or "tprbench: done" not in p.stdout:
        sys.exit(f"skiff --tpr-patch={mode} failed (status {p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    m = CAL.search(p.stdout)
    ticks_per_ns = int(m.group(1), 16) / int(m.group(2), 16)
    ns, patched = {}, {}
    for m in FORM.finditer(p.stdout):
        name, was_patched = m.group(1), m.group(2) == "1"
        accesses, ticks, base = (int(g, 16) for g in m.groups()[2:])
        ns[name] = max(ticks - base, 0) / accesses / ticks_per_ns
        patched[name] = was_patched
    return ns, patched, ticks_per_ns, p.stderr


def spread(v):
    return spread3(v, "{min:>8.0f} {median:>8.0f} {max:>8.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    require("bench/tpr.py", SKIFF, KERNEL)
    results = {mode: {f: [] for f in FORMS} for mode in ("off", "on")}
    unpatched_sites = set()
    stats_on = ""
    for i in range(args.runs):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        line = []
        for mode in order:
            ns, patched, tpn, stderr = run_once(mode)
            if mode == "on":
                stats_on = stderr
                unpatched_sites |= {f for f in FORMS if not patched.get(f)}
            for f in FORMS:
                if f in ns:
                    results[mode][f].append(ns[f])
            line.append(f"{mode}: " + ", ".join(f"{ns.get(f, float('nan')):.0f}" for f in FORMS))
        print(f"run {i + 1}: TSC {tpn:.3f} GHz; ns per access by form; " + "; ".join(line), flush=True)

    print(f"\n{'form':<16} {'unpatched (--tpr-patch=off)':>28}   {'patched (--tpr-patch=on)':>28}   patched/unpatched")
    print(f"{'':<16} {'min':>8} {'median':>8} {'max':>8}     {'min':>8} {'median':>8} {'max':>8}   (medians; ns per access, {args.runs} runs)")
    med = {}
    for f in FORMS:
        off, on = results["off"][f], results["on"][f]
        if not off or not on:
            print(f"{NAMES[f]:<16} n/a")
            continue
        med[f] = (statistics.median(off), statistics.median(on))
        note = "  (site not patched in some run: mixed)" if f in unpatched_sites else ""
        ratio = med[f][1] / med[f][0] if med[f][0] > 0 else float("inf")
        print(f"{NAMES[f]:<16} {spread(off)}     {spread(on)}   {ratio:>8.1f}x{note}")
    helper = HELPER.search(stats_on)
    print()
    if med and all(on > off for off, on in med.values()):
        print("Patched is slower than unpatched here, as expected on this host: guest kernel mode is emulated by KVM")
        print("instruction by instruction, so a TPR MMIO access costs about what a RAM store does (no exit), while the")
        print("patched path runs the helper's ~20 instructions through the emulator", end="")
        if helper and "handed to skiff" in helper.group(1):
            print(" and, because KVM takes the vAPIC TPR late\nhere, every patched access also exits to skiff (the write and read polls).")
        else:
            print(".")
    if helper:
        print(f"(skiff's --stats for the patched runs: {helper.group(1)})")

    exit_m = EXIT.search(stats_on)
    if not exit_m or not med:
        print("\n(no exit cost in --stats: no model)")
        return
    exit_ns = float(exit_m.group(1))
    print("\nMODEL, NOT A MEASUREMENT: a host where every TPR access exits to the VMM (no TPR virtualisation).")
    print(f"  An unpatched access there costs about one exit to skiff and back: {exit_ns:.0f} ns (skiff's host probe, --stats).")
    print("  A patched one costs the patched path, taken as measured here (median above).")
    print(f"  {'form':<16} {'exit':>8} {'patched':>8} {'saving':>8}  per access")
    for f in FORMS:
        if f in med:
            on = med[f][1]
            print(f"  {NAMES[f]:<16} {exit_ns:>8.0f} {on:>8.0f} {exit_ns - on:>8.0f}  ({'patching pays' if exit_ns > on else 'patching loses'})")
    print("  Here the patched path is emulated (and its writes exit), so it is far dearer than the same helper where guest")
    print("  kernel code runs natively; the model does not guess that figure. It shows what the parts measured here give.")


if __name__ == "__main__":
    main()
