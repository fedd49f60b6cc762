#!/usr/bin/env python3
"""`cocoon run` end to end and by phase, next to runc, runsc (gVisor, ptrace platform) and crun
running the same bundle in the same benchmark run, for three workloads:
  busybox `true`          the busybox test image, one layer
  debian `python3 -c pass` the Debian test image (bookworm minbase + python3-minimal and
                          nginx-light), two layers: minbase and the packages on top of it
  debian nginx            nginx with Debian's default site, to its first page served over
                          127.0.0.1 (fetched from inside the container by python3)

Each bundle's rootfs is an overlay mount of its layers, as engines hand it over, so the first
cocoon run of an image builds its layer images (cold) and later runs find them in the cache.
Phases come from `cocoon --debug --log-format json` (milliseconds since the process started):
  images   bundle checked -> root filesystem images ready
  vmm      images ready -> VM starting (the monitor set up; the VMM itself starts in ~3 ms)
  boot     VM starting -> the guest agent answers
  create   agent up -> container created (stdio attached, rootfs mounted in the guest, ...)
  run      created -> the container's process exited (start, workload, exit reported)
  exit     process exited -> `cocoon run` returned
Usage: bench/runtime.py [--runs N] [--workload busybox|python|nginx]...
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
DEBIAN = os.environ.get("COCOON_DEBIAN_ROOTFS", os.path.join(ROOT, "build/debian/rootfs"))
DEBIAN_BASE = os.path.join(os.path.dirname(DEBIAN), "minbase")
PHASES = ["bundle checked", "images ready", "vm starting", "agent up", "container created",
          "container exited"]

# Starts nginx (it daemonizes), then asks it for / over loopback until it answers.
FETCH_FIRST_PAGE = """
import socket, time
deadline = time.monotonic() + 120
while True:
    try:
        s = socket.create_connection(("127.0.0.1", 80), timeout=5)
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""

WORKLOADS = {
    "busybox": ("busybox `true`", [BUSYBOX], ["true"]),
    "python": ("debian `python3 -c pass`", [DEBIAN_BASE, DEBIAN], ["python3", "-c", "pass"]),
    "nginx": ("debian nginx to its first page", [DEBIAN_BASE, DEBIAN],
              ["sh", "-c", 'nginx && exec python3 -c "$0"', FETCH_FIRST_PAGE]),
}


def make_bundle(tmp, name, trees, args):
    """A bundle running `args` whose rootfs is an overlay mount of `trees` (lowest first): the
    first tree is a layer as it is, each later one only what it adds to or changes in the one
    below (rsync --compare-dest), as an image's layer diffs are."""
    base = os.path.join(tmp, name)
    bundle = os.path.join(base, "bundle")
    empty = os.path.join(base, "empty")
    os.makedirs(empty)
    subprocess.run([os.path.join(ROOT, "images/make-bundle.sh"), COCOON, bundle, empty, *args],
                   check=True, stdout=subprocess.DEVNULL)
    # Docker's and Podman's defaults, which a server that drops to its own user needs.
    config = os.path.join(bundle, "config.json")
    with open(config) as f:
        spec = json.load(f)
    for caps in spec["process"]["capabilities"].values():
        caps.extend(c for c in ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_SETGID", "CAP_SETUID")
                    if c not in caps)
    with open(config, "w") as f:
        json.dump(spec, f)
    layers = [trees[0]]
    for n, (below, tree) in enumerate(zip(trees, trees[1:])):
        diff = os.path.join(base, f"layer{n + 1}")
        subprocess.run(["rsync", "-aHAX", f"--compare-dest={os.path.abspath(below)}/",
                        f"{tree}/", f"{diff}/"], check=True)
        layers.append(diff)
    for d in ("upper", "work"):
        os.makedirs(os.path.join(base, d))
    lowerdir = ":".join(reversed(layers))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lowerdir},upperdir={base}/upper,workdir={base}/work",
                    os.path.join(bundle, "rootfs")], check=True)
    return bundle


def timed(cmd, env=None):
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return time.monotonic() - start, proc


def cocoon_run(bundle, tmp, n, env):
    log = os.path.join(tmp, f"cocoon-{n}.log")
    root = os.path.join(tmp, "cocoon-root")
    wall, proc = timed([COCOON, "--root", root, "--log", log, "--log-format", "json", "--debug",
                        "run", "--bundle", bundle, f"b{n}"], env)
    subprocess.run([COCOON, "--root", root, "delete", "--force", f"b{n}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"cocoon run failed ({proc.returncode}): {proc.stderr.strip()}")
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


def bench(workload, runs, tmp):
    label, trees, args = WORKLOADS[workload]
    for path in (COCOON, *trees):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run `make bench`")
    peers = {"runc": ["runc"], "runsc": ["runsc", "--platform=ptrace", "--network=none"],
             "crun": ["crun"]}
    bundle = make_bundle(tmp, workload, trees, args)
    # A layer cache of this workload's own, so its first run is cold.
    config = os.path.join(tmp, f"{workload}.toml")
    with open(config, "w") as f:
        f.write(f'layer_cache = "{tmp}/{workload}-layers"\n')
    env = dict(os.environ, COCOON_CONFIG=config)
    try:
        cocoon, times, errors = [], {p: [] for p in peers}, {}
        for n in range(runs):
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
            print(f"{workload} run {n + 1}/{runs}: cocoon {c['total']:.2f} s (images {c['images']:.3f} s), "
                  + ", ".join(f"{p} {times[p][-1]:.3f} s" for p in peers if times[p]),
                  file=sys.stderr)
    finally:
        subprocess.run(["umount", os.path.join(bundle, "rootfs")])
    print(f"runtime benchmark: `run` of {label}, {runs} runs each "
          "(overlay rootfs; 256 MiB, 1 vCPU for cocoon)")
    print(f"cocoon images, cold (first run)     (s)  {cocoon[0]['images']:.3f}")
    print(f"cocoon end to end, first run        (s)  {cocoon[0]['total']:.3f}")
    cached = cocoon[1:] or cocoon
    if len(cocoon) > 1:
        print(f"cocoon images, cached               (s)  {summary([c['images'] for c in cached], '{:.3f}')}")
    for key, label in [("vmm", "monitor + VMM set-up"), ("boot", "guest boot to agent"),
                       ("create", "container create"), ("run", "start, run, exit reported"),
                       ("exit", "monitor exit")]:
        print(f"cocoon {label:<29}(s)  {summary([c[key] for c in cached], '{:.3f}')}")
    total = [c["total"] for c in cached]
    print(f"cocoon end to end, cached           (s)  {summary(total, '{:.3f}')}")
    median = sorted(total)[len(total) // 2]
    for name in peers:
        if times[name]:
            peer_median = sorted(times[name])[len(times[name]) // 2]
            print(f"{name + ' run end to end':<36}(s)  {summary(times[name], '{:.3f}')}"
                  f"   cocoon/{name} = {median / peer_median:.1f}")
        else:
            print(f"{name + ' run':<36}     did not run: {errors.get(name)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "3")))
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                        help="repeatable; all three by default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workload or ["busybox", "python", "nginx"]:
            bench(workload, args.runs, tmp)


if __name__ == "__main__":
    main()
