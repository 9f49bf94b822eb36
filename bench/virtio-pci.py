#!/usr/bin/env python3
"""Manual check of the virtio-pci transport in the default Debian guest: boots it with
`--virtio-transport pci --stats` and a 64 MiB scratch disk, checks the PCI functions,
MSI-X interrupts per queue, the entropy source, a write and read-back of 512 KiB with
checksums, then 3000 4 KiB direct reads; prints every command's output and skiff's
--stats (MMIO exits per page: the BARs are at 0xe0000000 + 32 KiB per function, their
notify page at +0x3000 and ISR page at +0x1000 should show ~0 exits per request).

Usage: bench/virtio-pci.py   (a boot takes minutes where guest kernel mode is emulated)
"""
import argparse
import os
import subprocess
import tempfile
import time

from skiffbench import GUEST, SKIFF, Console, require

# Data made in guest user mode (fast), not from /dev/urandom (kernel mode: emulated).
MAKE = ("awk 'BEGIN{srand(42); for(i=0;i<16384;i++) printf \"%08x%08x%08x%07x\\n\", "
        "rand()*4294967295, rand()*4294967295, rand()*4294967295, i}' > /tmp/a; sha256sum /tmp/a")
CHECKS = [
    "ls /sys/bus/pci/devices",
    "for d in /sys/bus/pci/devices/*; do echo $d $(cat $d/vendor $d/device $d/class); done",
    "cat /sys/block/vda/size",
    "cat /proc/interrupts | grep PCI-MSI",
    "cat /sys/devices/virtual/misc/hw_random/rng_current",
    MAKE,
    "dd if=/tmp/a of=/dev/vda bs=64k oflag=direct 2>&1 | tail -1",
    "dd if=/dev/vda of=/tmp/b bs=64k count=8 iflag=direct 2>&1 | tail -1; sha256sum /tmp/b",
    "cat /sys/block/vda/stat",
    "dd if=/dev/vda of=/dev/null bs=4k count=3000 iflag=direct 2>&1 | tail -1",
    "cat /sys/block/vda/stat",
    "cat /proc/interrupts | grep PCI-MSI",
]


def main():
    # No options; --help says what this does instead of booting the guest.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    require("bench/virtio-pci.py", SKIFF, os.path.join(GUEST, "vmlinux"))
    work = tempfile.mkdtemp(prefix="skiff-pci-check-")
    image = os.path.join(work, "disk.img")
    subprocess.run(["truncate", "-s", "64M", image], check=True)
    g = Console([SKIFF, "run", "--stats", "--virtio-transport", "pci", "--disk", image], "bench/virtio-pci.py")
    try:
        t = time.monotonic()
        g.read_until("skiff-guest: ready", 3600)
        print(f"== booted in {time.monotonic() - t:.0f} s", flush=True)
        for cmd in CHECKS:
            print(f"== $ {cmd}\n{g.run(cmd).strip()}", flush=True)
        print("== skiff --stats\n" + g.finish(), flush=True)
    finally:
        if g.p.poll() is None:
            g.p.kill()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
