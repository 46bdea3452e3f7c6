# Applying a catalog file to the store: declarative and idempotent. Every reference is
# checked first (against the file and what the store already holds), so a file with a
# dangling reference writes nothing; then each entry is upserted, sections in
# dependency order. Applying the same file again changes nothing and says so.
from __future__ import annotations

from collections import Counter

from config.catalog_file import SECTIONS, CatalogFile, document_of
from config.errors import ConfigError, raise_if_any
from control_plane.store import UNCHANGED, Store


async def check_references(store: Store, catalog: CatalogFile, file: str) -> list[ConfigError]:
    """A ConfigError (file, path) for every entry naming a metric, feature, customer or
    plan that is neither in the file nor in the store."""
    known = {}
    for section, kind in SECTIONS:
        stored = {key for key, _ in await store.list_catalog(kind)}
        known[kind] = stored | {entry.key for entry in getattr(catalog, section)}
    errors = []

    def need(kind, name, path):
        if name not in known[kind]:
            errors.append(ConfigError(f"Unknown {kind} `{name}`; define it under `{kind}s`", file, path=path))

    for index, plan in enumerate(catalog.plans):
        path = f"$.plans[{index}]"
        for feature in plan.features:
            need("feature", feature, f"{path}.features")
        for metric in plan.quotas:
            need("metric", metric, f"{path}.quotas.{metric}")
        for metric in plan.fee_allocation:
            need("metric", metric, f"{path}.fee_allocation.{metric}")
        for number, charge in enumerate(plan.charges):
            need("metric", charge.metric, f"{path}.charges[{number}].metric")
    for index, subscription in enumerate(catalog.subscriptions):
        need("customer", subscription.customer, f"$.subscriptions[{index}].customer")
        need("plan", subscription.plan, f"$.subscriptions[{index}].plan")
    return errors


async def apply_catalog(store: Store, catalog: CatalogFile, file: str) -> dict[str, Counter]:
    """Upsert every entry of `catalog` (read from `file`, named in errors). Returns,
    per kind, how many entries were created, updated and left unchanged. Raises
    ConfigError(s) for unknown references before writing anything."""
    raise_if_any(await check_references(store, catalog, file))
    summary = {}
    for section, kind in SECTIONS:
        outcomes = Counter()
        for entry in getattr(catalog, section):
            outcomes[await store.put_catalog(kind, entry.key, document_of(entry))] += 1
        summary[kind] = outcomes
    return summary


def describe_apply(summary: dict[str, Counter]) -> list[str]:
    """What apply_catalog's `summary` says, as lines: per kind touched, its counts
    (`plans: 1 created, 2 unchanged`), then `applied` or `nothing to change`."""
    lines = [f"{kind}s: " + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
             for kind, outcomes in summary.items() if outcomes]
    changed = any(outcome != UNCHANGED for outcomes in summary.values() for outcome in outcomes)
    return [*lines, "applied" if changed else "nothing to change"]
