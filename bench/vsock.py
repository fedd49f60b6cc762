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
import sys
import time

from selftest_vm import SELFTEST_PORT, SelftestVm, both_ways, connect


def open_command(uds, line):
    """A self-test command whose stream stays open for the transfer."""
    s = connect(uds, SELFTEST_PORT)
    if s is None:
        sys.exit("self-test service went away")
    s.sendall(line.encode() + b"\n")
    return s


def sink(uds, size):
    s = open_command(uds, "SINK")
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
    s = open_command(uds, f"SOURCE {size} 1")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=8)
    args = parser.parse_args()
    size = args.mib << 20
    with SelftestVm() as vm:
        both_ways(args.runs, lambda: sink(vm.uds, size), lambda: source(vm.uds, size),
                  f"vsock benchmark: {args.runs} runs of {args.mib} MiB each way, 1 vCPU", "vsock")


if __name__ == "__main__":
    main()
