# `aforo check-config` and the loader behind it: one bad fixture per failure mode,
# each with the exact message a user sees (file, line, path), and the exit statuses.
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, load_guards
from control_plane.cli import main

REPO = Path(__file__).resolve().parents[2]
BAD = Path(__file__).resolve().parent / "bad"
EXAMPLE = REPO / "config" / "examples" / "guards.yaml"
RATE_FORMS = (
    "`5req/sec`, `300req/min` or `1000req/hour` (units: s, sec, second, m, min, minute, h, hour)"
)

# (fixture, message); `{file}` is the fixture's path as passed to the loader.
BAD_FIXTURES = [
    ("unknown_key.yaml",
     "{file}:8: Object contains unknown field `notfy` - at `$.guards[0].actions.level_1`"),
    ("unknown_top_key.yaml",
     "{file}:1: Object contains unknown field `guard`\n"
     "{file}:1: Object missing required field `guards`"),
    ("wrong_type.yaml",
     "{file}:3: Expected `str`, got `int` - at `$.guards[0].metric`"),
    ("missing_field.yaml",
     "{file}:2: Object missing required field `min_margin` - at `$.guards[0]`"),
    ("duplicate_id.yaml",
     "{file}:12: Duplicate guard id `token-floor`; first used by `$.guards[0]` - at `$.guards[2].id`"),
    ("duplicate_scope_metric.yaml",
     "{file}:8: Guard `pro-calls-strict` has the same scope `tier: pro`, metric `api_calls` and "
     "mode `enforce` as guard `pro-calls` (`$.guards[0]`); which one applies would be ambiguous - at `$.guards[1]`"),
    ("duplicate_yaml_key.yaml",
     "{file}:7: Duplicate key `min_margin` (first at line 4) - at `$.guards[0].min_margin`"),
    ("several_duplicates.yaml",
     "{file}:4: Duplicate key `metric` (first at line 3) - at `$.guards[0].metric`\n"
     "{file}:7: Duplicate key `threshold` (first at line 7)"
     " - at `$.guards[0].actions.level_1.threshold`"),
    ("unsafe_tag.yaml",
     "{file}:3: Tag `!!python/object/apply:os.system` is not allowed; use plain YAML values"
     " - at `$.guards[0].metric`"),
    ("custom_tag.yaml",
     "{file}:4: Tag `!percent` is not allowed; use plain YAML values - at `$.guards[0].min_margin`"),
    ("alias_bomb.yaml",
     "{file}:1: Aliases expand the document by 123440 values beyond the 23 written (limit: 100000 values added by aliases)"),
    ("thresholds_not_descending.yaml",
     "{file}:5: Thresholds must descend from level 1 to level 3: `level_2` threshold 20% is not"
     " below `level_1` threshold 15% - at `$.guards[0].actions`"),
    ("no_levels.yaml",
     "{file}:5: At least one of `level_1`, `level_2`, `level_3` is required - at `$.guards[0].actions`"),
    ("bad_rate.yaml",
     f"{{file}}:7: Expected a rate like {RATE_FORMS}, got `5 per second`"
     " - at `$.guards[0].actions.level_2.throttle_rate`"),
    ("zero_rate.yaml",
     "{file}:6: Expected a positive request count, got `0req/min`"
     " - at `$.guards[0].actions.level_2.throttle_rate`"),
    ("bad_burst.yaml",
     "{file}:6: Expected `int` >= 1 - at `$.guards[0].actions.level_2.burst`"),
    ("bad_percent.yaml",
     "{file}:4: Expected a percentage like `25%`, got `25` - at `$.guards[0].min_margin`"),
    ("percent_out_of_range.yaml",
     "{file}:6: Expected a percentage between -1000% and 100%, got `150%`"
     " - at `$.guards[0].actions.level_1.threshold`"),
    ("negative_band.yaml",
     "{file}:5: Expected a percentage between 0% and 100%, got `-1%` - at `$.guards[0].recovery_band`"),
    ("lock_without_features.yaml",
     "{file}:7: `action: lock_features` needs a non-empty `features` list"
     " - at `$.guards[0].actions.level_3`"),
    ("block_with_features.yaml",
     "{file}:6: `features` only applies to `action: lock_features`; `block_request` blocks every"
     " request - at `$.guards[0].actions.level_3`"),
    ("empty_channel.yaml",
     "{file}:10: Expected `str` of length >= 1 - at `$.guards[0].actions.level_1.notify[1]`"),
    ("bad_scope.yaml",
     "{file}:4: Scope takes exactly one of `tier` or `customer`, got `customer`, `tier`"
     " - at `$.guards[0].scope`"),
    ("unknown_scope_key.yaml",
     "{file}:4: Unknown scope key `plan`; expected exactly one of `tier` or `customer`"
     " - at `$.guards[0].scope`"),
    ("bad_mode.yaml",
     "{file}:5: Expected one of `enforce`, `shadow`, got `dry-run` - at `$.guards[0].mode`"),
    ("bad_id.yaml",
     "{file}:2: Expected a guard id (lowercase letters, digits, `_`, `.`, `-`), got `API Calls Floor`"
     " - at `$.guards[0].id`"),
    ("partial_wildcard.yaml",
     "{file}:3: Expected a metric name (letters, digits, `_`, `.`, `:`, `-`), `*` or `overall`,"
     " got `ai_*` - at `$.guards[0].metric`"),
    ("syntax_error.yaml",
     "{file}:6: Invalid YAML: expected ',' or ']', but got '}' (while parsing a flow sequence"
     " at line 6)"),
    ("two_documents.yaml",
     "{file}:2: Invalid YAML: expected a single document in the stream, but found another document"),
    ("empty.yaml",
     "{file}: File is empty; expected a mapping with a `guards` list"),
    ("top_level_list.yaml",
     "{file}:1: Expected a mapping with a `guards` list at the top level, got a list"),
    ("not_utf8.yaml",
     "{file}:2: File is not UTF-8 text (byte 0xe9 at offset 19)"),
]


def test_every_bad_fixture_is_in_the_table():
    assert sorted(path.name for path in BAD.glob("*.yaml")) == sorted(name for name, _ in BAD_FIXTURES)


@pytest.mark.parametrize(("fixture", "message"), BAD_FIXTURES, ids=[name for name, _ in BAD_FIXTURES])
def test_bad_fixture_message(fixture, message):
    path = BAD / fixture
    with pytest.raises(ConfigError) as caught:
        load_guards(path)
    assert str(caught.value) == message.replace("{file}", str(path))


def run_aforo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "control_plane.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )


def test_cli_accepts_the_example():
    result = run_aforo("check-config", str(EXAMPLE))
    version = load_guards(EXAMPLE).version
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"ok: {EXAMPLE} (5 guards, version {version})\n", ""
    )


def test_cli_reports_a_bad_file_on_stderr():
    path = BAD / "bad_rate.yaml"
    result = run_aforo("check-config", str(path))
    expected = dict(BAD_FIXTURES)["bad_rate.yaml"].replace("{file}", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"{path}: checked as guards file, 1 error\n" + expected + "\n")


def test_cli_missing_file_is_a_usage_error():
    result = run_aforo("check-config", "no/such/guards.yaml")
    assert result.returncode == 2
    assert result.stderr == "aforo check-config: cannot read no/such/guards.yaml: No such file or directory\n"


def test_cli_checks_every_file_and_prints_every_error(capsys):
    several = BAD / "several_duplicates.yaml"
    status = main(["check-config", str(EXAMPLE), str(several), str(BAD / "empty.yaml")])
    out, err = capsys.readouterr()
    assert status == 1
    assert out.startswith(f"ok: {EXAMPLE} (5 guards, ")
    assert err.splitlines() == [
        f"{several}: checked as guards file, 2 errors",
        f"{several}:4: Duplicate key `metric` (first at line 3) - at `$.guards[0].metric`",
        f"{several}:7: Duplicate key `threshold` (first at line 7)"
        " - at `$.guards[0].actions.level_1.threshold`",
        f"{BAD / 'empty.yaml'}: checked as guards file, 1 error",
        f"{BAD / 'empty.yaml'}: File is empty; expected a mapping with a `guards` list",
    ]


def test_cli_unreadable_file_outranks_invalid_one(capsys, tmp_path):
    status = main(["check-config", str(BAD / "empty.yaml"), str(tmp_path)])
    assert status == 2
    assert f"aforo check-config: cannot read {tmp_path}: Is a directory" in capsys.readouterr().err


def test_cli_counts_a_single_guard_in_the_singular(capsys, tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text("guards:\n  - {id: g, metric: m, min_margin: 5%, actions: {level_3: {threshold: 0%}}}\n")
    assert main(["check-config", str(one)]) == 0
    assert capsys.readouterr().out == f"ok: {one} (1 guard, version {load_guards(one).version})\n"


@pytest.mark.parametrize(
    ("argv", "usage_hint"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["check-config"], "the following arguments are required: FILE"),
        (["check-konfig", "guards.yaml"], "invalid choice: 'check-konfig'"),
    ],
)
def test_cli_usage_errors_exit_2(argv, usage_hint, capsys):
    assert main(argv) == 2
    assert usage_hint in capsys.readouterr().err


EXAMPLE_SECRETS = {"AFORO_WEBHOOK_SECRET_FINANCE": "f1", "AFORO_WEBHOOK_SECRET_ENGINEERING": "e1",
                   "AFORO_WEBHOOK_SECRET_ACME": "a1"}
EXAMPLE_KINDS = {
    "aforo.yaml": "all-in-one settings", "catalog.yaml": "catalog", "control_plane.yaml": "control plane settings",
    "edge_state.yaml": "edge state", "guards.yaml": "5 guards", "proxy.yaml": "proxy settings",
    "production-control-plane.yaml": "control plane settings", "production-proxy.yaml": "proxy settings",
}


def test_cli_accepts_every_example_as_the_kind_it_is(capsys, monkeypatch):
    examples = sorted((REPO / "config" / "examples").glob("*.yaml"))
    assert sorted(path.name for path in examples) == sorted(EXAMPLE_KINDS)
    for name, value in EXAMPLE_SECRETS.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config", *map(str, examples)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == len(examples)
    for path, line in zip(examples, lines):
        assert line.startswith(f"ok: {path} ({EXAMPLE_KINDS[path.name]}, ")


PROVIDER_SETTINGS = """\
upstreams:
  openai:
    url: http://127.0.0.1:8001
    headers: {authorization: "Bearer ${AFORO_TEST_PROVIDER_KEY}"}
routes:
  - {name: chat, upstream: openai}
edge_state: {file: edge_state.yaml}
"""


def test_cli_reports_a_provider_key_missing_from_the_environment(capsys, monkeypatch, tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(PROVIDER_SETTINGS)
    (tmp_path / "edge_state.yaml").write_text((REPO / "config" / "examples" / "edge_state.yaml").read_text())
    monkeypatch.delenv("AFORO_TEST_PROVIDER_KEY", raising=False)
    assert main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"{path}: checked as proxy settings, 1 error\n"
        f"{path}:4: Environment variable `AFORO_TEST_PROVIDER_KEY` is not set; the proxy sends it in header "
        "`authorization` to upstream `openai` - at `$.upstreams.openai.headers.authorization`\n")
    monkeypatch.setenv("AFORO_TEST_PROVIDER_KEY", "sk-provider-1")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == f"ok: {path} (proxy settings, 1 routes, 1 upstreams)\n" and "sk-provider-1" not in out


def test_cli_says_which_kind_it_took_a_bad_file_to_be(capsys, tmp_path):
    # The header names the kind the file was checked as: sniffed from its keys, or
    # what --kind says (here wrongly, which the header and the errors make plain).
    path = tmp_path / "catalog.yaml"
    path.write_text("metrics:\n  - {key: api_calls, aggregation: total}\n")
    assert main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"{path}: checked as catalog, 1 error\n"
        f"{path}:2: Expected one of `sum`, `count`, `max`, got `total` - at `$.metrics[0].aggregation`\n")
    assert main(["check-config", "--kind", "guards", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"{path}: checked as guards file, 2 errors\n"
        f"{path}:1: Object contains unknown field `metrics`\n"
        f"{path}:1: Object missing required field `guards`\n")


def test_cli_reports_every_schema_error_of_a_file_not_only_the_first(capsys, tmp_path):
    # One pass shows a user everything to fix, in file order, each with its line.
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "metrics:\n"
        "  - {key: api_calls, aggregation: summ}\n"
        "  - {key: tokens, unit_cost: abc}\n"
        "plans:\n"
        "  - key: pro\n"
        "    tier: pro\n"
        "    period: monthly\n"
        "    currency: USD\n"
        "    fixed_fee: \"10\"\n"
        "customers:\n"
        "  - {key: acme, name: Acme, emial: ops@acme.test}\n")
    assert main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: checked as catalog, 4 errors",
        f"{path}:2: Expected one of `sum`, `count`, `max`, got `summ` - at `$.metrics[0].aggregation`",
        f"{path}:3: Expected an amount like `\"49.00\"`, got `abc` - at `$.metrics[1].unit_cost`",
        f"{path}:7: Expected one of `day`, `week`, `month`, `year`, got `monthly` - at `$.plans[0].period`",
        f"{path}:11: Object contains unknown field `emial` - at `$.customers[0]`",
    ]


def test_every_bad_guard_and_every_bad_part_of_one_is_reported(tmp_path):
    path = tmp_path / "guards.yaml"
    path.write_text(
        "guards:\n"
        "  - {id: calls, metric: api_calls, min_margin: 5, actions: {level_1: {threshold: 10%, notfy: [ops]}}}\n"
        "  - {id: Tokens Floor, metric: tokens, min_margin: 5%, actions: {}}\n"
        "  - {id: fine, metric: tokens, min_margin: 5%, actions: {level_3: {threshold: 0%}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_guards(path)
    assert [str(error) for error in caught.value.errors] == [
        f"{path}:2: Expected a percentage like `25%`, got `5` - at `$.guards[0].min_margin`",
        f"{path}:2: Object contains unknown field `notfy` - at `$.guards[0].actions.level_1`",
        f"{path}:3: Expected a guard id (lowercase letters, digits, `_`, `.`, `-`), got `Tokens Floor`"
        " - at `$.guards[1].id`",
        f"{path}:3: At least one of `level_1`, `level_2`, `level_3` is required - at `$.guards[1].actions`",
    ]


def test_a_catalog_on_its_own_must_define_every_entry_it_names(capsys, tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "metrics:\n"
        "  - {key: api_calls, unit_cost: \"0.001\"}\n"
        "plans:\n"
        "  - key: pro\n"
        "    tier: pro\n"
        "    fixed_fee: \"10\"\n"
        "    features: [sso]\n"
        "    quotas: {api_calls: {limit: 5}, tokens: {limit: 9}}\n"
        "subscriptions:\n"
        "  - {key: s1, customer: ghost, plan: pro, period_anchor: \"2026-01-01T00:00:00Z\"}\n")
    assert main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: checked as catalog, 3 errors",
        f"{path}:7: Unknown feature `sso`; define it under `features` - at `$.plans[0].features`",
        f"{path}:8: Unknown metric `tokens`; define it under `metrics` - at `$.plans[0].quotas.tokens`",
        f"{path}:10: Unknown customer `ghost`; define it under `customers` - at `$.subscriptions[0].customer`",
    ]


NOTIFYING_GUARDS = """\
guards:
  - id: calls
    metric: api_calls
    min_margin: 40%
    actions:
      level_1: {threshold: 30%, notify: [finance, pager]}
      level_3: {threshold: 0%, notify: [pager]}
"""


def test_control_plane_settings_check_the_guard_file_and_the_channels_it_names(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AFORO_TEST_FINANCE_SECRET", "s1")
    guards = tmp_path / "guards.yaml"
    guards.write_text(NOTIFYING_GUARDS)
    settings = tmp_path / "control_plane.yaml"
    settings.write_text("listen: 127.0.0.1:8070\nguards: guards.yaml\nnotify:\n"
                        "  finance: {url: \"https://hooks.example.com/f\", secret_env: AFORO_TEST_FINANCE_SECRET}\n")
    assert main(["check-config", str(settings)]) == 1
    undefined = (f"Notify channel `pager` is not defined in the control plane settings {settings} "
                 "(defined: `finance`); its webhooks would fail")
    assert capsys.readouterr().err.splitlines() == [
        f"{settings}: checked as control plane settings, 2 errors",
        f"{guards}:6: {undefined} - at `$.guards[0].actions.level_1.notify[1]`",
        f"{guards}:7: {undefined} - at `$.guards[0].actions.level_3.notify[0]`",
    ]
    guards.write_text(NOTIFYING_GUARDS.replace("pager", "finance").replace("40%", "forty"))
    assert main(["check-config", str(settings)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{settings}: checked as control plane settings, 1 error",
        f"{guards}:4: Expected a percentage like `25%`, got `forty` - at `$.guards[0].min_margin`",
    ]
    guards.unlink()
    assert main(["check-config", str(settings)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{settings}: checked as control plane settings, 1 error",
        f"{settings}:2: Cannot read the guard file {guards}: No such file or directory - at `$.guards`",
    ]


def test_proxy_settings_check_the_edge_state_file_they_read(capsys, tmp_path):
    settings = tmp_path / "proxy.yaml"
    settings.write_text("upstreams:\n  api: {url: \"http://127.0.0.1:8001\"}\nroutes:\n  - {name: all, upstream: api}\n"
                        "edge_state: {file: state.yaml}\n")
    state = tmp_path / "state.yaml"
    assert main(["check-config", str(settings)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{settings}: checked as proxy settings, 1 error",
        f"{settings}:5: Cannot read the edge state file {state}: No such file or directory - at `$.edge_state.file`",
    ]
    state.write_text("period: {start: \"2026-01-01T00:00:00Z\", end: \"2026-02-01T00:00:00Z\"}\nplans: {}\n"
                     "customers:\n  - {id: acme, plan: gold, status: active}\n")
    assert main(["check-config", str(settings)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{settings}: checked as proxy settings, 1 error",
        f"{state}:4: Unknown plan `gold`; the plans are none - at `$.customers[0].plan`",
    ]


def test_an_all_in_one_file_checks_every_file_it_names(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AFORO_TEST_FINANCE_SECRET", "s1")
    (tmp_path / "guards.yaml").write_text(NOTIFYING_GUARDS)
    (tmp_path / "catalog.yaml").write_text("plans:\n  - {key: pro, tier: pro, quotas: {api_calls: {limit: 5}}}\n")
    settings = tmp_path / "aforo.yaml"
    settings.write_text("control_plane:\n  guards: guards.yaml\n  notify:\n"
                        "    finance: {url: \"https://hooks.example.com/f\", secret_env: AFORO_TEST_FINANCE_SECRET}\n"
                        "catalog: catalog.yaml\n"
                        "proxy:\n  upstreams:\n    api: {url: \"http://127.0.0.1:8001\"}\n"
                        "  routes:\n    - {name: all, upstream: api}\n")
    assert main(["check-config", str(settings)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{settings}: checked as all-in-one settings, 3 errors"
    assert [line.split(" - at ")[1] for line in err[1:]] == [
        "`$.guards[0].actions.level_1.notify[1]`", "`$.guards[0].actions.level_3.notify[0]`",
        "`$.plans[0].quotas.api_calls`"]
    assert err[3] == (f"{tmp_path / 'catalog.yaml'}:2: Unknown metric `api_calls`; define it under `metrics` "
                      "- at `$.plans[0].quotas.api_calls`")
    (tmp_path / "catalog.yaml").unlink()
    (tmp_path / "guards.yaml").write_text("guards: []\n")
    assert main(["check-config", str(settings)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{settings}: checked as all-in-one settings, 1 error",
        f"{settings}:5: Cannot read the catalog {tmp_path / 'catalog.yaml'}: No such file or directory"
        " - at `$.catalog`",
    ]
