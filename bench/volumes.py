#!/usr/bin/env python3
"""Volumes: the same file work in a `podman run -v` volume with cocoon (virtio-fs), in the
cocoon container's own root (overlay on the guest's tmpfs), in a runc container's volume, and
on the host itself, in the same run:
  seq write   dd of M MiB in 1 MiB blocks (MiB/s)
  seq read    dd of that file back (MiB/s; the guest's cache of it is dropped at open)
  create      N small files made by a shell loop (files/s)
  stat        `ls -l` of the N files: one lookup and attribute fetch each (files/s)
  unlink      `rm -r` of them (files/s)
Guest times come from the guest's /proc/uptime (10 ms steps), so the counts are sized for a
guest, where each is seconds.
A step that fails ends the script, and its row says so.
Usage: bench/volumes.py [--mib M] [--files N]   (or BENCH_VOLUME_MIB, BENCH_FILES)
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from network import IMAGE, IMAGE_TAR, Podman
from selftest_vm import ROOT

BUSYBOX = os.path.join(os.environ.get("COCOON_BUSYBOX_DIR", os.path.join(ROOT, "build/busybox-rootfs")),
                       "bin/busybox")

# Prints "T <uptime> <step>" after each step, in the directory given as $1.
SCRIPT = r"""
set -e
d=$1; mib=$2; n=$3
t() { echo "T $(cut -d' ' -f1 /proc/uptime) $1"; }
t start
dd if=/dev/zero of=$d/seq bs=1M count=$mib 2>/dev/null; t write
dd if=$d/seq of=/dev/null bs=1M 2>/dev/null; t read
rm $d/seq; mkdir $d/many; i=0
while [ $i -lt $n ]; do echo $i > $d/many/f$i; i=$((i+1)); done; t create
[ "$(ls $d/many | wc -l)" -eq $n ]
ls -l $d/many > /dev/null; t stat
rm -r $d/many; t unlink
"""

STEPS = ["write", "read", "create", "stat", "unlink"]


def rates(output, mib, files):
    """The steps' rates from the script's `T` lines."""
    marks = [line.split() for line in output.splitlines() if line.startswith("T ")]
    times = {m[2]: float(m[1]) for m in marks if len(m) == 3}
    order = ["start", *STEPS]
    if any(step not in times for step in order):
        return None
    took = {step: max(times[step] - times[prev], 0.01) for prev, step in zip(order, order[1:])}
    return {step: (mib if step in ("write", "read") else files) / took[step] for step in STEPS}


def in_container(podman, runtime, vol, where, mib, files):
    out = podman("run", "--rm", "--runtime", runtime, "-v", f"{vol}:/data", IMAGE,
                 "sh", "-c", SCRIPT, "sh", where, str(mib), str(files), check=False)
    return rates(out, mib, files)


def on_host(vol, mib, files):
    # The host's numbers at 10 ms resolution would be noise: more work, scaled back.
    scale = 32
    out = subprocess.run([BUSYBOX, "sh", "-c", SCRIPT, "sh", vol, str(mib * scale),
                          str(files * scale)], capture_output=True, text=True).stdout
    return rates(out, mib * scale, files * scale)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=int(os.environ.get("BENCH_VOLUME_MIB", 16)))
    parser.add_argument("--files", type=int, default=int(os.environ.get("BENCH_FILES", 200)))
    args = parser.parse_args()
    if shutil.which("podman") is None:
        sys.exit("podman is not installed (make test installs it)")
    scratch = tempfile.mkdtemp(prefix="cocoon-bench-volumes-")
    vol = os.path.join(scratch, "vol")
    os.makedirs(vol)
    podman = Podman(scratch)
    podman("load", "-q", "-i", IMAGE_TAR)
    rows = []
    try:
        rows.append(("cocoon, -v (virtio-fs)",
                     in_container(podman, "cocoon", vol, "/data", args.mib, args.files)))
        rows.append(("cocoon, own root (guest tmpfs)",
                     in_container(podman, "cocoon", vol, "/tmp", args.mib, args.files)))
        rows.append(("runc, -v (bind mount)",
                     in_container(podman, "runc", vol, "/data", args.mib, args.files)))
        rows.append(("host", on_host(vol, args.mib, args.files)))
    finally:
        podman("rm", "-a", "-f", "-t", "0", check=False)
        podman("system", "reset", "--force", check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Volumes: {args.mib} MiB written and read in 1 MiB blocks, {args.files} small files "
          f"created, listed with attributes, removed")
    print(f"{'where':<31} {'seq write':>12} {'seq read':>12} {'create':>10} {'stat':>10} "
          f"{'unlink':>10}")
    for name, r in rows:
        if r is None:
            print(f"{name:<31} failed")
            continue
        print(f"{name:<31} {r['write']:7.2f} MiB/s {r['read']:7.2f} MiB/s "
              f"{r['create']:6.0f} /s {r['stat']:6.0f} /s {r['unlink']:6.0f} /s")


if __name__ == "__main__":
    main()
