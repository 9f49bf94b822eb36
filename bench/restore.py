#!/usr/bin/env python3
"""Snapshot and restore benchmark.

For 256 MiB and 2 GiB guests of the chatter test kernel (it prints numbered lines
forever): boot it with --api-sock, pause it, take a full snapshot through the API,
then restore it --runs times. Printed (min/median/max over runs):
- restore to running: skiff's own "vCPUs running" (from its start to the moment the
  vCPUs are told to run), and the wall time from starting `skiff restore` to the
  first console byte it prints (the guest running again, seen from outside);
- snapshot create: the time of PUT /snapshot/create, the memory file's size and how
  much of it is allocated (zero pages are holes), against `cp` of a file of the
  guest's memory size (random data, page cache warm) followed by fsync of the copy
  (a snapshot is fsynced), interleaved with the snapshots: the goal is at most 1.2x;
  then diff snapshots, each after the guest ran 50 ms, and the last one's size.

--debian adds the default guest (Debian's kernel): a cold boot to a shell that
answers a command, against a restore of a snapshot of that shell to the same
answer, as a ratio (one cold boot: minutes where guest kernel mode is emulated).

Usage: bench/restore.py [--runs N] [--debian]
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from skiffbench import GUEST, SKIFF, Console, api, exit_on_signals, require, spread

SPREAD = "{min:8.2f} {median:8.2f} {max:8.2f}"


def wait_socket(sock, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            return
        except OSError:
            time.sleep(0.005)
    sys.exit(f"bench/restore.py: {sock} never answered")


def running_ms(stderr):
    m = re.search(r"^boot: .*vCPUs running ([\d.]+) ms", stderr, re.M)
    if not m:
        sys.exit(f"bench/restore.py: no 'vCPUs running' in:\n{stderr[-1500:]}")
    return float(m.group(1))


def cp_floor(work, size):
    """`cp` of a `size`-byte file of random data (page cache warm) plus fsync of the copy."""
    src = os.path.join(work, "cp-src")
    if not os.path.exists(src) or os.path.getsize(src) != size:
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n
    dst = os.path.join(work, "cp-dst")
    t = time.monotonic()
    subprocess.run(["cp", src, dst], check=True)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    ms = (time.monotonic() - t) * 1e3
    os.unlink(dst)
    return ms


def tiny(work, memory, runs):
    sock = os.path.join(work, "api.sock")
    kernel = os.path.join(GUEST, "chatter.elf")
    g = Console([SKIFF, "run", "--kernel", kernel, "--boot", "pvh", "--memory", memory, "--api-sock", sock], "bench/restore.py")
    wait_socket(sock)
    g.read_until("chatter: 20 ", 60)
    size = int(memory.rstrip("MG")) << (20 if memory.endswith("M") else 30)
    create, cp, alloc = [], [], []
    code, body = api(sock, "PATCH", "/vm", {"state": "Paused"})
    if code != 204:
        sys.exit(f"bench/restore.py: pause: {code} {body}")
    snap, mem = os.path.join(work, "vm.snap"), os.path.join(work, "vm.mem")
    for _ in range(runs):
        t = time.monotonic()
        code, body = api(sock, "PUT", "/snapshot/create", {"snapshot_path": snap, "mem_file_path": mem})
        create.append((time.monotonic() - t) * 1e3)
        if code != 204:
            sys.exit(f"bench/restore.py: snapshot: {code} {body}")
        alloc.append(os.stat(mem).st_blocks * 512 / (1 << 20))
        cp.append(cp_floor(work, size))
    # Diffs: the guest runs on a little between them (chatter changes almost no memory).
    diff = []
    for i in range(runs):
        # Each diff on top of the one before (a chain, at most 16 long).
        if i % 15 == 0:
            api(sock, "PUT", "/snapshot/create", {"snapshot_path": snap, "mem_file_path": mem})
        dsnap, dmem = os.path.join(work, f"diff{i}.snap"), os.path.join(work, f"diff{i}.mem")
        api(sock, "PATCH", "/vm", {"state": "Resumed"})
        time.sleep(0.05)
        api(sock, "PATCH", "/vm", {"state": "Paused"})
        t = time.monotonic()
        code, body = api(sock, "PUT", "/snapshot/create", {"snapshot_path": dsnap, "mem_file_path": dmem, "snapshot_type": "Diff"})
        diff.append((time.monotonic() - t) * 1e3)
        if code != 204:
            sys.exit(f"bench/restore.py: diff snapshot: {code} {body}")
    dalloc = os.stat(dmem).st_blocks * 512 / 1024
    g.stop()
    run, wall = [], []
    for _ in range(runs):
        r = Console([SKIFF, "restore", "--snapshot", snap, "--resume", "--boot-time"], "bench/restore.py")
        r.read_until("chatter: ", 30)
        wall.append(r.first_byte * 1e3)
        run.append(running_ms(r.stop()))
    mib = os.path.getsize(mem) / (1 << 20)
    print(f"guest {memory} (chatter), {runs} runs, min/median/max:")
    print(f"  restore: vCPUs running (skiff's)     {spread(run, SPREAD)} ms   goal <= 3 ms for 256 MiB")
    print(f"  restore: first console byte (wall)  {spread(wall, SPREAD)} ms")
    print(f"  snapshot create (PUT, full)         {spread(create, SPREAD)} ms")
    print(f"  cp + fsync of {memory} (the floor)    {spread(cp, SPREAD)} ms   ratio (medians) {statistics.median(create) / statistics.median(cp):.3f}")
    print(f"  memory file: {mib:.0f} MiB long, {statistics.median(alloc):.2f} MiB allocated; snapshot file {os.path.getsize(snap)} bytes")
    print(f"  snapshot create (PUT, diff)         {spread(diff, SPREAD)} ms   its memory file: {dalloc:.0f} KiB allocated")


def debian(work):
    sock = os.path.join(work, "deb.sock")
    t = time.monotonic()
    g = Console([SKIFF, "run", "--api-sock", sock], "bench/restore.py")
    g.read_until("skiff-guest: ready", 3600)
    g.send("echo he''llo-cold\n")
    g.read_until("hello-cold", 600)
    cold = time.monotonic() - t
    api(sock, "PATCH", "/vm", {"state": "Paused"})
    snap, mem = os.path.join(work, "deb.snap"), os.path.join(work, "deb.mem")
    t = time.monotonic()
    code, body = api(sock, "PUT", "/snapshot/create", {"snapshot_path": snap, "mem_file_path": mem})
    create = (time.monotonic() - t) * 1e3
    if code != 204:
        sys.exit(f"bench/restore.py: Debian snapshot: {code} {body}")
    floor = cp_floor(work, os.path.getsize(mem) - 4096)
    g.stop()
    t = time.monotonic()
    r = Console([SKIFF, "restore", "--snapshot", snap, "--resume"], "bench/restore.py")
    r.send("echo he''llo-restored\n")
    r.read_until("hello-restored", 600)
    warm = time.monotonic() - t
    r.stop()
    print("Debian guest (default), a shell answering `echo`:")
    print(f"  cold boot {cold * 1e3:10.1f} ms; restore {warm * 1e3:8.1f} ms; ratio {warm / cold:.5f}")
    alloc = os.stat(mem).st_blocks * 512 / (1 << 20)
    print(f"  full snapshot {create:.1f} ms ({alloc:.1f} MiB of data); cp + fsync of guest memory's size {floor:.1f} ms; ratio {create / floor:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--debian", action="store_true", help="also time a restored Debian shell against a cold boot")
    args = ap.parse_args()
    require("bench/restore.py", SKIFF, os.path.join(GUEST, "chatter.elf"))
    exit_on_signals("bench/restore.py")
    work = tempfile.mkdtemp(prefix="skiff-restore-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    try:
        for memory in ("256M", "2G"):
            tiny(work, memory, args.runs)
        if args.debian:
            debian(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
