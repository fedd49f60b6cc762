#!/usr/bin/env python3
"""`cocoon run` of a bundle that runs `true`, end to end and by phase, next to runc, runsc
(gVisor, ptrace platform) and crun running the same bundle in the same benchmark run.

The bundle's rootfs is an overlay mount of the busybox tree, as engines hand it over, so the
first cocoon run builds the layer image (cold) and later runs find it in the layer cache.
Phases come from `cocoon --debug --log-format json` (milliseconds since the process started):
  images   bundle checked -> root filesystem images ready
  vmm      images ready -> VM starting (the monitor set up; the VMM itself starts in ~3 ms)
  boot     VM starting -> the guest agent answers
  create   agent up -> container created (stdio attached, rootfs mounted in the guest, ...)
  run      created -> the container's process exited (start, `true`, exit reported)
  exit     process exited -> `cocoon run` returned
Usage: bench/runtime.py [--runs N]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from selftest_vm import ROOT, summary

COCOON = os.environ.get("COCOON_BIN", os.path.join(ROOT, "target/release/cocoon"))
BUSYBOX = os.environ.get("COCOON_BUSYBOX_DIR", os.path.join(ROOT, "build/busybox-rootfs"))
PHASES = ["bundle checked", "images ready", "vm starting", "agent up", "container created",
          "container exited"]


def make_bundle(tmp):
    """A bundle running `true` whose rootfs is an overlay mount over a copy of busybox."""
    bundle = os.path.join(tmp, "bundle")
    subprocess.run([os.path.join(ROOT, "images/make-bundle.sh"), COCOON, bundle, BUSYBOX, "true"],
                   check=True, stdout=subprocess.DEVNULL)
    lower = os.path.join(tmp, "lower")
    os.rename(os.path.join(bundle, "rootfs"), lower)
    for d in ("upper", "work", os.path.join("bundle", "rootfs")):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={tmp}/upper,workdir={tmp}/work",
                    os.path.join(bundle, "rootfs")], check=True)
    return bundle


def timed(cmd, env=None):
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return time.monotonic() - start, proc


def cocoon_run(bundle, tmp, n, env):
    log = os.path.join(tmp, f"cocoon-{n}.log")
    wall, proc = timed([COCOON, "--root", os.path.join(tmp, "cocoon-root"), "--log", log,
                        "--log-format", "json", "--debug", "run", "--bundle", bundle, f"b{n}"], env)
    if proc.returncode != 0:
        sys.exit(f"cocoon run failed: {proc.stderr.strip()}")
    subprocess.run([COCOON, "--root", os.path.join(tmp, "cocoon-root"), "delete", f"b{n}"], check=True)
    marks = {}
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            if entry.get("phase") in PHASES:
                marks[entry["phase"]] = float(entry["elapsed_ms"]) / 1000
    missing = [p for p in PHASES if p not in marks]
    if missing:
        sys.exit(f"cocoon's log lacks phases {missing}")
    return {
        "images": marks["images ready"] - marks["bundle checked"],
        "vmm": marks["vm starting"] - marks["images ready"],
        "boot": marks["agent up"] - marks["vm starting"],
        "create": marks["container created"] - marks["agent up"],
        "run": marks["container exited"] - marks["container created"],
        "exit": wall - marks["container exited"],
        "total": wall,
    }


def peer_run(name, cmd, bundle, tmp, n):
    root = os.path.join(tmp, f"{name}-root")
    wall, proc = timed([cmd[0], "--root", root, *cmd[1:], "run", "--bundle", bundle, f"{name}{n}"])
    subprocess.run([cmd[0], "--root", root, *cmd[1:], "delete", "--force", f"{name}{n}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return wall, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "5")))
    args = parser.parse_args()
    for path in (COCOON, BUSYBOX):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run `make bench`")
    peers = {"runc": ["runc"], "runsc": ["runsc", "--platform=ptrace", "--network=none"],
             "crun": ["crun"]}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(tmp)
        # A layer cache of this run's own, so the first run is cold.
        config = os.path.join(tmp, "config.toml")
        with open(config, "w") as f:
            f.write(f'layer_cache = "{tmp}/layers"\n')
        env = dict(os.environ, COCOON_CONFIG=config)
        try:
            cocoon, times, errors = [], {p: [] for p in peers}, {}
            for n in range(args.runs):
                cocoon.append(cocoon_run(bundle, tmp, n, env))
                for name, cmd in peers.items():
                    if not shutil.which(cmd[0]) or name in errors:
                        errors.setdefault(name, "not installed")
                        continue
                    wall, error = peer_run(name, cmd, bundle, tmp, n)
                    if error:
                        errors[name] = error
                    else:
                        times[name].append(wall)
                c = cocoon[-1]
                print(f"run {n + 1}/{args.runs}: cocoon {c['total']:.2f} s (images {c['images']:.3f} s), "
                      + ", ".join(f"{p} {times[p][-1]:.3f} s" for p in peers if times[p]),
                      file=sys.stderr)
        finally:
            subprocess.run(["umount", os.path.join(bundle, "rootfs")])
    print(f"runtime benchmark: `run` of a bundle running `true`, {args.runs} runs each "
          "(overlay rootfs; 256 MiB, 1 vCPU for cocoon)")
    print(f"cocoon images, cold (first run)     (s)  {cocoon[0]['images']:.3f}")
    if len(cocoon) > 1:
        print(f"cocoon images, cached               (s)  {summary([c['images'] for c in cocoon[1:]], '{:.3f}')}")
    for key, label in [("vmm", "monitor + VMM set-up"), ("boot", "guest boot to agent"),
                       ("create", "container create"), ("run", "start, run, exit reported"),
                       ("exit", "monitor exit")]:
        print(f"cocoon {label:<29}(s)  {summary([c[key] for c in cocoon], '{:.3f}')}")
    total = [c["total"] for c in cocoon]
    print(f"cocoon run end to end               (s)  {summary(total, '{:.3f}')}")
    median = sorted(total)[len(total) // 2]
    for name in peers:
        if times[name]:
            peer_median = sorted(times[name])[len(times[name]) // 2]
            print(f"{name + ' run end to end':<36}(s)  {summary(times[name], '{:.3f}')}"
                  f"   cocoon/{name} = {median / peer_median:.1f}")
        else:
            print(f"{name + ' run':<36}     did not run: {errors.get(name)}")


if __name__ == "__main__":
    main()
