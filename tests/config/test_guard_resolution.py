# Which guard applies to a (customer, tier, metric): customer > tier > global scope,
# exact metric > `*` within a scope, `overall` only by an `overall` guard.
from pathlib import Path

import pytest

from config import ConfigError, GuardSet, load_guards, parse_guards

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "guards.yaml"


def guard(guard_id: str, metric: str, scope: str = "global", mode: str = "enforce") -> str:
    return (
        f"  - id: {guard_id}\n"
        f'    metric: "{metric}"\n'
        f"    scope: {scope}\n"
        + (f"    mode: {mode}\n" if mode != "enforce" else "")
        + "    min_margin: 20%\n"
        "    actions: {level_1: {threshold: 15%}}\n"
    )


GUARDS = parse_guards(
    "guards:\n"
    + guard("global-any", "*")
    + guard("global-calls", "api_calls")
    + guard("global-overall", "overall")
    + guard("pro-any", "*", "{tier: pro}")
    + guard("pro-tokens", "ai_tokens", "{tier: pro}")
    + guard("acme-tokens", "ai_tokens", "{customer: cus_acme}")
    + guard("acme-overall", "overall", "{customer: cus_acme}")
    + guard("free-reasoning", "ai_reasoning_tokens", "{tier: free}")
)
ONLY_SPECIFIC = parse_guards(
    "guards:\n" + guard("pro-tokens", "ai_tokens", "{tier: pro}") + guard("global-calls", "api_calls")
)


@pytest.mark.parametrize(
    ("guards", "customer", "tier", "metric", "expected"),
    [
        # customer scope beats tier scope beats global
        (GUARDS, "cus_acme", "pro", "ai_tokens", "acme-tokens"),
        (GUARDS, "cus_other", "pro", "ai_tokens", "pro-tokens"),
        (GUARDS, "cus_other", "enterprise", "ai_tokens", "global-any"),
        # a scope's `*` guard beats an exact guard of a broader scope
        (GUARDS, "cus_other", "pro", "api_calls", "pro-any"),
        (GUARDS, "cus_other", "free", "api_calls", "global-calls"),
        # within one scope the exact metric beats `*`
        (GUARDS, "cus_other", "enterprise", "api_calls", "global-calls"),
        (GUARDS, "cus_other", "free", "ai_reasoning_tokens", "free-reasoning"),
        (GUARDS, "cus_other", "free", "egress_bytes", "global-any"),
        # a customer guard for one metric leaves the others to tier and global
        (GUARDS, "cus_acme", "pro", "egress_bytes", "pro-any"),
        (GUARDS, "cus_acme", "free", "api_calls", "global-calls"),
        # `overall` is only matched by `overall` guards, never by `*`
        (GUARDS, "cus_acme", "pro", "overall", "acme-overall"),
        (GUARDS, "cus_other", "pro", "overall", "global-overall"),
        (ONLY_SPECIFIC, "cus_other", "pro", "overall", None),
        # no guard at all
        (ONLY_SPECIFIC, "cus_other", "pro", "egress_bytes", None),
        (ONLY_SPECIFIC, "cus_other", "free", "ai_tokens", None),
        (parse_guards("guards: []\n"), "cus_other", "pro", "api_calls", None),
    ],
)
def test_resolution_precedence(guards, customer, tier, metric, expected):
    found = guards.resolve(customer, tier, metric)
    assert (found.id if found else None) == expected


def test_a_shadow_guard_is_resolved_beside_the_enforcing_one_never_in_its_place():
    # A customer-scope shadow guard must not switch off the tier's enforcing guard.
    guards = parse_guards(
        "guards:\n"
        + guard("pro-calls", "api_calls", "{tier: pro}")
        + guard("acme-trial", "api_calls", "{customer: cus_acme}", "shadow")
        + guard("pro-calls-stricter", "api_calls", "{tier: pro}", "shadow")      # same scope, other mode
    )
    assert guards.resolve("cus_acme", "pro", "api_calls").id == "pro-calls"
    assert guards.resolve("cus_acme", "pro", "api_calls", "shadow").id == "acme-trial"
    assert guards.resolve("cus_other", "pro", "api_calls", "shadow").id == "pro-calls-stricter"
    assert guards.resolve("cus_other", "free", "api_calls", "shadow") is None


def test_tier_names_and_customer_ids_live_in_separate_namespaces():
    # A customer whose id equals a tier name must not pick up that tier's guards.
    guards = parse_guards("guards:\n" + guard("pro-tokens", "ai_tokens", "{tier: pro}"))
    assert guards.resolve("pro", "free", "ai_tokens") is None


def test_example_file_resolves_as_its_comments_say():
    guards = load_guards(EXAMPLE)
    resolved = {
        (customer, tier, metric): guards.resolve(customer, tier, metric).id
        for customer, tier, metric in [
            ("cus_acme", "pro", "ai_reasoning_tokens"),
            ("cus_acme", "pro", "overall"),
            ("cus_1", "pro", "ai_reasoning_tokens"),
            ("cus_1", "pro", "api_calls"),
            ("cus_1", "free", "ai_tokens"),
        ]
    }
    assert resolved == {
        ("cus_acme", "pro", "ai_reasoning_tokens"): "acme-compute-lock",
        ("cus_acme", "pro", "overall"): "overall-margin",
        ("cus_1", "pro", "ai_reasoning_tokens"): "reasoning-token-safety",
        ("cus_1", "pro", "api_calls"): "default-margin-floor",
        ("cus_1", "free", "ai_tokens"): "default-margin-floor",     # the trial runs beside it
    }
    assert guards.resolve("cus_1", "free", "ai_tokens", "shadow").id == "free-tier-tokens-trial"
    assert guards.resolve("cus_1", "pro", "ai_tokens", "shadow") is None


def test_version_follows_file_content():
    text = "guards:\n" + guard("global-calls", "api_calls")
    first = parse_guards(text, "a.yaml")
    assert parse_guards(text, "b.yaml").version == first.version
    assert len(first.version) == 16 and int(first.version, 16) >= 0
    assert parse_guards(text + "# comment\n", "a.yaml").version != first.version


def test_example_version_is_the_hash_of_its_bytes():
    import hashlib

    assert load_guards(EXAMPLE).version == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()[:16]
    assert load_guards(EXAMPLE).source == str(EXAMPLE)


def test_a_loaded_guard_set_cannot_be_changed_in_place():
    with pytest.raises(AttributeError):
        GUARDS.guards = ()
    with pytest.raises(AttributeError):
        GUARDS.guards[0].id = "renamed"
    with pytest.raises(AttributeError):
        GUARDS.guards[0].scope.kind = "customer"
    assert isinstance(GUARDS.guards, tuple)


def test_building_an_ambiguous_set_directly_is_refused():
    guards = GUARDS.guards
    with pytest.raises(ValueError, match="two enforce guards for scope global and metric api_calls"):
        GuardSet([guards[1], guards[1]], "0" * 16, "<test>")


def test_ambiguity_is_reported_for_every_repeat():
    text = "guards:\n" + guard("a", "api_calls") + guard("b", "api_calls") + guard("c", "api_calls")
    with pytest.raises(ConfigError) as caught:
        parse_guards(text, "g.yaml")
    assert [str(error) for error in caught.value.errors] == [
        "g.yaml:7: Guard `b` has the same scope `global`, metric `api_calls` and mode `enforce` as"
        " guard `a` (`$.guards[0]`); which one applies would be ambiguous - at `$.guards[1]`",
        "g.yaml:12: Guard `c` has the same scope `global`, metric `api_calls` and mode `enforce` as"
        " guard `a` (`$.guards[0]`); which one applies would be ambiguous - at `$.guards[2]`",
    ]
