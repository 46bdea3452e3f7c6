"""Control plane ingest throughput into SQLite and PostgreSQL, side by side.

    python -m bench.control_plane [--events 20000] [--batch 500] [--concurrency 4] [--postgres URL]

Applies the example catalog to a fresh SQLite file and a fresh PostgreSQL schema,
then posts usage events in batches of `--batch`, `--concurrency` batches in flight,
through the REST API (real HTTP on 127.0.0.1, the admin token, JSON bodies; client
and server share one process and core), each event rated against its customer's
plan, and reports events/s per store. The last line is a JSON object with the
figures, including ingest_events_per_s_sqlite and ingest_events_per_s_postgres.
Guard reaction time (cost event to the first proxy response that enforces it) needs
the proxies fed by the control plane and is not measured yet.
"""

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

from config.catalog_file import load_catalog_file
from control_plane.api import create_admin_token, create_app
from control_plane.catalog import apply_catalog
from control_plane.postgres_store import PostgresStore
from control_plane.sqlite_store import SqliteStore

CATALOG = Path(__file__).resolve().parents[1] / "config" / "examples" / "catalog.yaml"
CUSTOMERS = ("cus_acme", "cus_globex", "cus_wonka")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def batches(total, size, stamp):
    events = [{"id": f"evt-{uuid.uuid4().hex}", "customer_id": CUSTOMERS[n % 3], "metric": "ai_tokens",
               "quantity": 1000 + n % 97, "timestamp": stamp} for n in range(total)]
    return [json.dumps(events[start:start + size]).encode() for start in range(0, total, size)]


async def measure(store, total, size, concurrency):
    await apply_catalog(store, load_catalog_file(CATALOG), str(CATALOG))
    token = await create_admin_token(store, "bench", time.time())
    runner = web.AppRunner(create_app(store), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/events"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    bodies = batches(total, size, stamp)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    accepted = 0
    queue = list(reversed(bodies))

    async def sender(session):
        nonlocal accepted
        while queue:
            async with session.post(url, data=queue.pop()) as response:
                accepted += (await response.json())["accepted"]
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            started = time.perf_counter()
            await asyncio.gather(*(sender(session) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    finally:
        await runner.cleanup()
    return {"events": total, "accepted": accepted, "seconds": round(elapsed, 3),
            "events_per_s": round(total / elapsed, 1)}


async def main_async(args):
    results = {}
    with tempfile.TemporaryDirectory(prefix="aforo-bench-") as folder:
        store = await SqliteStore.open(str(Path(folder) / "aforo.db"))
        await store.migrate()
        try:
            results["sqlite"] = await measure(store, args.events, args.batch, args.concurrency)
        finally:
            await store.close()
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    import asyncpg
    admin = await asyncpg.connect(args.postgres)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        store = await PostgresStore.connect(args.postgres, server_settings={"search_path": schema})
        await store.migrate()
        try:
            results["postgres"] = await measure(store, args.events, args.batch, args.concurrency)
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight at once")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(f"{'store':<10}{'events':>9}{'accepted':>10}{'seconds':>9}{'events/s':>11}")
    for name, run in results.items():
        print(f"{name:<10}{run['events']:>9}{run['accepted']:>10}{run['seconds']:>9.2f}{run['events_per_s']:>11,.0f}")
    print("targets: >= 10,000 events/s into SQLite, >= 20,000 into PostgreSQL")
    print(json.dumps({
        "ingest_events_per_s_sqlite": results["sqlite"]["events_per_s"],
        "ingest_events_per_s_postgres": results["postgres"]["events_per_s"],
        "batch_events": args.batch,
        "concurrency": args.concurrency,
        "events": args.events,
        "reaction_p99_ms": None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
