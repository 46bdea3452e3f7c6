# A proxy worker's one connection to the Redis edge bus, shared by what it follows
# (edge state), what it sends (meter events) and what it leases (hard quotas). Every
# call is bounded by `timeout_s`, and a circuit breaker stops calling a Redis that
# keeps failing: after `breaker_failures` failures in a row calls fail at once for
# `breaker_open_s`, then one call at a time tries again (the first success closes it).
# So a request that would wait on Redis waits at most `timeout_s`, and while the
# circuit is open, not at all.
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError

T = TypeVar("T")

TIMEOUT_S = 0.5
BREAKER_FAILURES = 3
BREAKER_OPEN_S = 2.0
# A blocking read (XREAD BLOCK) waits up to this long for news; its connection's
# timeout is this plus `timeout_s`.
BLOCK_S = 1.0


class BusUnavailable(Exception):
    """Redis did not answer in time, failed, or the circuit is open."""


class CircuitBreaker:
    """Closed: calls go through. `failures` failures in a row open it for `open_s`
    seconds (calls refused at once); then it lets one trial call through at a time
    (half open): a success closes it, a failure opens it again. `clock`: monotonic
    seconds."""

    def __init__(self, failures: int = BREAKER_FAILURES, open_s: float = BREAKER_OPEN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_to_open = failures
        self.open_s = open_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False                  # a half-open trial call is under way
        self.opened_total = 0

    @property
    def is_open(self) -> bool:
        """Whether calls are being refused (open, or half open with a trial running)."""
        if self.opened_at is None:
            return False
        return self.trial or self.clock() - self.opened_at < self.open_s

    def allow(self) -> bool:
        """Whether a call may go through now (in half open: the one trial)."""
        if self.opened_at is None:
            return True
        if self.trial or self.clock() - self.opened_at < self.open_s:
            return False
        self.trial = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial = False

    def failed(self) -> None:
        self.failures += 1
        if self.trial or self.failures >= self.failures_to_open:
            if self.opened_at is None or self.trial:
                self.opened_total += 1
            self.opened_at = self.clock()
            self.trial = False


class RedisBus:
    """The bus at `redis_url`: `call(what, command)` runs `command(client)` under the
    timeout and the circuit breaker, raising BusUnavailable (naming `what` and the
    bus) instead of RedisError or OSError. With `blocking`, `command` gets a client
    whose timeout leaves room for a read blocking up to BLOCK_S."""

    def __init__(self, redis_url: str, timeout_s: float = TIMEOUT_S, breaker: CircuitBreaker | None = None) -> None:
        self.where = redis_url
        self.timeout_s = timeout_s
        self.client = redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.blocking_client = redis.from_url(redis_url, socket_timeout=BLOCK_S + timeout_s,
                                              socket_connect_timeout=timeout_s)
        self.breaker = breaker or CircuitBreaker()

    async def call(self, what: str, command: Callable[[redis.Redis], Awaitable[T]], blocking: bool = False) -> T:
        if not self.breaker.allow():
            raise BusUnavailable(f"{what}: Redis at {self.where} is failing; not asking it for "
                                 f"{self.breaker.open_s:g} s (circuit open)")
        try:
            answer = await command(self.blocking_client if blocking else self.client)
        except (RedisError, OSError, TimeoutError) as error:
            self.breaker.failed()
            raise BusUnavailable(f"{what}: Redis at {self.where}: {error or type(error).__name__}") from error
        except BaseException:
            # Cancelled (a worker stopping): neither a success nor a failure of Redis.
            self.breaker.trial = False
            raise
        self.breaker.succeeded()
        return answer

    async def close(self) -> None:
        await self.client.aclose()
        await self.blocking_client.aclose()
