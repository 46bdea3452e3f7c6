"""Control plane ingest throughput into SQLite and PostgreSQL, side by side, and guard
reaction time through the proxy.

    python -m bench.control_plane [--events 20000] [--batch 500] [--concurrency 4] [--postgres URL]
                                  [--guards FILE] [--trials 50] [--baseline DIR] [--rounds 3]

Applies the example catalog to a fresh SQLite file and a fresh PostgreSQL schema,
starts `aforo control-plane` over each in its own process and posts usage events in
batches of `--batch`, `--concurrency` batches in flight, through the REST API (real
HTTP on 127.0.0.1, the admin token, JSON bodies), each event rated against its customer's
plan, and reports events/s per store. The last line is a JSON object with the
figures, including ingest_events_per_s_sqlite, ingest_events_per_s_postgres and
reaction_p99_ms. With --guards, the control plane also evaluates that guard file
after every batch for the customers it touched, as it does in production with a
guard file. Guard reaction time is measured as bench.reaction does (`aforo up`,
`--trials` cost events each breaching a fresh customer's level 3, timed from the
POST to the first proxy response that blocks). With `--baseline DIR` (another
checkout of Aforo Edge installed in its own `.venv`), that checkout's control plane
ingests the same events into stores of its own, each store's runs taking turns with
this checkout's, and ingest_ratio_vs_baseline_sqlite / _postgres compare them. Each
figure is the median of `--rounds` runs.
"""

import argparse
import asyncio
import datetime
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from bench import reaction
from config.catalog_file import load_catalog_file
from control_plane.catalog import apply_catalog
from control_plane.store import open_store

CATALOG = Path(__file__).resolve().parents[1] / "config" / "examples" / "catalog.yaml"
GUARDS = Path(__file__).resolve().parents[1] / "config" / "examples" / "guards.yaml"
CUSTOMERS = ("cus_acme", "cus_globex", "cus_wonka")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def batches(total, size, stamp):
    events = [{"id": f"evt-{uuid.uuid4().hex}", "customer_id": CUSTOMERS[n % 3], "metric": "ai_tokens",
               "quantity": 1000 + n % 97, "timestamp": stamp} for n in range(total)]
    return [json.dumps(events[start:start + size]).encode() for start in range(0, total, size)]


def _python(checkout):
    return sys.executable if checkout is None else str(Path(checkout) / ".venv" / "bin" / "python")


def start_control_plane(database, guards=None, checkout=None):
    """`aforo control-plane` of `checkout` (default: this one) on a free port over
    `database` (with the guard file `guards`, if any), in its own process: (process,
    base URL, admin token)."""
    process = subprocess.Popen([_python(checkout), "-m", "control_plane.cli", "control-plane", "--listen",
                                "127.0.0.1:0", "--database", database, *(["--guards", guards] if guards else [])],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=checkout)
    token = base = None
    for line in process.stdout:             # warnings (e.g. unknown notify channels) may come first
        token = token or (re.search(r"keep it\): (\S+)", line) or [None, None])[1]
        base = (re.search(r"API on (http://\S+) ", line) or [None, None])[1]
        if base:
            break
    return process, base, token


async def measure(database, total, size, concurrency, guards=None, checkout=None):
    async def prepare():
        store = await open_store(database)
        try:
            await apply_catalog(store, load_catalog_file(CATALOG), str(CATALOG), author="bench")
        finally:
            await store.close()
    if checkout is None:
        await prepare()
    else:                   # that checkout's own schema and catalog code
        catalog = Path(checkout) / CATALOG.relative_to(CATALOG.parents[2])     # its own example catalog
        subprocess.run([_python(checkout), "-m", "control_plane.cli", "apply", "-f", str(catalog), "--database",
                        database], cwd=checkout, check=True, capture_output=True)
    process, base, token = start_control_plane(database, guards, checkout)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    queue = list(reversed(batches(total, size, stamp)))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    accepted = 0

    async def sender(session):
        nonlocal accepted
        while queue:
            async with session.post(base + "/v1/events", data=queue.pop()) as response:
                accepted += (await response.json())["accepted"]
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            started = time.perf_counter()
            await asyncio.gather(*(sender(session) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        process.stdout.close()
    return {"events": total, "accepted": accepted, "seconds": round(elapsed, 3),
            "events_per_s": round(total / elapsed, 1)}


async def main_async(args):
    runs = {}
    # This checkout and the baseline take turns per store, `--rounds` times, the order
    # flipping each time, so a machine whose speed drifts slows both alike; each
    # figure is the median run's.
    checkouts = [("", None)] + ([("baseline_", args.baseline)] if args.baseline else [])
    import asyncpg
    admin = await asyncpg.connect(args.postgres)
    try:
        with tempfile.TemporaryDirectory(prefix="aforo-bench-") as folder:
            for round_ in range(args.rounds):
                turns = checkouts if round_ % 2 == 0 else list(reversed(checkouts))
                for prefix, checkout in turns:
                    database = str(Path(folder) / f"{prefix}aforo-{round_}.db")
                    runs.setdefault(prefix + "sqlite", []).append(await measure(
                        database, args.events, args.batch, args.concurrency, args.guards, checkout))
                for prefix, checkout in reversed(turns):
                    schema = f"bench_{uuid.uuid4().hex[:10]}"
                    await admin.execute(f"CREATE SCHEMA {schema}")
                    try:
                        scoped = f"{args.postgres}?options=-csearch_path%3D{schema}"
                        runs.setdefault(prefix + "postgres", []).append(await measure(
                            scoped, args.events, args.batch, args.concurrency, args.guards, checkout))
                    finally:
                        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await admin.close()
    return {name: sorted(taken, key=lambda run: run["events_per_s"])[len(taken) // 2] for name, taken in runs.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight at once")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--guards", metavar="FILE", help="a guard file the control plane evaluates after each batch "
                                                         f"(e.g. {GUARDS})")
    parser.add_argument("--trials", type=int, default=50, help="guard reaction trials")
    parser.add_argument("--baseline", help="another checkout whose control plane ingests beside this one's")
    parser.add_argument("--rounds", type=int, default=3, help="runs per checkout and store (the median is reported)")
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    reacted = reaction.reaction_figures(asyncio.run(reaction.measure(args.trials)))
    print(f"{'store':<10}{'events':>9}{'accepted':>10}{'seconds':>9}{'events/s':>11}")
    for name, run in results.items():
        print(f"{name:<10}{run['events']:>9}{run['accepted']:>10}{run['seconds']:>9.2f}{run['events_per_s']:>11,.0f}")
    print(f"batches of {args.batch} events, {args.concurrency} in flight, guards: {args.guards or 'none'}; "
          f"the median of {args.rounds} runs each")
    print(f"guard reaction over {reacted['reaction_trials']} trials: p50 {reacted['reaction_p50_ms']} ms, "
          f"p99 {reacted['reaction_p99_ms']} ms")
    print("targets: >= 10,000 events/s into SQLite, >= 20,000 into PostgreSQL; reaction p99 <= 1,000 ms")
    against = {}
    if args.baseline:
        for store in ("sqlite", "postgres"):
            against[f"baseline_ingest_events_per_s_{store}"] = results["baseline_" + store]["events_per_s"]
            against[f"ingest_ratio_vs_baseline_{store}"] = round(
                results[store]["events_per_s"] / results["baseline_" + store]["events_per_s"], 3)
    print(json.dumps({
        "ingest_events_per_s_sqlite": results["sqlite"]["events_per_s"],
        "ingest_events_per_s_postgres": results["postgres"]["events_per_s"],
        **against,
        "batch_events": args.batch,
        "concurrency": args.concurrency,
        "guards": args.guards,
        "events": args.events,
        "rounds": args.rounds,
        **reacted,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
