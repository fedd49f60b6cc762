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
import subprocess
import sys
import threading
import time

from selftest_vm import SelftestVm, both_ways, command

HOST_IP, GUEST_IP = "10.214.0.1", "10.214.0.2"


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

    t = threading.Thread(target=serve)
    t.start()
    reply = command(uds, f"TCPSEND {HOST_IP} {port} {size} 1")
    t.join()
    listener.close()
    if result.get("n") != size or reply != "done":
        sys.exit(f"host received {result.get('n')} bytes, guest said {reply!r}")
    return size / result["s"] / (1 << 20)


def inner(args):
    size = args.mib << 20
    with SelftestVm(["--net", "tap0"]) as vm:
        if command(vm.uds, f"NETUP {GUEST_IP}/24") != "up":
            sys.exit("cannot configure the guest NIC")
        both_ways(args.runs, lambda: to_guest(vm.uds, size), lambda: from_guest(vm.uds, size),
                  f"virtio-net TCP benchmark: {args.runs} runs of {args.mib} MiB each way, "
                  "MTU 1500, checksum and TSO offloads, mergeable RX buffers, receive coalescing",
                  "TCP")


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
