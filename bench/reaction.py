"""Guard reaction time: from the POST of a cost event that breaches a level to the
first proxy response that enforces it.

    python -m bench.reaction [--trials 50]

Runs `aforo up` (control plane on SQLite, one proxy worker fed by it) over a catalog
of `--trials` customers and a local upstream. Each trial posts one cost event that
takes a fresh customer below the guard's level-3 threshold and then sends that
customer's requests through the proxy, one after another on a keep-alive connection,
until one is answered 429 "Margin Limit Exceeded"; the time from just before the
POST to that answer is the trial's reaction time. Prints p50 and p99; the last line
is a JSON object with reaction_p50_ms and reaction_p99_ms.
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.proxy import free_port

START_TIMEOUT_S = 60.0
TRIAL_TIMEOUT_S = 10.0


def write_settings(folder: Path, customers: int, upstream_port: int):
    ports = {"control_plane": free_port(), "proxy": free_port(), "admin": free_port()}
    subscriptions = "\n".join(
        f"  - {{key: sub_{n}, customer: cus_{n}, plan: starter, period_anchor: \"2026-01-01T00:00:00Z\"}}"
        for n in range(customers))
    (folder / "catalog.yaml").write_text(textwrap.dedent("""\
        metrics:
          - {key: api_calls, aggregation: count}
        plans:
          - key: starter
            tier: starter
            fixed_fee: "10.00"
            charges:
              - {metric: api_calls, model: per_unit, price: "0.01"}
        customers:
        """) + "\n".join(f"  - {{key: cus_{n}}}" for n in range(customers)) + "\nsubscriptions:\n" + subscriptions + "\n")
    (folder / "guards.yaml").write_text(textwrap.dedent("""\
        guards:
          - id: floor
            metric: overall
            min_margin: 50%
            actions:
              level_3: {threshold: 0%}
        """))
    (folder / "aforo.yaml").write_text(textwrap.dedent(f"""\
        control_plane:
          listen: 127.0.0.1:{ports["control_plane"]}
          database: aforo.db
          guards: guards.yaml
        catalog: catalog.yaml
        proxy:
          listen: 127.0.0.1:{ports["proxy"]}
          admin: 127.0.0.1:{ports["admin"]}
          upstreams:
            api: {{url: "http://127.0.0.1:{upstream_port}"}}
          routes:
            - {{name: api, upstream: api, path_prefix: /, metric: api_calls}}
          metering: {{spool_dir: meter-spool}}
        """))
    return ports


async def start_upstream():
    async def hello(_request):
        return web.json_response({"ok": True})
    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def wait_for(condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await condition():
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the setup did not come up in time")


async def measure(trials: int) -> list[float]:
    upstream, upstream_port = await start_upstream()
    with tempfile.TemporaryDirectory(prefix="aforo-reaction-") as folder:
        folder = Path(folder)
        ports = write_settings(folder, trials, upstream_port)
        up = subprocess.Popen([sys.executable, "-m", "control_plane.cli", "up", "--config", str(folder / "aforo.yaml")],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=dict(os.environ))
        try:
            token = None
            for line in up.stdout:
                if "admin token" in line:
                    token = line.rsplit(" ", 1)[1].strip()
                if "Ctrl-C stops everything" in line:
                    break
            control_plane = f"http://127.0.0.1:{ports['control_plane']}"
            proxy = f"http://127.0.0.1:{ports['proxy']}/hello"
            admin = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession() as session:
                async def proxy_ready():
                    async with session.get(f"http://127.0.0.1:{ports['admin']}/readyz") as response:
                        return response.status == 200
                await wait_for(proxy_ready, START_TIMEOUT_S)
                keys = []
                for n in range(trials):
                    async with session.post(f"{control_plane}/v1/customers/cus_{n}/api-keys", headers=admin) as answer:
                        keys.append((await answer.json())["key"])

                async def status_of(key):
                    async with session.get(proxy, headers={"Authorization": f"Bearer {key}"}) as response:
                        await response.read()
                        return response.status

                async def every_key_served():
                    return all([await status_of(key) == 200 for key in keys])
                await wait_for(every_key_served, START_TIMEOUT_S)
                reactions = []
                for n, key in enumerate(keys):
                    cost = [{"id": f"breach-{n}", "customer_id": f"cus_{n}", "amount": "100",
                             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
                    started = time.perf_counter()
                    async with session.post(f"{control_plane}/v1/costs", json=cost, headers=admin) as answer:
                        await answer.read()
                    deadline = started + TRIAL_TIMEOUT_S
                    while await status_of(key) != 429:
                        if time.perf_counter() > deadline:
                            raise TimeoutError(f"customer cus_{n} was never blocked")
                    reactions.append((time.perf_counter() - started) * 1000)
                return reactions
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(60)
            await upstream.cleanup()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args(argv)
    reactions = asyncio.run(measure(args.trials))
    result = reaction_figures(reactions)
    print(f"reaction over {len(reactions)} trials: p50 {result['reaction_p50_ms']} ms, "
          f"p99 {result['reaction_p99_ms']} ms, max {result['reaction_max_ms']} ms (target p99 <= 1000 ms)")
    print(json.dumps(result))
    return 0


def reaction_figures(reactions):
    return {"reaction_p50_ms": round(statistics.median(reactions), 2),
            "reaction_p99_ms": round(percentile(reactions, 0.99), 2),
            "reaction_max_ms": round(max(reactions), 2), "reaction_trials": len(reactions)}


if __name__ == "__main__":
    sys.exit(main())
