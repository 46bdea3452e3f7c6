"""Streamed LLM completions through the proxy against the same completions direct.

    python -m bench.ai [--count 1000] [--concurrency 16] [--chunks 20] [--chunk-delay-ms 0] [--rounds 5]

Starts the local LLM upstream (bench.llm_upstream: OpenAI chat completions as SSE,
`--chunks` content deltas per answer, `--chunk-delay-ms` between events) and this
proxy in front of it (`aforo proxy`, one worker, a route with `ai: {format:
openai_chat}`, an edge state file with one customer, meter events to an NDJSON
file). Upstream and proxy share one core, the client runs on the other (taskset,
when installed and the machine has two cores). The client is an asyncio (aiohttp)
process that streams `--count` completions (`stream: true`, as the openai SDK sends
them) to each target with `--concurrency` in flight, in `--rounds` rounds that
alternate between the targets (the order flips each round, so drift in the machine's
speed touches both alike), and times per completion the first body byte (TTFB) and
the whole answer. Every answer must be a 200 ending in `data: [DONE]`. The proxy
asks the upstream for usage (`stream_options.include_usage`), so its answers carry
one more event (the usage chunk) than the direct ones.

Then the proxy is stopped (delivering every meter event) and its meter file read:
every completion through it must have exactly one `api_calls` event and one event
per token kind, none flagged. The last line is a JSON object with TTFB p50/p99 per
target, `ttfb_added_p99_ms` (proxy p99 minus direct p99), completions/s per target
and `throughput_ratio_vs_direct` (completions/s through the proxy over direct, over
the whole run; each round's ratio listed beside it), the meter counts, and whether
the targets (TTFB p99 added <= 1 ms, throughput >= 80% of direct) are met.
Everything listens on 127.0.0.1 and stops by itself (`--timeout` bounds the client).
"""

import argparse
import asyncio
import collections
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.proxy import LOAD_CPU, SERVER_CPU, free_port, stop, wait_listening

API_KEY = "bench-ai-key"
MODEL = "gpt-4o-mini"
PATH = "/v1/chat/completions"
ROUTE = "chat"
TOKEN_METRICS = ("ai_input_tokens", "ai_cached_tokens", "ai_output_tokens", "ai_reasoning_tokens")
TTFB_ADDED_P99_TARGET_MS = 1.0
THROUGHPUT_RATIO_TARGET = 0.8
TARGETS = ("direct", "proxy")


def pinned(cpu, command):
    """`command` pinned to `cpu` with taskset, unpinned when taskset is missing or
    the machine lacks the two cores the benchmark spreads over."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if shutil.which("taskset") and {int(SERVER_CPU), int(LOAD_CPU)} <= cores:
        return ["taskset", "-c", cpu] + command
    return command


# -- servers -------------------------------------------------------------------------------

def start_upstream(folder, port, chunks, chunk_delay_ms):
    log = open(Path(folder) / "upstream.log", "wb")
    process = subprocess.Popen(
        pinned(SERVER_CPU, [sys.executable, "-m", "bench.llm_upstream", "--port", str(port),
                            "--text-chunks", str(chunks), "--chunk-delay-s", str(chunk_delay_ms / 1000)]),
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_listening(port, process)
    return process


def proxy_settings(folder, port, upstream_port):
    folder = Path(folder)
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    (folder / "edge_state.yaml").write_text(textwrap.dedent(f"""\
        period: {{start: "2026-01-01T00:00:00+00:00", end: "2099-01-01T00:00:00+00:00"}}
        plans:
          pro: {{tier: pro, features: [large_models]}}
        customers:
          - {{id: cus_bench_ai, plan: pro, status: active, api_keys: [{digest}]}}
        """))
    settings = folder / "aforo-proxy.yaml"
    settings.write_text(textwrap.dedent(f"""\
        listen: 127.0.0.1:{port}
        admin: 127.0.0.1:{free_port()}
        workers: 1
        upstreams:
          llm: {{url: "http://127.0.0.1:{upstream_port}", pool_size: 128}}
        routes:
          - {{name: {ROUTE}, upstream: llm, path_prefix: {PATH}, ai: {{format: openai_chat}}}}
        edge_state: {{file: edge_state.yaml, reload_interval_s: 3600}}
        metering: {{path: meter-events.ndjson, spool_dir: meter-spool}}
        """))
    return settings


def start_proxy(folder, port, upstream_port):
    settings = proxy_settings(folder, port, upstream_port)
    log = open(Path(folder) / "proxy.log", "wb")
    process = subprocess.Popen(
        pinned(SERVER_CPU, [sys.executable, "-m", "control_plane.cli", "proxy", "--config", str(settings)]),
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_listening(port, process)
    return process


def cpu_seconds(pid):
    """User + system CPU seconds a process has used so far (None off Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_meter(folder):
    """The meter events of the bench route: {metric: count}, and how many were flagged."""
    path = Path(folder) / "meter-events.ndjson"
    counts = collections.Counter()
    flagged = 0
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("route") != ROUTE:
                continue
            counts[event["metric"]] += 1
            if "usage_flags" in (event.get("dimensions") or {}):
                flagged += 1
    return counts, flagged


# -- client (its own process, pinned) ----------------------------------------------------------

async def complete(session, url, body, headers):
    """One streamed completion: (ttfb_s, total_s, ok)."""
    start = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as response:
        first = await response.content.readany()
        ttfb = time.perf_counter() - start
        tail = first[-64:]
        while True:
            data = await response.content.readany()
            if not data:
                break
            tail = (tail + data)[-64:]
        total = time.perf_counter() - start
        ok = response.status == 200 and tail.endswith(b"data: [DONE]\n\n")
    return ttfb, total, ok


async def batch(session, url, count, concurrency):
    """`count` completions, `concurrency` in flight: (samples, wall seconds)."""
    body = json.dumps({"model": MODEL, "stream": True,
                       "messages": [{"role": "user", "content": "How are margins kept?"}]}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    samples = []
    left = count

    async def worker():
        nonlocal left
        while left > 0:
            left -= 1
            samples.append(await complete(session, url, body, headers))

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return samples, time.perf_counter() - start, time.process_time() - cpu


async def drive(spec):
    import aiohttp

    per_round = [spec["count"] // spec["rounds"] + (1 if index < spec["count"] % spec["rounds"] else 0)
                 for index in range(spec["rounds"])]
    sessions = {}
    result = {target: {"ttfb": [], "total": [], "errors": 0, "rounds": []} for target in TARGETS}
    warmed = {}
    try:
        for target in TARGETS:
            connector = aiohttp.TCPConnector(limit=spec["concurrency"], limit_per_host=spec["concurrency"])
            sessions[target] = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=spec["request_timeout_s"]))
        urls = {target: f"http://127.0.0.1:{spec['ports'][target]}{PATH}" for target in TARGETS}
        for target in TARGETS:                                   # warm-up: connections and code paths
            samples, _, _ = await batch(sessions[target], urls[target], spec["warmup"], spec["concurrency"])
            warmed[target] = len(samples)
            result[target]["errors"] += sum(not ok for _, _, ok in samples)
        for number, count in enumerate(per_round):
            for target in (TARGETS if number % 2 == 0 else TARGETS[::-1]):
                samples, wall, cpu = await batch(sessions[target], urls[target], count, spec["concurrency"])
                into = result[target]
                into["ttfb"] += [ttfb for ttfb, _, _ in samples]
                into["total"] += [total for _, total, _ in samples]
                into["errors"] += sum(not ok for _, _, ok in samples)
                into["rounds"].append({"completions": len(samples), "wall_s": wall, "cpu_s": cpu})
    finally:
        for session in sessions.values():
            await session.close()
    result["warmup"] = warmed
    return result


def run_client(spec_path, out_path):
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(asyncio.run(drive(spec))))


# -- figures -----------------------------------------------------------------------------------

def percentile(values, p):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="completions per target")
    parser.add_argument("--concurrency", type=int, default=16, help="completions in flight")
    parser.add_argument("--chunks", type=int, default=20, help="content deltas per completion")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="upstream pause between events")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds over the targets")
    parser.add_argument("--warmup", type=int, default=64, help="completions per target before measuring")
    parser.add_argument("--timeout", type=float, default=100.0, help="seconds the client may take in all")
    parser.add_argument("--run-client", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_client:
        run_client(*args.run_client)
        return 0
    if args.count < args.rounds or args.rounds < 1 or args.concurrency < 1:
        parser.error("need --rounds >= 1, --count >= --rounds and --concurrency >= 1")

    with tempfile.TemporaryDirectory(prefix="aforo-bench-ai-") as folder:
        ports = {"direct": free_port(), "proxy": free_port()}
        processes = []
        try:
            processes.append(start_upstream(folder, ports["direct"], args.chunks, args.chunk_delay_ms))
            proxy = start_proxy(folder, ports["proxy"], ports["direct"])
            processes.append(proxy)
            spec = Path(folder) / "client-spec.json"
            out = Path(folder) / "client-result.json"
            spec.write_text(json.dumps({
                "ports": ports, "count": args.count, "concurrency": args.concurrency,
                "rounds": args.rounds, "warmup": args.warmup, "request_timeout_s": 30.0}))
            cpu_before = {name: cpu_seconds(process.pid) for name, process in zip(("upstream", "proxy"), processes)}
            client = subprocess.Popen(pinned(LOAD_CPU, [sys.executable, "-m", "bench.ai",
                                                        "--run-client", str(spec), str(out)]))
            try:
                status = client.wait(args.timeout)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
                print(f"the client took longer than {args.timeout:.0f} s; stopped", file=sys.stderr)
                return 1
            if status != 0 or not out.exists():
                print(f"the client failed (exit status {status})", file=sys.stderr)
                return 1
            result = json.loads(out.read_text())
            cpu_used = {name: None if before is None else cpu_seconds(process.pid) - before
                        for (name, before), process in zip(cpu_before.items(), processes)}
            stop(proxy)                              # a graceful stop writes every meter event
            if proxy.returncode != 0:
                print(f"the proxy exited with {proxy.returncode}:\n"
                      + (Path(folder) / "proxy.log").read_text()[-2000:], file=sys.stderr)
            meter, flagged = read_meter(folder)
        finally:
            for process in reversed(processes):
                stop(process)

    figures = {}
    for target in TARGETS:
        data = result[target]
        completions = sum(run["completions"] for run in data["rounds"])
        wall = sum(run["wall_s"] for run in data["rounds"])
        figures[target] = {
            "completions": completions,
            "errors": data["errors"],
            "ttfb_p50_ms": percentile(data["ttfb"], 50) * 1000,
            "ttfb_p99_ms": percentile(data["ttfb"], 99) * 1000,
            "total_p50_ms": percentile(data["total"], 50) * 1000,
            "total_p99_ms": percentile(data["total"], 99) * 1000,
            "completions_per_s": completions / wall,
            "rounds_per_s": [run["completions"] / run["wall_s"] for run in data["rounds"]],
            "client_cpu_busy": sum(run["cpu_s"] for run in data["rounds"]) / wall,
        }
    direct, proxied = figures["direct"], figures["proxy"]
    ttfb_added_p99 = proxied["ttfb_p99_ms"] - direct["ttfb_p99_ms"]
    ratio = proxied["completions_per_s"] / direct["completions_per_s"]
    round_ratios = [p / d for p, d in zip(proxied["rounds_per_s"], direct["rounds_per_s"])]
    proxied_total = proxied["completions"] + result["warmup"]["proxy"]
    direct_total = direct["completions"] + result["warmup"]["direct"]
    cpu_ms = {"upstream": cpu_used["upstream"] and cpu_used["upstream"] * 1000 / (direct_total + proxied_total),
              "proxy": cpu_used["proxy"] and cpu_used["proxy"] * 1000 / proxied_total}
    token_counts = {metric: meter.get(metric, 0) for metric in TOKEN_METRICS}
    metered_exactly = (meter.get("api_calls", 0) == proxied_total and flagged == 0
                       and all(count == proxied_total for count in token_counts.values()))

    print(f"{args.count:,} streamed completions per target ({args.chunks} content chunks, "
          f"{args.chunk_delay_ms:g} ms between events), {args.concurrency} in flight, {args.rounds} rounds")
    print(f"{'target':<8}{'done':>7}{'errors':>8}{'TTFB p50':>10}{'TTFB p99':>10}"
          f"{'total p50':>11}{'total p99':>11}{'compl/s':>10}")
    for target in TARGETS:
        f = figures[target]
        print(f"{target:<8}{f['completions']:>7}{f['errors']:>8}{f['ttfb_p50_ms']:>10.2f}{f['ttfb_p99_ms']:>10.2f}"
              f"{f['total_p50_ms']:>11.2f}{f['total_p99_ms']:>11.2f}{f['completions_per_s']:>10.0f}")
    if None not in cpu_ms.values():
        print(f"CPU per completion on the server core: upstream {cpu_ms['upstream']:.3f} ms, "
              f"proxy {cpu_ms['proxy']:.3f} ms; client core busy {direct['client_cpu_busy']:.0%} (direct), "
              f"{proxied['client_cpu_busy']:.0%} (proxy)")
    print("throughput ratio by round: " + " ".join(f"{r:.3f}" for r in round_ratios))
    ttfb_met = ttfb_added_p99 <= TTFB_ADDED_P99_TARGET_MS
    ratio_met = ratio >= THROUGHPUT_RATIO_TARGET
    print(f"TTFB p99 added by the proxy: {ttfb_added_p99:.3f} ms (target <= {TTFB_ADDED_P99_TARGET_MS:g}: "
          f"{'met' if ttfb_met else 'NOT met'})")
    print(f"throughput through the proxy / direct: {ratio:.3f} (target >= {THROUGHPUT_RATIO_TARGET:g}: "
          f"{'met' if ratio_met else 'NOT met'})")
    print(f"metered: {meter.get('api_calls', 0)} api_calls events for {proxied_total} completions through "
          f"the proxy ({result['warmup']['proxy']} of them warm-up); token events "
          + ", ".join(f"{metric} {count}" for metric, count in token_counts.items())
          + f"; flagged {flagged}: {'exact' if metered_exactly else 'NOT exact'}")

    summary = {
        **{f"{target}_{key}": round(figures[target][key], 3)
           for target in TARGETS
           for key in ("ttfb_p50_ms", "ttfb_p99_ms", "total_p50_ms", "total_p99_ms", "completions_per_s")},
        "ttfb_added_p99_ms": round(ttfb_added_p99, 3),
        "throughput_ratio_vs_direct": round(ratio, 3),
        "throughput_ratios_by_round": [round(r, 3) for r in round_ratios],
        "ttfb_target_met": ttfb_met,
        "throughput_target_met": ratio_met,
        "upstream_cpu_ms_per_completion": cpu_ms["upstream"] and round(cpu_ms["upstream"], 3),
        "proxy_cpu_ms_per_completion": cpu_ms["proxy"] and round(cpu_ms["proxy"], 3),
        "client_cpu_busy_direct": round(direct["client_cpu_busy"], 3),
        "client_cpu_busy_proxy": round(proxied["client_cpu_busy"], 3),
        "errors": direct["errors"] + proxied["errors"],
        "proxied_completions": proxied_total,
        "metered_api_calls": meter.get("api_calls", 0),
        "metered_exactly": metered_exactly,
        "completions": args.count,
        "concurrency": args.concurrency,
        "chunks": args.chunks,
        "chunk_delay_ms": args.chunk_delay_ms,
        "rounds": args.rounds,
    }
    print(json.dumps(summary))
    return 0 if metered_exactly and summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
