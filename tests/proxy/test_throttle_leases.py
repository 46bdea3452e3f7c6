# Level-2 throttles shared by workers, one worker's side, with a real Redis ledger:
# two workers' buckets together admit the customer's burst once; with the ledger
# away a worker throttles on a bucket of its own, and goes back to the shared one a
# while after. The clock is the only thing made up.
import asyncio
import socket
import uuid

from config.bus import throttle_bucket_key
from config.edge_state_file import Customer, Plan, Standing
from config.values import Rate
from decision_core import ALLOW_THROTTLED, REJECT, RequestFacts, decide
from proxy.edge_snapshot import build_snapshot, hash_api_key
from proxy.redis_bus import RedisBus
from proxy.redis_quota_ledger import RedisQuotaLedger
from proxy.throttle_leases import OWN_BUCKET_S, ThrottleLeases

NOW = 1_795_000_000.0
FACTS = RequestFacts((), "api_calls", 1)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Request:
    """One request as a worker decides it: again each time its token is settled."""

    def __init__(self, leases, customer):
        self.leases, self.customer = leases, customer
        self.outcome = None
        self.settled = asyncio.Event()

    def start(self):
        decision = decide(self.customer, FACTS, NOW)
        if decision.outcome == REJECT and self.leases.wait(self, self.customer, decision):
            return
        self.outcome = decision.outcome
        self.settled.set()

    def lease_settled(self, ok):
        assert ok
        self.start()


def worker_state(customer_id, burst):
    customer = Customer(id=customer_id, plan="pro", status="active", api_keys=(hash_api_key(b"k").hex(),),
                        levels={"overall": Standing(guard="floor", level=2, throttle_rate=Rate(1, 3600),
                                                    burst=burst)})
    snapshot = build_snapshot({"pro": Plan(tier="pro")}, [customer], NOW - 86400, NOW + 86400, NOW,
                              shared=True)
    return snapshot.customer_by_id(customer_id)


async def serve(leases, customer, count):
    requests = [Request(leases, customer) for _ in range(count)]
    for request in requests:
        request.start()
    await asyncio.gather(*(request.settled.wait() for request in requests))
    return [request.outcome for request in requests]


def test_two_workers_admit_the_customers_burst_once(redis_url):
    async def scenario():
        bus = RedisBus(redis_url)
        customer_id = f"cus_{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        try:
            workers = [(ThrottleLeases(RedisQuotaLedger(bus), loop), worker_state(customer_id, 3)) for _ in range(2)]
            outcomes = await asyncio.gather(*(serve(leases, customer, 4) for leases, customer in workers))
            admitted = sum(outcome == ALLOW_THROTTLED for each in outcomes for outcome in each)
            assert admitted == 3
            # The empty bucket is known here now: refused without asking again.
            leases, customer = workers[0]
            assert await serve(leases, customer, 2) == [REJECT, REJECT]
        finally:
            await bus.client.delete(throttle_bucket_key(customer_id, "floor", "overall"))
            await bus.close()
    asyncio.run(scenario())


def test_with_the_ledger_away_a_worker_throttles_on_its_own_then_asks_again():
    with socket.socket() as sock:                   # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"

    async def scenario():
        bus = RedisBus(nowhere, timeout_s=0.5)
        clock = FakeClock()
        try:
            leases = ThrottleLeases(RedisQuotaLedger(bus), asyncio.get_running_loop(), clock=clock,
                                    wall_clock=lambda: NOW)
            customer = worker_state("cus_1", 2)
            # Its own bucket, full: the burst, then refusals without asking.
            assert await serve(leases, customer, 3) == [ALLOW_THROTTLED, ALLOW_THROTTLED, REJECT]
            assert await serve(leases, customer, 1) == [REJECT]
            assert not customer.acting_levels["overall"].bucket.fed
            clock.now += OWN_BUCKET_S
            # A while later it asks the shared bucket again (still away: its own again).
            assert await serve(leases, customer, 3) == [ALLOW_THROTTLED, ALLOW_THROTTLED, REJECT]
        finally:
            await bus.close()
    asyncio.run(scenario())
