#!/usr/bin/env python3
"""Boot-time benchmark: skiff against QEMU, interleaved runs, min/median/max and ratio.

Measured from outside each VMM, the same way for both: process start to the guest's
first console byte, to the guest's "ready" line (the default guest's /init, or the
tiny kernel's hello), and to process exit after the guest powers off. skiff's own
--boot-time figures (which include the /init marker port) are printed beside them.

Like with like: QEMU boots the same kernel (and initrd) with exactly the kernel
command line skiff gave the guest in the run just before it, as skiff prints it with
--stats ("kernel command line: ..."): skiff's defaults plus what its host probe
appends (clearcpuid=..., and the rest). The command line is printed once per guest.

The host probe: skiff reuses its cached probe results (vcpu/probe/cache.rs) unless
--reprobe is given here (then every skiff run probes afresh). Each run's "host probe:"
line from --stats says which, and the summary gives the probe's share of skiff's start.
Before the runs, `skiff probe` (always a fresh probe; it also refreshes the cache) is
timed on its own: what the first start on a host pays.

Guests:
  tiny    guest/out/tiny.elf, skiff's own PVH test kernel (guest/tiny/build).
  debian  the default guest (Debian's vmlinux + busybox initramfs); QEMU is tried once
          and reported honestly if it cannot boot it on this host.

Usage: bench/boot.py [--runs N] [--guest tiny|debian|all] [--qemu-timeout S] [--reprobe]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

from skiffbench import GUEST, ROOT, SKIFF, Console, spread


def run_vmm(cmd, ready, send_after_ready=None, timeout=1800):
    """Runs one VMM; returns dict of times (s) or an error string."""
    # Its own loop, not Console.read_until: a VMM that fails is reported, not fatal.
    c = Console(cmd, "bench/boot.py")
    times = {}
    buf = bytearray()
    killer = threading.Timer(timeout, c.p.kill)
    killer.start()
    try:
        while True:
            chunk = c.p.stdout.read1(4096)
            if not chunk:
                break
            now = time.monotonic() - c.t0
            times.setdefault("first_byte", now)
            buf += chunk
            if "ready" not in times and ready.encode() in buf:
                times["ready"] = now
                if send_after_ready:
                    c.send(send_after_ready)
        c.p.wait()
        times["exit"] = time.monotonic() - c.t0
    finally:
        killer.cancel()
    times["status"] = c.p.returncode
    times["stderr"] = c.stderr()
    times["console"] = buf.decode(errors="replace")
    return times


def skiff_cmd(guest, reprobe=False):
    extra = ["--reprobe"] if reprobe else []
    if guest == "tiny":
        return [SKIFF, "run", "--kernel", os.path.join(GUEST, "tiny.elf"), "--boot", "pvh", "--boot-time", "--stats"] + extra
    return [SKIFF, "run", "--boot-time", "--stats"] + extra


def probe_line(stderr):
    """skiff's "host probe:" line from --stats: (cached?, ms, line); None if absent.
    Cached: ms is the time to read the cache; fresh: the probe's own run time."""
    for line in stderr.splitlines():
        m = re.match(r"host probe: reused from .* read in ([\d.]+) ms", line)
        if m:
            return True, float(m.group(1)), line
        m = re.match(r"host probe: ran in ([\d.]+) ms", line)
        if m:
            return False, float(m.group(1)), line
    return None


def time_skiff_probe(runs):
    """Wall time of `skiff probe` (a fresh probe, which refreshes the cache), in s."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.run([SKIFF, "probe"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            sys.exit(f"skiff probe failed: {p.stderr.decode(errors='replace').strip()[-300:]}")
        times.append(time.monotonic() - t0)
    return times


def qemu_cmd(guest, cmdline):
    """QEMU booting what skiff_cmd boots, with `cmdline`: skiff's final command line."""
    base = ["qemu-system-x86_64", "-enable-kvm", "-m", "256", "-nographic", "-nodefaults",
            "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
            "-M", "pc", "-append", cmdline]
    if guest == "tiny":
        return base + ["-kernel", os.path.join(GUEST, "tiny.elf")]
    return base + ["-kernel", os.path.join(GUEST, "vmlinux"), "-initrd", os.path.join(GUEST, "initrd.cpio")]


def skiff_cmdline(stderr):
    """The kernel command line skiff gave the guest, from its --stats; None if absent."""
    for line in stderr.splitlines():
        if line.startswith("kernel command line: "):
            return line[len("kernel command line: "):]
    return None


READY = {"tiny": "tiny: hello", "debian": "skiff-guest: ready"}


def skiff_figures(stderr):
    """skiff's own RSS without guest memory (KiB) and emulated-instruction count, from --stats."""
    rss = emulated = None
    for line in stderr.splitlines():
        m = re.match(r"memory: skiff RSS (\d+) KiB", line)
        if m:
            rss = int(m.group(1))
        m = re.match(r"emulated after KVM emulation failure: (\d+)", line)
        if m:
            emulated = int(m.group(1))
    return rss, 0 if emulated is None else emulated


def summary(name, values):
    if not values:
        return f"{name:<12} (no successful runs)"
    ms = spread([v * 1e3 for v in values], "min {min:9.1f} ms  median {median:9.1f} ms  max {max:9.1f} ms")
    return f"{name:<12} {ms}  (n={len(values)})"


def bench(guest, runs, qemu_timeout, reprobe):
    print(f"== guest: {guest} ==")
    probes = []  # (cached, probe ms, skiff's own first-byte ms)
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    rss, emulated = [], []
    results = {"skiff": {"first_byte": [], "ready": [], "exit": []},
               "qemu": {"first_byte": [], "ready": [], "exit": []}}
    qemu_note = None if have_qemu else "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
    send = "poweroff\n" if guest == "debian" else None
    shown_cmdline = None
    for i in range(runs):
        r = run_vmm(skiff_cmd(guest, reprobe), READY[guest], send)
        cmdline = skiff_cmdline(r["stderr"])
        if cmdline is None:
            sys.exit(f"skiff's --stats did not name the kernel command line (status {r['status']}); "
                     f"cannot give QEMU the same one:\n{r['stderr'].strip()[-500:]}")
        if cmdline != shown_cmdline:
            print(f"  kernel command line, both VMMs{' (changed)' if shown_cmdline else ''}: {cmdline}")
            shown_cmdline = cmdline
        if r["status"] == 0 and "ready" in r:
            for k in results["skiff"]:
                results["skiff"][k].append(r[k])
            bt = [l for l in r["stderr"].splitlines() if l.startswith("boot:")]
            pl = probe_line(r["stderr"])
            m = re.search(r"first console byte ([\d.]+) ms", bt[0]) if bt else None
            if pl and m:
                probes.append((pl[0], pl[1], float(m.group(1))))
            r_rss, r_emu = skiff_figures(r["stderr"])
            if r_rss is not None:
                rss.append(r_rss)
            emulated.append(r_emu)
            print(f"  run {i+1} skiff: first byte {r['first_byte']*1e3:.1f} ms, ready {r['ready']*1e3:.1f} ms,"
                  f" exit {r['exit']*1e3:.1f} ms; skiff says: {bt[0] if bt else '?'};"
                  f" {'probe cache used' if pl and pl[0] else 'probed afresh' if pl else 'probe: ?'}")
        else:
            print(f"  run {i+1} skiff FAILED (status {r['status']}): {r['stderr'].strip()[-300:]}")
        if qemu_note is None:
            q = run_vmm(qemu_cmd(guest, cmdline), READY[guest], send, timeout=qemu_timeout)
            # isa-debug-exit makes QEMU exit with (value << 1) | 1 = 1.
            ok = "ready" in q and q["status"] in (0, 1)
            if ok:
                for k in results["qemu"]:
                    results["qemu"][k].append(q[k])
                print(f"  run {i+1} qemu:  first byte {q['first_byte']*1e3:.1f} ms, ready {q['ready']*1e3:.1f} ms,"
                      f" exit {q['exit']*1e3:.1f} ms")
            else:
                tail = (q["console"].strip()[-200:] + " | " + q["stderr"].strip()[-200:]).replace("\n", " / ")
                qemu_note = (f"QEMU could not boot the {guest} guest here (status {q['status']},"
                             f" {q['exit']:.0f} s): {tail}")
                print("  " + qemu_note)
    for what in ("first_byte", "ready", "exit"):
        print(summary(f"skiff {what}", results["skiff"][what]))
        print(summary(f"qemu  {what}", results["qemu"][what]))
        s, q = results["skiff"][what], results["qemu"][what]
        if s and q:
            print(f"  ratio skiff/qemu ({what}): {statistics.median(s) / statistics.median(q):.3f}")
    print_probe_share(probes)
    if rss:
        kib = spread(rss, "min {min} KiB, median {median:.0f} KiB, max {max} KiB")
        print(f"skiff RSS excluding guest memory: {kib} (goal: under 5120 KiB)")
    if emulated:
        print(f"instructions skiff emulated per boot (after KVM's emulator gave up): median {statistics.median(emulated):.0f}")
    if qemu_note:
        print("note: " + qemu_note)


def print_probe_share(probes):
    """How many runs reused the probe cache, and the probe's share of skiff's start."""
    if not probes:
        print("host probe: no --stats probe line parsed")
        return
    for cached in (True, False):
        runs = [p for p in probes if p[0] == cached]
        if not runs:
            continue
        ms = statistics.median(p[1] for p in runs)
        first = statistics.median(p[2] for p in runs)
        what = "reused from the cache (reading it)" if cached else "probed afresh"
        # The probe runs on its own thread beside the build; its share is an upper bound.
        print(f"host probe: {what} in {len(runs)}/{len(probes)} runs: median {ms:.2f} ms"
              f" of skiff's median {first:.1f} ms to the first console byte ({100 * ms / first:.0f}%)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--guest", choices=["tiny", "debian", "all"], default="all")
    ap.add_argument("--qemu-timeout", type=float, default=300)
    ap.add_argument("--reprobe", action="store_true", help="make every skiff run probe afresh (no probe cache)")
    ap.add_argument("--probe-runs", type=int, default=10, help="times to run `skiff probe` alone first (0: skip)")
    a = ap.parse_args()
    if not os.path.exists(SKIFF):
        sys.exit("build skiff first: cargo build --release")
    if not os.path.exists(os.path.join(GUEST, "tiny.elf")):
        subprocess.run([os.path.join(ROOT, "guest", "tiny", "build")], check=True)
    if a.probe_runs > 0:
        t = time_skiff_probe(a.probe_runs)
        print(summary("skiff probe", t) + "  (fresh probe, wall time; the cache is now warm)")
    for g in (["tiny", "debian"] if a.guest == "all" else [a.guest]):
        bench(g, a.runs, a.qemu_timeout, a.reprobe)


if __name__ == "__main__":
    main()
