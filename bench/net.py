#!/usr/bin/env python3
"""Network and vsock benchmarks: the Debian guest (booted here, inside a network
namespace this script makes, with --net on a TAP in it and --vsock) against floors
measured in the same run, interleaved:

- TCP guest -> host and host -> guest (MiB/s, busybox nc in the guest, a Python
  sink/source on the host) against the same transfer between two network namespaces
  over a veth pair;
- ping round trip (guest -> host) against ping across the veth pair;
- vsock guest -> host and host -> guest (skiff-vsock in the guest, Firecracker's
  CONNECT on the host) against a Unix socket between two host processes, and a
  vsock round trip (1-byte echo) against the same over a Unix socket;
- skiff's own CPU (every thread but the vCPUs) per GiB moved, and user-space exits
  per TCP packet the guest counted (eth0's tx + rx) and per MiB of vsock, from
  GET /stats around each transfer, less the serial console's (the typed command's
  echo): all of them, and those to device registers alone (goal 0 in steady
  state; the rest are this host's workarounds, see device_exits).

Needs root (ip netns), `cargo build --release`, the default guest (or
SKIFF_GUEST_DIR) with /bin/skiff-vsock (guest/checks/skiff-vsock.c), python3 and ping
on the host. Nothing leaves the namespaces this script makes; they are removed at
the end.

    bench/net.py --runs 3 [--mib 4] [--transport mmio|pci]

--transport pci gives skiff --virtio-transport pci: MSI-X interrupts need no exit,
where virtio-mmio's need two (the driver reads the interrupt status and writes its
acknowledgement). The guest's negotiated virtio-net features (checksum and
segmentation offloads) and its bytes per packet are printed.

Where guest kernel mode is emulated (this project's machines), every MiB the guest
kernel copies costs it seconds, hence the small default.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import json

from skiffbench import SKIFF, Console, api, skiff_cpu, spread

NS = f"skiffbench{os.getpid()}"
NS_A, NS_B = NS + "a", NS + "b"
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.2"


def sh(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench/net.py: {cmd}: {r.stderr.strip()}")
    return r.stdout


def setup():
    sh(f"ip netns add {NS} && ip -n {NS} link set lo up && ip -n {NS} tuntap add skt0 mode tap && "
       f"ip -n {NS} addr add {HOST_IP}/24 dev skt0 && ip -n {NS} link set skt0 up")
    # The floor: a veth pair between two namespaces.
    sh(f"ip netns add {NS_A} && ip netns add {NS_B} && ip -n {NS_A} link add va type veth peer name vb netns {NS_B} && "
       f"ip -n {NS_A} addr add 10.0.3.1/24 dev va && ip -n {NS_B} addr add 10.0.3.2/24 dev vb && "
       f"ip -n {NS_A} link set va up && ip -n {NS_B} link set vb up")


def teardown():
    for n in (NS, NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


SINK = r"""
import socket, sys, time
kind, _, where = sys.argv[1].partition(":")
if kind == "tcp":
    h, p = where.rsplit(":", 1); s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((h, int(p)))
else:
    s = socket.socket(socket.AF_UNIX); s.bind(where)
s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t = None
while True:
    d = c.recv(1 << 20)
    if not d: break
    if t is None: t = time.monotonic()
    n += len(d)
print(n, time.monotonic() - (t or time.monotonic()), flush=True)
"""

# Connects to "tcp:HOST:PORT" or "unix:PATH:PORT" (Firecracker's CONNECT; PORT "-":
# a plain Unix socket), retrying for up to a minute while nobody listens yet: the
# guest's listener starts in the background, and a vsock CONNECT to a port nobody
# listens on is closed by skiff without "OK" (Firecracker's behaviour).
CONNECT = r"""
import socket, sys, time
def connect(arg):
    kind, _, where = arg.partition(":")
    for _ in range(600):
        try:
            if kind == "tcp":
                h, p = where.rsplit(":", 1); return socket.create_connection((h, int(p)))
            path, port = where.rsplit(":", 1); c = socket.socket(socket.AF_UNIX); c.connect(path)
            if port == "-":
                return c
            c.sendall(b"CONNECT %s\n" % port.encode()); l = b""
            while not l.endswith(b"\n"):
                b = c.recv(1)
                if not b: raise ConnectionRefusedError("closed before OK")
                l += b
            if l.startswith(b"OK "): return c
            c.close()
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("no connection to " + arg)
"""

SOURCE = CONNECT + r"""
n = int(sys.argv[2]); c = connect(sys.argv[1])
buf = b"\0" * (1 << 20); t = time.monotonic(); sent = 0
while sent < n:
    c.sendall(buf[: min(len(buf), n - sent)]); sent += min(len(buf), n - sent)
c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
print(sent, time.monotonic() - t, flush=True)
"""


# Round trips of one byte through an echo peer: the median in microseconds.
ROUND_TRIP = CONNECT + r"""
import statistics
c = connect(sys.argv[1]); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if sys.argv[1].startswith("tcp") else None
times = []
for _ in range(int(sys.argv[2])):
    t = time.monotonic(); c.sendall(b"x")
    if c.recv(1) != b"x": sys.exit("echo lost")
    times.append(time.monotonic() - t)
c.shutdown(socket.SHUT_WR)
while c.recv(64): pass
print(len(times), statistics.median(times) * 1e6, flush=True)
"""

# The floor's echo peer on a Unix socket.
ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); print("ready", flush=True)
c, _ = s.accept()
while True:
    d = c.recv(64)
    if not d: break
    c.sendall(d)
"""
ROUND_TRIPS = 200


def py(ns, prog, *args):
    pre = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.Popen(pre + ["python3", "-c", prog] + list(args), stdout=subprocess.PIPE, text=True)


def last(p):
    out = p.communicate(timeout=3600)[0].strip().splitlines()
    n, secs = out[-1].split()
    return int(n), float(secs)


def skiff_cpu_total(pid):
    """Seconds on CPU of skiff's threads that are not vCPUs, all roles together."""
    return sum(skiff_cpu(pid).values())


SERIAL = range(0x3f8, 0x400)


def exits_now(sock):
    """(all user-space exits, those to the serial console's ports, exits by kind) so
    far (GET /stats)."""
    code, body = api(sock, "GET", "/stats")
    if code != 200:
        sys.exit(f"bench/net.py: GET /stats: {code} {body}")
    st = json.loads(body)
    serial = sum(n for p, n in st.get("port_exits", {}).items() if p.startswith("0x") and int(p, 16) in SERIAL)
    return sum(st["exits"].values()), serial, dict(st["exits"])


def device_exits(before, after):
    """Exits to device registers (MMIO and ports) between two exits_now() readings,
    less the console's. The other kinds are not the devices': `debug` is the SYSCALL
    fix-up's breakpoint (one per guest syscall and page fault) and `internal-error`
    skiff's emulation of what KVM cannot run (xsave and xrstor at every guest context
    switch), both armed only on hosts that need them."""
    kinds = ("mmio-read", "mmio-write", "io-in", "io-out")
    n = sum(after[2].get(k, 0) - before[2].get(k, 0) for k in kinds)
    return n - (after[1] - before[1])


def add_kinds(into, before, after, per):
    """Adds each exit kind's count between two exits_now() readings, divided by `per`."""
    for k, n in after[2].items():
        d = n - before[2].get(k, 0)
        if d:
            into.setdefault(k, []).append(d / per)


def packets_now(g):
    """eth0's packets so far, sent and received, as the guest counts them."""
    out = g.run("cat /sys/class/net/eth0/statistics/tx_packets /sys/class/net/eth0/statistics/rx_packets")
    return sum(int(w) for w in out.split() if w.isdigit())


# virtio-net feature bits (virtio 1.2, 5.1.3) worth naming here.
NET_FEATURES = {0: "CSUM", 1: "GUEST_CSUM", 7: "GUEST_TSO4", 8: "GUEST_TSO6", 10: "GUEST_UFO", 11: "HOST_TSO4",
                12: "HOST_TSO6", 14: "HOST_UFO", 15: "MRG_RXBUF", 29: "EVENT_IDX"}


def net_offloads(g):
    """The named virtio-net features the guest's driver accepted (sysfs gives the
    negotiated bits as a string of 0 and 1, bit 0 first)."""
    out = g.run("for d in /sys/bus/virtio/devices/*; do [ \"$(cat $d/device)\" = 0x0001 ] && cat $d/features; done")
    bits = next((w for w in out.split() if set(w) <= {"0", "1"} and len(w) >= 32), "")
    return " ".join(name for bit, name in NET_FEATURES.items() if bit < len(bits) and bits[bit] == "1") or "(none found)"


def skiff_pid(g):
    # `ip netns exec` execs skiff: the child is skiff.
    return g.p.pid


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=4, help="MiB per transfer")
    ap.add_argument("--transport", choices=["mmio", "pci"], default="mmio", help="skiff's --virtio-transport")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/net.py: needs root (ip netns)")
    n = a.mib << 20
    teardown()
    setup()
    tmp = tempfile.mkdtemp(prefix="skiff-netbench-")
    uds = os.path.join(tmp, "v.sock")
    res = {k: [] for k in ("tcp g->h", "tcp h->g", "tcp floor", "vsock g->h", "vsock h->g", "unix floor",
                           "ping guest us", "ping floor us", "vsock rtt us", "unix rtt us", "cpu s/GiB tcp", "cpu s/GiB vsock",
                           "tcp packets", "exits/packet tcp", "device exits/packet tcp", "exits/MiB vsock",
                           "device exits/MiB vsock")}
    sock = os.path.join(tmp, "api.sock")
    kinds = {"tcp": {}, "vsock": {}}  # exits by kind, per TCP packet and per vsock MiB
    try:
        g = Console(["ip", "netns", "exec", NS, SKIFF, "run", "--stats", "--memory", "1G",
                     "--net", "tap=skt0,mac=06:00:ac:10:00:02", "--vsock", f"cid=3,uds={uds}", "--api-sock", sock,
                     "--virtio-transport", a.transport], "bench/net.py")
        g.read_until("skiff-guest: ready", 3000)
        g.run(f"modprobe virtio_net; modprobe vmw_vsock_virtio_transport; ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0")
        pid = skiff_pid(g)
        offloads = net_offloads(g)
        for run in range(a.runs):
            # TCP guest -> host. Exits counted over both transfers, less the console's
            # (the typed command's echo), per packet the guest sent or received.
            p0 = packets_now(g)
            e0 = exits_now(sock)
            s = py(NS, SINK, f"tcp:{HOST_IP}:5001"); s.stdout.readline()
            c0 = skiff_cpu_total(pid)
            g.run(f"dd if=/dev/zero bs=1M count={a.mib} 2>/dev/null | nc {HOST_IP} 5001")
            c1 = skiff_cpu_total(pid)
            b, t = last(s); res["tcp g->h"].append(b / t / 2**20)
            # TCP host -> guest.
            g.run("(nc -l -p 5002 > /dev/null &)")
            src = py(NS, SOURCE, f"tcp:{GUEST_IP}:5002", str(n))
            c2 = skiff_cpu_total(pid)
            b2, t2 = last(src); res["tcp h->g"].append(b2 / t2 / 2**20)
            res["cpu s/GiB tcp"].append((c1 - c0 + skiff_cpu_total(pid) - c2) / (2 * n / 2**30))
            e1 = exits_now(sock)
            packets = packets_now(g) - p0
            res["tcp packets"].append(packets)
            res["exits/packet tcp"].append(((e1[0] - e0[0]) - (e1[1] - e0[1])) / max(packets, 1))
            res["device exits/packet tcp"].append(device_exits(e0, e1) / max(packets, 1))
            add_kinds(kinds["tcp"], e0, e1, max(packets, 1))
            # The veth floor.
            s = py(NS_B, SINK, "tcp:10.0.3.2:5005"); s.stdout.readline()
            src = py(NS_A, SOURCE, "tcp:10.0.3.2:5005", str(n)); last(src)
            b, t = last(s); res["tcp floor"].append(b / t / 2**20)
            # Ping.
            out = g.run(f"ping -c 20 -i 0.2 {HOST_IP} | tail -1")
            res["ping guest us"].append(float(out.split("=")[-1].split("/")[1]) * 1000)
            out = sh(f"ip netns exec {NS_A} ping -c 20 -i 0.2 10.0.3.2 | tail -1")
            res["ping floor us"].append(float(out.split("=")[-1].split("/")[1]) * 1000)
            # vsock guest -> host.
            path = f"{uds}_5003"
            if os.path.exists(path):
                os.unlink(path)
            s = py(None, SINK, f"unix:{path}"); s.stdout.readline()
            e0 = exits_now(sock)
            c0 = skiff_cpu_total(pid)
            g.run(f"dd if=/dev/zero bs=1M count={a.mib} 2>/dev/null | skiff-vsock connect 2 5003")
            c1 = skiff_cpu_total(pid)
            b, t = last(s); res["vsock g->h"].append(b / t / 2**20)
            # vsock host -> guest.
            g.run("(skiff-vsock listen 5004 < /dev/null > /dev/null &)")
            src = py(None, SOURCE, f"unix:{uds}:5004", str(n))
            c2 = skiff_cpu_total(pid)
            b2, t2 = last(src); res["vsock h->g"].append(b2 / t2 / 2**20)
            res["cpu s/GiB vsock"].append((c1 - c0 + skiff_cpu_total(pid) - c2) / (2 * n / 2**30))
            e1 = exits_now(sock)
            res["exits/MiB vsock"].append(((e1[0] - e0[0]) - (e1[1] - e0[1])) / (2 * n / 2**20))
            res["device exits/MiB vsock"].append(device_exits(e0, e1) / (2 * n / 2**20))
            add_kinds(kinds["vsock"], e0, e1, 2 * n / 2**20)
            # The Unix socket floor.
            fl = os.path.join(tmp, "floor.sock")
            if os.path.exists(fl):
                os.unlink(fl)
            s = py(None, SINK, f"unix:{fl}"); s.stdout.readline()
            last(py(None, SOURCE, f"unix:{fl}:-", str(n)))
            b, t = last(s); res["unix floor"].append(b / t / 2**20)
            # vsock round trip (1 byte, echoed by the guest) against a Unix socket's.
            g.run("(skiff-vsock echo 5006 1 > /dev/null &)")
            res["vsock rtt us"].append(last(py(None, ROUND_TRIP, f"unix:{uds}:5006", str(ROUND_TRIPS)))[1])
            ef = os.path.join(tmp, "echo.sock")
            if os.path.exists(ef):
                os.unlink(ef)
            e = py(None, ECHO, ef); e.stdout.readline()
            res["unix rtt us"].append(last(py(None, ROUND_TRIP, f"unix:{ef}:-", str(ROUND_TRIPS)))[1])
            e.wait(timeout=60)
            print(f"run {run + 1}/{a.runs} done", flush=True)
        err = g.finish()
    finally:
        teardown()
    print(f"transport {a.transport}; virtio-net features the guest negotiated: {offloads}")
    if res["tcp packets"]:
        print(f"bytes per TCP packet (both directions, data and ACKs): {2 * n / statistics.median(res['tcp packets']):.0f}")
    print("MiB/s unless named:")
    for k, v in res.items():
        if v:
            print(f"  {k:16} " + spread(v, "min {min:.3f} median {median:.3f} max {max:.3f}"))
    for what, unit in (("tcp", "per TCP packet"), ("vsock", "per vsock MiB")):
        print(f"exits by kind {unit} (the console's included; medians over runs):")
        for k, v in sorted(kinds[what].items()):
            print(f"  {k:24} " + spread(v, "min {min:.3f} median {median:.3f} max {max:.3f}"))
    exits = [l for l in err.splitlines() if "exit" in l.lower()][:12]
    print("skiff --stats exit lines (exits per packet: divide by the packets the guest counted):")
    for l in exits:
        print("  " + l)


if __name__ == "__main__":
    main()
