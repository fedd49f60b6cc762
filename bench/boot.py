#!/usr/bin/env python3
"""Boot benchmark: cocoon-vmm against qemu's microvm machine, same kernel and initramfs, same run.

Prints, over N runs each (median, min, max):
  - cocoon-vmm: process start -> first KVM_RUN (ms), process start -> agent's boot marker (s),
    process start -> exit (s), the VMM's RSS without guest memory (KiB), VM exits by reason;
  - qemu-system-x86_64 -M microvm: process start -> exit (s);
  - the ratio cocoon/qemu of start -> exit. qemu has no boot-marker device, so the comparison
    uses the whole run: boot, the agent's marker, and the agent's immediate power-off.
Both run with the console off. Usage: bench/boot.py [--runs N]
Environment: COCOON_KERNEL, COCOON_INITRD, COCOON_VMM (set by `make bench`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from selftest_vm import KERNEL, INITRD, VMM, require_artifacts, summary

MEMORY_MIB = 128


def cocoon_run(tmp):
    metrics = os.path.join(tmp, "metrics.json")
    start = time.time_ns()
    proc = subprocess.run(
        [VMM, "--kernel", KERNEL, "--initrd", INITRD, "--console", "off",
         "--memory", str(MEMORY_MIB), "--metrics", metrics, "--cmdline", "cocoon.check=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time_ns()
    if proc.returncode != 0:
        sys.exit(f"cocoon-vmm failed ({proc.returncode}): {proc.stderr.strip()}")
    with open(metrics) as f:
        m = json.load(f)
    return {
        "first_run_ms": (m["first_kvm_run_unix_ns"] - start) / 1e6,
        "marker_s": (m["agent_up_unix_ns"] - start) / 1e9,
        "exit_s": (end - start) / 1e9,
        "rss_kib": m["rss_excluding_guest_kib"],
        "exits": m["exits"],
    }


def qemu_cmdline():
    """The command line cocoon-vmm gives the guest, minus the devices qemu does not have."""
    base = ("reboot=k panic=-1 pci=off nomodules tsc=reliable no_timer_check lpj=1000000 "
            "cryptomgr.notests random.trust_cpu=on quiet 8250.nr_uarts=0 cocoon.check=1")
    if os.path.exists("/sys/module/kvm_pvm"):
        base += " noxsave clearcpuid=smap,smep,popcnt,fsgsbase,cx16"
    return base


def qemu_run():
    start = time.time_ns()
    proc = subprocess.run(
        ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=off",
         "-enable-kvm", "-cpu", "host", "-m", str(MEMORY_MIB), "-smp", "1",
         "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
         "-device", "i8042",
         "-kernel", KERNEL, "-initrd", INITRD, "-append", qemu_cmdline()],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    end = time.time_ns()
    if proc.returncode != 0:
        sys.exit(f"qemu failed ({proc.returncode}): {proc.stderr.strip()}")
    return {"exit_s": (end - start) / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "5")))
    args = parser.parse_args()
    require_artifacts()

    cocoon, qemu = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # Interleave so both see the same machine conditions.
        for i in range(args.runs):
            cocoon.append(cocoon_run(tmp))
            qemu.append(qemu_run())
            print(f"run {i + 1}/{args.runs}: cocoon {cocoon[-1]['exit_s']:.2f} s, "
                  f"qemu microvm {qemu[-1]['exit_s']:.2f} s", file=sys.stderr)

    print(f"boot benchmark: {args.runs} runs each, {MEMORY_MIB} MiB, 1 vCPU, console off")
    print(f"kernel {os.path.realpath(KERNEL)}")
    print(f"cocoon-vmm start -> first KVM_RUN   (ms)  {summary([r['first_run_ms'] for r in cocoon], '{:.2f}')}")
    print(f"cocoon-vmm start -> agent marker    (s)   {summary([r['marker_s'] for r in cocoon], '{:.2f}')}")
    print(f"cocoon-vmm start -> exit            (s)   {summary([r['exit_s'] for r in cocoon], '{:.2f}')}")
    print(f"qemu microvm start -> exit          (s)   {summary([r['exit_s'] for r in qemu], '{:.2f}')}")
    ratio = statistics.median([r['exit_s'] for r in cocoon]) / statistics.median([r['exit_s'] for r in qemu])
    print(f"ratio cocoon/qemu (start -> exit, medians)  {ratio:.3f}")
    print(f"cocoon-vmm RSS without guest memory (KiB) {summary([r['rss_kib'] for r in cocoon], '{:.0f}')}")
    print("cocoon-vmm VM exits per boot (median by reason):")
    for reason in cocoon[0]["exits"]:
        print(f"  {reason:<12} {statistics.median([r['exits'][reason] for r in cocoon]):.0f}")


if __name__ == "__main__":
    main()
