"""How long an edge state file of a million customers takes to load, and its memory.

    python -m bench.edge_state_load [--customers 1000000] [--no-baseline]

Writes an edge state file of `--customers` customers (three plans, one or two API
keys each, usage on every quota metric, a margin standing on one in ten), then
loads it as the proxy does at start and on every change (FileEdgeState: strict YAML,
schema, cross checks, snapshot) in a child process per loader, one after the other:
the loader as it ships (libyaml's parser, events read straight into data) and the
baseline, the way every file was read before: the pure-Python parser and composer
building the whole node tree, then constructing from it, with the cyclic garbage
collector running (yaml_source.USE_LIBYAML and STREAM_WITHOUT_ALIASES False, the
collector left on). Each child reports its wall seconds and its peak RSS. Prints a table and, as its last
line, a JSON object with customers, file_mib, load_s, baseline_load_s, ratio
(baseline over new), peak_rss_mib and baseline_peak_rss_mib. The baseline takes
about ten times as long and more memory; --no-baseline skips it (its figures are
then null).
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PLANS = """\
plans:
  free:
    tier: free
    quotas:
      api_calls: {limit: 1000, hard: true}
      ai_tokens: {limit: 50000, hard: true}
  pro:
    tier: pro
    features: [large_models]
    quotas:
      api_calls: {limit: 100000, hard: true}
      ai_tokens: {limit: 5000000, hard: false}
  enterprise:
    tier: enterprise
    features: [large_models, premium_compute]
    quotas:
      api_calls: {limit: 10000000, hard: false}
"""
PLAN_NAMES = ("free", "pro", "enterprise")
MIB = 1 << 20


def bench_key(number):
    """The plain API key of customer `number` (its digest is what the file lists)."""
    return b"ak_bench_%d" % number


def write_state(path, customers):
    """Write an edge state file of `customers` customers at `path`."""
    with open(path, "w") as out:
        out.write("period: monthly\n")
        out.write(PLANS)
        out.write("customers:\n")
        for number in range(customers):
            plan = PLAN_NAMES[number % 3]
            keys = [hashlib.sha256(bench_key(number)).hexdigest()]
            if number % 7 == 0:
                keys.append(hashlib.sha256(bench_key(number) + b"_rotated").hexdigest())
            usage = f"{{api_calls: {number % 1000}}}" if plan == "enterprise" else \
                f"{{api_calls: {number % 1000}, ai_tokens: {number % 50000}}}"
            out.write(f"  - id: cus_{number}\n    plan: {plan}\n    status: active\n"
                      f"    api_keys: [{', '.join(keys)}]\n    usage: {usage}\n")
            if number % 10 == 0:
                out.write("    levels:\n      api_calls: {guard: margin-floor, level: 1}\n")


def measure(path, baseline):
    """Load `path` once as the proxy does; seconds, peak RSS and customers loaded."""
    import contextlib

    import config.documents
    import proxy.edge_state
    from config import yaml_source
    from proxy.edge_state import FileEdgeState

    if baseline:
        yaml_source.USE_LIBYAML = yaml_source.STREAM_WITHOUT_ALIASES = False
        for module in (yaml_source, config.documents, proxy.edge_state):
            module.no_cyclic_gc = contextlib.nullcontext
    started = time.perf_counter()
    edge_state = FileEdgeState(path)
    load_s = time.perf_counter() - started
    last = len(edge_state.snapshot) - 1
    assert edge_state.customer_for_key(bench_key(last)).customer_id == f"cus_{last}"
    return {"load_s": load_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "customers": len(edge_state.snapshot), "libyaml": yaml_source.USE_LIBYAML}


def _run(path, baseline):
    # Each loader in its own process, so each peak RSS is its own.
    command = [sys.executable, "-m", "bench.edge_state_load", "--measure-only", path]
    if baseline:
        command.append("--baseline")
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--no-baseline", action="store_true", help="skip the pure-Python baseline")
    parser.add_argument("--measure-only", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_only:
        print(json.dumps(measure(args.measure_only, args.baseline)))
        return 0

    with tempfile.TemporaryDirectory(prefix="aforo-bench-") as folder:
        path = os.path.join(folder, "edge_state.yaml")
        started = time.perf_counter()
        write_state(path, args.customers)
        file_mib = os.path.getsize(path) / MIB
        print(f"edge state file: {args.customers:,} customers, {file_mib:,.0f} MiB, "
              f"written in {time.perf_counter() - started:.1f} s")
        new = _run(path, False)
        if not new["libyaml"]:
            print("PyYAML has no libyaml here: the loader runs its pure-Python composer", file=sys.stderr)
        baseline = None if args.no_baseline else _run(path, True)
    print(f"{'loader':<22}{'load s':>10}{'peak RSS MiB':>14}")
    for name, run in (("as shipped", new), ("before (pure, tree)", baseline)):
        if run is not None:
            print(f"{name:<22}{run['load_s']:>10.1f}{run['peak_rss_mib']:>14,.0f}")
    ratio = None if baseline is None else baseline["load_s"] / new["load_s"]
    if ratio is not None:
        print(f"the baseline takes {ratio:.1f}x as long")
    print(json.dumps({
        "customers": args.customers,
        "file_mib": round(file_mib, 1),
        "load_s": round(new["load_s"], 2),
        "baseline_load_s": None if baseline is None else round(baseline["load_s"], 2),
        "ratio": None if ratio is None else round(ratio, 2),
        "peak_rss_mib": round(new["peak_rss_mib"]),
        "baseline_peak_rss_mib": None if baseline is None else round(baseline["peak_rss_mib"]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
