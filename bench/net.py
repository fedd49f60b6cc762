#!/usr/bin/env python3
"""TCP throughput over virtio-net, host <-> guest, through a TAP in a network namespace.

Creates a namespace with a TAP (removed at the end), runs one VM inside it whose agent serves the
device self-test (cocoon.selftest=1), configures the guest NIC over vsock, then times TCP
transfers of --mib MiB each way, --runs times, and prints the median, min and max MiB/s.
Usage: bench/net.py [--runs N] [--mib M]   (needs root: ip netns, TAP)
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.environ.get("COCOON_KERNEL", os.path.join(ROOT, "build/vmlinux"))
INITRD = os.environ.get("COCOON_INITRD", os.path.join(ROOT, "build/initramfs.cpio"))
VMM = os.environ.get("COCOON_VMM", os.path.join(ROOT, "target/release/cocoon-vmm"))
HOST_IP, GUEST_IP = "10.214.0.1", "10.214.0.2"


def command(uds, line, then=None):
    """Sends one self-test command; `then(stream)` runs after the first reply line if given."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.sendall(b"CONNECT 1025\n")
    f = s.makefile("rb")
    if not f.readline().startswith(b"OK "):
        s.close()
        return None
    s.sendall(line.encode() + b"\n")
    reply = f.readline().decode().strip()
    if then is not None:
        then()
        reply = f.readline().decode().strip()
    s.close()
    return reply


def to_guest(uds, size):
    block = os.urandom(64 * 1024)
    timing = {}

    def send():
        c = socket.create_connection((GUEST_IP, 7000), timeout=60)
        start = time.monotonic()
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            c.sendall(block[:n])
            sent += n
        c.shutdown(socket.SHUT_WR)
        c.recv(64)
        timing["s"] = time.monotonic() - start
        c.close()

    reply = command(uds, "TCPRECV 7000", then=send)
    if not reply or not reply.startswith(str(size)):
        sys.exit(f"guest received {reply!r}")
    return size / timing["s"] / (1 << 20)


def from_guest(uds, size):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST_IP, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    result = {}

    def serve():
        c, _ = listener.accept()
        start = time.monotonic()
        got = 0
        while True:
            d = c.recv(256 * 1024)
            if not d:
                break
            got += len(d)
        result["s"] = time.monotonic() - start
        result["n"] = got
        c.sendall(b"done\n")
        c.close()

    import threading
    t = threading.Thread(target=serve)
    t.start()
    reply = command(uds, f"TCPSEND {HOST_IP} {port} {size} 1")
    t.join()
    listener.close()
    if result.get("n") != size or reply != "done":
        sys.exit(f"host received {result.get('n')} bytes, guest said {reply!r}")
    return size / result["s"] / (1 << 20)


def summary(values):
    return (f"median {statistics.median(values):.2f}  min {min(values):.2f}  "
            f"max {max(values):.2f}")


def inner(args):
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        uds = os.path.join(tmp, "v.sock")
        vmm = subprocess.Popen([VMM, "--kernel", KERNEL, "--initrd", INITRD, "--console", "off",
                                "--vsock", f"3,{uds}", "--net", "tap0",
                                "--cmdline", "cocoon.selftest=1"])
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if command(uds, f"NETUP {GUEST_IP}/24") == "up":
                        break
                except OSError:
                    pass
                if vmm.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the guest's self-test service never came up")
                time.sleep(0.3)
            up, down = [], []
            for i in range(args.runs):
                up.append(to_guest(uds, size))
                down.append(from_guest(uds, size))
                print(f"run {i + 1}/{args.runs}: host->guest {up[-1]:.2f} MiB/s, "
                      f"guest->host {down[-1]:.2f} MiB/s", file=sys.stderr)
            command(uds, "POWEROFF")
            vmm.wait(timeout=60)
        finally:
            if vmm.poll() is None:
                vmm.kill()
                vmm.wait()
    print(f"virtio-net TCP benchmark: {args.runs} runs of {args.mib} MiB each way, MTU 1500, no offloads")
    print(f"TCP host -> guest (MiB/s)  {summary(up)}")
    print(f"TCP guest -> host (MiB/s)  {summary(down)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=1)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    ns = f"cocoon-bench-{os.getpid()}"
    ip = lambda *a: subprocess.run(["ip", *a], check=True)
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        ip("-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", "tap0")
        ip("-n", ns, "link", "set", "tap0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        rc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                             "--inner", "--runs", str(args.runs), "--mib", str(args.mib)]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    sys.exit(rc)


if __name__ == "__main__":
    main()
