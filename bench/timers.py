"""How late the proxy's timeouts fire, against nginx's, side by side.

    python -m bench.timers [--rounds 3] [--connections 40] [--timeout 1.0]

Every timeout is set to `--timeout` seconds, on this proxy (header_timeout_s,
body_timeout_s, an upstream's read_timeout_s) and on nginx (client_header_timeout,
client_body_timeout, proxy_read_timeout), both in front of an upstream that reads
requests and never answers. For each timeout `--connections` clients, started a few
milliseconds apart, stall where it applies: mid-headers, mid-body, or with a whole
request the upstream sits on. Each client's lateness is the time from its last byte to
the answer (or the close) minus the setting. Both targets take turns round by round
(the order flips each round). The table shows p50/p99 lateness per target and
timeout; the last line is a JSON object with header_timeout_late_p99_ms,
body_timeout_late_p99_ms and read_timeout_late_p99_ms (this proxy, over all rounds),
the same for nginx (nginx_...), and every client's error count. Everything listens
on 127.0.0.1 and stops by itself.
"""

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.proxy import bench_key, free_port, pinned, start_nginx, start_proxy, stop, wait_listening

TIMEOUTS = ("header", "body", "read")
STAGGER_S = 0.005
# A client waits at most this long past the setting before it counts as an error.
GRACE_S = 5.0


def stalled_request(kind, key):
    """The bytes a client sends before it stalls, for the timeout `kind`."""
    head = f"POST /v1/stall HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
    if kind == "header":
        return head.encode()                                   # the blank line never comes
    if kind == "body":
        return (head + "Content-Length: 1000\r\n\r\n").encode() + b"b" * 100
    return (head + "Content-Length: 10\r\n\r\n").encode() + b"r" * 10


async def one_client(port, kind, key, delay_s, timeout_s):
    """Seconds past `timeout_s` until the target answers or closes, or None on error."""
    await asyncio.sleep(delay_s)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(stalled_request(kind, key))
        await writer.drain()
        sent_at = time.monotonic()
        try:
            await asyncio.wait_for(reader.read(1), timeout_s + GRACE_S)
        except (asyncio.TimeoutError, ConnectionError):
            return None
        return time.monotonic() - sent_at - timeout_s
    finally:
        writer.close()


async def measure(port, kind, connections, timeout_s):
    """Lateness (seconds) of each of `connections` clients stalling for `kind`."""
    return await asyncio.gather(*(one_client(port, kind, bench_key(0), index * STAGGER_S, timeout_s)
                                  for index in range(connections)))


def serve_silent_upstream(port):
    """Child process: an upstream that reads whatever comes and never answers."""
    class Silent(asyncio.Protocol):
        def data_received(self, data):
            pass

    async def main():
        server = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


def proxy_settings(port, upstream_port, folder, timeout_s):
    return textwrap.dedent(f"""\
        listen: 127.0.0.1:{port}
        admin: 127.0.0.1:{free_port()}
        limits: {{header_timeout_s: {timeout_s}, body_timeout_s: {timeout_s}}}
        upstreams:
          api: {{url: "http://127.0.0.1:{upstream_port}", pool_size: 512, read_timeout_s: {timeout_s}}}
        routes:
          - {{name: resource, upstream: api, path_prefix: /v1}}
        edge_state: {{file: {folder}/unused-edge-state.yaml}}
        metering: {{path: {folder}/meter-events.ndjson, spool_dir: {folder}/spool}}
        """)


def nginx_proxy(folder, port, upstream_port, timeout_s):
    process = start_nginx(folder, "proxy", textwrap.dedent(f"""\
        client_header_timeout {timeout_s * 1000:.0f}ms;
        client_body_timeout {timeout_s * 1000:.0f}ms;
        server {{
            listen 127.0.0.1:{port} backlog=4096;
            location / {{
                proxy_pass http://127.0.0.1:{upstream_port};
                proxy_read_timeout {timeout_s * 1000:.0f}ms;
            }}
        }}
        """))
    wait_listening(port, process)
    return process


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=40, help="stalling clients per timeout and round")
    parser.add_argument("--timeout", type=float, default=1.0, help="every timeout's setting, seconds")
    parser.add_argument("--serve-silent-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_silent_upstream:
        serve_silent_upstream(args.serve_silent_upstream)
        return 0
    late = {}          # (target, timeout) -> lateness seconds of every client
    errors = {}
    with tempfile.TemporaryDirectory(prefix="aforo-bench-timers-") as folder:
        upstream_port = free_port()
        upstream = subprocess.Popen(pinned("1", [sys.executable, "-m", "bench.timers", "--serve-silent-upstream",
                                                 str(upstream_port)]))
        processes = {}
        try:
            wait_listening(upstream_port, upstream)
            ports = {"aforo": free_port()}
            processes["aforo"], _ = start_proxy(folder, ports["aforo"], upstream_port, 1,
                                                proxy_settings(ports["aforo"], upstream_port, folder, args.timeout))
            if shutil.which("nginx"):
                ports["nginx"] = free_port()
                processes["nginx"] = nginx_proxy(folder, ports["nginx"], upstream_port, args.timeout)
            targets = list(ports)
            for round_number in range(args.rounds):
                for kind in TIMEOUTS:
                    for target in (targets if round_number % 2 == 0 else targets[::-1]):
                        results = asyncio.run(measure(ports[target], kind, args.connections, args.timeout))
                        late.setdefault((target, kind), []).extend(r for r in results if r is not None)
                        errors[(target, kind)] = errors.get((target, kind), 0) + results.count(None)
        finally:
            for process in processes.values():
                stop(process)
            stop(upstream)

    print(f"{'target':<8}{'timeout':<9}{'clients':>8}{'p50 late ms':>13}{'p99 late ms':>13}{'errors':>8}")
    summary = {}
    for (target, kind), values in late.items():
        p50 = statistics.median(values) * 1000 if values else float("nan")
        p99 = percentile(values, 0.99) * 1000 if values else float("nan")
        print(f"{target:<8}{kind:<9}{len(values):>8}{p50:>13.1f}{p99:>13.1f}{errors[(target, kind)]:>8}")
        prefix = "" if target == "aforo" else f"{target}_"
        summary[f"{prefix}{kind}_timeout_late_p99_ms"] = round(p99, 1)
        summary[f"{prefix}{kind}_timeout_late_p50_ms"] = round(p50, 1)
    summary.update({
        "errors": sum(errors.values()),
        "timeout_s": args.timeout,
        "clients_per_timeout": args.connections * args.rounds,
    })
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
