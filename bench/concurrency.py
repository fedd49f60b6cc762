#!/usr/bin/env python3
"""Containers started together (issue 20): N = 1, 2, 4, 8 `cocoon run` of busybox `true` at
once, from a template and booted cold (--no-template), in one run. For each N: how many
succeeded, and each start's wall time (command start to return), p50 and p99. No wait on a
guest has a wall-clock timeout and admission (docs/cli.md, "Waiting on a guest") lets
`admission_vcpus_per_core` x cores vCPUs start at once, so every start must succeed; the
slowest ones waited for their turn.
Usage: bench/concurrency.py [--counts 1,2,4,8] [--no-cold]
"""
import argparse
import concurrent.futures
import time

from template import Scratch, figure, percentile


def round_of(scratch, n, mode, round_id):
    """N runs at once; returns [(seconds, ok)]."""
    bundles = [scratch.bundle(f"{mode}-{n}-{round_id}-{i}", ["true"]) for i in range(n)]
    extra = ["--no-template"] if mode == "cold" else []

    def one(i):
        cid = f"{mode}-{n}-{round_id}-{i}"
        started = time.monotonic()
        proc = scratch.cocoon("run", *extra, "--bundle", bundles[i], cid, check=False)
        took = time.monotonic() - started
        if proc.returncode != 0:
            print(f"  {cid} failed ({proc.returncode}): {proc.stderr.strip()}")
        scratch.delete(cid)
        return took, proc.returncode == 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="1,2,4,8")
    parser.add_argument("--no-cold", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    modes = ["template"] + ([] if args.no_cold else ["cold"])
    with Scratch() as scratch:
        scratch.cocoon("template", "create")
        print("cocoon run true, N at once on this host "
              "(wall time per start; all must succeed)")
        for mode in modes:
            for n in counts:
                results = round_of(scratch, n, mode, "r")
                times = [t for t, _ in results]
                ok = sum(1 for _, good in results if good)
                figure(f"{mode:<8} N={n}: succeeded", f"{ok}/{n}", unit="")
                figure(f"{mode:<8} N={n}: p50 / p99",
                       f"{percentile(times, 50):.2f} / {percentile(times, 99):.2f}")


if __name__ == "__main__":
    main()
