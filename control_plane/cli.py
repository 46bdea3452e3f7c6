# The `aforo` command. Exit status: 0 success, 1 invalid configuration, 2 usage error
# or unreadable file. Subcommands each get a `run_*` function taking parsed arguments;
# heavy modules are imported inside them so `check-config` stays quick.
from __future__ import annotations

import argparse
import os
import re
import sys
import time

from config import ConfigError
from config.check import KINDS, check_file, kind_of
from control_plane.store import DEFAULT_SQLITE_PATH
from control_plane.tokens import ADMIN, SCOPES

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
DATABASE_URL_ENV = "AFORO_DATABASE_URL"
REDIS_URL_ENV = "AFORO_REDIS_URL"


def main(argv: list[str] | None = None) -> int:
    """Run `aforo` with `argv` (default: sys.argv[1:]) and return the exit status.

    Usage errors (unknown subcommand, missing argument) print argparse's message to
    stderr and return 2; `--help` returns 0.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return args.run(args)


def _print_errors(err: ConfigError) -> None:
    # Every problem of a configuration error, one per line (file:line: message - at path).
    for error in err.errors:
        print(error, file=sys.stderr)


def run_check_config(args: argparse.Namespace) -> int:
    """Validate each configuration file — guards, proxy settings, edge state, catalog,
    control plane or all-in-one settings, told apart by their top-level keys unless
    --kind says — with every file it names (see config.check), and print `ok: FILE (summary)`
    to stdout, or `FILE: checked as KIND, N errors` and then every error to stderr
    (so a file taken for another kind than meant is seen at once; --kind says which).
    Returns 0 if all are valid, 1 if any is invalid, 2 if any cannot be read (every
    file is still checked)."""
    status = EXIT_OK
    for file in args.files:
        kind = args.kind or kind_of(file)
        try:
            summary = check_file(file, kind)
        except ConfigError as err:
            count = len(err.errors)
            print(f"{file}: checked as {KINDS[kind].name}, {count} {'error' if count == 1 else 'errors'}",
                  file=sys.stderr)
            _print_errors(err)
            status = max(status, EXIT_INVALID)
        except OSError as err:
            print(f"aforo check-config: cannot read {file}: {err.strerror or err}", file=sys.stderr)
            status = EXIT_USAGE
        else:
            print(f"ok: {file} ({summary})")
    return status


def run_proxy(args: argparse.Namespace) -> int:
    """Run the edge proxy from a settings file until SIGTERM / SIGINT."""
    from config.logs import configure_logging
    from proxy.server import run_proxy as serve

    configure_logging()
    try:
        return serve(args.config, args.redis_url or os.environ.get(REDIS_URL_ENV) or None)
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except OSError as err:
        print(f"aforo proxy: {err}", file=sys.stderr)
        return EXIT_USAGE


def _on_store(database: str, act):
    # Run `act(store)` on the store `database` names, closed afterwards; its result.
    import asyncio

    from control_plane.store import open_store

    async def run():
        store = await open_store(database)
        try:
            return await act(store)
        finally:
            await store.close()
    return asyncio.run(run())


def _add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", default=os.environ.get(DATABASE_URL_ENV, DEFAULT_SQLITE_PATH),
                        metavar="URL", help="an SQLite file (default: $AFORO_DATABASE_URL or "
                        f"{DEFAULT_SQLITE_PATH}) or a postgresql:// URL")


def run_apply(args: argparse.Namespace) -> int:
    """Apply a catalog file to the store: upsert every entry, print what changed."""
    from config.catalog_file import load_catalog_file
    from control_plane.catalog import apply_catalog, describe_apply
    from control_plane.store import StoreError
    from control_plane.tokens import command_author

    try:
        catalog = load_catalog_file(args.file)
        author = command_author(f"aforo apply {args.file}")
        summary = _on_store(args.database, lambda store: apply_catalog(store, catalog, args.file, author=author))
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except OSError as err:
        print(f"aforo apply: cannot read {args.file}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as err:
        print(f"aforo apply: {err}", file=sys.stderr)
        return EXIT_USAGE
    for line in describe_apply(summary):
        print(line)
    return EXIT_OK


def run_tokens(args: argparse.Namespace) -> int:
    """`aforo tokens create|list|revoke` on the store `--database` names: create prints
    the new token's id, name, scope and the token itself (shown once); list prints one
    line per token (id, scope, name, created, revoked or `live`); revoke takes effect on
    the token's next request. Returns 0, or 2 with a message for an unknown token, a
    bad name or an unreachable store."""
    import datetime

    from control_plane.store import StoreError
    from control_plane.tokens import command_author, create_token

    author = command_author(f"aforo tokens {args.action}")

    def when(at):
        return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def act(store):
        if args.action == "create":
            token, secret = await create_token(store, args.name, time.time(), args.scope, author=author)
            return [f"created {token.id} ({token.scope}) {token.name}",
                    f"token (shown once, keep it): {secret}"]
        if args.action == "list":
            return [f"{token.id}  {token.scope:<5}  {token.name}  created {when(token.created_at)}  "
                    + ("live" if token.revoked_at is None else f"revoked {when(token.revoked_at)}")
                    for token in await store.tokens()] or ["no tokens"]
        token = await store.revoke_token(args.id, time.time(), author=author)
        if token is None:
            raise ValueError(f"no live token `{args.id}` (see `aforo tokens list`)")
        return [f"revoked {token.id} ({token.scope}) {token.name}"]

    try:
        lines = _on_store(args.database, act)
    except (ValueError, StoreError, OSError) as err:
        print(f"aforo tokens {args.action}: {err}", file=sys.stderr)
        return EXIT_USAGE
    for line in lines:
        print(line)
    return EXIT_OK


def run_control_plane(args: argparse.Namespace) -> int:
    """Run the control plane (REST API, guards, webhooks) until SIGTERM / SIGINT, from
    the settings file `--config` (defaults without one); `--listen`, `--guards` and
    `--database` (or $AFORO_DATABASE_URL) override the file's values."""

    import msgspec

    from config.control_plane_settings import (
        ControlPlaneSettings,
        DatabaseUrl,
        load_control_plane_settings,
    )
    from config.logs import configure_logging
    from config.network import HostPort
    from control_plane.server import run_control_plane
    from control_plane.store import StoreError

    configure_logging()
    try:
        settings = load_control_plane_settings(args.config) if args.config else ControlPlaneSettings()
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except OSError as err:
        print(f"aforo control-plane: cannot read {args.config}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USAGE
    overrides = {}
    options = (("listen", "--listen", HostPort.parse, args.listen),
               ("database", "--database", DatabaseUrl.parse, args.database or os.environ.get(DATABASE_URL_ENV)),
               ("guards", "--guards", str, args.guards),
               ("redis_url", "--redis-url", _redis_url, args.redis_url or os.environ.get(REDIS_URL_ENV)))
    for field, option, parse, value in options:
        if value:
            try:
                overrides[field] = parse(value)
            except ValueError as err:
                print(f"aforo control-plane: {option}: {err}", file=sys.stderr)
                return EXIT_USAGE
    try:
        run_control_plane(msgspec.structs.replace(settings, **overrides))
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except (StoreError, OSError) as err:
        print(f"aforo control-plane: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _redis_url(value: str) -> str:
    from config.bus import REDIS_URL_MEANING, REDIS_URL_PATTERN

    if not re.match(REDIS_URL_PATTERN, value):
        raise ValueError(f"expected {REDIS_URL_MEANING}, got `{value}`")
    return value


def run_up(args: argparse.Namespace) -> int:
    """Run the control plane and the proxy together from one settings file (with
    --demo: the demo's files, a demo API and a walk down the guard ladder)."""
    from all_in_one import demo
    from all_in_one.runner import run_up as serve
    from config.logs import configure_logging
    from control_plane.store import StoreError

    configure_logging()
    if args.demo:
        settings_path = demo.prepare(args.folder)
        print(f"demo: files in {args.folder}/ (the store starts empty at every demo run)", flush=True)
        options = {"on_ready": demo.drive, "extra_children": [("aforo-demo-api", demo.serve_upstream, ())]}
    elif args.config is None:
        print("aforo up: give --config FILE (see config/examples/aforo.yaml) or --demo", file=sys.stderr)
        return EXIT_USAGE
    else:
        settings_path, options = args.config, {}
    try:
        return serve(str(settings_path), announce=lambda line: print(line, flush=True), **options)
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except (StoreError, OSError) as err:
        print(f"aforo up: {err}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aforo", description="Aforo Edge: margin-aware edge decision proxy."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="validate configuration files (for CI); exit 1 if any is invalid",
        description="Validate guard, proxy settings, edge state, catalog, control plane and all-in-one files and print every "
        "error with file, line and path.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="YAML file")
    check.add_argument("--kind", choices=sorted(KINDS), help="the kind of file (default: from its keys)")
    check.set_defaults(run=run_check_config)
    proxy = commands.add_parser(
        "proxy",
        help="run the edge proxy",
        description="Run the edge proxy: workers sharing the listen port, admin endpoint, "
        "hot-reloaded edge state, asynchronous metering. SIGTERM shuts down gracefully.",
    )
    proxy.add_argument("--config", required=True, metavar="FILE", help="proxy settings YAML")
    proxy.add_argument("--redis-url", metavar="URL",
                       help="run on the Redis edge bus at URL (default: $AFORO_REDIS_URL): edge state from it, "
                       "meter events to it, whatever the settings file says")
    proxy.set_defaults(run=run_proxy)
    apply = commands.add_parser(
        "apply",
        help="apply a catalog file (metrics, model and tool prices, features, plans, customers, subscriptions)",
        description="Upsert the catalog in FILE into the store: declarative and idempotent (applying "
        "the same file twice changes nothing). References are checked before anything is written.",
    )
    apply.add_argument("-f", "--file", required=True, metavar="FILE", help="catalog YAML")
    _add_database_option(apply)
    apply.set_defaults(run=run_apply)
    tokens = commands.add_parser(
        "tokens",
        help="create, list and revoke bearer tokens of the REST API",
        description="Bearer tokens of the REST API, in the store: `admin` tokens may call everything, "
        "`proxy` tokens only what a proxy needs (edge state and changes, quota leases, throttles, meter events). "
        "A revoked token is refused from its next request on.",
    )
    _add_database_option(tokens)
    actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a token (printed once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument("--scope", choices=SCOPES, default=ADMIN, help="what it may call (default: admin)")
    actions.add_parser("list", help="list every token, revoked ones included (never the token itself)")
    revoke = actions.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id", metavar="ID", help="the token's id (tok_...)")
    tokens.set_defaults(run=run_tokens)
    control = commands.add_parser(
        "control-plane",
        help="run the control plane: REST API, guards and webhooks",
        description="Run the control plane's REST API (catalog, API keys, event and cost ingest, margins), "
        "judge guards after ingest and deliver their webhooks. Settings come from --config FILE (see "
        "config/examples/control_plane.yaml); the other options override it. The first start on an empty "
        "store prints an admin token once.",
    )
    control.add_argument("--config", metavar="FILE", help="control plane settings YAML")
    control.add_argument("--listen", metavar="HOST:PORT", help="where the API listens (default 127.0.0.1:8070)")
    control.add_argument("--guards", metavar="FILE", help="guard YAML, watched and hot-reloaded")
    control.add_argument("--database", metavar="URL", help="an SQLite file or a postgresql:// URL (default: "
                         f"$AFORO_DATABASE_URL, else the settings' `database`, else {DEFAULT_SQLITE_PATH})")
    control.add_argument("--redis-url", metavar="URL", help="the Redis edge bus whose meter stream it reads "
                         f"(default: ${REDIS_URL_ENV}, else the settings' `redis_url`, else none)")
    control.set_defaults(run=run_control_plane)
    up = commands.add_parser(
        "up",
        help="run the control plane and the proxy together (all in one, SQLite by default)",
        description="Start the control plane and the proxy workers from one settings file and print "
        "where they listen; Ctrl-C stops the proxies (every meter event delivered) and then the "
        "control plane. --demo adds a demo API and catalog and shows a customer going from allowed "
        "to throttled to blocked.",
    )
    up.add_argument("--config", metavar="FILE", help="all-in-one settings YAML (control_plane, catalog, proxy)")
    up.add_argument("--demo", action="store_true", help="run the demo (its files go to --folder)")
    up.add_argument("--folder", default="aforo-demo", metavar="DIR", help="where --demo keeps its files")
    up.set_defaults(run=run_up)
    return parser


if __name__ == "__main__":
    sys.exit(main())
