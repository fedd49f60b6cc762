#!/usr/bin/env python3
"""Snapshot benchmark: restoring a booted guest against booting one, in the same run.

Boots a 128 MiB and a 512 MiB guest with the agent (console off, vsock), waits for the agent's
Hello, pauses and snapshots each over the API socket, then prints:
  - restore, VMM side: spawn of `cocoon-vmm --restore` -> first KVM_RUN (--metrics), median and
    p90 over --restores runs (each clone stopped with SIGTERM right after), target <= 5 ms;
  - restore -> the agent's Hello reply over vsock, over --hellos runs;
  - cold boot -> the agent's Hello reply, same 128 MiB VM, over --boots runs (the baseline);
  - the `snapshot` API call's duration and the snapshot's size (memory.bin apparent and
    allocated, state.bin) for both guests;
  - host memory: PSS (/proc/PID/smaps_rollup) of --clones idle clones of the 128 MiB snapshot
    running at once against as many cold-booted 128 MiB VMs (booted --parallel at a time),
    target: a clone's PSS <= 1/4 of a cold-booted VM's.
Usage: bench/snapshot.py [--restores N] [--hellos N] [--boots N] [--clones N] [--parallel N]
Environment: COCOON_KERNEL, COCOON_INITRD, COCOON_VMM (set by `make bench`). Scratch files go
in a directory under /tmp, removed at the end with every VM this script started.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from selftest_vm import KERNEL, INITRD, VMM, require_artifacts
from agent import Agent

MEMORY_MIB = 128
BIG_MEMORY_MIB = 512
CID = 3
BOOT_TIMEOUT_S = 240
RESTORE_TIMEOUT_S = 60
FIRST_RUN_TARGET_MS = 5.0
PSS_TARGET_RATIO = 0.25
SETTLE_S = 2.0


class BenchError(Exception):
    pass


def percentile(values, p):
    """The p-th percentile, interpolated between the closest ranks (numpy's default)."""
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Vm:
    """One cocoon-vmm process started by this script, with its sockets and its stderr log."""

    def __init__(self, scratch, name, args, api=False):
        self.name = name
        self.uds = os.path.join(scratch, f"{name}.vsock")
        self.api = os.path.join(scratch, f"{name}.api") if api else None
        self.log = os.path.join(scratch, f"{name}.stderr")
        argv = [VMM, *args, "--vsock", f"{CID},{self.uds}", "--console", "off"]
        if self.api:
            argv += ["--api-sock", self.api]
        self.argv = argv
        with open(self.log, "wb") as err:
            self.spawned = time.monotonic()
            self.spawned_ns = time.time_ns()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        VMS.append(self)

    def stderr(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read().strip()
        except OSError:
            return ""

    def failed(self, what):
        code = self.proc.poll()
        state = f"exited with status {code}" if code is not None else "still running"
        return BenchError(f"{self.name}: {what} ({state})\n  command: {' '.join(self.argv)}\n"
                          f"  stderr: {self.stderr() or '(empty)'}")

    def check_alive(self, what):
        if self.proc.poll() is not None:
            raise self.failed(what)

    def api_call(self, request):
        """Sends one request line on a fresh connection; returns (reply, seconds)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(120)
            s.connect(self.api)
            f = s.makefile("rwb")
            t0 = time.monotonic()
            f.write(json.dumps(request).encode() + b"\n")
            f.flush()
            line = f.readline()
            took = time.monotonic() - t0
        if not line:
            raise self.failed(f"the API socket closed without answering {request}")
        return json.loads(line), took

    def hello(self):
        """One Hello over vsock: the agent's info, or None if nobody answered (yet)."""
        try:
            agent = Agent(self.uds)
        except OSError:
            return None
        if agent.sock is None:
            return None
        try:
            reply = agent.call("hello")
        except (OSError, EOFError, ValueError, KeyError):
            return None
        except RuntimeError as e:
            raise self.failed(f"the agent refused Hello: {e}")
        finally:
            agent.sock.close()
        if reply.get("kind") != "hello":
            raise self.failed(f"the agent answered Hello with {reply}")
        return reply["value"]

    def wait_agent(self, timeout, interval):
        """Polls until the agent answers Hello; returns (seconds since spawn, agent info).
        With an API socket, waits for the boot marker there first, so that the guest is not
        disturbed by vsock connection attempts while it boots."""
        deadline = self.spawned + timeout
        if self.api:
            while True:
                self.check_alive("the VM ended before its agent came up")
                try:
                    if self.api_call({"action": "state"})[0].get("agent_up"):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise self.failed(f"the agent's boot marker did not come within {timeout} s")
                time.sleep(0.1)
        while True:
            info = self.hello()
            if info is not None:
                return time.monotonic() - self.spawned, info
            self.check_alive("the VM ended before its agent answered")
            if time.monotonic() > deadline:
                raise self.failed(f"the agent did not answer Hello within {timeout} s")
            time.sleep(interval)

    def stop(self):
        """SIGTERM (the VMM stops the guest, writes its metrics, removes its sockets); SIGKILL
        if that does not end it. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self in VMS:
            VMS.remove(self)
        return self.proc.returncode

    def pss_kib(self):
        fields = {}
        with open(f"/proc/{self.proc.pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1])
        return {"pss": fields["Pss"], "rss": fields["Rss"],
                "private": fields["Private_Clean"] + fields["Private_Dirty"],
                "anon": fields["Anonymous"]}


VMS = []


def boot(scratch, name, memory_mib=MEMORY_MIB):
    return Vm(scratch, name, ["--kernel", KERNEL, "--initrd", INITRD, "--memory", str(memory_mib)],
              api=True)


def restore(scratch, name, snap, extra=()):
    return Vm(scratch, name, ["--restore", snap, *extra])


def check_memory(vm, info, memory_mib):
    # MemTotal is a little less than the VM's RAM: a guest of another size is a mistake.
    if not memory_mib * 0.5 < info.get("memory_mib", 0) <= memory_mib:
        raise vm.failed(f"the agent reports {info.get('memory_mib')} MiB, expected ~{memory_mib}")


def take_snapshot(scratch, memory_mib):
    """Boots a guest, waits for its agent, pauses, snapshots. Returns the figures and the dir."""
    vm = boot(scratch, f"snap{memory_mib}", memory_mib)
    boot_s, info = vm.wait_agent(BOOT_TIMEOUT_S, 0.005)
    check_memory(vm, info, memory_mib)
    reply, _ = vm.api_call({"action": "pause"})
    if not reply.get("ok"):
        raise vm.failed(f"pause failed: {reply}")
    snap = os.path.join(scratch, f"snapshot-{memory_mib}")
    reply, took = vm.api_call({"action": "snapshot", "path": snap})
    if not reply.get("ok"):
        raise vm.failed(f"snapshot failed: {reply}")
    vm.stop()
    mem = os.stat(os.path.join(snap, "memory.bin"))
    state = os.stat(os.path.join(snap, "state.bin"))
    figures = {"memory_mib": memory_mib, "boot_s": boot_s, "snapshot_ms": took * 1000,
               "mem_apparent": mem.st_size, "mem_allocated": mem.st_blocks * 512,
               "state": state.st_size}
    print(f"snapshot of {memory_mib} MiB: booted in {boot_s:.2f} s, snapshot call "
          f"{took * 1000:.1f} ms, memory.bin {mem.st_blocks * 512 / 2**20:.1f} MiB allocated",
          file=sys.stderr)
    return figures, snap


def restore_first_run(scratch, snap, i):
    """One restore, stopped by SIGTERM once its vCPU has run: the times to first KVM_RUN."""
    metrics = os.path.join(scratch, f"first-run-{i}.json")
    vm = restore(scratch, f"first-run-{i}", snap, ["--metrics", metrics])
    # The vsock socket is bound while the VM is built, before the vCPUs are let go.
    deadline = time.monotonic() + RESTORE_TIMEOUT_S
    while not os.path.exists(vm.uds):
        vm.check_alive("the restore failed")
        if time.monotonic() > deadline:
            raise vm.failed("the restored VM never bound its vsock socket")
        time.sleep(0.001)
    time.sleep(0.1)
    vm.check_alive("the restored VM ended by itself")
    code = vm.stop()
    if code != 128 + signal.SIGTERM:
        raise vm.failed(f"expected exit status {128 + signal.SIGTERM} after SIGTERM")
    try:
        with open(metrics) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise vm.failed(f"no metrics in {metrics}: {e}")
    if m.get("first_kvm_run_unix_ns") is None:
        raise vm.failed(f"the metrics have no first KVM_RUN: {m}")
    return {"spawn_ms": (m["first_kvm_run_unix_ns"] - vm.spawned_ns) / 1e6,
            "main_ms": m["first_kvm_run_us"] / 1000,
            "rss_kib": m.get("rss_excluding_guest_kib")}


def restore_hello(scratch, snap, i):
    vm = restore(scratch, f"hello-{i}", snap)
    took, info = vm.wait_agent(RESTORE_TIMEOUT_S, 0.002)
    check_memory(vm, info, MEMORY_MIB)
    # The same again on the running clone: what a connection and a Hello cost by themselves.
    t0 = time.monotonic()
    if vm.hello() is None:
        raise vm.failed("the clone's agent did not answer a second Hello")
    again = time.monotonic() - t0
    vm.stop()
    return took, again


def cold_hello(scratch, i):
    vm = boot(scratch, f"cold-{i}")
    took, info = vm.wait_agent(BOOT_TIMEOUT_S, 0.005)
    check_memory(vm, info, MEMORY_MIB)
    vm.stop()
    return took


def pss_of(vms):
    time.sleep(SETTLE_S)
    figures = []
    for vm in vms:
        vm.check_alive("the VM ended while idle")
        figures.append(vm.pss_kib())
    return figures


def pss_clones(scratch, snap, n):
    vms = [restore(scratch, f"clone-{i}", snap) for i in range(n)]
    for vm in vms:
        _, info = vm.wait_agent(RESTORE_TIMEOUT_S, 0.01)
        check_memory(vm, info, MEMORY_MIB)
    print(f"{n} clones answer Hello", file=sys.stderr)
    figures = pss_of(vms)
    for vm in vms:
        vm.stop()
    return figures


def pss_cold(scratch, n, parallel):
    vms = []
    while len(vms) < n:
        batch = [boot(scratch, f"pss-cold-{len(vms) + j}") for j in range(min(parallel, n - len(vms)))]
        for vm in batch:
            took, info = vm.wait_agent(BOOT_TIMEOUT_S, 0.01)
            check_memory(vm, info, MEMORY_MIB)
        vms += batch
        print(f"{len(vms)}/{n} cold-booted VMs answer Hello (last batch {took:.1f} s)",
              file=sys.stderr)
    figures = pss_of(vms)
    for vm in vms:
        vm.stop()
    return figures


def mib(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB"


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def report(first_runs, hellos, colds, snaps, clones, cold_pss):
    print(f"snapshot benchmark: {MEMORY_MIB} MiB guest (and {BIG_MEMORY_MIB} MiB for sizes), "
          f"1 vCPU, console off, vsock; kernel {os.path.realpath(KERNEL)}")
    print()
    print(f"Restore against cold boot ({MEMORY_MIB} MiB)")
    spawn = [r["spawn_ms"] for r in first_runs]
    inproc = [r["main_ms"] for r in first_runs]
    ok = ("met (median and p90)" if percentile(spawn, 90) <= FIRST_RUN_TARGET_MS else
          "met by the median only" if statistics.median(spawn) <= FIRST_RUN_TARGET_MS else "MISSED")
    again = [a for _, a in hellos]
    hellos = [h for h, _ in hellos]
    rows = [
        ("restore: spawn -> first KVM_RUN (ms)", spawn, "{:.2f}",
         f"<= {FIRST_RUN_TARGET_MS:g} ms: {ok}"),
        ("restore: main() -> first KVM_RUN (ms)", inproc, "{:.2f}", ""),
        ("restore: spawn -> agent Hello reply (s)", hellos, "{:.3f}", ""),
        ("  then a 2nd connection and Hello (s)", again, "{:.3f}", ""),
        ("cold boot: spawn -> agent Hello reply (s)", colds, "{:.2f}", ""),
    ]
    table(("figure", "runs", "median", "p90", "min", "max", "target"),
          [(label, len(v), fmt.format(statistics.median(v)), fmt.format(percentile(v, 90)),
            fmt.format(min(v)), fmt.format(max(v)), target) for label, v, fmt, target in rows])
    print(f"cold boot / restore to agent Hello (medians): "
          f"{statistics.median(colds) / statistics.median(hellos):.0f}x")
    rss = [r["rss_kib"] for r in first_runs if r["rss_kib"] is not None]
    if rss:
        print(f"restored cocoon-vmm RSS without guest memory, at SIGTERM: "
              f"median {statistics.median(rss):.0f} KiB")
    print()
    print("Snapshot (the `snapshot` API call of a paused guest just after its agent's Hello)")
    table(("guest", "snapshot call", "memory.bin apparent", "memory.bin allocated", "state.bin"),
          [(f"{s['memory_mib']} MiB", f"{s['snapshot_ms']:.1f} ms", mib(s["mem_apparent"]),
            mib(s["mem_allocated"]), f"{s['state'] / 1024:.1f} KiB") for s in snaps])
    print()
    per = lambda vms, key: sum(v[key] for v in vms) / len(vms) * 1024
    per_clone, per_cold = per(clones, "pss"), per(cold_pss, "pss")
    ratio = per_clone / per_cold
    ok = "met" if ratio <= PSS_TARGET_RATIO else "MISSED"
    print(f"Host memory: idle {MEMORY_MIB} MiB VMs running at once, from /proc/PID/smaps_rollup "
          f"{SETTLE_S:g} s after the last agent answered")
    table(("VMs", "total PSS", "PSS per VM", "min", "max", "RSS per VM", "private per VM",
           "anon per VM"),
          [(label, mib(sum(v["pss"] for v in vms) * 1024), mib(per(vms, "pss")),
            mib(min(v["pss"] for v in vms) * 1024), mib(max(v["pss"] for v in vms) * 1024),
            mib(per(vms, "rss")), mib(per(vms, "private")), mib(per(vms, "anon")))
           for label, vms in [(f"{len(clones)} clones of one snapshot", clones),
                              (f"{len(cold_pss)} cold-booted VMs", cold_pss)]])
    print(f"PSS per clone / per cold-booted VM: {ratio:.3f} (target <= {PSS_TARGET_RATIO:g}: {ok})")

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restores", type=int, default=10, help="restores to first KVM_RUN")
    parser.add_argument("--hellos", type=int, default=5, help="restores to the agent's Hello")
    parser.add_argument("--boots", type=int, default=3, help="cold boots to the agent's Hello")
    parser.add_argument("--clones", type=int, default=10, help="VMs of each kind for the PSS")
    parser.add_argument("--parallel", type=int, default=2, help="cold boots at once for the PSS")
    args = parser.parse_args()
    if min(args.restores, args.hellos, args.boots, args.clones, args.parallel) < 1:
        sys.exit("every count must be at least 1")
    require_artifacts()
    if not os.path.exists("/proc/self/smaps_rollup"):
        sys.exit("/proc/self/smaps_rollup is missing: the host kernel is too old for the PSS figures")
    socket.setdefaulttimeout(30)
    # A SIGTERM to the script still stops its VMs and removes its scratch directory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("snapshot benchmark: terminated"))

    scratch = tempfile.mkdtemp(prefix="cocoon-bench-snapshot-", dir="/tmp")
    try:
        snaps, snap = [], None
        for memory_mib in (MEMORY_MIB, BIG_MEMORY_MIB):
            figures, path = take_snapshot(scratch, memory_mib)
            snaps.append(figures)
            if memory_mib == MEMORY_MIB:
                snap = path
            else:
                shutil.rmtree(path)
        first_runs = []
        for i in range(args.restores):
            first_runs.append(restore_first_run(scratch, snap, i))
            print(f"restore {i + 1}/{args.restores}: first KVM_RUN "
                  f"{first_runs[-1]['spawn_ms']:.2f} ms after spawn", file=sys.stderr)
        hellos = []
        for i in range(args.hellos):
            hellos.append(restore_hello(scratch, snap, i))
            print(f"restore {i + 1}/{args.hellos}: agent Hello {hellos[-1][0] * 1000:.1f} ms after "
                  f"spawn, a second Hello {hellos[-1][1] * 1000:.1f} ms", file=sys.stderr)
        colds = []
        for i in range(args.boots):
            colds.append(cold_hello(scratch, i))
            print(f"cold boot {i + 1}/{args.boots}: agent Hello {colds[-1]:.2f} s after spawn",
                  file=sys.stderr)
        clones = pss_clones(scratch, snap, args.clones)
        cold_pss = pss_cold(scratch, args.clones, args.parallel)
    except BenchError as e:
        sys.exit(f"snapshot benchmark failed: {e}")
    finally:
        for vm in list(VMS):
            vm.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    report(first_runs, hellos, colds, snaps, clones, cold_pss)


if __name__ == "__main__":
    main()
