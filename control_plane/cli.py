# The `aforo` command. Exit status: 0 success, 1 invalid configuration, 2 usage error
# or unreadable file. Subcommands each get a `run_*` function taking parsed arguments;
# heavy modules are imported inside them so `check-config` stays quick.
from __future__ import annotations

import argparse
import os
import sys

import yaml

from config import ConfigError, load_guards
from config.edge_state_file import load_edge_state_file
from config.proxy_settings import load_proxy_settings
from control_plane.store import DEFAULT_SQLITE_PATH

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


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


def _describe_guards(file: str) -> str:
    guard_set = load_guards(file)
    count = len(guard_set.guards)
    return f"{count} {'guard' if count == 1 else 'guards'}, version {guard_set.version}"


def _describe_proxy_settings(file: str) -> str:
    settings = load_proxy_settings(file)
    return f"proxy settings, {len(settings.routes)} routes, {len(settings.upstreams)} upstreams"


def _describe_edge_state(file: str) -> str:
    state = load_edge_state_file(file)
    return f"edge state, {len(state.plans)} plans, {len(state.customers)} customers"


# kind -> (a top-level key that identifies it, validator returning a summary)
CONFIG_KINDS = {
    "guards": ("guards", _describe_guards),
    "proxy": ("upstreams", _describe_proxy_settings),
    "edge-state": ("customers", _describe_edge_state),
}


def _kind_of(file: str) -> str:
    # Sniff the top-level keys; anything unreadable goes to the guard loader, which
    # reports YAML errors with their line.
    try:
        with open(file, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError):
        return "guards"
    if isinstance(document, dict):
        for kind, (key, _) in CONFIG_KINDS.items():
            if key in document:
                return kind
    return "guards"


def run_check_config(args: argparse.Namespace) -> int:
    """Validate each configuration file — guards, proxy settings or edge state, told
    apart by their top-level keys unless --kind says — and print `ok: FILE (summary)`
    to stdout or every error to stderr. Returns 0 if all are valid, 1 if any is
    invalid, 2 if any cannot be read (every file is still checked)."""
    status = EXIT_OK
    for file in args.files:
        try:
            kind = args.kind or _kind_of(file)
            summary = CONFIG_KINDS[kind][1](file)
        except ConfigError as err:
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
        return serve(args.config)
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except OSError as err:
        print(f"aforo proxy: {err}", file=sys.stderr)
        return EXIT_USAGE


def run_apply(args: argparse.Namespace) -> int:
    """Apply a catalog file to the store: upsert every entry, print what changed."""
    import asyncio

    from config.catalog_file import load_catalog_file
    from control_plane.catalog import apply_catalog
    from control_plane.store import StoreError, open_store

    async def apply(catalog):
        store = await open_store(args.database)
        try:
            return await apply_catalog(store, catalog, args.file)
        finally:
            await store.close()

    try:
        summary = asyncio.run(apply(load_catalog_file(args.file)))
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except OSError as err:
        print(f"aforo apply: cannot read {args.file}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as err:
        print(f"aforo apply: {err}", file=sys.stderr)
        return EXIT_USAGE
    for kind, outcomes in summary.items():
        if outcomes:
            counts = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
            print(f"{kind}s: {counts}")
    print("applied" if any(outcome != "unchanged" for outcomes in summary.values() for outcome in outcomes)
          else "nothing to change")
    return EXIT_OK


def run_control_plane(args: argparse.Namespace) -> int:
    """Run the control plane's REST API over the store until SIGTERM / SIGINT."""
    import asyncio

    import uvloop

    from config.network import HostPort
    from control_plane.server import serve_control_plane
    from control_plane.store import StoreError
    from config.logs import configure_logging

    configure_logging()
    try:
        listen = HostPort.parse(args.listen)
    except ValueError as err:
        print(f"aforo control-plane: --listen: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # uvloop, as the proxy runs: aiohttp and asyncpg do less work per request on it.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_control_plane(args.database, listen.host, listen.port, args.guards))
    except ConfigError as err:
        _print_errors(err)
        return EXIT_INVALID
    except (StoreError, OSError) as err:
        print(f"aforo control-plane: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aforo", description="Aforo Edge: margin-aware edge decision proxy."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="validate configuration files (for CI); exit 1 if any is invalid",
        description="Validate guard, proxy settings and edge state files and print every "
        "error with file, line and path.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="YAML file")
    check.add_argument("--kind", choices=sorted(CONFIG_KINDS), help="the kind of file (default: from its keys)")
    check.set_defaults(run=run_check_config)
    proxy = commands.add_parser(
        "proxy",
        help="run the edge proxy",
        description="Run the edge proxy: workers sharing the listen port, admin endpoint, "
        "hot-reloaded edge state, asynchronous metering. SIGTERM shuts down gracefully.",
    )
    proxy.add_argument("--config", required=True, metavar="FILE", help="proxy settings YAML")
    proxy.set_defaults(run=run_proxy)
    apply = commands.add_parser(
        "apply",
        help="apply a catalog file (metrics, features, plans, customers, subscriptions)",
        description="Upsert the catalog in FILE into the store: declarative and idempotent (applying "
        "the same file twice changes nothing). References are checked before anything is written.",
    )
    apply.add_argument("-f", "--file", required=True, metavar="FILE", help="catalog YAML")
    apply.add_argument("--database", default=os.environ.get("AFORO_DATABASE_URL", DEFAULT_SQLITE_PATH),
                       metavar="URL", help="an SQLite file (default: $AFORO_DATABASE_URL or "
                       f"{DEFAULT_SQLITE_PATH}) or a postgresql:// URL")
    apply.set_defaults(run=run_apply)
    control = commands.add_parser(
        "control-plane",
        help="run the control plane's REST API",
        description="Run the control plane's REST API (catalog, API keys, event and cost ingest) over the "
        "store. The first start on an empty store prints an admin token once.",
    )
    control.add_argument("--listen", default="127.0.0.1:8070", metavar="HOST:PORT")
    control.add_argument("--guards", metavar="FILE", help="guard YAML, watched and hot-reloaded")
    control.add_argument("--database", default=os.environ.get("AFORO_DATABASE_URL", DEFAULT_SQLITE_PATH),
                         metavar="URL", help="an SQLite file or a postgresql:// URL")
    control.set_defaults(run=run_control_plane)
    return parser


if __name__ == "__main__":
    sys.exit(main())
