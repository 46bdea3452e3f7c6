# The `aforo` command. Exit status: 0 success, 1 invalid configuration, 2 usage error
# or unreadable file. Subcommands each get a `run_*` function taking parsed arguments;
# only `check-config` exists so far.
from __future__ import annotations

import argparse
import sys

from config import ConfigError, load_guards

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


def run_check_config(args: argparse.Namespace) -> int:
    """Validate each guard file; print `ok: FILE (N guards, version V)` to stdout or
    every error to stderr. Returns 0 if all are valid, 1 if any is invalid, 2 if
    any cannot be read (every file is still checked)."""
    status = EXIT_OK
    for file in args.files:
        try:
            guard_set = load_guards(file)
        except ConfigError as err:
            for error in err.errors:
                print(error, file=sys.stderr)
            status = max(status, EXIT_INVALID)
        except OSError as err:
            print(f"aforo check-config: cannot read {file}: {err.strerror or err}", file=sys.stderr)
            status = EXIT_USAGE
        else:
            count = len(guard_set.guards)
            noun = "guard" if count == 1 else "guards"
            print(f"ok: {file} ({count} {noun}, version {guard_set.version})")
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aforo", description="Aforo Edge: margin-aware edge decision proxy."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="validate guard files (for CI); exit 1 if any is invalid",
        description="Validate guard files and print every error with file, line and path.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="guard YAML file")
    check.set_defaults(run=run_check_config)
    return parser


if __name__ == "__main__":
    sys.exit(main())
