# The control plane's settings file (`aforo control-plane --config FILE`). Every field
# has a default; relative SQLite and guard file paths are read from the settings
# file's directory, not the cwd; a notify channel's signing secret is never written in
# the file, only the name of the environment variable holding it, which must be set.
#
# Fields (defaults in parentheses):
#   listen ("127.0.0.1:8070")  where the REST API listens, `host:port` (port 0: any free one)
#   database ("aforo.db")      an SQLite file, `sqlite:PATH`, or a `postgresql://` URL
#   guards (none)              the guard file, watched and hot-reloaded
#   notify ({})                name -> NotifyChannel: where a guard's `notify` names send webhooks
#   webhooks                   how deliveries are retried (see WebhookSettings)
#   redis_url (none)           the Redis edge bus (`redis://host:port/db`): meter events
#                              are also read from its stream, and the edge state is
#                              published on it for proxies that follow it
#   edge_resync_interval_s (300)  with `redis_url`: seconds between two publications of
#                              the whole edge state on the bus (changes go out as they
#                              happen; this is how a proxy that fell behind the changes
#                              stream catches up without a gap), > 0
#   meter_claim_idle_s (30)    with `redis_url`: a meter stream entry another control
#                              plane read and has not acknowledged for this long (it
#                              died) is taken over, > 0
#   reporting (none)           the one currency P&L totals are converted into, at the
#                              operator's rates (see Reporting); without it, totals
#                              are per currency only
from __future__ import annotations

import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Annotated

import msgspec

from config.bus import REDIS_URL_MEANING, REDIS_URL_PATTERN
from config.currencies import CURRENCY_MEANING, CURRENCY_PATTERN, CurrencyCode, currency_problem
from config.documents import Problem, parse_document, read_document
from config.errors import ConfigError, raise_if_any
from config.network import HostPort, WebhookUrl
from config.schema import PATTERN_MEANINGS, Name, Schema
from config.values import Money, show
from config.yaml_source import child_path_of

CONTROL_PLANE_SETTINGS_EXPECTED = "a mapping of control plane settings"
DEFAULT_LISTEN = HostPort("127.0.0.1", 8070)
DEFAULT_DATABASE = "aforo.db"
DEFAULT_EDGE_RESYNC_INTERVAL_S = 300.0
DEFAULT_METER_CLAIM_IDLE_S = 30.0
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_PREFIX = "sqlite:"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SETTINGS_PATTERN_MEANINGS = {
    **PATTERN_MEANINGS,
    REDIS_URL_PATTERN: REDIS_URL_MEANING,
    ENV_NAME_PATTERN: "an environment variable name (letters, digits, `_`; not starting with a digit)",
    CURRENCY_PATTERN: CURRENCY_MEANING,
}
Count = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
EnvName = Annotated[str, msgspec.Meta(pattern=ENV_NAME_PATTERN)]
FilePath = Annotated[str, msgspec.Meta(min_length=1)]


class DatabaseUrl(str):
    """Where the store is: a `postgresql://` (or `postgres://`) URL, `sqlite:PATH`, or
    a plain SQLite file path (created when missing), as control_plane.store.open_store
    takes it."""

    @classmethod
    def parse(cls, raw: object) -> DatabaseUrl:
        """ValueError for an empty value or a URL of another scheme (`mysql://…`)."""
        written = raw.strip() if isinstance(raw, str) else ""
        if not written.removeprefix(SQLITE_PREFIX) or ("://" in written and not written.startswith(POSTGRES_SCHEMES)):
            raise ValueError(
                f"Expected an SQLite file path or a `postgresql://` URL, got `{show(raw)}`"
            )
        return cls(written)

    @property
    def is_sqlite(self) -> bool:
        return not self.startswith(POSTGRES_SCHEMES)


class NotifyChannel(Schema):
    """A webhook receiver a guard's `notify` list can name: `url` (http or https),
    `secret_env`, the environment variable holding the secret every delivery is
    signed with, and `timeout_s`, how long one delivery attempt may take."""

    url: WebhookUrl
    secret_env: EnvName
    timeout_s: Seconds = 5.0


class WebhookSettings(Schema):
    """Deliveries are retried until one is answered 2xx, at most `max_attempts` times;
    after the n-th failed attempt the next waits min(`max_backoff_s`,
    `initial_backoff_s` * 2**(n-1)) seconds."""

    max_attempts: Count = 10
    initial_backoff_s: Seconds = 1.0
    max_backoff_s: Seconds = 300.0

    def __post_init__(self) -> None:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"`max_backoff_s` ({self.max_backoff_s:g}) must not be below "
                f"`initial_backoff_s` ({self.initial_backoff_s:g})"
            )


class Reporting(Schema):
    """How P&L totals across currencies are given: in `currency`, each other
    currency converted at `exchange_rates` (currency -> units of `currency` one unit
    of it is worth, exact to 9 places, set by the operator: `EUR: "1.08"`). The
    rates used are stated in every P&L; a currency without a rate leaves the
    converted totals out (the per-currency totals are always there)."""

    currency: CurrencyCode = "USD"
    exchange_rates: dict[CurrencyCode, Money] = {}

    def __post_init__(self) -> None:
        for code in (self.currency, *self.exchange_rates):
            if (unknown := currency_problem(code)) is not None:
                raise ValueError(unknown)
        for code, rate in self.exchange_rates.items():
            if not rate.nanos:
                raise ValueError(f"The exchange rate of `{code}` must be above 0")


class ControlPlaneSettings(Schema):
    """A validated control plane settings file (see the module comment for every field).
    Also the `control_plane:` section of a larger file: check it with
    control_plane_problems and resolve its paths with resolve_paths."""

    listen: HostPort = DEFAULT_LISTEN
    database: DatabaseUrl = DatabaseUrl(DEFAULT_DATABASE)
    guards: FilePath | None = None
    notify: dict[Name, NotifyChannel] = msgspec.field(default_factory=dict)
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    redis_url: Annotated[str, msgspec.Meta(pattern=REDIS_URL_PATTERN)] | None = None
    edge_resync_interval_s: Seconds = DEFAULT_EDGE_RESYNC_INTERVAL_S
    meter_claim_idle_s: Seconds = DEFAULT_METER_CLAIM_IDLE_S
    reporting: Reporting | None = None


def parse_control_plane_settings(
    text: str,
    file: str = "<string>",
    base_dir: str | PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ControlPlaneSettings:
    """Validate control plane settings YAML `text`; `file` names it in errors.

    A relative SQLite `database` and `guards` path are joined to `base_dir` (left as
    written when None). `environ` (default os.environ) must hold every channel's
    `secret_env`. Raises ConfigError (ConfigErrors for several) naming file, line and
    path: YAML and schema errors (unknown keys, a bad URL, ...) and unset secrets.
    """
    environ = os.environ if environ is None else environ
    settings = parse_document(
        text,
        file,
        ControlPlaneSettings,
        expected=CONTROL_PLANE_SETTINGS_EXPECTED,
        pattern_meanings=SETTINGS_PATTERN_MEANINGS,
        cross_check=lambda value: control_plane_problems(value, environ),
    )
    return settings if base_dir is None else resolve_paths(settings, base_dir)


def load_control_plane_settings(
    path: str | PathLike[str], environ: Mapping[str, str] | None = None
) -> ControlPlaneSettings:
    """Read and validate the settings file at `path`; relative paths inside it are
    resolved against its directory. Raises OSError when it cannot be read and
    ConfigError as parse_control_plane_settings does."""
    text, _ = read_document(path)
    return parse_control_plane_settings(text, str(path), Path(path).parent, environ)


def control_plane_problems(
    settings: ControlPlaneSettings, environ: Mapping[str, str], at: str = "$"
) -> list[Problem]:
    """What the schema cannot see, for settings found at path `at` of their file: a
    channel whose `secret_env` is unset or empty in `environ`."""
    problems = []
    for name, channel in settings.notify.items():
        if not environ.get(channel.secret_env):
            state = "is empty" if channel.secret_env in environ else "is not set"
            problems.append(Problem(
                child_path_of(f"{at}.notify", name) + ".secret_env",
                f"Environment variable `{channel.secret_env}` {state}; it holds the signing secret "
                f"of notify channel `{name}`",
            ))
    return problems


def signing_secrets(
    settings: ControlPlaneSettings, environ: Mapping[str, str] | None = None, file: str = "<settings>"
) -> dict[str, bytes]:
    """channel name -> its signing secret (UTF-8), read from `environ` (default
    os.environ) when the control plane starts. Raises ConfigError(s) as the loader
    does when a variable is unset or empty (`file` names the settings in them)."""
    environ = os.environ if environ is None else environ
    raise_if_any([ConfigError(problem.message, file, path=problem.path)
                  for problem in control_plane_problems(settings, environ)])
    return {name: environ[channel.secret_env].encode() for name, channel in settings.notify.items()}


def resolve_paths(settings: ControlPlaneSettings, base_dir: str | PathLike[str]) -> ControlPlaneSettings:
    """`settings` with a relative SQLite `database` and `guards` joined to `base_dir`
    (absolute paths, PostgreSQL URLs and ":memory:" are left as they are)."""
    database = settings.database
    if database.is_sqlite:
        path = database.removeprefix(SQLITE_PREFIX)
        if path != ":memory:":
            database = DatabaseUrl(os.path.join(base_dir, path))
    guards = None if settings.guards is None else os.path.join(base_dir, settings.guards)
    return msgspec.structs.replace(settings, database=database, guards=guards)
