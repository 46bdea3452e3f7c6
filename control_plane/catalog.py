# Applying a catalog file to the store: declarative and idempotent. Every reference is
# checked first (against the file and what the store already holds), so a file with a
# dangling reference writes nothing; then each entry is upserted, sections in
# dependency order. Applying the same file again changes nothing and says so. An entry
# a live one names (referrers_of) is not deleted.
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from config.catalog_file import (
    SECTIONS,
    CatalogFile,
    document_of,
    references_of,
    unknown_reference,
    unknown_references,
)
from config.errors import ConfigError, raise_if_any
from control_plane.store import UNCHANGED, Store


# A subscription in one of these has ended: it no longer holds what it names.
ENDED_SUBSCRIPTION_STATUSES = ("canceled", "expired")


class Referrer(NamedTuple):
    """A live entry naming another: its `kind` and `key`, and the `path` in it (from
    its document's top, `$`) that names the other."""

    kind: str
    key: str
    path: str


def is_live(kind: str, document: dict) -> bool:
    """Whether an entry still holds what it names: every entry does, but a
    subscription that has ended (status canceled or expired)."""
    return not (kind == "subscription" and document.get("status") in ENDED_SUBSCRIPTION_STATUSES)


async def referrers_of(store: Store, kind: str, key: str) -> list[Referrer]:
    """Every live entry of the store (see is_live) naming the entry `kind`/`key`, by
    references_of, in section then key order; empty when nothing live names it (a
    model or tool price, a subscription, or an entry only ended subscriptions name)."""
    return [Referrer(referrer_kind, referrer_key, reference.path)
            for _, referrer_kind in SECTIONS
            for referrer_key, document in await store.list_catalog(referrer_kind)
            if is_live(referrer_kind, document)
            for reference in references_of(referrer_kind, document)
            if (reference.kind, reference.key) == (kind, key)]


async def stored_keys(store: Store) -> dict[str, set[str]]:
    """The keys of every catalog entry the store holds, per kind: what a catalog file
    applied to it may name besides its own entries (see load_catalog_file)."""
    return {kind: {key for key, _ in await store.list_catalog(kind)} for _, kind in SECTIONS}


async def check_references(store: Store, catalog: CatalogFile, file: str) -> list[ConfigError]:
    """A ConfigError (file, path) for every entry naming a metric, feature, customer or
    plan that is neither in the file nor in the store."""
    return [ConfigError(problem.message, file, path=problem.path)
            for problem in unknown_references(catalog, await stored_keys(store))]


async def check_entry_references(store: Store, kind: str, document: dict, source: str = "body") -> list[ConfigError]:
    """check_references for one entry of `kind` on its own (its `document`): a
    ConfigError naming `source`, with a path from the entry's top, for every entry it
    names that the store does not hold."""
    return [ConfigError(unknown_reference(reference), source, path=reference.path)
            for reference in references_of(kind, document)
            if await store.get_catalog(reference.kind, reference.key) is None]


async def apply_catalog(store: Store, catalog: CatalogFile, file: str, *, author: str) -> dict[str, Counter]:
    """Upsert every entry of `catalog` (read from `file`, named in errors), each change
    in the audit trail as made by `author`. Returns,
    per kind, how many entries were created, updated and left unchanged. Raises
    ConfigError(s) for unknown references before writing anything."""
    raise_if_any(await check_references(store, catalog, file))
    summary = {}
    for section, kind in SECTIONS:
        outcomes = Counter()
        for entry in getattr(catalog, section):
            outcomes[await store.put_catalog(kind, entry.key, document_of(entry), author=author)] += 1
        summary[kind] = outcomes
    return summary


def describe_apply(summary: dict[str, Counter]) -> list[str]:
    """What apply_catalog's `summary` says, as lines: per kind touched, its counts
    (`plans: 1 created, 2 unchanged`), then `applied` or `nothing to change`."""
    lines = [f"{kind}s: " + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
             for kind, outcomes in summary.items() if outcomes]
    changed = any(outcome != UNCHANGED for outcomes in summary.values() for outcome in outcomes)
    return [*lines, "applied" if changed else "nothing to change"]
