"""The ``pnn`` command line: ``pnn train``, and one subcommand per module in pnn/commands.

Errors a user can fix (a bad option, a missing file, a malformed configuration) print one line
and exit with code 2; other pnn errors (an instrument failure, a stopped run) exit with 1, and an
interrupted run with 130. ``--debug`` shows the traceback. This module imports nothing heavy, so
``pnn --help`` answers quickly; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__

__all__ = ["main", "build_parser"]

# Subcommand modules, in the order ``pnn --help`` lists them. Each defines
# ``add_parser(subparsers)``, registering a parser whose ``func`` default runs the command.
COMMAND_MODULES = ["train", "sweep", "bench", "emulate", "devices", "calibrate"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, pointing at ``--help``.

    Abbreviated options are off: on a bench, ``--epoch`` must not silently mean ``--epochs``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available subcommand."""
    parser = OneLineErrorParser(
        prog="pnn",
        description=(
            "Train physical neural networks with local learning rules, on simulated devices "
            "and on lab instruments."
        ),
        epilog="Run 'pnn COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"pnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).add_parser(subparsers)
    return parser


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` and ``--verbose`` to a subcommand's parser."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error, and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO level) to stderr")


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if getattr(args, "debug", False) else (
        logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _reject_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> None:
    """Exit with a usage error from the subcommand's parser, suggesting the nearest option."""
    command = getattr(args, "command", None)
    target = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            target = action.choices[command]
    message = f"unrecognized arguments: {' '.join(extras)}"
    options = [option for action in target._actions for option in action.option_strings]
    unknown = next((extra.split("=", 1)[0] for extra in extras if extra.startswith("--")), None)
    close = difflib.get_close_matches(unknown, options, n=1) if unknown else []
    if close:
        message += f" (did you mean {close[0]}?)"
    target.error(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _reject_unknown(parser, args, extras)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _configure_logging(args)

    from .errors import ConfigError, PnnError  # noqa: PLC0415 - light module

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"pnn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"pnn {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PnnError as exc:
        if args.debug:
            raise
        interrupted = type(exc).__name__ == "TrainingInterrupted"
        print(f"pnn {args.command}: {'' if interrupted else 'error: '}{exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a one-line message
        if args.debug:
            raise
        print(
            f"pnn {args.command}: unexpected error: {type(exc).__name__}: {exc} "
            "(run again with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
