#!/usr/bin/env python3
"""vsock throughput: host -> guest and guest -> host through cocoon-vmm's hybrid vsock.

Boots one VM whose agent runs the device self-test service (cocoon.selftest=1), then times
`SINK` (host sends, the guest reads and checksums) and `SOURCE` (the guest sends, the host reads)
transfers of --mib MiB each, --runs times, and prints the median, min and max MiB/s.
Usage: bench/vsock.py [--runs N] [--mib M]
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
PORT = 1025


def connect(uds, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            s.close()
            return None
        reply += chunk
    return s if reply.startswith(b"OK ") else None


def command(uds, line):
    s = connect(uds, PORT)
    if s is None:
        sys.exit("self-test service went away")
    s.sendall(line.encode() + b"\n")
    return s


def sink(uds, size):
    s = command(uds, "SINK")
    block = os.urandom(64 * 1024)
    start = time.monotonic()
    sent = 0
    while sent < size:
        s.sendall(block[: min(len(block), size - sent)])
        sent += min(len(block), size - sent)
    s.shutdown(socket.SHUT_WR)
    reply = s.makefile("rb").readline()
    elapsed = time.monotonic() - start
    s.close()
    if not reply.startswith(str(size).encode()):
        sys.exit(f"guest received {reply!r}, expected {size} bytes")
    return size / elapsed / (1 << 20)


def source(uds, size):
    s = command(uds, f"SOURCE {size} 1")
    start = time.monotonic()
    got = 0
    while True:
        chunk = s.recv(256 * 1024)
        if not chunk:
            break
        got += len(chunk)
    elapsed = time.monotonic() - start
    s.close()
    if got != size:
        sys.exit(f"host received {got} bytes, expected {size}")
    return size / elapsed / (1 << 20)


def summary(values):
    return (f"median {statistics.median(values):.2f}  min {min(values):.2f}  "
            f"max {max(values):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=8)
    args = parser.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        uds = os.path.join(tmp, "v.sock")
        vmm = subprocess.Popen([VMM, "--kernel", KERNEL, "--initrd", INITRD, "--console", "off",
                                "--vsock", f"3,{uds}", "--cmdline", "cocoon.selftest=1"])
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    s = connect(uds, PORT)
                    if s:
                        s.close()
                        break
                except OSError:
                    pass
                if vmm.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the guest's self-test service never came up")
                time.sleep(0.3)
            to_guest, from_guest = [], []
            for i in range(args.runs):
                to_guest.append(sink(uds, size))
                from_guest.append(source(uds, size))
                print(f"run {i + 1}/{args.runs}: host->guest {to_guest[-1]:.2f} MiB/s, "
                      f"guest->host {from_guest[-1]:.2f} MiB/s", file=sys.stderr)
            command(uds, "POWEROFF").close()
            vmm.wait(timeout=60)
        finally:
            if vmm.poll() is None:
                vmm.kill()
                vmm.wait()
    print(f"vsock benchmark: {args.runs} runs of {args.mib} MiB each way, 1 vCPU")
    print(f"vsock host -> guest (MiB/s)  {summary(to_guest)}")
    print(f"vsock guest -> host (MiB/s)  {summary(from_guest)}")


if __name__ == "__main__":
    main()
