#!/usr/bin/env python3
"""The network through the whole engine path: Podman (Debian's 4.3, netavark's default bridge,
ports published with -p) with cocoon, next to the same with runc, in the same run:
  HTTP GET latency  small GETs (100 bytes) from the host to busybox httpd through the published
                    port, one connection each: p50 / p99
  host -> container TCP throughput to busybox `nc -l` through the published port
  container -> host TCP throughput from busybox `nc` to a server on the host, over the bridge
Usage: bench/network.py [--requests N] [--mib M]   (or BENCH_REQUESTS, BENCH_MIB)
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from selftest_vm import ROOT

COCOON = os.environ.get("COCOON_BIN", os.path.join(ROOT, "target/release/cocoon"))
IMAGE_TAR = os.environ.get("COCOON_OCI_IMAGE", os.path.join(ROOT, "build/busybox-oci.tar"))
IMAGE = "localhost/cocoon-busybox:latest"
GATEWAY = "10.88.0.1"


class Podman:
    def __init__(self, scratch):
        self.env = dict(os.environ)
        conf = os.path.join(scratch, "containers.conf")
        with open(conf, "w") as f:
            # runc sets rlimits on the host, which root here may not raise (docs/podman.md).
            f.write('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
                    '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    f'events_logfile_path = "{scratch}/events.log"\ntmp_dir = "{scratch}/tmp"\n'
                    f'[engine.runtimes]\ncocoon = ["{COCOON}"]\n')
        storage = os.path.join(scratch, "storage.conf")
        with open(storage, "w") as f:
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{scratch}/storage"\n'
                    f'runroot = "{scratch}/run"\n')
        self.env["CONTAINERS_CONF"] = conf
        self.env["CONTAINERS_STORAGE_CONF"] = storage

    def __call__(self, *args, check=True):
        out = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            sys.exit(f"podman {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout


def get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.0 200") and not data.startswith(b"HTTP/1.1 200"):
        raise OSError(data[:80])
    return data


def wait_for(port, path, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(port, path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def latency(podman, runtime, port, requests):
    script = "mkdir -p /www && head -c 100 /dev/zero > /www/s && exec httpd -f -p 80 -h /www"
    name = f"bench-http-{runtime}"
    podman("run", "-d", "--runtime", runtime, "--name", name, "-p", f"{port}:80", IMAGE,
           "sh", "-c", script)
    try:
        wait_for(port, "/s")
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            get(port, "/s")
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def to_container(podman, runtime, port, mib):
    name = f"bench-sink-{runtime}"
    # The container counts what it got, so the figure is of bytes that arrived.
    podman("run", "-d", "--runtime", runtime, "--name", name, "-p", f"{port}:5001", IMAGE,
           "sh", "-c", "nc -l -p 5001 | wc -c > /tmp/got; sleep 3600")
    try:
        block = b"\0" * (1 << 20)
        deadline = time.monotonic() + 180
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                # A published port accepts before the container listens; a refused or reset
                # connection shows at the first send or at EOF at once.
                s.sendall(block[:1])
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        s.settimeout(600)
        start = time.perf_counter()
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        elapsed = time.perf_counter() - start
        s.close()
        got = podman("exec", name, "cat", "/tmp/got", check=False).strip()
        if got != str(mib * (1 << 20) + 1):
            return None, f"the container got {got or 'nothing'} bytes"
        return mib / elapsed, ""
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def from_container(podman, runtime, mib):
    server = socket.socket()
    # The bridge, and its address, exist only while a container is on it.
    server.bind(("0.0.0.0", 0))
    server.listen(1)
    port = server.getsockname()[1]
    result = {}

    def receive():
        conn, _ = server.accept()
        total, start = 0, None
        while chunk := conn.recv(1 << 20):
            start = start or time.perf_counter()
            total += len(chunk)
        result["bytes"], result["secs"] = total, time.perf_counter() - (start or 0)
        conn.close()

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    podman("run", "--rm", "--runtime", runtime, IMAGE, "sh", "-c",
           f"dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null | nc {GATEWAY} {port}")
    thread.join(60)
    server.close()
    if result.get("bytes") != mib << 20:
        return None, f"{result.get('bytes', 0)} bytes arrived"
    return mib / result["secs"], ""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=int(os.environ.get("BENCH_REQUESTS", 200)))
    parser.add_argument("--mib", type=int, default=int(os.environ.get("BENCH_MIB", 32)))
    args = parser.parse_args()
    if shutil.which("podman") is None:
        sys.exit("podman is not installed (make test installs it)")
    scratch = tempfile.mkdtemp(prefix="cocoon-bench-net-")
    podman = Podman(scratch)
    podman("load", "-q", "-i", IMAGE_TAR)
    rows = []
    base = 19000 + os.getpid() % 500
    try:
        for i, runtime in enumerate(["runc", "cocoon"]):
            p50, p99 = latency(podman, runtime, base + 2 * i, args.requests)
            up, up_note = to_container(podman, runtime, base + 2 * i + 1, args.mib)
            down, down_note = from_container(podman, runtime, args.mib)
            rows.append((runtime, p50, p99, up, down, "; ".join(n for n in (up_note, down_note) if n)))
    finally:
        podman("rm", "-a", "-f", "-t", "0", check=False)
        podman("system", "reset", "--force", check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Podman, default bridge, published ports; {args.requests} GETs of 100 bytes, "
          f"{args.mib} MiB each way")
    print(f"{'runtime':<8} {'GET p50':>9} {'GET p99':>9} {'host->ctr':>12} {'ctr->host':>12}")
    fmt = lambda v: f"{v:8.2f} MiB/s" if v else "      failed"
    for runtime, p50, p99, up, down, note in rows:
        print(f"{runtime:<8} {p50:6.2f} ms {p99:6.2f} ms {fmt(up):>12} {fmt(down):>12} {note}")


if __name__ == "__main__":
    main()
