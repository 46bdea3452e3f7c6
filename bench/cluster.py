"""Production mode on one machine: 3 proxies on the Redis bus against one, the event
lag to PostgreSQL, guard reaction through Redis, and a hard quota across proxies.

    python -m bench.cluster [--duration 5] [--rounds 3] [--connections 64] [--customers 10000]
                            [--proxies 3] [--control-planes 2] [--trials 20] [--quota 1000]
                            [--postgres URL]

Starts an upstream and a single proxy exactly as bench.proxy does (one worker, a file
edge state of `--customers` customers), and a cluster (bench.cluster_setup): a
redis-server of its own, a fresh PostgreSQL schema, `--control-planes` ×
`aforo control-plane` and `--proxies` × `aforo proxy` (one worker each) on the bus,
forwarding to the same upstream. The proxies, the single one included, share one
core with the upstream and wrk runs on the other (taskset), as in bench.proxy; the
control planes, Redis and PostgreSQL run where the scheduler puts them.

1. Throughput: wrk drives the single proxy with `--connections` connections, then
   the cluster with as many spread over its proxies (one wrk each, at once), taking
   turns for `--rounds` rounds (the order flipping each round). The ratio of the
   cluster's aggregate requests/s to the single proxy's, per round, and its median.
2. Event lag: once the meter stream is drained, clients send paced requests through
   every proxy for `--lag-seconds`; for each of their usage rows, the time from the
   request to the row being stored in PostgreSQL (p50, p99).
3. Guard reaction through Redis: `--trials` times, a cost event posted to a control
   plane (the workers taking turns) takes a fresh customer below the guard's level-3
   threshold; the time from just before the POST until every proxy answers that
   customer 429 "Margin Limit Exceeded" (p50, p99; target p99 <= 1 s).
4. Quota: 50 clients over all proxies ask one customer with a hard quota of
   `--quota` for half as much again; how many were admitted.

The last line is a JSON object with the figures: rps_ratio_vs_single,
event_lag_p99_ms, reaction_p99_ms, quota_limit, quota_admitted and more. Everything
listens on 127.0.0.1 and is stopped before it exits.
"""

import argparse
import asyncio
import concurrent.futures
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

from bench import proxy as single
from bench.cluster_setup import (
    MARGIN_BLOCK_TITLE,
    QUOTA_CUSTOMER,
    Cluster,
    create_schema,
    drop_schema,
    guard_customer,
    load_customer,
    scoped_database_url,
    send_requests,
    wait_for,
)
from bench.reaction import percentile, reaction_figures

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
LOAD_CUSTOMERS = 100
DRAIN_TIMEOUT_S = 180.0
TRIAL_TIMEOUT_S = 10.0


# -- throughput ---------------------------------------------------------------------

def run_wrk_on_all(ports, connections, duration_s, script):
    """One wrk per port at once, `connections` spread over them: the summed
    requests/s, the worst p99 and the non-2xx answers."""
    shares = [connections // len(ports) + (1 if n < connections % len(ports) else 0) for n in range(len(ports))]
    with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
        runs = list(pool.map(lambda pair: single.run_wrk(pair[0], pair[1], duration_s, script),
                             zip(ports, shares)))
    return {"rps": sum(run["rps"] for run in runs), "p99_ms": max(run["p99_ms"] for run in runs),
            "non_2xx": sum(run["non_2xx"] for run in runs),
            "socket_errors": "; ".join(run["socket_errors"] for run in runs if run["socket_errors"])}


def throughput(args, folder, single_port, cluster):
    single_script = single.wrk_script(folder, args.customers)
    cluster_script = single.wrk_script(folder, 0, [cluster.keys[load_customer(n)] for n in range(LOAD_CUSTOMERS)],
                                       name="cluster-keys.lua")
    cluster_ports = [proxy.port for proxy in cluster.running_proxies]
    targets = {"single": lambda duration: single.run_wrk(single_port, args.connections, duration, single_script),
               "cluster": lambda duration: run_wrk_on_all(cluster_ports, args.connections, duration, cluster_script)}
    for run in targets.values():
        run(2)                                              # warm-up
    runs = {name: [] for name in targets}
    for round_number in range(args.rounds):
        for name in (list(targets) if round_number % 2 == 0 else list(targets)[::-1]):
            runs[name].append(targets[name](args.duration))
    return runs


# -- event lag ----------------------------------------------------------------------

def drained(cluster):
    """Whether no meter event waits anywhere: proxies' buffers and spools, the stream."""
    waiting = sum(proxy.metric("aforo_meter_buffer_depth") + proxy.metric("aforo_meter_spooled_events")
                  for proxy in cluster.running_proxies)
    return waiting == 0 and cluster.meter_stream_length() == 0


def event_lag(args, cluster):
    wait_for(lambda: drained(cluster), DRAIN_TIMEOUT_S, "the meter stream drained", interval_s=0.5)
    customers = [load_customer(n) for n in range(LOAD_CUSTOMERS)]
    keys = [(customer, cluster.keys[customer]) for customer in customers]
    since = time.time()
    deadline = time.monotonic() + args.lag_seconds
    outcomes = asyncio.run(send_requests([proxy.url for proxy in cluster.running_proxies], keys,
                                         until=lambda: time.monotonic() > deadline, concurrency=6, pause_s=0.02))
    admitted = sum(1 for outcome in outcomes if outcome.status == 200)

    def all_stored():
        found = cluster.event_lags_ms(since, customers)
        return found if len(found) >= admitted else None
    lags = wait_for(all_stored, 60, "the paced requests' usage rows", interval_s=0.5)
    return lags, len(outcomes) / args.lag_seconds


# -- guard reaction -----------------------------------------------------------------

async def _blocking_status(session, proxy, key):
    # 429 only for a margin block (not a quota or throttle refusal).
    async with session.get(proxy.url + "/v1/resource", headers={"Authorization": f"Bearer {key}"}) as answer:
        body = await answer.read()
        if answer.status == 429 and json.loads(body).get("title") == MARGIN_BLOCK_TITLE:
            return 429
        return answer.status


async def _reaction_trial(session, cluster, trial):
    customer = guard_customer(trial)
    key = cluster.keys[customer]
    for proxy in cluster.running_proxies:
        if await _blocking_status(session, proxy, key) != 200:
            raise RuntimeError(f"{customer} is not served by proxy :{proxy.port} before its trial")
    control_plane = cluster.running_control_planes[trial % len(cluster.running_control_planes)]
    cost = [{"id": f"breach-{trial}", "customer_id": customer, "amount": "500",
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    started = time.perf_counter()

    async def until_blocked(proxy):
        while await _blocking_status(session, proxy, key) != 429:
            if time.perf_counter() - started > TRIAL_TIMEOUT_S:
                raise TimeoutError(f"{customer} was never blocked by proxy :{proxy.port}")
        return time.perf_counter()

    async def post():
        async with session.post(control_plane.url + "/v1/costs", json=cost,
                                headers={"Authorization": f"Bearer {cluster.token}"}) as answer:
            await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"POST /v1/costs answered {answer.status}")

    _, *blocked_at = await asyncio.gather(post(), *map(until_blocked, cluster.running_proxies))
    return (max(blocked_at) - started) * 1000


async def reactions(cluster, trials):
    """Per trial, milliseconds from posting a breaching cost event (to the control
    planes in turn) until every proxy blocks the customer."""
    async with aiohttp.ClientSession() as session:
        return [await _reaction_trial(session, cluster, trial) for trial in range(trials)]


# -- quota --------------------------------------------------------------------------

def quota_scenario(cluster, limit):
    outcomes = asyncio.run(send_requests([proxy.url for proxy in cluster.running_proxies],
                                         [(QUOTA_CUSTOMER, cluster.keys[QUOTA_CUSTOMER])], total=limit * 3 // 2,
                                         concurrency=50))
    return Counter((outcome.status, outcome.reason) for outcome in outcomes)


# -- the run ------------------------------------------------------------------------

def measure(args):
    with tempfile.TemporaryDirectory(prefix="aforo-bench-cluster-") as folder:
        folder = Path(folder)
        upstream_port = single.free_port()
        upstream = single.start_upstream(folder, upstream_port)
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        create_schema(args.postgres, schema)
        single_process = None
        cluster = Cluster(folder / "cluster", scoped_database_url(args.postgres, schema), proxies=args.proxies,
                          control_planes=args.control_planes, quota_limit=args.quota,
                          load_customers=LOAD_CUSTOMERS, guard_customers=args.trials,
                          upstream_port=upstream_port, proxy_cpu=single.SERVER_CPU)
        try:
            single_port = single.free_port()
            single_process, _ = single.start_proxy(folder, single_port, upstream_port, args.customers)
            started = time.monotonic()
            cluster.start()
            setup_s = time.monotonic() - started
            print(f"cluster up in {setup_s:.1f} s: {args.proxies} proxies, {args.control_planes} control planes",
                  flush=True)
            runs = throughput(args, folder, single_port, cluster)
            print("throughput measured; draining the meter stream", flush=True)
            lags, lag_rps = event_lag(args, cluster)
            print(f"event lag measured over {len(lags)} events", flush=True)
            reacted = asyncio.run(reactions(cluster, args.trials))
            quota = quota_scenario(cluster, args.quota)
        finally:
            cluster.stop()
            if single_process is not None:
                single.stop(single_process)
            single.stop(upstream)
            drop_schema(args.postgres, schema)
    return runs, lags, lag_rps, reacted, quota


def median(values):
    return statistics.median(values) if values else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over single proxy and cluster")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections in all")
    parser.add_argument("--customers", type=int, default=10_000, help="customers of the single proxy")
    parser.add_argument("--proxies", type=int, default=3)
    parser.add_argument("--control-planes", type=int, default=2)
    parser.add_argument("--lag-seconds", type=float, default=8.0)
    parser.add_argument("--trials", type=int, default=20, help="guard reaction trials")
    parser.add_argument("--quota", type=int, default=1000, help="the hard quota of the quota scenario")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    args = parser.parse_args(argv)
    for tool in ("wrk", "redis-server", "redis-cli"):
        if not shutil.which(tool):
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    runs, lags, lag_rps, reacted, quota = measure(args)

    print(f"{'target':<9}{'round':>6}{'req/s':>12}{'p99 ms':>10}{'non-2xx':>9}")
    for name, rounds in runs.items():
        for number, run in enumerate(rounds, 1):
            print(f"{name:<9}{number:>6}{run['rps']:>12,.0f}{run['p99_ms']:>10.2f}{run['non_2xx']:>9}  "
                  f"{run['socket_errors']}")
    ratios = [cluster_run["rps"] / single_run["rps"] for single_run, cluster_run in zip(runs["single"], runs["cluster"])]
    reaction = reaction_figures(reacted)
    admitted = sum(count for (status, _), count in quota.items() if status == 200)
    print(f"cluster of {args.proxies} / single proxy, requests/s: {median(ratios):.2f} "
          f"(rounds: {', '.join(f'{ratio:.2f}' for ratio in ratios)}); all proxies share one core")
    print(f"event lag, request to PostgreSQL row, {len(lags)} events at {lag_rps:.0f} req/s: "
          f"p50 {median(lags):.0f} ms, p99 {percentile(lags, 0.99):.0f} ms")
    print(f"guard reaction through Redis, until all {args.proxies} proxies block, {len(reacted)} trials: "
          f"p50 {reaction['reaction_p50_ms']} ms, p99 {reaction['reaction_p99_ms']} ms (target p99 <= 1000 ms)")
    print(f"hard quota of {args.quota}, {args.quota * 3 // 2} requests from 50 clients over {args.proxies} proxies: "
          f"{admitted} admitted; answers {dict(sorted(quota.items()))}")
    print(json.dumps({
        "rps_ratio_vs_single": round(median(ratios), 3),
        "rps_ratios_by_round": [round(ratio, 3) for ratio in ratios],
        "single_rps": round(median([run["rps"] for run in runs["single"]]), 1),
        "cluster_rps": round(median([run["rps"] for run in runs["cluster"]]), 1),
        "single_p99_ms": median([run["p99_ms"] for run in runs["single"]]),
        "cluster_p99_ms": median([run["p99_ms"] for run in runs["cluster"]]),
        "cluster_non_2xx": sum(run["non_2xx"] for run in runs["cluster"]),
        "event_lag_p50_ms": round(median(lags), 1),
        "event_lag_p99_ms": round(percentile(lags, 0.99), 1),
        "event_lag_events": len(lags),
        **reaction,
        "quota_limit": args.quota,
        "quota_admitted": admitted,
        "proxies": args.proxies,
        "control_planes": args.control_planes,
        "connections": args.connections,
        "rounds": args.rounds,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
