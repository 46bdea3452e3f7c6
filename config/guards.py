# Guard files -> an immutable GuardSet. Precedence when resolving a guard for
# (customer, tier, metric): customer scope > tier scope > global; within one scope an
# exact metric guard > a `*` guard. `overall` is matched only exactly, never by `*`.
# Enforcing and shadow guards resolve apart: a shadow guard is judged beside the
# enforcing guard that applies, never in its place.
from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

from config.documents import (
    Problem,
    content_version,
    decode_document,
    duplicate_names,
    parse_document,
    read_document,
)
from config.schema import (
    MODES,
    OVERALL_METRIC,
    PATTERN_MEANINGS,
    WILDCARD_METRIC,
    Guard,
    GuardFile,
)
from config.watched_file import WatchedFile

GUARD_FILE_EXPECTED = "a mapping with a `guards` list"


class GuardSet:
    """The guards of one file, validated and indexed; immutable.

    `guards` (tuple, file order), `version` (first 16 hex chars of the sha256 of
    the file bytes: equal files, equal versions), `source` (the file name).
    `resolve` precedence: customer scope > tier scope > global; within one scope an
    exact metric guard > a `*` guard; `overall` is only matched by an `overall` guard.
    Guards of each mode resolve among themselves (MODES), so a shadow guard never
    hides an enforcing one. Construction raises ValueError for two guards with one
    scope, metric and mode (`parse_guards` reports that as a ConfigError before
    building the set).
    """

    __slots__ = ("guards", "version", "source", "_by_mode")

    def __init__(self, guards: Iterable[Guard], version: str, source: str) -> None:
        # mode -> (by customer, by tier, global), each metric -> guard.
        by_mode: dict[str, tuple[dict, dict, dict]] = {mode: ({}, {}, {}) for mode in MODES}
        frozen = tuple(guards)
        for guard in frozen:
            by_customer, by_tier, by_global = by_mode[guard.mode]
            if guard.scope.kind == "customer":
                by_metric = by_customer.setdefault(guard.scope.name, {})
            elif guard.scope.kind == "tier":
                by_metric = by_tier.setdefault(guard.scope.name, {})
            else:
                by_metric = by_global
            if guard.metric in by_metric:
                raise ValueError(f"two {guard.mode} guards for scope {guard.scope} and metric {guard.metric}")
            by_metric[guard.metric] = guard
        for name, value in (
            ("guards", frozen),
            ("version", version),
            ("source", source),
            ("_by_mode", by_mode),
        ):
            object.__setattr__(self, name, value)

    def resolve(self, customer_id: str, tier: str, metric: str, mode: str = "enforce") -> Guard | None:
        """The guard of `mode` ("enforce" or "shadow") that applies to
        `customer_id` (on plan `tier`) for `metric`.

        Tried in order: customer exact, customer `*`, tier exact, tier `*`, global
        exact, global `*`; the first hit wins. For metric == "overall" (the
        customer's margin across all metrics) only `overall` guards are tried.
        Returns None when no guard of that mode applies.
        """
        wildcard_applies = metric != OVERALL_METRIC
        by_customer, by_tier, by_global = self._by_mode[mode]
        for by_metric in (
            by_customer.get(customer_id),
            by_tier.get(tier),
            by_global,
        ):
            if by_metric:
                guard = by_metric.get(metric)
                if guard is None and wildcard_applies:
                    guard = by_metric.get(WILDCARD_METRIC)
                if guard is not None:
                    return guard
        return None

    def channels(self) -> list[tuple[str, str]]:
        """Every notify channel the guards name, as (path in the file, channel), in
        file order: `("$.guards[0].actions.level_1.notify[1]", "pager")`."""
        return [(f"$.guards[{index}].actions.level_{number}.notify[{place}]", channel)
                for index, guard in enumerate(self.guards)
                for number, level in guard.actions.levels
                for place, channel in enumerate(level.notify)]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("GuardSet is immutable; load a new one instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("GuardSet is immutable; load a new one instead")

    def __repr__(self) -> str:
        return (
            f"GuardSet(source={self.source!r}, version={self.version!r}, "
            f"guards={len(self.guards)})"
        )


def parse_guards(text: str, file: str = "<string>") -> GuardSet:
    """Validate guard YAML `text` into a GuardSet; `file` names it in errors and
    becomes `GuardSet.source`. The version hashes the UTF-8 encoding of `text`.

    Raises ConfigError (ConfigErrors when several problems are known at once) for
    YAML errors, an empty file or a top level that is not a mapping, schema errors,
    duplicate guard ids and two guards with the same scope and metric. An empty
    `guards: []` is valid: no guard applies to anyone.
    """
    return _build(text, file, content_version(text.encode("utf-8")))


def load_guards(path: str | PathLike[str]) -> GuardSet:
    """Read and validate the guard file at `path` (source = the path as given).

    Raises OSError when the file cannot be read (missing, a directory, no
    permission), ConfigError when it is not UTF-8 or not a valid guard file.
    """
    text, raw = read_document(path)
    return _build(text, str(path), content_version(raw))


def watch_guards(path: str | PathLike[str], on_reload_error=None) -> WatchedFile[GuardSet]:
    """The guard file at `path` as a WatchedFile: `value` is the GuardSet in force,
    rebuilt when the file changes; a broken edit keeps the last good set (logged with
    file, line and path, counted, passed to `on_reload_error(path, error)`). The first
    load raises ConfigError."""
    return WatchedFile(path, lambda raw: _build(decode_document(raw, str(path)), str(path), content_version(raw)),
                       what="guards", on_reload_error=on_reload_error)


def _build(text: str, file: str, version: str) -> GuardSet:
    guard_file = parse_document(
        text,
        file,
        GuardFile,
        expected=GUARD_FILE_EXPECTED,
        pattern_meanings=PATTERN_MEANINGS,
        cross_check=_ambiguities,
    )
    return GuardSet(guard_file.guards, version, file)


def _ambiguities(guard_file: GuardFile) -> list[Problem]:
    """Duplicate ids, and two guards with one (scope, metric, mode): either would
    make `resolve` or a reported transition depend on file order. (An enforcing and
    a shadow guard may share a scope and metric: the shadow one is judged beside.)"""
    guards = guard_file.guards
    problems: list[Problem] = []
    problems += duplicate_names((guard.id for guard in guards), "$.guards", "id", "guard id")
    index_of_target: dict[tuple[object, str, str], int] = {}
    for index, guard in enumerate(guards):
        first = index_of_target.setdefault((guard.scope, guard.metric, guard.mode), index)
        if first != index:
            problems.append(
                Problem(
                    f"$.guards[{index}]",
                    f"Guard `{guard.id}` has the same scope `{guard.scope}`, metric "
                    f"`{guard.metric}` and mode `{guard.mode}` as guard `{guards[first].id}` "
                    f"(`$.guards[{first}]`); which one applies would be ambiguous",
                )
            )
    return problems
