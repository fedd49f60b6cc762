#!/usr/bin/env python3
"""`cocoon run` end to end and by phase, restored from a template and booted cold
(`--no-template`), next to runc, runsc (gVisor, ptrace platform) and crun running the same bundle
in the same benchmark run, for three workloads:
  busybox `true`          the busybox test image, one layer
  debian `python3 -c pass` the Debian test image (bookworm minbase + python3-minimal and
                          nginx-light), two layers: minbase and the packages on top of it
  debian nginx            nginx with Debian's default site, to its first page served over
                          127.0.0.1 (fetched from inside the container by python3)

Each bundle's rootfs is an overlay mount of its layers, as engines hand it over, so the first
cocoon run of an image builds its layer images (cold) and later runs find them in the cache.
The template (a snapshot of a booted VM of the workloads' size: 1 vCPU, 256 MiB, 8 disk slots)
is made ahead with `cocoon template create` in a template_dir of the benchmark's own, so every
template run measures a restore, never the template's making; its making is reported apart.
Cold runs come after the template runs, so they find the layer images cached.
Phases come from `cocoon --debug --log-format json` (milliseconds since the process started):
  images     bundle checked -> root filesystem images ready
  vmm        images ready -> VM starting (the monitor set up)
  restore    VM starting -> VM restored (template lookup, snapshot loaded, disks swapped in)
  agent      VM restored -> the guest agent answers
  boot       (cold) VM starting -> the guest agent answers
  identity   agent up -> identity set (hostname, clock, entropy, boot id given to the guest)
  create     identity set -> container created (layer disks attached, rootfs mounted, ...)
  start      container created -> container started
  run+exit   container started -> the container's process exited (workload, exit reported)
  monitor exit  process exited -> `cocoon run` returned
Usage: bench/runtime.py [--runs N] [--cold-runs M] [--workload busybox|python|nginx]...
  --runs       template runs, and runs of each peer runtime (or BENCH_RUNS)
  --cold-runs  cold (--no-template) runs (or BENCH_COLD_RUNS)
By default busybox has 5 template runs and 2 cold ones, python and nginx (whose workloads take
15-50 s in the guest here) 3 and 1, which keeps the three workloads to about 9 minutes.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from selftest_vm import ROOT, pin_cocoon, summary

COCOON = os.environ.get("COCOON_BIN", os.path.join(ROOT, "target/release/cocoon"))
BUSYBOX = os.environ.get("COCOON_BUSYBOX_DIR", os.path.join(ROOT, "build/busybox-rootfs"))
DEBIAN = os.environ.get("COCOON_DEBIAN_ROOTFS", os.path.join(ROOT, "build/debian/rootfs"))
DEBIAN_BASE = os.path.join(os.path.dirname(DEBIAN), "minbase")
COMMON = ["bundle checked", "images ready", "vm starting", "agent up", "identity set",
          "container created", "container started", "container exited"]
PHASES = {"template": COMMON + ["template ready", "vm restored"], "cold": COMMON + ["vm running"]}
# A binary older than the phase logs none; its time is then part of `create`.
OPTIONAL = {"identity set"}

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

# Template runs and cold runs of each workload unless --runs/--cold-runs say otherwise.
DEFAULT_RUNS = {"busybox": (5, 2), "python": (3, 1), "nginx": (3, 1)}

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


# The environment cocoon runs in: the pinned copies of the binary, kernel and initramfs.
BASE_ENV = dict(os.environ)


def timed(cmd, env=None):
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return time.monotonic() - start, proc


def write_config(path, tmp, workload):
    """A configuration of this benchmark's own: its template directory (shared by the
    workloads, which have one VM size) and the workload's own layer cache, so its first run
    builds the layer images."""
    with open(path, "w") as f:
        f.write(f'template_dir = "{tmp}/templates"\n'
                f'layer_cache = "{tmp}/{workload}-layers"\n')


def make_template(tmp):
    """Makes the template ahead (a boot and a snapshot) and returns the seconds it took."""
    config = os.path.join(tmp, "template.toml")
    write_config(config, tmp, "template")
    env = dict(BASE_ENV, COCOON_CONFIG=config)
    wall, proc = timed([COCOON, "template", "create"], env)
    if proc.returncode != 0:
        sys.exit(f"cocoon template create failed ({proc.returncode}): {proc.stderr.strip()}")
    return wall


def cocoon_run(bundle, tmp, name, env, mode):
    log = os.path.join(tmp, f"cocoon-{name}.log")
    root = os.path.join(tmp, "cocoon-root")
    flags = ["--no-template"] if mode == "cold" else []
    wall, proc = timed([COCOON, "--root", root, "--log", log, "--log-format", "json", "--debug",
                        "run", *flags, "--bundle", bundle, name], env)
    subprocess.run([COCOON, "--root", root, "delete", "--force", name],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"cocoon run ({mode}) failed ({proc.returncode}): {proc.stderr.strip()}")
    marks = {}
    with open(log) as f:
        for line in f:
            entry = json.loads(line)
            if entry.get("phase") in PHASES[mode]:
                marks[entry["phase"]] = float(entry["elapsed_ms"]) / 1000
    missing = [p for p in PHASES[mode] if p not in marks and p not in OPTIONAL]
    if missing:
        sys.exit(f"cocoon's log ({mode}) lacks phases {missing}")
    identity = marks.get("identity set", marks["agent up"])
    times = {
        "images": marks["images ready"] - marks["bundle checked"],
        "vmm": marks["vm starting"] - marks["images ready"],
        "sandbox": marks["agent up"] - marks["vm starting"],
        "identity": identity - marks["agent up"] if "identity set" in marks else None,
        "create": marks["container created"] - identity,
        "start": marks["container started"] - marks["container created"],
        "run": marks["container exited"] - marks["container started"],
        "exit": wall - marks["container exited"],
        "total": wall,
    }
    if mode == "template":
        times["restore"] = marks["vm restored"] - marks["vm starting"]
        times["agent"] = marks["agent up"] - marks["vm restored"]
        if times["restore"] > 5:
            print(f"warning: run {name}'s restore took {times['restore']:.1f} s: "
                  "was the template made again?", file=sys.stderr)
    else:
        times["boot"] = times["sandbox"]
    return times


def peer_run(name, cmd, bundle, tmp, n):
    root = os.path.join(tmp, f"{name}-root")
    wall, proc = timed([cmd[0], "--root", root, *cmd[1:], "run", "--bundle", bundle, f"{name}{n}"])
    subprocess.run([cmd[0], "--root", root, *cmd[1:], "delete", "--force", f"{name}{n}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return wall, None


def figure(label, value, unit="(s)"):
    print(f"{label:<40}{unit}  {value}")


def rows(mode, runs, keys):
    for key, what in keys:
        values = [r[key] for r in runs if r[key] is not None]
        figure(f"cocoon {mode} {what}",
               summary(values, '{:.3f}') if values else "not logged by this binary")


def bench(workload, runs, cold_runs, tmp, template_secs):
    label, trees, args = WORKLOADS[workload]
    for path in (COCOON, *trees):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run `make bench`")
    peers = {"runc": ["runc"], "runsc": ["runsc", "--platform=ptrace", "--network=none"],
             "crun": ["crun"]}
    bundle = make_bundle(tmp, workload, trees, args)
    config = os.path.join(tmp, f"{workload}.toml")
    write_config(config, tmp, workload)
    env = dict(BASE_ENV, COCOON_CONFIG=config)
    try:
        template, cold, times, errors = [], [], {p: [] for p in peers}, {}
        for n in range(runs):
            template.append(cocoon_run(bundle, tmp, f"{workload}-t{n}", env, "template"))
            for name, cmd in peers.items():
                if not shutil.which(cmd[0]) or name in errors:
                    errors.setdefault(name, "not installed")
                    continue
                wall, error = peer_run(name, cmd, bundle, tmp, n)
                if error:
                    errors[name] = error
                else:
                    times[name].append(wall)
            c = template[-1]
            print(f"{workload} run {n + 1}/{runs}: cocoon (template) {c['total']:.2f} s "
                  f"(images {c['images']:.3f} s, restore {c['restore']:.3f} s), "
                  + ", ".join(f"{p} {times[p][-1]:.3f} s" for p in peers if times[p]),
                  file=sys.stderr)
        for n in range(cold_runs):
            cold.append(cocoon_run(bundle, tmp, f"{workload}-c{n}", env, "cold"))
            c = cold[-1]
            print(f"{workload} cold run {n + 1}/{cold_runs}: cocoon (--no-template) "
                  f"{c['total']:.2f} s (boot {c['boot']:.2f} s)", file=sys.stderr)
    finally:
        subprocess.run(["umount", os.path.join(bundle, "rootfs")])
    print(f"runtime benchmark: `run` of {label}, {runs} template runs, {cold_runs} cold runs, "
          f"{runs} runs of each peer (overlay rootfs; 256 MiB, 1 vCPU for cocoon)")
    figure("cocoon template create, ahead (once)", f"{template_secs:.3f}")
    figure("cocoon images, cold (first run)", f"{template[0]['images']:.3f}")
    figure("cocoon end to end, first run", f"{template[0]['total']:.3f}")
    # The first run built the layer images; the others (and every cold run) found them cached.
    cached = template[1:] or template
    if len(template) > 1:
        figure("cocoon images, cached", summary([c['images'] for c in cached], '{:.3f}'))
    steps = [("identity", "identity"), ("create", "container create"), ("start", "start"),
             ("run", "run+exit reported"), ("exit", "monitor exit")]
    rows("template", cached, [("vmm", "monitor set-up"), ("restore", "restore"),
                              ("agent", "agent"), *steps, ("total", "end to end")])
    if cold:
        rows("cold", cold, [("vmm", "monitor set-up"), ("boot", "boot to agent"),
                            *steps, ("total", "end to end")])
    median = statistics.median(c["total"] for c in cached)
    if cold:
        cold_median = statistics.median(c["total"] for c in cold)
        ready = statistics.median(c["sandbox"] for c in cached)
        cold_ready = statistics.median(c["sandbox"] for c in cold)
        print(f"template speed-up vs cold = {cold_median / median:.1f}x end to end, "
              f"{cold_ready / ready:.0f}x VM start to agent up")
    for name in peers:
        if times[name]:
            peer_median = statistics.median(times[name])
            ratios = f"cocoon/{name} = {median / peer_median:.1f}"
            if cold:
                ratios += f" (cold {cold_median / peer_median:.1f})"
            figure(f"{name} run end to end", f"{summary(times[name], '{:.3f}')}   {ratios}")
        else:
            figure(f"{name} run", f"did not run: {errors.get(name)}", unit="   ")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env_runs, env_cold = os.environ.get("BENCH_RUNS"), os.environ.get("BENCH_COLD_RUNS")
    parser.add_argument("--runs", type=int, default=int(env_runs) if env_runs else None,
                        help="template runs, and runs of each peer (default 5 for busybox, "
                        "3 for the others)")
    parser.add_argument("--cold-runs", type=int, default=int(env_cold) if env_cold else None,
                        help="cold (--no-template) runs, ~25 s more each (default 2 for "
                        "busybox, 1 for the others)")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                        help="repeatable; all three by default")
    args = parser.parse_args()
    if (args.runs is not None and args.runs < 1) or (args.cold_runs is not None
                                                      and args.cold_runs < 0):
        parser.error("--runs must be at least 1, --cold-runs at least 0")
    global COCOON, BASE_ENV
    with tempfile.TemporaryDirectory() as tmp:
        COCOON, BASE_ENV = pin_cocoon(tmp, COCOON)
        template_secs = make_template(tmp)
        for workload in args.workload or ["busybox", "python", "nginx"]:
            runs, cold_runs = DEFAULT_RUNS[workload]
            bench(workload, runs if args.runs is None else args.runs,
                  cold_runs if args.cold_runs is None else args.cold_runs, tmp, template_secs)


if __name__ == "__main__":
    main()
