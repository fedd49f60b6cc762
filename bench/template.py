#!/usr/bin/env python3
"""Sandboxes restored from one template (a snapshot of a booted VM, see `cocoon template`):
  concurrency  10 `cocoon run` of busybox `true` at once, from one template made beforehand:
               each start's wall time (command start to return), p50 and p99, and p99/p50
               (target <= 3)
  density      10 idle sandboxes (`cocoon run --detach` of busybox `sleep 600`) from one
               template: the PSS (/proc/PID/smaps_rollup) of every process of each sandbox
               (the monitor, `cocoon ... monitor ID`, runs the VM in its threads, and any
               process under it), per sandbox (target <= 15 MiB) and as sandboxes per GiB of
               host memory, next to one cold-booted (--no-template) idle sandbox's PSS
Everything lives in a scratch directory: the state (--root), a configuration (COCOON_CONFIG)
with its own template_dir and layer_cache, and the bundles, each an overlay mount of the busybox
tree with an upper directory of its own (as engines hand a rootfs over), so every container
finds the one layer image cached after the first. All containers are deleted (--force) and the
mounts undone, whatever fails.
Usage: bench/template.py [--concurrent N] [--rounds R] [--sandboxes N] [--no-cold]
"""
import argparse
import concurrent.futures
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from selftest_vm import ROOT, pin_cocoon, summary

COCOON = os.environ.get("COCOON_BIN", os.path.join(ROOT, "target/release/cocoon"))
BUSYBOX = os.environ.get("COCOON_BUSYBOX_DIR", os.path.join(ROOT, "build/busybox-rootfs"))
PHASES = ["vm starting", "vm restored", "agent up", "container created", "container started",
          "container exited"]
SETTLE_SECS = 3  # after `run --detach` returns, before an idle sandbox's memory is read


def figure(label, value, unit="(s)"):
    print(f"{label:<44}{unit:<5}  {value}")


def percentile(values, q):
    """The nearest-rank percentile: of 10 values, p50 is the 5th and p99 the 10th."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Scratch:
    """The scratch state, configuration, template directory, layer cache and bundles; on exit
    every container made through it is deleted and every mount undone."""

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="cocoon-template-bench-")
        self.dir = self.tmp.name
        self.root = os.path.join(self.dir, "root")
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(f'template_dir = "{self.dir}/templates"\nlayer_cache = "{self.dir}/layers"\n')
        self.cocoon_bin, env = pin_cocoon(self.dir, COCOON)
        self.env = dict(env, COCOON_CONFIG=config)
        self.ids, self.mounts, self.specs = [], [], {}

    def __enter__(self):
        return self

    def cocoon(self, *args, log=None, check=True):
        cmd = [self.cocoon_bin, "--root", self.root]
        if log:
            cmd += ["--log", log, "--log-format", "json", "--debug"]
        # Files, not pipes: a detached container's monitor keeps the stdio it was given (the
        # container's own), and reading a pipe to its end would wait for the container.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run([*cmd, *args], stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=err, env=self.env)
            out.seek(0)
            err.seek(0)
            proc.stdout, proc.stderr = out.read(), err.read()
        if check and proc.returncode != 0:
            raise RuntimeError(f"cocoon {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc

    def bundle(self, cid, args):
        """A bundle for container `cid` running `args`: a config.json and a rootfs that is an
        overlay of the busybox tree."""
        key = tuple(args)
        if key not in self.specs:
            proto = os.path.join(self.dir, f"proto{len(self.specs)}")
            empty = os.path.join(self.dir, "empty")
            os.makedirs(empty, exist_ok=True)
            subprocess.run([os.path.join(ROOT, "images/make-bundle.sh"), self.cocoon_bin, proto, empty,
                            *args], check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(proto, "config.json")) as f:
                self.specs[key] = f.read()
        base = os.path.join(self.dir, "c", cid)
        bundle = os.path.join(base, "bundle")
        for d in ("upper", "work", "bundle/rootfs"):
            os.makedirs(os.path.join(base, d))
        with open(os.path.join(bundle, "config.json"), "w") as f:
            f.write(self.specs[key])
        rootfs = os.path.join(bundle, "rootfs")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={BUSYBOX},upperdir={base}/upper,workdir={base}/work", rootfs],
                       check=True)
        self.mounts.append(rootfs)
        self.ids.append(cid)
        return bundle

    def delete(self, cid):
        self.cocoon("delete", "--force", cid, check=False)

    def monitor_pid(self, cid):
        state = json.loads(self.cocoon("state", cid).stdout)
        if state.get("status") != "running" or not state.get("pid"):
            raise RuntimeError(f"container {cid} is {state.get('status')}, not running")
        return state["pid"]

    def __exit__(self, *_):
        for cid in self.ids:
            self.delete(cid)
        # Anything still running from this scratch state (it was started here) is killed.
        for pid in pids_mentioning(self.root):
            try:
                os.kill(pid, signal.SIGKILL)
                print(f"killed leftover process {pid}", file=sys.stderr)
            except ProcessLookupError:
                pass
        for rootfs in reversed(self.mounts):
            subprocess.run(["umount", rootfs], stderr=subprocess.DEVNULL)
        self.tmp.cleanup()


def pids_mentioning(text):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def process_tree(pid):
    """`pid` and every process under it."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rollup(pid):
    """smaps_rollup of `pid` in KiB by field."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def sandbox_memory(scratch, cid):
    """PSS, PSS of anonymous memory, and RSS (MiB) summed over the sandbox's processes."""
    totals = {"Pss": 0, "Pss_Anon": 0, "Rss": 0}
    for pid in process_tree(scratch.monitor_pid(cid)):
        fields = rollup(pid)
        for key in totals:
            totals[key] += fields.get(key, 0)
    return {k: v / 1024 for k, v in totals.items()}


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def phases(log):
    marks = {}
    try:
        with open(log) as f:
            for line in f:
                entry = json.loads(line)
                if entry.get("phase") in PHASES:
                    marks[entry["phase"]] = float(entry["elapsed_ms"]) / 1000
    except (OSError, ValueError):
        pass
    return marks


def make_template(scratch):
    start = time.monotonic()
    name = scratch.cocoon("template", "create").stdout.strip()
    return name, time.monotonic() - start


def concurrency(scratch, n, rounds):
    """`rounds` rounds of `n` simultaneous `cocoon run` of busybox `true`."""
    # One run first, alone, so the layer image is cached and the template known to load.
    bundle = scratch.bundle("warm", ["true"])
    scratch.cocoon("run", "--bundle", bundle, "warm")
    scratch.delete("warm")
    walls, failures, marks, round_walls = [], [], [], []

    def one(cid, bundle):
        log = os.path.join(scratch.dir, f"{cid}.log")
        cmd = [scratch.cocoon_bin, "--root", scratch.root, "--log", log, "--log-format", "json", "--debug",
               "run", "--bundle", bundle, cid]
        start = time.monotonic()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=scratch.env)
        return cid, time.monotonic() - start, proc, log

    for r in range(rounds):
        bundles = {f"r{r}-{i}": scratch.bundle(f"r{r}-{i}", ["true"]) for i in range(n)}
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda item: one(*item), bundles.items()))
        round_wall = time.monotonic() - start
        round_walls.append(round_wall)
        for cid, wall, proc, log in results:
            scratch.delete(cid)
            if proc.returncode == 0:
                walls.append(wall)
                marks.append(phases(log))
            else:
                failures.append(f"{cid}: exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
        ok = sum(1 for _, _, p, _ in results if p.returncode == 0)
        print(f"concurrency round {r + 1}/{rounds}: {ok}/{n} succeeded in {round_wall:.2f} s",
              file=sys.stderr)
    return walls, failures, marks, " ".join(f"{w:.3f}" for w in round_walls)


def density(scratch, n, cold):
    """`n` idle sandboxes from the template, then (with `cold`) one booted cold, alone."""
    ids, lone = [], None
    before = mem_available()
    for i in range(n):
        cid = f"idle{i}"
        bundle = scratch.bundle(cid, ["sleep", "600"])
        start = time.monotonic()
        scratch.cocoon("run", "--detach", "--bundle", bundle, cid)
        ids.append(cid)
        print(f"density: sandbox {i + 1}/{n} started in {time.monotonic() - start:.2f} s",
              file=sys.stderr)
        if i == 0:
            time.sleep(SETTLE_SECS)
            lone = sandbox_memory(scratch, cid)
    time.sleep(SETTLE_SECS)
    per = [sandbox_memory(scratch, cid) for cid in ids]
    after = mem_available()
    for cid in ids:
        scratch.delete(cid)
    cold_memory = None
    if cold:
        bundle = scratch.bundle("idle-cold", ["sleep", "600"])
        start = time.monotonic()
        scratch.cocoon("run", "--detach", "--no-template", "--bundle", bundle, "idle-cold")
        print(f"density: cold sandbox started in {time.monotonic() - start:.2f} s", file=sys.stderr)
        time.sleep(SETTLE_SECS)
        cold_memory = sandbox_memory(scratch, "idle-cold")
        scratch.delete("idle-cold")
    return per, lone, (before - after) / n, cold_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=10, help="simultaneous runs (10)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of them (1)")
    parser.add_argument("--sandboxes", type=int, default=10, help="idle sandboxes (10)")
    parser.add_argument("--no-cold", action="store_true",
                        help="skip the cold-booted sandbox (a ~25 s boot)")
    args = parser.parse_args()
    for path in (COCOON, BUSYBOX):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run `make bench`")
    with Scratch() as scratch:
        try:
            name, template_secs = make_template(scratch)
            walls, failures, marks, round_walls = concurrency(scratch, args.concurrent, args.rounds)
            per, lone, available, cold = density(scratch, args.sandboxes, not args.no_cold)
        except RuntimeError as e:
            sys.exit(str(e))
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    if any(m["vm restored"] - m["vm starting"] > 5 for m in marks if "vm restored" in m):
        print("warning: some restores took over 5 s: the template was made again "
              "(did its inputs change?)", file=sys.stderr)
    total = args.concurrent * args.rounds
    print(f"template benchmark: sandboxes restored from one template "
          f"(busybox; 256 MiB, 1 vCPU, 8 disk slots; template {name})")
    figure("template create, ahead (once)", f"{template_secs:.3f}")
    figure(f"concurrent runs of `true`, {args.concurrent} at once, succeeded",
           f"{len(walls)}/{total}", unit="   ")
    if walls:
        p50, p99 = percentile(walls, 50), percentile(walls, 99)
        figure("concurrent run wall time p50", f"{p50:.3f}")
        figure("concurrent run wall time p99", f"{p99:.3f}")
        figure("concurrent run wall time p99/p50", f"{p99 / p50:.2f}   (target <= 3)", unit="   ")
        figure("concurrent runs, first start to last end", f"{round_walls}")
        for label, a, b in [("restore", "vm starting", "vm restored"),
                            ("agent", "vm restored", "agent up"),
                            ("agent up to created", "agent up", "container created"),
                            ("start", "container created", "container started"),
                            ("run+exit", "container started", "container exited")]:
            values = [m[b] - m[a] for m in marks if a in m and b in m]
            if values:
                figure(f"concurrent run {label}", summary(values, "{:.3f}"))
    mib = [p["Pss"] for p in per]
    median = statistics.median(mib)
    n = len(per)
    figure("idle sandbox PSS, alone", f"{lone['Pss']:.1f}", unit="(MiB)")
    figure(f"idle sandbox PSS, {n} running", f"{summary(mib, '{:.1f}')}   (target <= 15)",
           unit="(MiB)")
    figure(f"idle sandbox PSS anon, {n} running",
           summary([p["Pss_Anon"] for p in per], "{:.1f}"), unit="(MiB)")
    figure(f"idle sandbox RSS, {n} running", summary([p["Rss"] for p in per], "{:.1f}"),
           unit="(MiB)")
    figure("host MemAvailable drop per sandbox", f"{available:.1f}", unit="(MiB)")
    figure("idle sandboxes per GiB of host memory", f"{1024 / median:.0f}   (by median PSS)",
           unit="     ")
    if cold:
        figure("idle sandbox PSS, cold-booted, alone",
               f"{cold['Pss']:.1f}   cold/template = {cold['Pss'] / median:.1f}", unit="(MiB)")
        figure("idle sandbox RSS, cold-booted, alone", f"{cold['Rss']:.1f}", unit="(MiB)")


if __name__ == "__main__":
    main()
