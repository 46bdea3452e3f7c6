# Fixtures for control-plane tests: `backend`, parametrized over the embedded SQLite
# store and a real PostgreSQL (a schema of its own per test).
import asyncio

import pytest

from control_plane.postgres_store import PostgresStore
from control_plane.sqlite_store import SqliteStore


class Backend:
    """Runs a scenario against one backend: `run(scenario)` calls `scenario(open_store)`
    on a fresh event loop, where `await open_store()` opens (and migrates, unless
    migrate=False) a store on
    the test's database (again: another connection to the same one); every store
    opened is closed before the loop ends."""

    def __init__(self, connect, database_url):
        self.connect = connect
        self.database_url = database_url      # the same database, as `aforo ... --database` takes it

    def run(self, scenario):
        async def main():
            opened = []

            async def open_store(migrate=True):
                store = await self.connect()
                opened.append(store)
                if migrate:
                    await store.migrate()
                return store
            try:
                return await scenario(open_store)
            finally:
                for store in opened:
                    await store.close()
        return asyncio.run(main())


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        path = str(tmp_path / "store" / "aforo.db")
        return Backend(lambda: SqliteStore.open(path), path)
    url, schema = request.getfixturevalue("postgres_schema")
    return Backend(lambda: PostgresStore.connect(url, server_settings={"search_path": schema}),
                   f"{url}?search_path={schema}")
