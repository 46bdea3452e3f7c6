# Control plane settings: what a settings file means (defaults, paths read from the
# file's directory, secrets from the environment) and the exact message, line and
# path of each mistake.
from pathlib import Path

import pytest

from config import ConfigError
from config.control_plane_settings import (
    ControlPlaneSettings,
    load_control_plane_settings,
    parse_control_plane_settings,
    signing_secrets,
)
from config.network import HostPort

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
EXAMPLE_SECRETS = {"AFORO_WEBHOOK_SECRET_FINANCE": "f1", "AFORO_WEBHOOK_SECRET_ENGINEERING": "e1",
                   "AFORO_WEBHOOK_SECRET_ACME": "a1"}

# Lines: 1 notify, 2 finance, 3 url, 4 secret_env; `extra` starts at line 5.
CHANNEL = """\
notify:
  finance:
    url: https://hooks.example.com/aforo
    secret_env: FINANCE_SECRET
"""
ENVIRON = {"FINANCE_SECRET": "s3cret"}


def error_of(text, environ=ENVIRON):
    with pytest.raises(ConfigError) as caught:
        parse_control_plane_settings(text, "control_plane.yaml", environ=environ)
    return str(caught.value)


def test_the_example_is_valid_and_points_at_the_example_guards():
    settings = load_control_plane_settings(EXAMPLES / "control_plane.yaml", environ=EXAMPLE_SECRETS)
    assert Path(settings.guards) == EXAMPLES / "guards.yaml"
    assert Path(settings.database) == EXAMPLES / "aforo.db"
    assert sorted(settings.notify) == ["acme-account-team", "engineering-alerts", "finance-ops"]
    assert settings.notify["engineering-alerts"].url == "https://alerts.example.com/webhooks/aforo?team=platform"
    assert signing_secrets(settings, EXAMPLE_SECRETS)["finance-ops"] == b"f1"


def test_the_production_example_shares_postgresql_and_the_redis_bus():
    settings = load_control_plane_settings(EXAMPLES / "production-control-plane.yaml", environ=EXAMPLE_SECRETS)
    assert not settings.database.is_sqlite
    assert settings.database == "postgresql://aforo@db.internal:5432/aforo"
    assert settings.redis_url == "redis://redis.internal:6379/0"
    assert (settings.edge_resync_interval_s, settings.meter_claim_idle_s) == (300.0, 30.0)
    assert Path(settings.guards) == EXAMPLES / "guards.yaml"
    assert sorted(settings.notify) == ["acme-account-team", "engineering-alerts", "finance-ops"]


def test_the_example_names_every_channel_its_guards_notify():
    from config import load_guards
    guards = load_guards(EXAMPLES / "guards.yaml")
    named = {name for guard in guards.guards for _, level in guard.actions.levels for name in level.notify}
    settings = load_control_plane_settings(EXAMPLES / "control_plane.yaml", environ=EXAMPLE_SECRETS)
    assert named == set(settings.notify)


def test_the_example_writes_out_every_default():
    example = load_control_plane_settings(EXAMPLES / "control_plane.yaml", environ=EXAMPLE_SECRETS)
    defaults = ControlPlaneSettings()
    assert (example.listen, example.webhooks) == (defaults.listen, defaults.webhooks)
    assert Path(example.database).name == defaults.database
    assert example.notify["finance-ops"].timeout_s == example.notify["engineering-alerts"].timeout_s == 5.0


def test_defaults():
    settings = parse_control_plane_settings("{}", "control_plane.yaml", environ={})
    assert settings.listen == HostPort("127.0.0.1", 8070)
    assert (settings.database, settings.guards, settings.notify) == ("aforo.db", None, {})
    assert (settings.webhooks.max_attempts, settings.webhooks.initial_backoff_s,
            settings.webhooks.max_backoff_s) == (10, 1.0, 300.0)
    assert (settings.redis_url, settings.edge_resync_interval_s, settings.meter_claim_idle_s) == (None, 300.0, 30.0)
    assert parse_control_plane_settings("edge_resync_interval_s: 2.5", "control_plane.yaml",
                                        environ={}).edge_resync_interval_s == 2.5
    channel = parse_control_plane_settings(CHANNEL, "control_plane.yaml", environ=ENVIRON).notify["finance"]
    assert (channel.url, channel.secret_env, channel.timeout_s) == (
        "https://hooks.example.com/aforo", "FINANCE_SECRET", 5.0)


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("https://Hooks.Example.com/a/b?x=1&y=2", "https://hooks.example.com/a/b?x=1&y=2"),
        ("HTTP://127.0.0.1:9100", "http://127.0.0.1:9100"),
        ("http://[::1]:9100/aforo", "http://[::1]:9100/aforo"),
    ],
)
def test_webhook_urls_are_kept_with_path_and_query(written, kept):
    text = CHANNEL.replace("https://hooks.example.com/aforo", written)
    assert parse_control_plane_settings(text, "control_plane.yaml", environ=ENVIRON).notify["finance"].url == kept


def test_relative_paths_are_read_from_the_settings_file_directory(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "control_plane.yaml"
    path.write_text("database: data/aforo.db\nguards: guards.yaml\n")
    settings = load_control_plane_settings(path, environ={})
    assert Path(settings.database) == tmp_path / "conf" / "data" / "aforo.db"
    assert Path(settings.guards) == tmp_path / "conf" / "guards.yaml"
    for kept in ("postgresql://aforo@db.internal/aforo", "sqlite::memory:", str(tmp_path / "abs.db")):
        path.write_text(f"database: '{kept}'\n")
        assert load_control_plane_settings(path, environ={}).database == kept
    path.write_text("database: sqlite:here.db\n")
    assert Path(load_control_plane_settings(path, environ={}).database) == tmp_path / "conf" / "here.db"


SECRET_PROBLEMS = [
    # (text, environment, message)
    (CHANNEL.replace("FINANCE_SECRET", "FINANCE_SECRET_TYPO"), ENVIRON,
     ("control_plane.yaml:4: Environment variable `FINANCE_SECRET_TYPO` is not set; it holds the signing secret of "
      "notify channel `finance` - at `$.notify.finance.secret_env`")),
    (CHANNEL.replace("finance:", "finance-ops:"), {"FINANCE_SECRET": ""},
     ("control_plane.yaml:4: Environment variable `FINANCE_SECRET` is empty; it holds the signing secret of "
      "notify channel `finance-ops` - at `$.notify['finance-ops'].secret_env`")),
]


@pytest.mark.parametrize(("text", "environ", "message"), SECRET_PROBLEMS)
def test_a_missing_secret_names_the_variable_and_the_channel(text, environ, message):
    assert error_of(text, environ) == message


BAD_SETTINGS = [
    # (text, message)
    (CHANNEL.replace("secret_env: FINANCE_SECRET", "secret: s3cret"),
     "control_plane.yaml:2: Object missing required field `secret_env` - at `$.notify.finance`\n"
     "control_plane.yaml:4: Object contains unknown field `secret` - at `$.notify.finance`"),
    (CHANNEL.replace("secret_env: FINANCE_SECRET", "secret_env: 1PASSWORD"),
     ("control_plane.yaml:4: Expected an environment variable name (letters, digits, `_`; not starting with a "
      "digit), got `1PASSWORD` - at `$.notify.finance.secret_env`")),
    (CHANNEL.replace("https://hooks.example.com/aforo", "hooks.example.com/aforo"),
     ("control_plane.yaml:3: Expected a webhook URL like `https://hooks.example.com/aforo`, got "
      "`hooks.example.com/aforo` - at `$.notify.finance.url`")),
    (CHANNEL.replace("https://hooks.example.com/aforo", "ftp://hooks.example.com/aforo"),
     ("control_plane.yaml:3: Only `http://` and `https://` webhook URLs are supported, got "
      "`ftp://hooks.example.com/aforo` - at `$.notify.finance.url`")),
    (CHANNEL.replace("https://hooks.example.com/aforo", "https://user:pw@hooks.example.com/aforo"),
     ("control_plane.yaml:3: A webhook URL has no user info and no `#fragment`, got "
      "`https://user:pw@hooks.example.com/aforo` - at `$.notify.finance.url`")),
    (CHANNEL.replace("https://hooks.example.com/aforo", "https://hooks.example.com:99999/aforo"),
     ("control_plane.yaml:3: Expected a webhook URL like `https://hooks.example.com/aforo`, got "
      "`https://hooks.example.com:99999/aforo` - at `$.notify.finance.url`")),
    (CHANNEL + "    timeout_s: 0\n",
     "control_plane.yaml:5: Expected `float` > 0.0 - at `$.notify.finance.timeout_s`"),
    (CHANNEL + "webhook: {max_attempts: 3}\n",
     "control_plane.yaml:5: Object contains unknown field `webhook`"),
    (CHANNEL + "webhooks: {max_attempts: 0}\n",
     "control_plane.yaml:5: Expected `int` >= 1 - at `$.webhooks.max_attempts`"),
    (CHANNEL + "webhooks: {initial_backoff_s: 60, max_backoff_s: 30}\n",
     "control_plane.yaml:5: `max_backoff_s` (30) must not be below `initial_backoff_s` (60) - at `$.webhooks`"),
    (CHANNEL + "listen: 8070\n",
     ("control_plane.yaml:5: Expected `host:port` like `127.0.0.1:8080`, `[::1]:8080` or `proxy.internal:8080`, "
      "got `8070` - at `$.listen`")),
    (CHANNEL + "database: mysql://db/aforo\n",
     ("control_plane.yaml:5: Expected an SQLite file path or a `postgresql://` URL, got `mysql://db/aforo` "
      "- at `$.database`")),
    (CHANNEL + "guards: ''\n",
     "control_plane.yaml:5: Expected `str` of length >= 1 - at `$.guards`"),
    (CHANNEL + "edge_resync_interval_s: 0\n",
     "control_plane.yaml:5: Expected `float` > 0.0 - at `$.edge_resync_interval_s`"),
    (CHANNEL + "edge_resync_interval_s: -30\n",
     "control_plane.yaml:5: Expected `float` > 0.0 - at `$.edge_resync_interval_s`"),
    (CHANNEL + "edge_resync_interval_s: 5m\n",
     "control_plane.yaml:5: Expected `float`, got `str` - at `$.edge_resync_interval_s`"),
    (CHANNEL + "meter_claim_idle_s: 0\n",
     "control_plane.yaml:5: Expected `float` > 0.0 - at `$.meter_claim_idle_s`"),
    (CHANNEL + "edge_resync_interval: 60\n",
     "control_plane.yaml:5: Object contains unknown field `edge_resync_interval`"),
    ("notify: [finance]\n",
     "control_plane.yaml:1: Expected `object`, got `array` - at `$.notify`"),
    ("", "control_plane.yaml: File is empty; expected a mapping of control plane settings"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SETTINGS)
def test_bad_settings(text, message):
    assert error_of(text) == message


def test_every_unset_secret_is_reported_at_once():
    text = CHANNEL + "  oncall: {url: 'http://127.0.0.1:9/page', secret_env: ONCALL_SECRET}\n"
    assert error_of(text, {}).splitlines() == [
        ("control_plane.yaml:4: Environment variable `FINANCE_SECRET` is not set; it holds the signing secret of "
         "notify channel `finance` - at `$.notify.finance.secret_env`"),
        ("control_plane.yaml:5: Environment variable `ONCALL_SECRET` is not set; it holds the signing secret of "
         "notify channel `oncall` - at `$.notify.oncall.secret_env`"),
    ]


def test_a_secret_unset_at_start_is_a_clear_error_too():
    settings = parse_control_plane_settings(CHANNEL, "control_plane.yaml", environ=ENVIRON)
    with pytest.raises(ConfigError) as caught:
        signing_secrets(settings, {}, "control_plane.yaml")
    assert str(caught.value) == (
        "control_plane.yaml: Environment variable `FINANCE_SECRET` is not set; it holds the signing secret of "
        "notify channel `finance` - at `$.notify.finance.secret_env`")


def test_unreadable_settings_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_control_plane_settings(tmp_path / "missing.yaml")
