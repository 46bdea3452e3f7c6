# Production mode as users run it: 3 `aforo proxy` processes and 2 `aforo control-plane`
# workers sharing one PostgreSQL schema and one Redis (a redis-server of this module's
# own, which it stops and starts again), over real sockets. Exact hard quotas across
# proxies, a guard level reaching every proxy, a Redis outage under load, and a
# control-plane worker killed mid-stream, each judged by what clients and the store see.
import asyncio
import shutil
import signal
import threading
import time
import uuid
from collections import Counter

import pytest
from conftest import _service_missing

from bench.cluster_setup import (
    CLOSED_PATH,
    GUARDS,
    MARGIN_BLOCK_TITLE,
    QUOTA_CUSTOMER,
    Cluster,
    Load,
    create_schema,
    drop_schema,
    guard_customer,
    http_get,
    load_customer,
    quota_customer,
    scoped_database_url,
    send_requests,
    wait_for,
)
from config.proxy_settings import RedisCalls
from proxy.quota_leases import CHUNK_SHARE

QUOTA_LIMIT = 1000
LOAD_CUSTOMERS = 12
# One guard customer is throttled instead of blocked: 1 request an hour, bursts of
# THROTTLE_BURST, for that customer across every proxy.
THROTTLED = guard_customer(2)
THROTTLE_BURST = 4
GUARDS_WITH_A_THROTTLE = GUARDS + f"""\
  - id: throttle-floor
    metric: overall
    scope: {{customer: {THROTTLED}}}
    min_margin: 90%
    actions:
      level_2: {{threshold: 85%, throttle_rate: 1req/hour, burst: {THROTTLE_BURST}}}
"""
# Small enough that a Redis outage of a few seconds under load spills meter events
# to the disk spool instead of memory.
PROXY_METERING = "buffer_events: 2000, batch_events: 500"
# How long events may take to reach PostgreSQL once nothing stands in their way.
SETTLE_S = 30.0
# How long Redis stays down under load: several rounds of the proxies' circuit breaker.
OUTAGE_S = 8.0
# What one worker may admit from its last state while the quota ledger is away.
OUTAGE_CHUNK = QUOTA_LIMIT // CHUNK_SHARE
# After this long a dead control plane's unacknowledged entries are taken over.
CLAIM_IDLE_S = 3.0


@pytest.fixture(scope="module")
def cluster(postgres_url, redis_url, tmp_path_factory):
    if not shutil.which("redis-server"):
        _service_missing("redis-server is not available for the cluster's own Redis")
    schema = f"cluster_{uuid.uuid4().hex[:12]}"
    create_schema(postgres_url, schema)
    running = Cluster(tmp_path_factory.mktemp("cluster"), scoped_database_url(postgres_url, schema),
                      proxies=3, control_planes=2, quota_limit=QUOTA_LIMIT, quota_customers=5,
                      load_customers=LOAD_CUSTOMERS,
                      guard_customers=3, proxy_metering=PROXY_METERING, meter_claim_idle_s=CLAIM_IDLE_S,
                      guards=GUARDS_WITH_A_THROTTLE)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        drop_schema(postgres_url, schema)


@pytest.fixture
def report_logs(cluster):
    """On a failure, the processes' last words are in the report."""
    yield
    print(cluster.logs())


def proxy_urls(cluster):
    return [proxy.url for proxy in cluster.running_proxies]


def load_keys(cluster):
    return [(load_customer(n), cluster.keys[load_customer(n)]) for n in range(LOAD_CUSTOMERS)]


def stored_exactly_once(cluster):
    """Whether every request that reached the upstream is one usage row in PostgreSQL
    (and there is no row of a request that did not): (forwarded, stored) when so."""
    forwarded = cluster.upstream.counts()
    stored = cluster.stored_usage()
    if {customer: (count, count) for customer, count in forwarded.items()} == stored:
        return forwarded, stored
    return None


def refusal(proxy, key):
    """The problem+json of a 429 answer through `proxy` with `key`, None for another."""
    status, problem = http_get(proxy.url + "/v1/resource", key)
    return problem if status == 429 else None


def units_billed(cluster, customer):
    margin = cluster.api("GET", f"/v1/customers/{customer}/margin")
    return sum(metric["units"] for metric in margin["metrics"] if metric["metric"] == "api_calls")


def test_a_hard_quota_admits_exactly_its_limit_across_every_proxy(cluster, report_logs):
    key = cluster.keys[QUOTA_CUSTOMER]
    # 50 clients spread over the 3 proxies ask for half as much again as the quota.
    outcomes = asyncio.run(send_requests(proxy_urls(cluster), [(QUOTA_CUSTOMER, key)], total=QUOTA_LIMIT * 3 // 2,
                                         concurrency=50))
    assert Counter(outcome.status for outcome in outcomes) == {200: QUOTA_LIMIT, 429: QUOTA_LIMIT // 2}
    assert {outcome.reason for outcome in outcomes if outcome.status == 429} == {"quota_exceeded"}
    assert cluster.upstream.counts()[QUOTA_CUSTOMER] == QUOTA_LIMIT
    # And the quota stays used up on every proxy.
    for proxy in cluster.running_proxies:
        assert http_get(proxy.url + "/v1/resource", key)[0] == 429


def test_a_guard_level_change_reaches_every_proxy(cluster, report_logs):
    customer = guard_customer(0)
    key = cluster.keys[customer]
    for proxy in cluster.running_proxies:
        assert http_get(proxy.url + "/v1/resource", key)[0] == 200
    # A cost far above the plan's revenue, through the second control-plane worker:
    # its margin falls below the guard's level-3 threshold.
    cluster.post_cost(customer, "500", "gpu-bill-1", control_plane=1)
    for proxy in cluster.running_proxies:
        problem = wait_for(lambda proxy=proxy: refusal(proxy, key), 10, f"proxy :{proxy.port} refusing {customer}")
        assert problem["title"] == MARGIN_BLOCK_TITLE
    # Another customer is untouched.
    assert http_get(cluster.running_proxies[0].url + "/v1/resource", cluster.keys[guard_customer(1)])[0] == 200


def test_a_throttle_admits_its_rate_for_the_customer_across_every_proxy(cluster, report_logs):
    key = cluster.keys[THROTTLED]
    admitted_throttled = 'aforo_requests_total{decision="throttle",route="api"}'

    def throttled_admits():
        return sum(proxy.metric(admitted_throttled) for proxy in cluster.running_proxies)
    before = throttled_admits()
    cluster.post_cost(THROTTLED, "5", "throttle-bill-1")        # margin about 50 %: level 2
    # Each proxy admits until the customer's shared bucket is empty, then refuses.
    for proxy in cluster.running_proxies:
        problem = wait_for(lambda proxy=proxy: refusal(proxy, key), 10, f"proxy :{proxy.port} throttling")
        assert problem["reason"] == "throttled"
    for _ in range(5):
        for proxy in cluster.running_proxies:
            assert refusal(proxy, key)["reason"] == "throttled"
    # Three proxies on buckets of their own would have admitted the burst three times.
    assert throttled_admits() - before == THROTTLE_BURST


def test_a_hard_quota_stays_exact_across_a_redis_restart(cluster, report_logs):
    customer = quota_customer(1)
    key = cluster.keys[customer]
    # Every proxy takes a lease and uses a little of it; Redis goes away before the
    # unused units can go back, and comes back.
    admitted = sum(http_get(proxy.url + "/v1/resource", key)[0] == 200
                   for proxy in cluster.running_proxies for _ in range(5))
    cluster.redis.stop()
    wait_for(lambda: all(proxy.metric("aforo_redis_circuit_open") for proxy in cluster.running_proxies), 10,
             "every proxy noticing Redis is away")
    cluster.redis.start()
    wait_for(lambda: not any(proxy.metric("aforo_redis_circuit_open") for proxy in cluster.running_proxies), 20,
             "every proxy using Redis again", interval_s=0.2)
    outcomes = asyncio.run(send_requests(proxy_urls(cluster), [(customer, key)], total=QUOTA_LIMIT * 3 // 2,
                                         concurrency=50))
    admitted += sum(outcome.status == 200 for outcome in outcomes)
    assert admitted == QUOTA_LIMIT


def use_most_of_the_quota(cluster, customers):
    """Each customer uses 90 % of its hard quota through every proxy (so each holds a
    lease), and the store has recorded it (so the proxies' last state knows)."""
    used = QUOTA_LIMIT * 9 // 10
    for customer, path in customers:
        outcomes = asyncio.run(send_requests(proxy_urls(cluster), [(customer, cluster.keys[customer])], total=used,
                                             concurrency=30, path=path))
        assert Counter(outcome.status for outcome in outcomes) == {200: used}
    wait_for(lambda: all(cluster.stored_usage().get(customer) == (used, used) for customer, _ in customers),
             SETTLE_S, "the usage stored", interval_s=0.2)
    time.sleep(2.0)             # the proxies' state follows the store's totals
    return used


def test_a_redis_outage_admits_at_most_one_chunk_per_worker_beyond_a_hard_quota(cluster, report_logs):
    # Proxies that decide from their last state while the ledger is away would each
    # admit all that state says is left: three times the 10 % left, here.
    customers = [(quota_customer(2), "/v1/resource"), (quota_customer(3), CLOSED_PATH + "/resource")]
    admitted = dict.fromkeys((customer for customer, _ in customers), use_most_of_the_quota(cluster, customers))
    cluster.redis.stop()
    try:
        wait_for(lambda: all(proxy.metric("aforo_redis_circuit_open") for proxy in cluster.running_proxies), 10,
                 "every proxy noticing Redis is away")
        refused = {}
        for customer, path in customers:
            outcomes = asyncio.run(send_requests(proxy_urls(cluster), [(customer, cluster.keys[customer])],
                                                 total=QUOTA_LIMIT // 2, concurrency=30, path=path))
            admitted[customer] += sum(outcome.status == 200 for outcome in outcomes)
            refused[customer] = Counter((outcome.status, outcome.reason) for outcome in outcomes
                                        if outcome.status != 200)
    finally:
        cluster.redis.start()
    workers = len(cluster.running_proxies)
    open_customer, closed_customer = (customer for customer, _ in customers)
    # The stated bound: the limit, plus one chunk per worker for `open` routes; never
    # beyond the limit for `closed` ones. What is not admitted is 503 (retry shortly).
    assert QUOTA_LIMIT - OUTAGE_CHUNK < admitted[open_customer] <= QUOTA_LIMIT + workers * OUTAGE_CHUNK
    assert admitted[closed_customer] <= QUOTA_LIMIT
    assert set(refused[open_customer]) <= {(503, "quota_unavailable"), (429, "quota_exceeded")}
    assert set(refused[closed_customer]) == {(503, "quota_unavailable")}
    wait_for(lambda: not any(proxy.metric("aforo_redis_circuit_open") for proxy in cluster.running_proxies), 20,
             "every proxy using Redis again", interval_s=0.2)


def test_a_redis_outage_under_load_blocks_no_request_and_loses_no_event(cluster, report_logs):
    redis_timeout_s = RedisCalls().timeout_s        # the proxies' configured (default) Redis timeout
    proxies = cluster.running_proxies
    load = Load(proxy_urls(cluster), load_keys(cluster), concurrency=12)
    started = sum(cluster.upstream.counts().values())
    wait_for(lambda: sum(cluster.upstream.counts().values()) > started + 500, 10, "load flowing")
    rss_before = {proxy.port: proxy.rss_mib() for proxy in proxies}
    rss_highest = dict(rss_before)
    sampling = threading.Event()

    circuit_seen_open = set()

    def sample_rss():
        while not sampling.wait(0.2):
            for proxy in proxies:
                rss_highest[proxy.port] = max(rss_highest[proxy.port], proxy.rss_mib())
                if proxy.metric("aforo_redis_circuit_open"):
                    circuit_seen_open.add(proxy.port)
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    try:
        cluster.redis.stop()                                 # Redis is gone...
        down_at, before_outage = time.monotonic(), sum(cluster.upstream.counts().values())
        wait_for(lambda: time.monotonic() - down_at > OUTAGE_S
                 and sum(cluster.upstream.counts().values()) > before_outage + 2000, 30,
                 "requests served while Redis is down", interval_s=0.2)
        ready_while_down = [proxy.readyz()[0] for proxy in proxies]
        cluster.redis.start()                                # ...and back, with what it held
        restarted_at = sum(cluster.upstream.counts().values())
        wait_for(lambda: sum(cluster.upstream.counts().values()) > restarted_at + 1000, 30,
                 "requests served after Redis is back", interval_s=0.2)
    finally:
        outcomes = load.stop()
        sampling.set()
        sampler.join()

    # Clients noticed nothing: every request answered as before, none waiting on Redis
    # longer than its timeout (plus a generous margin for a loaded 2-core machine).
    # While Redis was away every proxy said so on /metrics (its circuit breaker open),
    # and stayed ready.
    assert circuit_seen_open == {proxy.port for proxy in proxies}
    assert ready_while_down == [200] * len(proxies)
    assert Counter(outcome.status for outcome in outcomes) == {200: len(outcomes)}
    slowest = max(outcome.latency_s for outcome in outcomes)
    assert slowest < redis_timeout_s + 2.0, f"a request took {slowest:.2f} s"
    # Memory stayed bounded (meter events beyond the buffer went to the disk spool).
    grown = {port: rss_highest[port] - rss_before[port] for port in rss_before}
    assert max(grown.values()) < 64, f"proxy RSS grew by {grown} MiB"
    assert sum(proxy.metric('aforo_meter_events_total{outcome="spilled"}') for proxy in proxies) > 0
    assert [proxy.metric('aforo_meter_events_total{outcome="lost"}') for proxy in proxies] == [0.0] * len(proxies)
    # Every meter event reached PostgreSQL once the bus was back, exactly once.
    forwarded, _ = wait_for(lambda: stored_exactly_once(cluster), SETTLE_S, "every forwarded request stored once",
                            interval_s=0.5)
    assert sum(forwarded[customer] for customer, _ in load_keys(cluster)) >= len(outcomes)
    assert units_billed(cluster, load_customer(0)) == forwarded[load_customer(0)]


def test_a_killed_control_plane_worker_loses_and_doubles_nothing(cluster, report_logs):
    survivor, victim = cluster.running_control_planes
    load = Load(proxy_urls(cluster), load_keys(cluster), concurrency=12)
    try:
        # Paused while it waits on the stream, the victim is handed an entry it never
        # acknowledges; then it is killed, mid-stream, with that entry pending.
        for _ in range(5):
            victim.runner.signal(signal.SIGSTOP)
            try:
                wait_for(lambda: cluster.pending_of(victim.consumer), 5, "an entry pending with the paused worker")
                break
            except AssertionError:
                victim.runner.signal(signal.SIGCONT)        # it was not waiting on the stream: again
        victim.runner.signal(signal.SIGKILL)
        assert cluster.pending_of(victim.consumer) >= 1
        before = sum(cluster.upstream.counts().values())
        wait_for(lambda: sum(cluster.upstream.counts().values()) > before + 1000, 30,
                 "requests served after the kill", interval_s=0.2)
    finally:
        outcomes = load.stop()
    victim.runner.stop()
    assert Counter(outcome.status for outcome in outcomes) == {200: len(outcomes)}
    # The survivor claims the dead worker's entries once they have been idle
    # CLAIM_IDLE_S: then every forwarded request is stored, once.
    wait_for(lambda: stored_exactly_once(cluster), CLAIM_IDLE_S + SETTLE_S,
             "every forwarded request stored once", interval_s=0.5)
    assert cluster.pending_of(victim.consumer) == 0
    forwarded = cluster.upstream.counts()
    assert all(units_billed(cluster, load_customer(n)) == forwarded[load_customer(n)] for n in range(3))
    assert survivor.runner.process.poll() is None


def test_a_redis_that_lost_everything_mid_traffic_grants_no_more_than_the_stated_bound(cluster, report_logs):
    # Last in this module: the flush takes the meter stream with it.
    customer = quota_customer(4)
    key = cluster.keys[customer]
    admitted = use_most_of_the_quota(cluster, [(customer, "/v1/resource")])
    with cluster.redis.client() as client:
        client.flushall()
    outcomes = asyncio.run(send_requests(proxy_urls(cluster), [(customer, key)], total=QUOTA_LIMIT, concurrency=30))
    admitted += sum(outcome.status == 200 for outcome in outcomes)
    # Units leased before the loss are spent, the rebuilt ledger grants what the store
    # says is left, and meanwhile each worker admits at most one chunk.
    assert admitted <= QUOTA_LIMIT + len(cluster.running_proxies) * OUTAGE_CHUNK
    assert {outcome.reason for outcome in outcomes if outcome.status != 200} <= {"quota_unavailable",
                                                                                   "quota_exceeded"}
    # Once rebuilt, the quota stays used up on every proxy.
    for proxy in cluster.running_proxies:
        wait_for(lambda proxy=proxy: http_get(proxy.url + "/v1/resource", key)[0] == 429, 20,
                 f"proxy :{proxy.port} refusing {customer} for its quota")
