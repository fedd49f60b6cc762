#!/usr/bin/env python3
"""Container lifecycle latency inside one guest, over the agent protocol (docs/protocol.md).

Boots one VM with the busybox EROFS image as its disk, then for each run:
  create   host sends CreateContainer -> agent replies (rootfs mounted, cgroup made, init
           process set up and waiting before exec)
  start    host sends StartContainer -> agent replies (the process has exec'd: it is running)
  create -> running   the sum: the host's create request to the container process running
  exit -> host sees exit code   the container writes one byte to stdout and exits; the time from
           that byte reaching the host to the Wait reply reaching the host
  remove   RemoveContainer round trip (unmounts, cgroup removed)
Usage: bench/agent.py [--runs N]
"""
import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from selftest_vm import KERNEL, INITRD, VMM, ROOT, connect, require_artifacts, summary

ROOTFS = os.environ.get("COCOON_ROOTFS", os.path.join(ROOT, "build/busybox.erofs"))
CONTROL_PORT, STDIO_PORT, VERSION = 1024, 1026, 1


def send(s, message):
    body = json.dumps(message).encode()
    s.sendall(struct.pack(">I", len(body)) + body)


def recv(s):
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise EOFError("agent closed the connection")
            data += chunk
        return data
    (length,) = struct.unpack(">I", exactly(4))
    return json.loads(exactly(length))


class Agent:
    def __init__(self, uds):
        self.uds, self.next_id = uds, 1
        self.sock = connect(uds, CONTROL_PORT)

    def call(self, method, params=None):
        request = {"method": method} if params is None else {"method": method, "params": params}
        send(self.sock, {"version": VERSION, "id": self.next_id, "request": request})
        self.next_id += 1
        reply = recv(self.sock)
        if "Err" in reply["result"]:
            raise RuntimeError(f"{method}: {reply['result']['Err']}")
        return reply["result"]["Ok"]


def attach(uds, container_id, stream):
    s = connect(uds, STDIO_PORT)
    send(s, {"version": VERSION, "container_id": container_id, "exec_id": None, "stream": stream})
    ack = recv(s)
    if "Err" in ack:
        raise RuntimeError(f"attach {stream}: {ack['Err']}")
    return s


def spec(args):
    return {
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/",
                    "env": ["PATH=/bin"], "noNewPrivileges": True},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                                 {"type": "uts"}]},
    }


def one_run(uds, n):
    cid = f"bench{n}"
    out = attach(uds, cid, "stdout")
    control, waiter = Agent(uds), Agent(uds)
    stdio = {"terminal": False, "stdin": False, "stdout": True, "stderr": False}
    t0 = time.monotonic()
    control.call("create_container", {"container_id": cid, "spec": spec(["echo", "x"]),
                                      "layers": ["/dev/vda"], "stdio": stdio})
    t1 = time.monotonic()
    result = {}

    def wait():
        result["exit"] = waiter.call("wait", {"container_id": cid, "exec_id": None})
        result["t_exit"] = time.monotonic()
    thread = threading.Thread(target=wait)
    thread.start()
    control.call("start_container", {"container_id": cid})
    t2 = time.monotonic()
    byte = out.recv(1)
    t_byte = time.monotonic()
    thread.join()
    assert byte == b"x" and result["exit"]["value"]["code"] == 0, (byte, result)
    t3 = time.monotonic()
    control.call("remove_container", {"container_id": cid})
    t4 = time.monotonic()
    return {"create": t1 - t0, "start": t2 - t1, "running": t2 - t0,
            "exit_seen": max(result["t_exit"], t_byte) - t_byte, "remove": t4 - t3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "5")))
    args = parser.parse_args()
    require_artifacts()
    if not os.path.exists(ROOTFS):
        sys.exit(f"{ROOTFS} is missing: run `make bench`")
    with tempfile.TemporaryDirectory() as tmp:
        uds = os.path.join(tmp, "v.sock")
        vm = subprocess.Popen([VMM, "--kernel", KERNEL, "--initrd", INITRD, "--console", "off",
                               "--memory", "256", "--disk", f"{ROOTFS},ro", "--vsock", f"3,{uds}"])
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    agent = Agent(uds)
                    if agent.sock is not None:
                        agent.call("hello")
                        break
                except (OSError, EOFError):
                    pass
                if time.monotonic() > deadline or vm.poll() is not None:
                    sys.exit("the agent never answered")
                time.sleep(0.2)
            runs = []
            for i in range(args.runs):
                runs.append(one_run(uds, i))
                r = runs[-1]
                print(f"run {i + 1}/{args.runs}: create {r['create']:.3f} s, start {r['start']:.3f} s, "
                      f"exit seen {r['exit_seen'] * 1000:.1f} ms, remove {r['remove']:.3f} s",
                      file=sys.stderr)
            agent.call("power_off")
            vm.wait(timeout=60)
        finally:
            if vm.poll() is None:
                vm.kill()
                vm.wait()
    print(f"agent benchmark: {args.runs} containers in sequence in one guest (256 MiB, 1 vCPU)")
    for key, label, scale, fmt in [
        ("create", "create request -> created      (s) ", 1, "{:.3f}"),
        ("start", "start request -> exec'd        (s) ", 1, "{:.3f}"),
        ("running", "create request -> running      (s) ", 1, "{:.3f}"),
        ("exit_seen", "exit -> host has the exit code (ms)", 1000, "{:.1f}"),
        ("remove", "remove request -> removed      (s) ", 1, "{:.3f}"),
    ]:
        print(f"{label} {summary([r[key] * scale for r in runs], fmt)}")


if __name__ == "__main__":
    main()
