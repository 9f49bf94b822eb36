"""What the benchmark scripts share: where skiff and the guests are, the checks at a
script's start, a VMM's console on pipes, the CPU time of skiff's own threads, and
min/median/max formatting.

Not a command: the scripts run as bench/NAME.py, so Python puts bench/ first on
sys.path and their `import skiffbench` finds this file, from any working directory.
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.environ.get("SKIFF_GUEST_DIR", os.path.join(ROOT, "guest", "out"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
SKIFF = os.path.join(TARGET, "release", "skiff")
DONE = "__skiff_bench_done__"  # brackets a command's output in Console.run


def require(script, *paths):
    """Ends `script` with what to run if skiff or a guest file is not built yet."""
    for path in paths:
        if not os.path.exists(path):
            sys.exit(f"{script}: {path} is missing (cargo build --release; scripts/fetch-guest)")


def exit_on_signals(script):
    """A SIGTERM or SIGHUP ends `script` through its cleanup (finally), like Ctrl-C."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: sys.exit(f"{script}: stopped by signal {n}"))


class Console:
    """A VMM process (skiff; QEMU too in bench/boot.py) started with `cmd`, the whole
    command line, its console on pipes, driven like a user at the guest's shell.
    `script` ("bench/disk.py") heads its messages."""

    def __init__(self, cmd, script):
        self.script = script
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buf = b""
        self.first_byte = None  # seconds from the start to the first console output
        self.err = []
        # Read aside, so that skiff never waits on a full stderr pipe.
        self.reader = threading.Thread(target=lambda: self.err.append(self.p.stderr.read()), daemon=True)
        self.reader.start()

    def stderr(self):
        """All skiff wrote to stderr; call once it has ended."""
        self.reader.join(10)
        return self.err[0].decode(errors="replace") if self.err else ""

    def send(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def read_until(self, needle, timeout):
        """The console output up to `needle`, which is consumed; ends the script, with the
        console's and stderr's tails, if skiff ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.buf:
            if time.monotonic() > deadline:
                sys.exit(f"{self.script}: timed out waiting for {needle!r}; console:\n"
                         f"{self.buf[-2000:].decode(errors='replace')}")
            chunk = self.p.stdout.read1(65536)
            if not chunk:
                self.p.wait(timeout=60)
                sys.exit(f"{self.script}: skiff ended (status {self.p.returncode}) before {needle!r}; console:\n"
                         f"{self.buf[-2000:].decode(errors='replace')}\nstderr:\n{self.stderr()[-3000:]}")
            if self.first_byte is None:
                self.first_byte = time.monotonic() - self.t0
            # The last MiB is enough to find a needle in: a guest that prints without end
            # (chatter) must not fill memory.
            self.buf = (self.buf + chunk)[-(1 << 20):]
        head, _, self.buf = self.buf.partition(needle.encode())
        return head.decode(errors="replace")

    def run(self, cmd, timeout=3600, started=None):
        """`cmd` typed at the guest's shell; its output. `started` is called once the guest
        has begun the command (its echo is done)."""
        # The markers are split in the typed text, so its echo never matches them.
        half = len(DONE) // 2
        mark = f"{DONE[:half]}''{DONE[half:]}"
        self.send(f"echo {mark}B; {cmd}; echo {mark}E\n")
        self.read_until(DONE + "B", timeout)
        if started:
            started()
        return self.read_until(DONE + "E", timeout)

    def finish(self):
        """Powers the guest off; skiff's stderr."""
        self.send("poweroff\n")
        self.p.stdout.read()
        self.p.wait(timeout=600)
        return self.stderr()

    def stop(self):
        """Ends skiff with SIGTERM, for a guest that does not power off; skiff's stderr."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        # Keep reading the console, so skiff's last writes never wait on a full pipe.
        threading.Thread(target=self.p.stdout.read, daemon=True).start()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        return self.stderr()


def skiff_cpu(pid):
    """CPU seconds of skiff's threads that are not vCPUs, by role: the main thread
    (event loop), the disk's I/O workers, the rest (console writer...). From each
    thread's schedstat (nanoseconds on CPU), not the 10 ms ticks of stat."""
    roles = {"loop": 0, "io": 0, "other": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            if comm.startswith("skiff-vcpu"):
                continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except OSError:
            continue
        # iou-wrk-*: the kernel's io_uring workers, threads of skiff's process.
        role = "loop" if tid == str(pid) else "io" if "-io" in comm or comm.startswith("iou-") else "other"
        roles[role] += ns
    return {k: v / 1e9 for k, v in roles.items()}


def spread(xs, fmt):
    """min, median and max of xs, put into fmt's {min}, {median} and {max}."""
    return fmt.format(min=min(xs), median=statistics.median(xs), max=max(xs))


def api(sock, method, path, body=None):
    """One HTTP request on the API socket; (status, body)."""
    data = json.dumps(body).encode() if body is not None else b""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(600)
    s.connect(sock)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.decode().split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    while len(rest) < length:
        rest += s.recv(65536)
    s.close()
    return int(head.split()[1]), rest.decode(errors="replace")
