#!/usr/bin/env python3
"""Soak (`make soak`, issue 16 item 5 and issue 20): CYCLES create/start/delete cycles of a
busybox container through `cocoon`, PARALLEL at once, each as an engine drives it (`create`,
`start`, `state` until stopped, `delete`), from a template unless --no-template. Every cycle
must succeed; the slowest start (create + start) is reported with p50/p99. Afterwards nothing
may be left: counted before and after are the processes of the scratch state, TAP devices,
host mounts, state directories, layer-cache temporaries and admission tickets; any difference
is a leak, and the soak exits 1. The CLI path has no long-lived cocoon process: each
container's monitor lives as long as its container, so its file descriptors go with it (the
processes left are counted instead).
Usage: bench/soak.py [--cycles 200] [--parallel 8] [--no-template]
"""
import argparse
import concurrent.futures
import json
import os
import sys
import time

from template import Scratch, figure, percentile, pids_mentioning

ADMISSION_DIR = "/run/cocoon/admission"


def entries(path, keep=lambda name: True):
    try:
        return [name for name in os.listdir(path) if keep(name)]
    except FileNotFoundError:
        return []


def census(scratch):
    """What the host holds that a container could leak, by kind."""
    with open("/proc/self/mountinfo") as f:
        mounts = sum(1 for _ in f)
    return {
        "processes of the state": len(pids_mentioning(scratch.root)),
        "TAP devices": len(entries("/sys/class/net",
                                   lambda n: os.path.exists(f"/sys/class/net/{n}/tun_flags"))),
        "host mounts": mounts,
        "state directories": len(entries(scratch.root)),
        "layer-cache temporaries": len(entries(os.path.join(scratch.dir, "layers"),
                                               lambda n: ".tmp." in n)),
        "admission tickets": len(entries(ADMISSION_DIR, lambda n: n.startswith("ticket"))),
    }


def cycle(scratch, bundle, cid, extra):
    """One container's life; returns (seconds to start, error or None)."""
    started = time.monotonic()
    try:
        scratch.cocoon("create", *extra, "--bundle", bundle, cid)
        scratch.cocoon("start", cid)
        took = time.monotonic() - started
        deadline = time.monotonic() + 600
        while json.loads(scratch.cocoon("state", cid).stdout)["status"] != "stopped":
            if time.monotonic() > deadline:
                raise RuntimeError("still running 600 s after start")
            time.sleep(0.2)
        scratch.cocoon("delete", cid)
        return took, None
    except Exception as e:  # noqa: BLE001 - every failure is a failed cycle, reported
        scratch.delete(cid)
        return time.monotonic() - started, str(e)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--no-template", action="store_true")
    args = parser.parse_args()
    if not os.path.exists("/dev/kvm"):
        # As the VM tests: CI must not pass without running it; elsewhere it is skipped.
        if os.environ.get("CI") == "true":
            sys.exit("soak: /dev/kvm is missing, and CI=true requires the VM tests to run")
        print("soak: skipped, /dev/kvm is missing (it boots microVMs)")
        return
    extra = ["--no-template"] if args.no_template else []
    with Scratch() as scratch:
        if not args.no_template:
            scratch.cocoon("template", "create")
        # One bundle per lane: a lane runs its cycles one after another.
        bundles = [scratch.bundle(f"lane{i}", ["true"]) for i in range(args.parallel)]
        before = census(scratch)
        wall = time.monotonic()

        def lane(i):
            return [cycle(scratch, bundles[i], f"soak-{i}-{n}", extra)
                    for n in range(i, args.cycles, args.parallel)]

        with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
            results = [r for lane_results in pool.map(lane, range(args.parallel))
                       for r in lane_results]
        wall = time.monotonic() - wall
        after = census(scratch)

        failures = [error for _, error in results if error]
        starts = [took for took, error in results if not error]
        mode = "cold" if args.no_template else "template"
        print(f"soak: {args.cycles} create/start/delete cycles of busybox `true`, "
              f"{args.parallel} at once, {mode}, {wall:.0f} s")
        figure("cycles succeeded", f"{len(results) - len(failures)}/{len(results)}", unit="")
        if starts:
            figure("start (create + start): p50 / p99 / slowest",
                   f"{percentile(starts, 50):.2f} / {percentile(starts, 99):.2f} / "
                   f"{max(starts):.2f}")
        for error in failures[:10]:
            print(f"  failed: {error}")
        leaks = False
        for kind, count in before.items():
            left = after[kind] - count
            leaks |= left != 0
            figure(f"left behind: {kind}", f"{left} ({count} before, {after[kind]} after)",
                   unit="")
    sys.exit(1 if failures or leaks else 0)


if __name__ == "__main__":
    main()
