# `aforo apply`: the catalog lands in the store, applying it again changes nothing,
# a change updates just what changed, and a dangling reference writes nothing.
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError
from config.catalog_file import load_catalog_file, parse_catalog_file
from control_plane.catalog import apply_catalog
from control_plane.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"


def test_applying_twice_changes_nothing_and_a_change_updates_only_itself(backend):
    catalog = load_catalog_file(EXAMPLE)
    changed_text = EXAMPLE.read_text().replace('fixed_fee: "49.00"', 'fixed_fee: "59.00"').replace(
        '{key: gpt-4o, input: "2.50"', '{key: gpt-4o, input: "2.75"')
    changed = parse_catalog_file(changed_text, "catalog.yaml")

    async def scenario(open_store):
        store = await open_store()
        first = await apply_catalog(store, catalog, "catalog.yaml", author="test")
        assert {kind: dict(outcomes) for kind, outcomes in first.items()} == {
            "metric": {"created": 8}, "model_price": {"created": 6}, "tool_price": {"created": 3},
            "feature": {"created": 2}, "plan": {"created": 3}, "customer": {"created": 3},
            "subscription": {"created": 3}}
        version = await store.catalog_version()
        again = await apply_catalog(store, catalog, "catalog.yaml", author="test")
        assert {kind: dict(outcomes) for kind, outcomes in again.items()} == {
            "metric": {"unchanged": 8}, "model_price": {"unchanged": 6}, "tool_price": {"unchanged": 3},
            "feature": {"unchanged": 2}, "plan": {"unchanged": 3}, "customer": {"unchanged": 3},
            "subscription": {"unchanged": 3}}
        assert await store.catalog_version() == version        # nothing for a rater to reload
        third = await apply_catalog(store, changed, "catalog.yaml", author="test")
        assert dict(third["plan"]) == {"updated": 1, "unchanged": 2}
        assert dict(third["model_price"]) == {"updated": 1, "unchanged": 5}
        assert await store.catalog_version() != version
        assert (await store.get_catalog("plan", "pro"))["fixed_fee"] == "59"
        assert await store.get_catalog("model_price", "gpt-4o") == {
            "input": "2.75", "cached_input": "1.25", "output": "10", "cache_write": None, "reasoning": None}
        assert await store.get_catalog("tool_price", "web_search") == {"per_call": "0.01"}
    backend.run(scenario)


def test_a_reference_to_nothing_writes_nothing(backend):
    catalog = parse_catalog_file(
        "plans:\n  - {key: p, tier: t, features: [gold], quotas: {calls: {limit: 5}}}\n"
        "subscriptions:\n  - {key: s, customer: cus_x, plan: p, period_anchor: \"2026-11-01T00:00:00Z\"}\n",
        "catalog.yaml")

    async def scenario(open_store):
        store = await open_store()
        with pytest.raises(ConfigError) as caught:
            await apply_catalog(store, catalog, "catalog.yaml", author="test")
        assert [str(error) for error in caught.value.errors] == [
            "catalog.yaml: Unknown feature `gold`; define it under `features` - at `$.plans[0].features`",
            "catalog.yaml: Unknown metric `calls`; define it under `metrics` - at `$.plans[0].quotas.calls`",
            "catalog.yaml: Unknown customer `cus_x`; define it under `customers` - at `$.subscriptions[0].customer`",
        ]
        assert await store.list_catalog("plan") == []
        # What the store already holds counts: with those defined, the same file applies.
        await store.put_catalog("feature", "gold", {}, author="test")
        await store.put_catalog("metric", "calls", {"aggregation": "count"}, author="test")
        await store.put_catalog("customer", "cus_x", {}, author="test")
        summary = await apply_catalog(store, catalog, "catalog.yaml", author="test")
        assert dict(summary["subscription"]) == {"created": 1}
    backend.run(scenario)


def test_the_command_applies_a_file_and_reports_what_changed(tmp_path, capsys):
    database = str(tmp_path / "aforo.db")
    assert main(["apply", "-f", str(EXAMPLE), "--database", database]) == 0
    assert "plans: 3 created" in capsys.readouterr().out
    assert main(["apply", "-f", str(EXAMPLE), "--database", database]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to change"
    bad = tmp_path / "bad.yaml"
    bad.write_text("subscriptions:\n  - {key: s, customer: nobody, plan: pro, period_anchor: \"2026-11-01T00:00:00Z\"}\n")
    assert main(["apply", "-f", str(bad), "--database", database]) == 1
    assert "Unknown customer `nobody`" in capsys.readouterr().err
    assert main(["apply", "-f", str(tmp_path / "missing.yaml"), "--database", database]) == 2


def test_the_command_applies_to_postgresql(postgres_schema, tmp_path):
    url, schema = postgres_schema
    # The schema of this test, through libpq's `options` in the URL.
    scoped = f"{url}?options=-csearch_path%3D{schema}"
    command = [sys.executable, "-m", "control_plane.cli", "apply", "-f", str(EXAMPLE), "--database", scoped]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.stdout.splitlines()[-1] == "nothing to change", again.stderr

    async def plans():
        import asyncpg
        connection = await asyncpg.connect(url)
        try:
            return await connection.fetchval(f"SELECT count(*) FROM {schema}.catalog WHERE kind = 'plan'")
        finally:
            await connection.close()
    assert asyncio.run(plans()) == 3


def test_a_file_of_price_tables_alone_is_a_catalog_and_applies_once(tmp_path, capsys):
    prices = tmp_path / "prices.yaml"
    prices.write_text('model_prices:\n  - {key: gpt-4o, input: "2.50"}\n'
                      'tool_prices:\n  - {key: web_search, per_call: "0.01"}\n')
    database = str(tmp_path / "aforo.db")
    assert main(["check-config", str(prices)]) == 0
    assert "1 model_prices, 1 tool_prices" in capsys.readouterr().out
    assert main(["apply", "-f", str(prices), "--database", database]) == 0
    assert capsys.readouterr().out.splitlines() == ["model_prices: 1 created", "tool_prices: 1 created", "applied"]
    assert main(["apply", "-f", str(prices), "--database", database]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to change"
