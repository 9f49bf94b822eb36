#!/usr/bin/env python3
"""Disk benchmark: the default guest reading and writing a virtio-blk disk, against the
host doing the same work on the same image file (the floor), interleaved.

One boot of the default guest (1 vCPU) with a 512 MiB raw image as /dev/vda; then,
--runs times each, alternating guest and host:
  seq-write  dd if=/dev/zero of=DISK bs=1M count=256 oflag=direct
  seq-read   dd if=DISK of=/dev/null bs=1M count=256 iflag=direct
  rand-read  skiff-check randread DISK 2000   (4 KiB O_DIRECT reads at random offsets)
The host runs the same dd commands (GNU dd) and the same randread (skiff-check built
for the host) on the image file.

Printed per operation (min/median/max over runs):
- the guest's time and the host's: guest kernel mode is emulated where KVM runs it
  through its emulator, so the guest's own I/O path dominates there;
- skiff's own CPU time (its event loop and block workers: every thread but the vCPUs,
  from /proc/PID/task/*/schedstat, in nanoseconds) per MiB and per request, against the host command's CPU
  time (user + system) per MiB and per request; the goal is skiff <= 1.5x the host's;
- requests, from the guest's /sys/block/vda/stat.
At the end, skiff's MMIO exits to the disk's registers per request (--stats, over the
whole run, driver set-up included): notifications are ioeventfds, so what remains is
the interrupt acknowledgement virtio-mmio needs (status read + ack write).

--direct gives skiff the disk with `,direct` (O_DIRECT where a request is aligned), so
its data path is the host dd's (O_DIRECT too); without it skiff goes through the host's
page cache, which the guest's O_DIRECT does not reach.

--transport pci gives skiff --virtio-transport pci (MSI-X: no interrupt status read and
acknowledgement per interrupt, which virtio-mmio needs).

--ops picks some of the operations (comma-separated). SKIFF_BLOCK_IO=pool in the
environment makes skiff send reads and writes to its worker pool instead of io_uring.

Usage: bench/disk.py [--runs N] [--direct] [--transport mmio|pci] [--ops seq-write,seq-read,rand-read]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from skiffbench import GUEST, ROOT, SKIFF, Console, exit_on_signals, require, skiff_cpu, spread

SPREAD = "{min:9.3f} {median:9.3f} {max:9.3f}"


# The host doing the guest's requests at the guest's pace: O_DIRECT reads or writes of
# SIZE bytes (sequential, or at random 4 KiB-aligned offsets), COUNT of them, sleeping
# INTERVAL us between them. On this project's machines a request that finds the host
# idle costs several times what one in a tight loop does (a wake-up from idle, cold
# caches, the host disk's doorbell exit), and the guest, whose kernel mode is emulated,
# sends a few to a few dozen requests a second: this is the floor at that rate.
PACED_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 7) return 2;
    int write = argv[1][0] == 'w', rnd = argv[2][0] == 'r';
    long size = atol(argv[4]), count = atol(argv[5]), interval = atol(argv[6]);
    int fd = open(argv[3], (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0 || size <= 0) return 1;
    off_t blocks = lseek(fd, 0, SEEK_END) / 4096;
    void *buf;
    if (posix_memalign(&buf, 4096, size)) return 1;
    memset(buf, 0, size);
    srandom(1);
    for (long i = 0; i < count; i++) {
        off_t at = rnd ? (random() % (blocks - size / 4096)) * 4096 : i * size;
        ssize_t n = write ? pwrite(fd, buf, size, at) : pread(fd, buf, size, at);
        if (n != size) return 1;
        if (interval > 0) usleep(interval);
    }
    return 0;
}
"""


def guest_requests(g):
    fields = g.run("cat /sys/block/vda/stat").split()
    return int(fields[0]) + int(fields[4])


def host_run(cmd):
    t = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        sys.exit(f"bench/disk.py: host {cmd} failed")
    return time.monotonic() - t, ru.ru_utime + ru.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--direct", action="store_true", help="give skiff the disk with ,direct (O_DIRECT, like the host's dd)")
    ap.add_argument("--transport", choices=["mmio", "pci"], default="mmio", help="skiff's --virtio-transport")
    ap.add_argument("--ops", default="seq-write,seq-read,rand-read", help="the operations to run, comma-separated")
    args = ap.parse_args()
    require("bench/disk.py", SKIFF, os.path.join(GUEST, "vmlinux"))
    exit_on_signals("bench/disk.py")
    work = tempfile.mkdtemp(prefix="skiff-disk-bench-")
    image = os.path.join(work, "disk.img")
    subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", "count=512", "status=none"], check=True)
    paced = os.path.join(work, "paced")
    with open(paced + ".c", "w") as f:
        f.write(PACED_C)
    subprocess.run(["gcc", "-O2", "-o", paced, paced + ".c"], check=True)
    checker = os.path.join(work, "skiff-check")
    subprocess.run(["gcc", "-static", "-O2", "-mgeneral-regs-only", "-o", checker, os.path.join(ROOT, "guest/checks/skiff-check.c")], check=True)
    ops = {
        "seq-write": ("dd if=/dev/zero of={d} bs=1M count=256 oflag=direct", 256, ["dd", "if=/dev/zero", f"of={image}", "bs=1M", "count=256", "oflag=direct", "conv=notrunc"]),
        "seq-read": ("dd if={d} of=/dev/null bs=1M count=256 iflag=direct", 256, ["dd", f"if={image}", "of=/dev/null", "bs=1M", "count=256", "iflag=direct"]),
        "rand-read": ("skiff-check randread {d} 2000", 2000 * 4096 / (1 << 20), [checker, "randread", image, "2000"]),
    }
    # The paced host run of each: (write?, random?, request size, requests).
    pacing = {"seq-write": ("w", "s", 1 << 20, 24), "seq-read": ("r", "s", 1 << 20, 24), "rand-read": ("r", "r", 4096, 100)}
    wanted = args.ops.split(",")
    if not wanted or any(w not in ops for w in wanted):
        sys.exit(f"bench/disk.py: --ops takes some of {','.join(ops)}")
    ops = {k: v for k, v in ops.items() if k in wanted}
    g = Console([SKIFF, "run", "--stats", "--disk", image + (",direct" if args.direct else ""),
                 "--virtio-transport", args.transport], "bench/disk.py")
    try:
        measure(g, ops, image, args.runs, args.transport, lambda name, interval: paced_run(paced, image, pacing[name], interval))
    finally:
        # Never leave a guest running or a 512 MiB image behind, whatever failed.
        if g.p.poll() is None:
            g.p.kill()
        shutil.rmtree(work, ignore_errors=True)


def disk_register_exits(stderr, transport):
    """MMIO exits to the disk's registers in --stats' top MMIO pages: its virtio-mmio
    slot (the second, after the rng), or its PCI BAR (the second function's 32 KiB)."""
    pages = {int(a, 16): int(n) for a, n in re.findall(r"^\s+0x([0-9a-f]{12})\s+(\d+)$", stderr, re.M)}
    if transport == "mmio":
        return sum(n for a, n in pages.items() if a == 0xD000_1000)
    return sum(n for a, n in pages.items() if 0xE000_8000 <= a < 0xE001_0000)


def paced_run(paced, image, spec, interval_s):
    """The host's CPU ms per MiB doing `spec`'s requests one every `interval_s` (at
    most 0.1 s: beyond a few ms idle the cost no longer grows)."""
    mode, pattern, size, count = spec
    interval_us = int(min(interval_s, 0.1) * 1e6)
    _, cpu = host_run([paced, mode, pattern, image, str(size), str(count), str(interval_us)])
    return cpu / (count * size / (1 << 20)) * 1e3


def measure(g, ops, image, runs, transport, paced):
    g.read_until("skiff-guest: ready", 3600)
    results = {k: {"guest_s": [], "host_s": [], "skiff_cpu_mib": [], "host_cpu_mib": [], "paced_cpu_mib": [], "skiff_cpu_req": [], "host_cpu_req": [], "reqs": []} for k in ops}
    for _ in range(runs):
        for name, (guest_cmd, mib, host_cmd) in ops.items():
            r = results[name]
            reqs0 = guest_requests(g)
            # skiff's CPU from the moment the guest starts the command to its end; its
            # output goes to a file in the guest, read after: the console's echo of the
            # typed line and of dd's report is not disk I/O (it cost skiff's console
            # thread ~5 ms a command, which the host's dd does not pay).
            start = {}
            out = g.run(guest_cmd.format(d="/dev/vda") + " >/tmp/bench.out 2>&1",
                        started=lambda: start.update(cpu=skiff_cpu(g.p.pid), t=time.monotonic()))
            cpu1, elapsed = skiff_cpu(g.p.pid), time.monotonic() - start["t"]
            cpu0 = start["cpu"]
            out += g.run("cat /tmp/bench.out")
            reqs = guest_requests(g) - reqs0
            roles = {k: cpu1[k] - cpu0[k] for k in cpu1}
            cpu = sum(roles.values())
            for k, v in roles.items():
                r.setdefault("role_" + k, []).append(v / max(reqs, 1) * 1e6)
            if "FAIL" in out or "rror" in out:
                sys.exit(f"bench/disk.py: guest {name}: {out}")
            # The host's command three times, its median: one 60 ms dd is a noisy floor.
            host = sorted(host_run(host_cmd) for _ in range(3))
            host_s, host_cpu = statistics.median(h[0] for h in host), statistics.median(h[1] for h in host)
            # The host's request count for the same work: 1 MiB or 4 KiB requests.
            host_reqs = 256 if name != "rand-read" else 2000
            r["guest_s"].append(elapsed)
            r["host_s"].append(host_s)
            r["reqs"].append(reqs)
            r["skiff_cpu_mib"].append(cpu / mib * 1e3)
            r["host_cpu_mib"].append(host_cpu / mib * 1e3)
            r["paced_cpu_mib"].append(paced(name, elapsed / max(reqs, 1)))
            r["skiff_cpu_req"].append(cpu / max(reqs, 1) * 1e6)
            r["host_cpu_req"].append(host_cpu / host_reqs * 1e6)
    stderr = g.finish()
    print(f"disk benchmark, {runs} runs each (min / median / max)")
    for name, r in results.items():
        ratio = statistics.median(r["skiff_cpu_mib"]) / max(statistics.median(r["host_cpu_mib"]), 1e-9)
        print(f"{name}:")
        print(f"  time s             guest {spread(r['guest_s'], SPREAD)}   host {spread(r['host_s'], SPREAD)}")
        print(f"  CPU ms per MiB     skiff {spread(r['skiff_cpu_mib'], SPREAD)}   host {spread(r['host_cpu_mib'], SPREAD)}   ratio {ratio:.2f} (goal <= 1.5)")
        print(f"  CPU us per request skiff {spread(r['skiff_cpu_req'], SPREAD)}   host {spread(r['host_cpu_req'], SPREAD)}")
        paced_ratio = statistics.median(r["skiff_cpu_mib"]) / max(statistics.median(r["paced_cpu_mib"]), 1e-9)
        print(f"  host at the guest's pace, ms/MiB {spread(r['paced_cpu_mib'], SPREAD)}   skiff/paced ratio {paced_ratio:.2f}")
        roles = ", ".join(f"{k[5:]} {statistics.median(v):.1f}" for k, v in r.items() if k.startswith("role_"))
        print(f"  skiff's us per request by thread (medians): {roles}")
        print(f"  guest requests     {statistics.median(r['reqs']):.0f} per run (median)")
    reqs = re.search(r"virtio disk [^:]+: (\d+) requests", stderr)
    exits = disk_register_exits(stderr, transport)
    if reqs:
        print(f"MMIO exits to the disk's registers ({transport}): {exits} for {reqs.group(1)} requests "
              f"({exits / max(int(reqs.group(1)), 1):.3f} per request, whole run: driver set-up included)")
    else:
        print(f"bench/disk.py: no disk line in skiff's --stats:\n{stderr[-2000:]}")


if __name__ == "__main__":
    main()
