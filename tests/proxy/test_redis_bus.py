# The worker's connection to Redis: a circuit breaker that opens after failures in a
# row, refuses calls while open, lets calls try again after the pause and closes on
# a success; and a bus that answers BusUnavailable (never a hang or a RedisError)
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
        (["fail"] * 3 + ["wait"], True, False),                 # the pause is over: calls try again
        (["fail"] * 3 + ["wait", "trial", "fail"], False, True),  # and one failure opens it again
        (["fail"] * 3 + ["wait", "trial", "ok"], True, False),  # a success closes it
        (["fail"] * 3 + ["wait", "trial", "trial"], True, False),  # every caller may try, not one
    ],
)
def test_the_breaker_opens_after_failures_in_a_row_and_closes_after_a_success(steps, allowed_at_end, open_at_end):
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


def test_a_tripped_breaker_stays_tripped_through_the_pause_until_a_call_succeeds():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, open_s=2.0, clock=clock)
    breaker.failed()
    clock.now += 5.0                                    # the pause is over, Redis not yet back
    assert (breaker.is_open, breaker.tripped) == (False, True)
    breaker.succeeded()
    assert breaker.tripped is False
