import asyncio
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import decision_core


def pytest_report_header(config):
    build = "compiled (Cython)" if decision_core.COMPILED else "pure Python"
    return f"decision core: {build}; {decision_core.PURE_PYTHON_ENV}={os.environ.get(decision_core.PURE_PYTHON_ENV, '')!r}"


# -- services the tests use for real ------------------------------------------------------
# PostgreSQL at POSTGRES_URL (trust auth on this machine). When it is not up the tests
# start it if this machine can; under CI=true a service that stays down fails the run
# loudly instead of skipping what needs it.
POSTGRES_URL = os.environ.get("AFORO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SERVICE_WAIT_S = 20


async def _postgres_answers(url):
    import asyncpg
    try:
        connection = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return False
    await connection.close()
    return True


def _start_postgres():
    versions = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").is_dir() else []
    if not versions or not shutil.which("pg_ctlcluster"):
        return "pg_ctlcluster is not available"
    result = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start"],
                            capture_output=True, text=True, timeout=60)
    return result.stderr.strip() or None


def _service_missing(what):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a running PostgreSQL, started here when it was down."""
    if not asyncio.run(_postgres_answers(POSTGRES_URL)):
        problem = _start_postgres()
        for _ in range(SERVICE_WAIT_S * 2):
            if asyncio.run(_postgres_answers(POSTGRES_URL)):
                break
            time.sleep(0.5)
        else:
            _service_missing(f"PostgreSQL at {POSTGRES_URL} is not running and could not be started: {problem}")
    return POSTGRES_URL


@pytest.fixture
def postgres_schema(postgres_url):
    """A fresh schema of its own for one test, dropped afterwards: (url, schema)."""
    import asyncpg
    schema = f"test_{uuid.uuid4().hex[:12]}"

    async def run(sql):
        connection = await asyncpg.connect(postgres_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()
    asyncio.run(run(f"CREATE SCHEMA {schema}"))
    yield postgres_url, schema
    asyncio.run(run(f"DROP SCHEMA {schema} CASCADE"))


# Redis at REDIS_URL, started here (redis-server, as a daemon) when it is down.
REDIS_URL = os.environ.get("AFORO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_answers(url):
    import redis
    try:
        return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_url():
    """The URL of a running Redis, started here when it was down."""
    if not _redis_answers(REDIS_URL):
        problem = None
        if shutil.which("redis-server"):
            result = subprocess.run(["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--daemonize", "yes"],
                                    capture_output=True, text=True, timeout=60)
            problem = result.stderr.strip() or None
        else:
            problem = "redis-server is not available"
        for _ in range(SERVICE_WAIT_S * 2):
            if _redis_answers(REDIS_URL):
                break
            time.sleep(0.5)
        else:
            _service_missing(f"Redis at {REDIS_URL} is not running and could not be started: {problem}")
    return REDIS_URL


@pytest.fixture
def private_redis(redis_url, tmp_path):
    """A redis-server of one test's own (bench.cluster_setup.PrivateRedis), which it
    may stop and start again without touching the Redis other tests share; stopped
    after the test. (`redis_url` first: redis-server is there, or the run fails under
    CI=true.)"""
    from bench.cluster_setup import PrivateRedis
    if not shutil.which("redis-server"):
        _service_missing("redis-server is not available for a private Redis")
    server = PrivateRedis(tmp_path / "private-redis")
    server.start()
    yield server
    server.stop(keep_data=False)
