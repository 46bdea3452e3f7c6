"""A production-mode cluster on this machine, as real processes: the tests of
tests/cluster and `python -m bench.cluster` both run it.

    cluster = Cluster(folder, database_url, proxies=3, control_planes=2)
    cluster.start()          # redis-server, upstream, catalog, control planes, proxies
    ...
    cluster.stop()           # everything it started, in reverse order

A private `redis-server` (its own port, no persistence of its own: `stop()` saves a
dump that `start()` loads again, as a Redis restarted for maintenance does), one
PostgreSQL schema, `control_planes` × `aforo control-plane` on both (guards on, the
meter stream read in one consumer group), and `proxies` × `aforo proxy` (one worker
each, its own port) following the edge state on the bus and sending meter events to
it. The catalog has a count metric `api_calls`; `cus_quota` on a plan with a hard
quota of `quota_limit`, load customers and guard customers on a plan whose fixed fee
keeps their margin high until cost events arrive. Every guard customer falls to
level 3 once its costs pass its revenue.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.proxy import free_port, rss_mib, wait_listening

QUOTA_CUSTOMER = "cus_quota"
PROBE_CUSTOMER = "cus_probe"
# Requests under this path take the proxies' route with `when_quota_unknown: closed`.
CLOSED_PATH = "/closed"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
API_TIMEOUT_S = 10.0
# The guard every customer is under: blocked (level 3) once costs exceed revenue.
GUARDS = """\
guards:
  - id: margin-floor
    metric: overall
    min_margin: 50%
    actions:
      level_3: {threshold: 0%, action: block_request}
"""
MARGIN_BLOCK_TITLE = "Margin Limit Exceeded"


def quota_customer(index: int) -> str:
    """The customers on the plan with the small hard quota; the first is QUOTA_CUSTOMER."""
    return QUOTA_CUSTOMER if index == 0 else f"{QUOTA_CUSTOMER}_{index}"


def load_customer(index: int) -> str:
    return f"cus_load_{index:03d}"


def guard_customer(index: int) -> str:
    return f"cus_guard_{index:03d}"


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `condition()` until it returns something truthy (returned), within
    `timeout_s`; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {value!r})")
        time.sleep(interval_s)


def scoped_database_url(url: str, schema: str) -> str:
    """A PostgreSQL URL whose connections use `schema` (search_path)."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def _run_sql(url: str, sql: str, *args):
    import asyncpg

    async def run():
        connection = await asyncpg.connect(url, timeout=API_TIMEOUT_S)
        try:
            return await connection.fetch(sql, *args)
        finally:
            await connection.close()
    return asyncio.run(run())


def create_schema(url: str, schema: str) -> None:
    _run_sql(url, f"CREATE SCHEMA {schema}")


def drop_schema(url: str, schema: str) -> None:
    _run_sql(url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _pinned(cpu, command):
    from bench.proxy import pinned
    return pinned(cpu, command) if cpu is not None else command


class _Logged:
    """A process whose output (stdout and stderr) goes to `log` and is kept in
    `lines` as it comes."""

    def __init__(self, command, log: Path, cwd: Path, env=None):
        self.log = log
        self.lines: list[str] = []
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.log, "a") as log:
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                log.write(line)
                log.flush()

    @property
    def pid(self) -> int:
        return self.process.pid

    def line_matching(self, pattern: str, timeout_s: float = START_TIMEOUT_S):
        """The first match of `pattern` in the output, waiting for it within a bound."""
        def found():
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log.name}: exited with {self.process.returncode}:\n" + self.tail())
            return None
        return wait_for(found, timeout_s, f"{self.log.name} saying {pattern!r}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.lines[-lines:])

    def signal(self, signum) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a graceful stop), SIGKILL after `timeout_s`; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)        # in case it was paused
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode


# -- Redis --------------------------------------------------------------------------

class PrivateRedis:
    """A redis-server of its own on 127.0.0.1:`port`, its dump in `folder`. `stop()`
    shuts it down saving its data (`keep_data=False`: killed, data lost) and `start()`
    starts it again on the same port, loading what was saved."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--dbfilename", "dump.rdb", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, 20, f"redis-server on port {self.port} answering")

    def answers(self) -> bool:
        import redis
        try:
            with redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def client(self):
        import redis
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def stop(self, keep_data: bool = True) -> None:
        if self.process is None:
            return
        if keep_data:
            import redis
            try:
                with self.client() as client:
                    client.shutdown(save=True)
            except (redis.RedisError, OSError):
                pass                    # it went away as it saved: what SHUTDOWN does
        else:
            self.process.kill()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


# -- upstream -----------------------------------------------------------------------

COUNTS_PATH = b"/__counts"


def serve_counting_upstream(port: int) -> None:
    """Child process: an HTTP/1.1 upstream answering every request 200 and counting
    them per customer (the proxy's `X-Aforo-Customer`); `GET /__counts` answers the
    counts as JSON."""
    import uvloop

    counts: dict[str, int] = {}
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\ncontent-type: text/plain\r\n\r\nok from upstream\n"
    marker = b"\r\nx-aforo-customer:"

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = b""

        def data_received(self, data):
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                if head.split(b" ", 2)[1:2] == [COUNTS_PATH]:
                    body = json.dumps(counts).encode()
                    self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                         + str(len(body)).encode() + b"\r\n\r\n" + body)
                    continue
                lower = head.lower()
                at = lower.find(marker)
                if at >= 0:
                    end = lower.find(b"\r\n", at + len(marker))
                    customer = head[at + len(marker):end if end >= 0 else None].strip().decode()
                    counts[customer] = counts.get(customer, 0) + 1
                self.transport.write(ok)

    async def main():
        server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port, reuse_port=True,
                                                                 backlog=4096)
        await server.serve_forever()

    uvloop.install()
    asyncio.run(main())


class CountingUpstream:
    def __init__(self, folder: Path, cpu=None):
        self.port = free_port()
        self.runner = _Logged(_pinned(cpu, [sys.executable, "-m", "bench.cluster_setup", "--serve-upstream",
                                            str(self.port)]), folder / "upstream.log", folder)
        wait_listening(self.port, self.runner.process)

    def counts(self) -> dict[str, int]:
        """Requests that reached the upstream, per customer."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{COUNTS_PATH.decode()}",
                                    timeout=API_TIMEOUT_S) as answer:
            return json.loads(answer.read())

    def stop(self):
        self.runner.stop()


# -- the catalog --------------------------------------------------------------------

def catalog_yaml(quota_limit: int, load_customers: int, guard_customers: int, now: float,
                 quota_customers: int = 1) -> str:
    anchor = datetime.datetime.fromtimestamp(now - 86400, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    customers = [(quota_customer(n), "capped") for n in range(quota_customers)] \
        + [(load_customer(n), "metered") for n in range(load_customers)] \
        + [(guard_customer(n), "metered") for n in range(guard_customers)] + [(PROBE_CUSTOMER, "metered")]
    return textwrap.dedent(f"""\
        metrics:
          - {{key: api_calls, aggregation: count, unit: request}}
        plans:
          - key: capped
            tier: capped
            fixed_fee: "10.00"
            quotas:
              api_calls: {{limit: {quota_limit}, hard: true}}
            charges:
              - {{metric: api_calls, model: per_unit, price: "0.01"}}
          - key: metered
            tier: metered
            fixed_fee: "10.00"
            quotas:
              api_calls: {{limit: 1000000000, hard: true}}
            charges:
              - {{metric: api_calls, model: per_unit, price: "0.01"}}
        customers:
        """) + "".join(f"  - {{key: {customer}}}\n" for customer, _ in customers) + "subscriptions:\n" + "".join(
        f"  - {{key: sub_{customer}, customer: {customer}, plan: {plan}, period_anchor: \"{anchor}\"}}\n"
        for customer, plan in customers)


# -- the processes ------------------------------------------------------------------

@dataclass
class ControlPlaneProcess:
    runner: _Logged
    url: str
    consumer: str            # its name in the meter stream's consumer group


@dataclass
class ProxyProcess:
    runner: _Logged
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        return rss_mib(self.runner.pid)

    def metric(self, sample: str) -> float:
        """The value of one sample on the admin port's /metrics, named as it is
        written there (`aforo_meter_events_total{outcome="lost"}`); 0 when absent."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == sample:
                    return float(value)
        return 0.0

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError as error:
            return 0, str(error)


@dataclass
class Cluster:
    """See the module comment. `proxy_metering` is extra YAML for every proxy's
    `metering` mapping (e.g. `buffer_events: 2000`); `upstream_port` an upstream
    already running (otherwise a CountingUpstream is started); `proxy_cpu` pins the
    proxies (and a started upstream) to that CPU."""

    folder: Path
    database_url: str
    proxies: int = 3
    control_planes: int = 2
    quota_limit: int = 1000
    quota_customers: int = 1
    load_customers: int = 20
    guard_customers: int = 20
    proxy_metering: str = ""
    meter_claim_idle_s: float = 30.0
    guards: str = GUARDS
    upstream_port: int | None = None
    proxy_cpu: str | None = None
    redis: PrivateRedis | None = None
    upstream: CountingUpstream | None = None
    running_control_planes: list[ControlPlaneProcess] = field(default_factory=list)
    running_proxies: list[ProxyProcess] = field(default_factory=list)
    token: str = ""
    keys: dict[str, str] = field(default_factory=dict)

    def start(self) -> Cluster:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.redis = PrivateRedis(self.folder / "redis")
            self.redis.start()
            if self.upstream_port is None:
                self.upstream = CountingUpstream(self.folder, self.proxy_cpu)
                self.upstream_port = self.upstream.port
            self._apply_catalog()
            (self.folder / "guards.yaml").write_text(self.guards)
            for _ in range(self.control_planes):
                self.start_control_plane()
            # Keys made before any proxy starts, the probe's last: a proxy that serves
            # the probe's key holds every key (changes apply in order).
            for customer in [*map(quota_customer, range(self.quota_customers)),
                             *map(load_customer, range(self.load_customers)),
                             *map(guard_customer, range(self.guard_customers)), PROBE_CUSTOMER]:
                self.keys[customer] = self.api("POST", f"/v1/customers/{customer}/api-keys")["key"]
            for _ in range(self.proxies):
                self.start_proxy()
            for proxy in self.running_proxies:
                wait_for(lambda proxy=proxy: proxy.readyz()[0] == 200, START_TIMEOUT_S, f"proxy :{proxy.port} ready")
                wait_for(lambda proxy=proxy: self.probe(proxy) == 200, START_TIMEOUT_S,
                         f"proxy :{proxy.port} serving the last key made")
        except BaseException:
            self.stop()
            raise
        return self

    def _cli(self, *args) -> list[str]:
        return [sys.executable, "-m", "control_plane.cli", *args]

    def _apply_catalog(self) -> None:
        catalog = self.folder / "catalog.yaml"
        catalog.write_text(catalog_yaml(self.quota_limit, self.load_customers, self.guard_customers, time.time(),
                                        self.quota_customers))
        result = subprocess.run(self._cli("apply", "-f", str(catalog), "--database", self.database_url),
                                check=False, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"aforo apply failed: {result.stdout}{result.stderr}")

    def start_control_plane(self) -> ControlPlaneProcess:
        """One more `aforo control-plane` worker; the first start prints the admin token."""
        index = len(self.running_control_planes)
        settings = self.folder / f"control-plane-{index}.yaml"
        settings.write_text(textwrap.dedent(f"""\
            listen: 127.0.0.1:0
            database: "{self.database_url}"
            guards: guards.yaml
            redis_url: "{self.redis.url}"
            meter_claim_idle_s: {self.meter_claim_idle_s:g}
            """))
        runner = _Logged(self._cli("control-plane", "--config", str(settings)),
                         self.folder / f"control-plane-{index}.log", self.folder)
        url = runner.line_matching(r"API on (http://\S+)").group(1)
        if not self.token:
            self.token = runner.line_matching(r"keep it\): (\S+)", 1).group(1)
        started = ControlPlaneProcess(runner, url, f"{socket.gethostname()}-{runner.pid}")
        self.running_control_planes.append(started)
        return started

    def start_proxy(self) -> ProxyProcess:
        index = len(self.running_proxies)
        port, admin_port = free_port(), free_port()
        metering = f"redis_url: \"{self.redis.url}\", path: meter-{index}.ndjson, spool_dir: spool-{index}"
        if self.proxy_metering:
            metering += ", " + self.proxy_metering
        settings = self.folder / f"proxy-{index}.yaml"
        settings.write_text(textwrap.dedent(f"""\
            listen: 127.0.0.1:{port}
            admin: 127.0.0.1:{admin_port}
            workers: 1
            upstreams:
              api: {{url: "http://127.0.0.1:{self.upstream_port}", pool_size: 128}}
            routes:
              - {{name: closed, upstream: api, path_prefix: {CLOSED_PATH}, metric: api_calls, units: 1,
                  when_quota_unknown: closed}}
              - {{name: api, upstream: api, path_prefix: /, metric: api_calls, units: 1}}
            edge_state: {{redis_url: "{self.redis.url}"}}
            metering: {{{metering}}}
            """))
        runner = _Logged(_pinned(self.proxy_cpu, self._cli("proxy", "--config", str(settings))),
                         self.folder / f"proxy-{index}.log", self.folder)
        wait_listening(admin_port, runner.process)
        started = ProxyProcess(runner, port, admin_port)
        self.running_proxies.append(started)
        return started

    def probe(self, proxy: ProxyProcess) -> int:
        return http_get(proxy.url + "/probe", self.keys[PROBE_CUSTOMER])[0]

    def stop(self) -> None:
        """Stop everything started, proxies first (they hand their meter events on)."""
        for proxy in self.running_proxies:
            proxy.runner.stop()
        for control_plane in self.running_control_planes:
            control_plane.runner.stop()
        if self.upstream is not None:
            self.upstream.stop()
        if self.redis is not None:
            self.redis.stop(keep_data=False)

    def logs(self) -> str:
        """The tail of every process's output, for a failure report."""
        parts = []
        for name, runner in [*((f"control plane {n}", c.runner) for n, c in enumerate(self.running_control_planes)),
                             *((f"proxy {n}", p.runner) for n, p in enumerate(self.running_proxies))]:
            parts.append(f"--- {name} (pid {runner.pid})\n{runner.tail()}")
        return "\n".join(parts)

    # -- asking the cluster ---------------------------------------------------------

    def api(self, method: str, path: str, body=None, control_plane: int = 0):
        """A call to a control plane's REST API with the admin token; the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(self.running_control_planes[control_plane].url + path, data=data,
                                      method=method, headers={"Authorization": f"Bearer {self.token}",
                                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(call, timeout=API_TIMEOUT_S) as answer:
            text = answer.read()
            return json.loads(text) if text else None

    def post_cost(self, customer: str, amount: str, event_id: str, control_plane: int = 0):
        stamp = datetime.datetime.now(datetime.UTC).isoformat()
        return self.api("POST", "/v1/costs", [{"id": event_id, "customer_id": customer, "amount": amount,
                                               "timestamp": stamp}], control_plane)

    def stored_usage(self) -> dict[str, tuple[int, int]]:
        """Per customer: (usage rows in PostgreSQL, distinct event ids among them)."""
        rows = _run_sql(self.database_url, "SELECT customer_id, count(*), count(DISTINCT event_id) FROM events "
                                           "WHERE kind = 'usage' GROUP BY customer_id")
        return {row[0]: (row[1], row[2]) for row in rows}

    def event_lags_ms(self, since: float, customers) -> list[float]:
        """For the usage events that happened at or after `since` (epoch seconds) for
        `customers`: milliseconds from the request to the row being stored."""
        rows = _run_sql(self.database_url, "SELECT (ingested_at - occurred_at) * 1000 FROM events "
                                           "WHERE kind = 'usage' AND occurred_at >= $1 AND customer_id = ANY($2)",
                        since, list(customers))
        return [row[0] for row in rows]

    def meter_stream_length(self) -> int:
        """Entries in the meter stream: batches not yet taken in by a control plane."""
        from config.bus import METER_STREAM
        with self.redis.client() as client:
            return client.xlen(METER_STREAM)

    def pending_of(self, consumer: str) -> int:
        """Meter stream entries delivered to the control plane `consumer` (its name up
        to the random part) and not acknowledged."""
        from config.bus import METER_GROUP, METER_STREAM
        with self.redis.client() as client:
            names = [entry["name"] for entry in client.xinfo_consumers(METER_STREAM, METER_GROUP)]
            names = [name.decode() if isinstance(name, bytes) else name for name in names]
            return sum(len(client.xpending_range(METER_STREAM, METER_GROUP, "-", "+", 1000, consumername=name))
                       for name in names if name.startswith(consumer + "-"))


# -- clients ------------------------------------------------------------------------

def http_get(url: str, key: str, timeout_s: float = API_TIMEOUT_S) -> tuple[int, dict]:
    """One GET with `key`: (status, problem+json body or {})."""
    call = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(call, timeout=timeout_s) as answer:
            answer.read()
            return answer.status, {}
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {}


@dataclass
class Outcome:
    customer: str
    status: int                  # 0: no answer (connection failed or timed out)
    latency_s: float
    title: str = ""
    reason: str = ""


async def _one_request(session, url, customer, key, timeout_s) -> Outcome:
    import aiohttp
    started = time.perf_counter()
    try:
        async with session.get(url, headers={"Authorization": f"Bearer {key}"},
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as answer:
            body = await answer.read()
            title = reason = ""
            if answer.status >= 400 and answer.content_type == "application/problem+json":
                problem = json.loads(body)
                title, reason = problem.get("title", ""), problem.get("reason", "")
            return Outcome(customer, answer.status, time.perf_counter() - started, title, reason)
    except (TimeoutError, aiohttp.ClientError, OSError) as error:
        return Outcome(customer, 0, time.perf_counter() - started, reason=type(error).__name__)


async def send_requests(urls: list[str], customers_keys: list[tuple[str, str]], *, total: int | None = None,
                        until=None, concurrency: int = 50, timeout_s: float = 30.0,
                        pause_s: float = 0.0, path: str = "/v1/resource") -> list[Outcome]:
    """`concurrency` clients, client i sending to urls[i % len(urls)] + `path` with the
    key of customers_keys[i % len]: one request after another on a keep-alive
    connection (`pause_s` apart), `total` requests among them all, or until `until()`
    is true. Every outcome, its latency measured here."""
    import aiohttp

    outcomes: list[Outcome] = []
    sent = 0

    async def client(index):
        nonlocal sent
        url = urls[index % len(urls)] + path
        customer, key = customers_keys[index % len(customers_keys)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            while (total is None or sent < total) and (until is None or not until()):
                sent += 1
                outcomes.append(await _one_request(session, url, customer, key, timeout_s))
                if pause_s:
                    await asyncio.sleep(pause_s)

    await asyncio.gather(*(client(index) for index in range(concurrency)))
    return outcomes


class Load:
    """send_requests() in a thread of its own until stop(): the test goes on meanwhile."""

    def __init__(self, urls, customers_keys, concurrency: int = 12, timeout_s: float = 30.0):
        self._stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self._thread = threading.Thread(target=self._run, args=(urls, customers_keys, concurrency, timeout_s),
                                        daemon=True)
        self._thread.start()

    def _run(self, urls, customers_keys, concurrency, timeout_s):
        self.outcomes = asyncio.run(send_requests(urls, customers_keys, until=self._stop.is_set,
                                                  concurrency=concurrency, timeout_s=timeout_s))

    def stop(self, timeout_s: float = 60.0) -> list[Outcome]:
        self._stop.set()
        self._thread.join(timeout_s)
        return self.outcomes


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="helpers of bench.cluster")
    parser.add_argument("--serve-upstream", type=int, required=True, help="run the counting upstream on this port")
    args = parser.parse_args(argv)
    serve_counting_upstream(args.serve_upstream)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
