#!/usr/bin/env python3
"""Exit-dispatch benchmark: what one exit of each kind costs under skiff, under QEMU and
under a raw KVM_RUN loop (the floor), measured by the same guest in the same way.

The guest is guest/out/exitbench.elf (guest/tiny/exitbench.S): it times, from inside,
`outb` to an unclaimed port, `outb` to port 0x80, `outb` to skiff's boot-marker port
0x440 (an ioeventfd doorbell under skiff; an ordinary exit elsewhere), `inl` from the ACPI PM timer (port
from the FADT), a byte MMIO write to an unclaimed address, a 4 KiB `rep outsb` and
`cpuid` (handled in the kernel: the floor of any exit), with the TSC calibrated against
PIT channel 2 and an empty-loop baseline subtracted (guest kernel mode may be emulated
by KVM at hundreds of ns an instruction).

VMMs, interleaved run by run (the order rotates):
  skiff        target/release/skiff run --boot pvh
  skiff-nc     the same with --no-coalesce (port 0x80 exits every time)
  qemu         qemu-system-x86_64 -enable-kvm -M pc (SeaBIOS, PVH option ROM)
  floor        target/release/examples/kvm_floor: KVM_RUN, drop the exit, KVM_RUN
               (no ACPI tables: it skips the PM-timer read)

Usage: bench/exits.py [--runs N] [--no-qemu]
Needs: cargo build --release --bin skiff --example kvm_floor; guest/tiny/build.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

from skiffbench import GUEST, SKIFF, TARGET, spread

FLOOR = os.path.join(TARGET, "release", "examples", "kvm_floor")
KERNEL = os.path.join(GUEST, "exitbench.elf")

# exitbench.S times each operation REPS (5) times N (1000 for `outb`) in a run.
PORT80_WRITES = 5 * 1000
OPS = ["cpuid", "out_unclaimed", "out_post", "out_doorbell", "pm_timer_read", "mmio_write", "rep_outsb_4k"]
LINE = re.compile(r"exitbench: op=(\w+) n=(\d+) ns=([\d.]+)")
PORT80 = re.compile(r"^\s+0x0080\s+(\d+)", re.M)
COALESCED = re.compile(r"^coalesced writes: (\d+) port I/O")


def commands():
    return {
        "skiff": ([SKIFF, "run", "--kernel", KERNEL, "--boot", "pvh", "--stats"], 0),
        "skiff-nc": ([SKIFF, "run", "--kernel", KERNEL, "--boot", "pvh", "--stats", "--no-coalesce"], 0),
        # isa-debug-exit turns the probe's write of 0 into QEMU's exit status 1.
        "qemu": (["qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-m", "128", "-nographic", "-nodefaults",
                  "-serial", "stdio", "-no-reboot", "-kernel", KERNEL,
                  "-device", "isa-debug-exit,iobase=0xf4,iosize=1"], 1),
        "floor": ([FLOOR, KERNEL], 0),
    }


class RunFailed(Exception):
    pass


def run_one(name, cmd, ok_status):
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                           timeout=120)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"{name} did not finish in 120 s")
    if p.returncode != ok_status or "exitbench: done" not in p.stdout:
        raise RunFailed(f"{name} failed (status {p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    ns = {m.group(1): float(m.group(3)) for m in LINE.finditer(p.stdout)}
    extra = {}
    if name.startswith("skiff"):
        m = PORT80.search(p.stderr)
        extra["port80_exits"] = int(m.group(1)) if m else 0
        m = next((COALESCED.match(l) for l in p.stderr.splitlines() if COALESCED.match(l)), None)
        extra["coalesced"] = int(m.group(1)) if m else 0
    return ns, extra


def fmt(v):
    return f"{v:10.1f}" if v is not None else f"{'-':>10}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    for path, how in [(SKIFF, "cargo build --release"), (FLOOR, "cargo build --release --example kvm_floor"),
                      (KERNEL, "guest/tiny/build")]:
        if not os.path.exists(path):
            sys.exit(f"{path} missing: {how}")
    vmms = commands()
    if a.no_qemu or shutil.which("qemu-system-x86_64") is None:
        print("(QEMU left out: " + ("--no-qemu" if a.no_qemu else "qemu-system-x86_64 not installed") + ")")
        del vmms["qemu"]
    names = list(vmms)
    results = {n: {op: [] for op in OPS} for n in names}
    extras = {n: [] for n in names}
    for i in range(a.runs):
        order = names[i % len(names):] + names[:i % len(names)]
        line = []
        for n in order:
            if n not in names:
                continue
            try:
                ns, extra = run_one(n, *vmms[n])
            except RunFailed as e:
                if n != "qemu":
                    sys.exit(str(e))
                # QEMU is the peer, not the subject: say why it is left out and go on.
                print(f"  (QEMU left out from here on: {e})", flush=True)
                names.remove("qemu")
                continue
            for op, v in ns.items():
                results[n].setdefault(op, []).append(v)
            extras[n].append(extra)
            line.append(f"{n} {ns.get('out_unclaimed', 0):.0f}")
        print(f"  run {i + 1}: out_unclaimed ns: " + ", ".join(line), flush=True)

    med = {n: {op: (statistics.median(v) if v else None) for op, v in results[n].items()} for n in names}
    print(f"\n== ns per operation, {a.runs} runs (guest-measured; min / median / max) ==")
    for n in names:
        print(f"-- {n}")
        for op in OPS:
            v = results[n].get(op) or []
            if v:
                print(f"  {op:<14} " + spread(v, "min {min:12.1f}  median {median:12.1f}  max {max:12.1f}"))
            else:
                print(f"  {op:<14} (not measured)")

    print("\n== medians and ratios ==")
    head = f"  {'op':<14}" + "".join(f"{n:>12}" for n in names)
    head += f"{'skiff/qemu':>12}" if "qemu" in names else ""
    head += f"{'skiff/floor':>12}"
    print(head)
    for op in OPS:
        row = f"  {op:<14}" + "".join(f"  {fmt(med[n].get(op))}" for n in names)
        s = med["skiff"].get(op)
        for peer in (["qemu"] if "qemu" in names else []) + ["floor"]:
            p = med[peer].get(op)
            row += f"{s / p:12.3f}" if s is not None and p else f"{'-':>12}"
        print(row)

    p80 = [e["port80_exits"] for e in extras["skiff"]]
    co = [e["coalesced"] for e in extras["skiff"]]
    print(f"\n  skiff port 0x80: median {statistics.median(p80):.0f} exits for the probe's {PORT80_WRITES} writes; "
          f"median {statistics.median(co):.0f} writes delivered from the coalesced ring")

    print("\n== goals ==")
    s, f = med["skiff"], med["floor"]
    r = s["out_unclaimed"] / f["out_unclaimed"]
    print(f"  port exit vs raw KVM_RUN floor: {r:.3f}x  (goal <= 1.02): {'met' if r <= 1.02 else 'MISSED'}")
    if "qemu" in names:
        q = med["qemu"]
        slower = [op for op in OPS if s.get(op) is not None and q.get(op) is not None and s[op] >= q[op]]
        print(f"  below QEMU on every operation: {'met' if not slower else 'MISSED on ' + ', '.join(slower)}")
        if "cpuid" in slower:
            # Say how far apart they are: no VMM code runs on a cpuid exit.
            sm, qm = min(results["skiff"]["cpuid"]), min(results["qemu"]["cpuid"])
            print(f"    cpuid is answered inside KVM, no VMM code runs: medians {s['cpuid']:.1f} vs {q['cpuid']:.1f} ns, "
                  f"minima {sm:.1f} vs {qm:.1f} ns (floor median {f['cpuid']:.1f})")
    r = s["out_post"] / s["out_unclaimed"]
    print(f"  port 0x80 write vs a user-space port exit: {r:.3f}x  (goal <= 0.2): {'met' if r <= 0.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
