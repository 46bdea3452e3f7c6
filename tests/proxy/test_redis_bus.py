# The worker's connection to Redis: a circuit breaker that opens after failures in a
# row, refuses calls while open, lets one trial through after the pause and closes on
# its success; and a bus that answers BusUnavailable (never a hang or a RedisError)
# when Redis is not there.
import asyncio
import socket

import pytest

from proxy.redis_bus import BusUnavailable, CircuitBreaker, RedisBus


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize(
    ("steps", "allowed_at_end", "open_at_end"),
    [
        (["fail", "fail"], True, False),                        # below the threshold
        (["fail", "fail", "fail"], False, True),                # opened
        (["fail", "fail", "ok", "fail", "fail"], True, False),  # a success resets the count
        (["fail"] * 3 + ["wait"], True, False),                 # the pause is over: a trial may go
        (["fail"] * 3 + ["wait", "trial", "fail"], False, True),  # the trial failed: open again
        (["fail"] * 3 + ["wait", "trial", "ok"], True, False),  # the trial succeeded: closed
        (["fail"] * 3 + ["wait", "trial"], False, True),        # one trial at a time
    ],
)
def test_the_breaker_opens_after_failures_in_a_row_and_closes_after_a_good_trial(steps, allowed_at_end, open_at_end):
    clock = Clock()
    breaker = CircuitBreaker(failures=3, open_s=2.0, clock=clock)
    for step in steps:
        if step == "fail":
            breaker.failed()
        elif step == "ok":
            breaker.succeeded()
        elif step == "wait":
            clock.now += 2.0
        elif step == "trial":
            assert breaker.allow()
    assert breaker.is_open == open_at_end
    assert breaker.allow() == allowed_at_end


def test_a_bus_without_redis_fails_fast_and_then_stops_asking():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]                   # nothing listens here once closed

    async def run():
        attempts = []
        bus = RedisBus(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, breaker=CircuitBreaker(failures=2, open_s=60))

        async def ping(client):
            attempts.append(1)
            return await client.ping()
        try:
            for _ in range(5):
                with pytest.raises(BusUnavailable) as caught:
                    await bus.call("ping", ping)
            assert "circuit open" in str(caught.value)
            assert len(attempts) == 2                   # after two failures it stopped asking
            assert bus.breaker.is_open
        finally:
            await bus.close()
    asyncio.run(run())


def test_a_bus_with_redis_answers(redis_url):
    async def run():
        bus = RedisBus(redis_url)
        try:
            assert await bus.call("ping", lambda client: client.ping()) is True
            assert not bus.breaker.is_open
        finally:
            await bus.close()
    asyncio.run(run())
