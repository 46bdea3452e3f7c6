# Graceful shutdown: stop accepting, close idle keep-alive connections, let the
# requests in flight finish, and leave every meter event in the meter file. Once with
# a worker in this process, once with `aforo proxy` as a real process with two workers
# stopped by SIGTERM. Every wait is bounded; nothing is asserted on elapsed time.
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    SOCKET_TIMEOUT_S,
    HttpReader,
    connect,
    edge_state_yaml,
    read_until_closed,
    request,
    wait_until,
)

HEAD = b"Host: api.test\r\nAuthorization: Bearer k-pro\r\n"
PROCESS_EXIT_BOUND_S = 60          # a bound on waiting for the process, never an assertion
READY_ATTEMPTS = 300               # readiness polls, 0.05 s apart


def slow_request_in_flight(proxy_port, upstream, loop_thread):
    """A keep-alive connection whose GET /slow has reached the upstream and waits on
    the "slow" gate."""
    sock = connect(proxy_port)
    sock.sendall(b"GET /slow HTTP/1.1\r\n" + HEAD + b"\r\n")
    wait_until(loop_thread, lambda: any(entry[1] == "/slow" for entry in upstream.requests))
    return sock


def assert_refused(port):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S).close()


# -- in process ------------------------------------------------------------------------------

def test_stop_finishes_the_request_in_flight_and_keeps_every_meter_event(upstream, make_proxy, loop_thread):
    proxy = make_proxy(upstream.port)
    for index in range(3):
        assert request(proxy.port, "GET", f"/echo/{index}")[0] == 200
    idle = connect(proxy.port)
    idle_reader = HttpReader(idle)
    idle.sendall(b"GET /echo/idle HTTP/1.1\r\n" + HEAD + b"\r\n")
    assert idle_reader.read_response()[0] == 200
    slow = slow_request_in_flight(proxy.port, upstream, loop_thread)
    stopping = asyncio.run_coroutine_threadsafe(proxy.worker.stop(20), loop_thread.loop)
    try:
        wait_until(loop_thread, lambda: proxy.app.closing)
        # No new connections; the idle keep-alive one is closed without a response.
        assert_refused(proxy.port)
        assert idle_reader.buffer + read_until_closed(idle) == b""
        assert not stopping.done()                   # the slow request still holds it open
        upstream.gate("slow").set()
        status, headers, body, _ = HttpReader(slow).read_response()
        assert (status, body) == (200, b"finally")
        assert headers["connection"] == "close"
        assert read_until_closed(slow) == b""
    finally:
        upstream.gate("slow").set()
        stopping.result(30)
        idle.close()
        slow.close()
    events = proxy.meter_events()
    assert len(events) == 5
    assert len({event["id"] for event in events}) == 5
    assert sum(event["response_bytes"] == len(b"finally") for event in events) == 1
    assert not any(proxy.folder.joinpath("meter-spool").glob("segment-*"))


def test_stop_aborts_what_the_grace_period_could_not_finish(upstream, make_proxy, loop_thread):
    proxy = make_proxy(upstream.port)
    slow = slow_request_in_flight(proxy.port, upstream, loop_thread)
    try:
        loop_thread.run(proxy.worker.stop(0), timeout=30)
        # Cut, not completed: the client sees no response rather than a false one.
        assert read_until_closed(slow) == b""
    finally:
        upstream.gate("slow").set()
        slow.close()
    assert proxy.meter_events() == []


def test_a_stopped_worker_no_longer_sweeps(upstream, make_proxy, loop_thread):
    # A stopped worker leaves nothing scheduled on the loop holding on to it.
    proxy = make_proxy(upstream.port)
    proxy.stop()
    assert loop_thread.call(lambda: proxy.app.sweeper is None)


# -- a real process --------------------------------------------------------------------------

def free_port(pair=False):
    """A port nothing listens on (and, with `pair`, the one after it too)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair found")


def proxy_command(settings_path):
    aforo = Path(sys.executable).with_name("aforo")
    if aforo.exists():
        return [str(aforo), "proxy", "--config", str(settings_path)]
    return [sys.executable, "-c", "import sys; from proxy.server import run_proxy; sys.exit(run_proxy(sys.argv[1]))",
            str(settings_path)]


def readiness(admin_port):
    """The /readyz status of one worker's admin port, or None when nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=SOCKET_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (ConnectionError, urllib.error.URLError):
        return None


def poll(condition, what):
    for _ in range(READY_ATTEMPTS):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen in {READY_ATTEMPTS} attempts")


class ProxyProcess:
    """`aforo proxy --config FILE` with `workers` workers in its own session, so every
    worker can be killed with it at the end."""

    def __init__(self, folder, upstream_port, workers=2, start=True):
        self.folder = folder
        self.workers = workers
        self.port = free_port()
        self.admin_port = free_port(pair=True)
        (folder / "edge_state.yaml").write_text(edge_state_yaml())
        settings_path = folder / "proxy.yaml"
        settings_path.write_text(textwrap.dedent(f"""\
            listen: 127.0.0.1:{self.port}
            admin: 127.0.0.1:{self.admin_port}
            workers: {workers}
            limits: {{shutdown_grace_s: 30}}
            upstreams:
              main: {{url: "http://127.0.0.1:{upstream_port}", pool_size: 8, connect_timeout_s: 2, read_timeout_s: 30}}
            routes:
              - {{name: everything, upstream: main, path_prefix: /, metric: api_calls, units: 1}}
            edge_state: {{file: edge_state.yaml, reload_interval_s: 3600}}
            metering: {{path: meter-events.ndjson, spool_dir: meter-spool, buffer_events: 1000, batch_events: 50,
                       flush_interval_s: 3600}}
            """))
        self.settings_path = settings_path
        self.log = open(folder / "proxy.log", "wb")
        self.process = None
        if start:
            self.start()

    def start(self):
        self.process = subprocess.Popen(proxy_command(self.settings_path), cwd=self.folder, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def admin_ports(self):
        return [self.admin_port + index for index in range(self.workers)]

    def wait_ready(self):
        def ready():
            assert self.process.poll() is None, self.output()
            return all(readiness(port) == 200 for port in self.admin_ports)
        poll(ready, "readiness of every worker")

    def worker_pids(self):
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children if b"spawn_main" in _cmdline(pid)]

    def output(self):
        self.log.flush()
        return (self.folder / "proxy.log").read_text(errors="replace")

    def exit_status(self):
        """(exit status, output) once the process ends by itself; killed if it does not."""
        try:
            return self.process.wait(PROCESS_EXIT_BOUND_S), self.output()
        finally:
            self.kill()

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(PROCESS_EXIT_BOUND_S)
        self.log.close()

    def meter_events(self):
        events = []
        for index in range(self.workers):
            path = self.folder / f"meter-events.worker-{index}.ndjson"
            if path.exists():
                events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return events


@pytest.fixture
def proxy_process(upstream, tmp_path):
    started = []

    def start(workers=2):
        process = ProxyProcess(tmp_path, upstream.port, workers)
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.kill()


def test_sigterm_drains_every_worker_and_keeps_every_meter_event(proxy_process, upstream, loop_thread):
    proxy = proxy_process(workers=2)
    connections_n, per_connection = 10, 20
    sockets = [connect(proxy.port) for _ in range(connections_n)]
    slow = None
    try:
        for sock in sockets:
            reader = HttpReader(sock)
            for index in range(per_connection):
                sock.sendall(b"GET /echo/%d HTTP/1.1\r\n" % index + HEAD + b"\r\n")
                assert reader.read_response()[0] == 200
        requests_n = connections_n * per_connection
        slow = slow_request_in_flight(proxy.port, upstream, loop_thread)
        proxy.process.send_signal(signal.SIGTERM)
        # Every worker stops accepting and reports it is not ready (or has already stopped).
        poll(lambda: all(readiness(port) != 200 for port in proxy.admin_ports), "every worker shutting down")
        assert_refused(proxy.port)
        for sock in sockets:                        # idle keep-alive connections are closed
            assert read_until_closed(sock) == b""
        assert proxy.process.poll() is None         # the slow request holds its worker
        upstream.gate("slow").set()
        status, headers, body, _ = HttpReader(slow).read_response()
        assert (status, body) == (200, b"finally")
        assert headers["connection"] == "close"
        assert proxy.process.wait(PROCESS_EXIT_BOUND_S) == 0, proxy.output()
    finally:
        upstream.gate("slow").set()
        for sock in sockets + [slow] if slow else sockets:
            sock.close()
    events = proxy.meter_events()
    assert len(events) == requests_n + 1, proxy.output()
    assert len({event["id"] for event in events}) == requests_n + 1
    assert {event["customer_id"] for event in events} == {"cus_pro"}
    assert sum(event["response_bytes"] == len(b"finally") for event in events) == 1
    assert [path.name for path in proxy.folder.glob("meter-spool*/*") if path.is_file()] == []


def test_a_worker_that_dies_is_replaced_and_the_port_keeps_serving(proxy_process):
    proxy = proxy_process(workers=2)
    first, second = proxy.worker_pids()
    os.kill(first, signal.SIGKILL)

    def replaced():
        pids = proxy.worker_pids()
        return (len(pids) == 2 and first not in pids and second in pids
                and all(readiness(port) == 200 for port in proxy.admin_ports))
    poll(replaced, "a new worker in place of the killed one")
    # Fresh connections land on either worker (SO_REUSEPORT): every one is served.
    for index in range(20):
        assert request(proxy.port, "GET", f"/echo/after-{index}")[0] == 200
    assert f"worker 0 (pid {first}) exited with status {128 + signal.SIGKILL}" in proxy.output()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(PROCESS_EXIT_BOUND_S) == 0, proxy.output()
    assert len(proxy.meter_events()) == 20


def test_a_killed_worker_loses_no_meter_event_older_than_its_last_group_commit(proxy_process):
    # The meter file is written once an hour (flush_interval_s: 3600): every event sits in
    # worker memory, and on disk only in the journal of the group commit (every 100 ms).
    proxy = proxy_process(workers=2)
    requests_n = 30
    for index in range(requests_n):
        assert request(proxy.port, "GET", f"/echo/before-kill-{index}")[0] == 200

    def journaled():
        return sum(len(path.read_bytes().splitlines())
                   for path in proxy.folder.glob("meter-spool.worker-*/journal/*.ndjson"))
    poll(lambda: journaled() == requests_n, "the group commit of every event")
    assert proxy.meter_events() == []
    killed = proxy.worker_pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    # Each replacement replays its predecessor's journal to the meter file at once.
    poll(lambda: len({event["id"] for event in proxy.meter_events()}) == requests_n,
         "every event of the killed workers delivered by their replacements")
    assert not set(killed) & set(proxy.worker_pids())
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(PROCESS_EXIT_BOUND_S) == 0, proxy.output()
    events = proxy.meter_events()
    assert sorted(event["id"] for event in events) == sorted({event["id"] for event in events})
    assert len(events) == requests_n
    assert [path.name for path in proxy.folder.glob("meter-spool*/**/*") if path.is_file()] == []


def test_a_worker_that_cannot_start_stops_the_proxy_with_a_failure(upstream, tmp_path):
    # Worker 1's admin port is taken: it exits at every start; after a few quick
    # exits in a row the proxy gives up rather than retrying forever.
    proxy = ProxyProcess(tmp_path, upstream.port, workers=2, start=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", proxy.admin_ports[1]))
        squatter.listen()
        proxy.start()
        status, output = proxy.exit_status()
    assert status == 1, output
    assert "worker 1 exited with status 1 5 times in a row" in output


def test_a_bad_edge_state_file_is_reported_once_before_any_worker_starts(upstream, tmp_path):
    proxy = ProxyProcess(tmp_path, upstream.port, workers=2, start=False)
    (tmp_path / "edge_state.yaml").write_text("customers: [oops\n")
    proxy.start()
    status, output = proxy.exit_status()
    assert status == 1, output
    assert "edge_state.yaml" in output
    assert "worker" not in output          # no worker was started, none restarted


def _cmdline(pid):
    # A child may exit between being listed and being read: it is no worker then.
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""
