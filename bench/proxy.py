"""Proxy throughput and latency against nginx, side by side, plus memory at 1M customers.

    python -m bench.proxy [--duration 4] [--rounds 5] [--connections 16,64] [--customers 10000]
                          [--baseline DIR]

Starts a local upstream (nginx answering a small fixed body, or a Python server when
nginx is missing), nginx as a plain reverse proxy with upstream keep-alive, and this
proxy (one worker, decisions on, `--customers` customers, every request with one of
their API keys). Upstream and targets share one core, wrk runs on the other
(taskset). Both targets stay up and take turns run by run for `--rounds` rounds
(the order flips each round), wrk driving each at every connection count; the table shows
requests/s and p50/p99 latency per run. Then a worker with 1,000,000 customers
loaded reports its resident memory. The last line is a JSON object with the figures
(medians over rounds), including rps_ratio_vs_nginx and p99_ratio_vs_nginx at 64
connections (the median of each round's aforo/nginx ratio, every round's ratio
listed beside it) and rss_mib_1m_customers. Everything listens on 127.0.0.1 and
stops by itself. With `--baseline DIR` (another checkout of Aforo Edge, installed in
its own `.venv`, e.g. `git worktree add DIR <commit>`), that checkout's proxy runs as
a third target taking turns with the others, and rps_ratio_vs_baseline and
p99_ratio_vs_baseline compare this checkout's proxy with it, round by round.
"""

import argparse
import asyncio
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PATH = "/v1/resource"
SERVER_CPU = "1"
LOAD_CPU = "0"
READY_ATTEMPTS = 200


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port, process=None):
    for _ in range(READY_ATTEMPTS):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def pinned(cpu, command):
    return (["taskset", "-c", cpu] if shutil.which("taskset") else []) + command


# -- servers -----------------------------------------------------------------------

def nginx_config(folder, body):
    """nginx.conf text: `body` goes inside the http block."""
    return textwrap.dedent(f"""\
        worker_processes 1;
        daemon off;
        master_process off;
        pid {folder}/nginx.pid;
        error_log {folder}/error.log error;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            client_body_temp_path {folder}/body;
            proxy_temp_path {folder}/proxy;
            fastcgi_temp_path {folder}/fastcgi;
            uwsgi_temp_path {folder}/uwsgi;
            scgi_temp_path {folder}/scgi;
        """) + textwrap.indent(body, "    ") + "}\n"


def start_nginx(folder, name, body):
    folder = Path(folder) / name
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(nginx_config(folder, body))
    return subprocess.Popen(pinned(SERVER_CPU, ["nginx", "-c", str(config), "-p", str(folder)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_upstream(folder, port):
    if shutil.which("nginx"):
        process = start_nginx(folder, "upstream", textwrap.dedent(f"""\
            server {{
                listen 127.0.0.1:{port} reuseport backlog=4096;
                keepalive_requests 1000000;
                location / {{ return 200 "ok from upstream\\n"; }}
            }}
            """))
    else:
        process = subprocess.Popen(pinned(SERVER_CPU, [sys.executable, "-m", "bench.proxy", "--serve-upstream",
                                                       str(port)]))
    wait_listening(port, process)
    return process


def start_nginx_proxy(folder, port, upstream_port):
    process = start_nginx(folder, "proxy", textwrap.dedent(f"""\
        upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}
        server {{
            listen 127.0.0.1:{port} reuseport backlog=4096;
            keepalive_requests 1000000;
            location / {{
                proxy_pass http://backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
        """))
    wait_listening(port, process)
    return process


def settings_yaml(port, admin_port, upstream_port, folder):
    return textwrap.dedent(f"""\
        listen: 127.0.0.1:{port}
        admin: 127.0.0.1:{admin_port}
        workers: 1
        upstreams:
          api: {{url: "http://127.0.0.1:{upstream_port}", pool_size: 128}}
        routes:
          - {{name: resource, upstream: api, path_prefix: /v1, metric: api_calls, units: 1}}
        edge_state: {{file: {folder}/unused-edge-state.yaml}}
        metering: {{path: {folder}/meter-events.ndjson, spool_dir: {folder}/spool, buffer_events: 200000, batch_events: 5000}}
        """)


def bench_key(index):
    return f"bench-key-{index:07d}"


def build_edge_state(customers):
    """A snapshot of `customers` customers over three plans, as the control plane
    would send it: quotas large enough never to refuse, a few standings at level 1."""
    from config.edge_state_file import Customer, Plan, Quota
    from proxy.edge_state import build_snapshot, hash_api_key

    plans = {
        "free": Plan(tier="free", quotas={"api_calls": Quota(limit=10**12, hard=True)}),
        "pro": Plan(tier="pro", features=("large_models",),
                    quotas={"api_calls": Quota(limit=10**12, hard=True), "ai_tokens": Quota(limit=10**12, hard=False)}),
        "enterprise": Plan(tier="enterprise", features=("large_models", "premium_compute")),
    }
    names = ("free", "pro", "enterprise")

    def rows():
        for index in range(customers):
            yield Customer(id=f"cus_{index:07d}", plan=names[index % 3], status="active",
                           api_keys=(hash_api_key(bench_key(index).encode()).hex(),),
                           usage={"api_calls": index % 1000})

    now = time.time()
    return build_snapshot(plans, rows(), now - 10 * 86400, now + 20 * 86400, now)


def serve_proxy(settings_path, customers, ready_file):
    """Child process: one proxy worker serving `customers` customers until SIGTERM."""
    import uvloop

    from config.proxy_settings import load_proxy_settings
    from proxy.server import ProxyWorker

    uvloop.install()
    settings = load_proxy_settings(settings_path)
    edge_state = build_edge_state(customers)

    async def main():
        loop = asyncio.get_running_loop()
        worker = ProxyWorker(settings, loop=loop, edge_state=edge_state)
        await worker.start()
        # A proxy following a control plane finds customers by id at its first change
        # (and a leasing one at its first lease): that table counts too.
        edge_state.customer_by_id("cus_0000000")
        Path(ready_file).write_text(str(rss_mib()))
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await worker.stop(1.0)

    asyncio.run(main())


def serve_upstream(port):
    """Fallback upstream without nginx: a minimal asyncio HTTP server."""
    import uvloop

    response = b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\nok from upstream\n"

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = b""

        def data_received(self, data):
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                self.transport.write(response)

    async def main():
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, reuse_port=True)
        await server.serve_forever()

    uvloop.install()
    asyncio.run(main())


def rss_mib(pid="self"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_proxy(folder, port, upstream_port, customers, settings_text=None, checkout=None):
    """A proxy worker process serving `customers` bench customers on `port` (with
    `settings_text`, default settings_yaml()), of `checkout` (a directory with its own
    `.venv`; default this one); returns (process, RSS MiB when ready)."""
    folder = Path(folder)
    name = "aforo" if checkout is None else "baseline"
    (folder / name).mkdir(exist_ok=True)
    settings = folder / f"{name}-proxy.yaml"
    settings.write_text(settings_text or settings_yaml(port, free_port(), upstream_port, folder / name))
    ready = folder / f"ready-{name}-{customers}"
    python = sys.executable if checkout is None else str(Path(checkout) / ".venv" / "bin" / "python")
    process = subprocess.Popen(pinned(SERVER_CPU, [python, "-m", "bench.proxy", "--serve-proxy",
                                                   str(settings), str(customers), str(ready)]), cwd=checkout)
    for _ in range(READY_ATTEMPTS * 10):
        if ready.exists() and ready.read_text():
            break
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}")
        time.sleep(0.1)
    else:
        raise RuntimeError("proxy did not become ready")
    wait_listening(port, process)
    return process, float(ready.read_text())


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- load --------------------------------------------------------------------------------

def wrk_script(folder, customers, keys=None, name="keys.lua"):
    """A wrk Lua script (`name` in `folder`) sending each request with the next
    customer's API key: of `customers` bench customers, or the given `keys`."""
    keys = ",".join(f'"{key}"' for key in (keys or (bench_key(index) for index in range(customers))))
    script = Path(folder) / name
    script.write_text(textwrap.dedent(f"""\
        local keys = {{{keys}}}
        local n = 0
        request = function()
            n = n + 1
            return wrk.format("GET", "{PATH}", {{["Authorization"] = "Bearer " .. keys[(n % #keys) + 1]}})
        end
        """))
    return script


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text):
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def run_wrk(port, connections, duration_s, script):
    output = subprocess.run(
        pinned(LOAD_CPU, ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}{PATH}"]),
        capture_output=True, text=True, check=True, timeout=duration_s + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def median(values):
    return statistics.median(values) if values else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds over the targets")
    parser.add_argument("--connections", default="16,64")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--rss-customers", type=int, default=1_000_000)
    parser.add_argument("--baseline", help="another checkout whose proxy runs beside this one")
    parser.add_argument("--serve-proxy", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_proxy:
        serve_proxy(args.serve_proxy[0], int(args.serve_proxy[1]), args.serve_proxy[2])
        return 0
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if not shutil.which("wrk"):
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 1
    connection_counts = [int(count) for count in args.connections.split(",")]
    runs = {}           # (target, connections) -> one result per round
    with tempfile.TemporaryDirectory(prefix="aforo-bench-") as folder:
        script = wrk_script(folder, args.customers)
        upstream_port = free_port()
        upstream = start_upstream(folder, upstream_port)
        processes = {}
        try:
            ports = {}
            if shutil.which("nginx"):
                ports["nginx"] = free_port()
                processes["nginx"] = start_nginx_proxy(folder, ports["nginx"], upstream_port)
            ports["aforo"] = free_port()
            processes["aforo"], _ = start_proxy(folder, ports["aforo"], upstream_port, args.customers)
            if args.baseline:
                ports["baseline"] = free_port()
                processes["baseline"], _ = start_proxy(folder, ports["baseline"], upstream_port, args.customers,
                                                       checkout=args.baseline)
            targets = list(ports)
            for target in targets:
                run_wrk(ports[target], connection_counts[0], 2, script)    # warm-up
            # Both targets stay up and take turns run by run, the order flipping every
            # round, so a machine that speeds up or slows down during the benchmark
            # touches both alike: each aforo run is paired with the nginx run beside it.
            for round_number in range(args.rounds):
                for connections in connection_counts:
                    for target in (targets if round_number % 2 == 0 else targets[::-1]):
                        runs.setdefault((target, connections), []).append(
                            run_wrk(ports[target], connections, args.duration, script))
            rss_after_load = rss_mib(processes["aforo"].pid)
        finally:
            for process in processes.values():
                stop(process)
            stop(upstream)
        rss_process, rss_1m = start_proxy(folder, free_port(), free_port(), args.rss_customers)
        stop(rss_process)

    print(f"{'target':<9}{'conns':>6}{'round':>6}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}")
    for (target, connections), rounds in runs.items():
        for number, run in enumerate(rounds, 1):
            print(f"{target:<9}{connections:>6}{number:>6}{run['rps']:>12,.0f}{run['p50_ms']:>10.2f}"
                  f"{run['p99_ms']:>10.2f}{run['non_2xx']:>9}  {run['socket_errors']}")
    print(f"aforo worker RSS after load ({args.customers:,} customers): {rss_after_load:.0f} MiB")
    print(f"aforo worker RSS with {args.rss_customers:,} customers loaded: {rss_1m:.0f} MiB (target <= 200)")
    high = max(connection_counts)
    summary = {
        f"{target}_{key}_c{connections}": round(median([run[key] for run in rounds]), 3)
        for (target, connections), rounds in runs.items()
        for key in ("rps", "p50_ms", "p99_ms")
    }
    # Each round's aforo run against that round's nginx run; the median over rounds.
    nginx_high = runs.get(("nginx", high))
    aforo_high = runs[("aforo", high)]
    rps_ratios = [a["rps"] / n["rps"] for a, n in zip(aforo_high, nginx_high)] if nginx_high else []
    p99_ratios = [a["p99_ms"] / n["p99_ms"] for a, n in zip(aforo_high, nginx_high)] if nginx_high else []
    baseline_high = runs.get(("baseline", high))
    if baseline_high:
        versus = [(a["rps"] / b["rps"], a["p99_ms"] / b["p99_ms"]) for a, b in zip(aforo_high, baseline_high)]
        summary.update({
            "rps_ratio_vs_baseline": round(median([rps for rps, _ in versus]), 3),
            "p99_ratio_vs_baseline": round(median([p99 for _, p99 in versus]), 3),
            "rps_ratios_vs_baseline_by_round": [round(rps, 3) for rps, _ in versus],
        })
    summary.update({
        "rps_ratio_vs_nginx": round(median(rps_ratios), 3) if rps_ratios else None,
        "p99_ratio_vs_nginx": round(median(p99_ratios), 3) if p99_ratios else None,
        "rps_ratios_by_round": [round(ratio, 3) for ratio in rps_ratios],
        "p99_ratios_by_round": [round(ratio, 3) for ratio in p99_ratios],
        "rss_mib_1m_customers": round(rss_1m, 1),
        "customers": args.customers,
        "rounds": args.rounds,
    })
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
