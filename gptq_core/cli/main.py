"""Entry point of the ``gptq`` command: one module per subcommand, each with ``register``."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import traceback

from .._version import __version__

#: Subcommand modules of this package; each defines ``register(subparsers)`` which adds its
#: parser and sets ``func`` (args -> exit code) as the default.
COMMANDS: tuple[str, ...] = ("backends", "quantize", "generate", "eval", "demo", "models", "bench", "check")

#: ``--log-level`` choices; ``-v`` means INFO and ``-vv`` DEBUG. Default: warnings and errors.
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "WARNING"
#: The logger every module of the package logs under (``gptq_core.*``).
LOGGER_NAME = "gptq_core"


#: Exceptions that, escaping a command, mean a path or file the user gave is wrong: exit 2 and
#: one line with the fix, never a traceback (docs/DESIGN.md §10).
BAD_PATH_FIXES: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "check the path"),
    (IsADirectoryError, "give a file, not a folder"),
    (NotADirectoryError, "give a folder, not a file"),
    (PermissionError, "choose a path you may read and write, or fix its permissions"),
)

#: OSError numbers of a filesystem that cannot take the output: (exit code, fix).
FILESYSTEM_FIXES: dict[int, tuple[int, str]] = {
    errno.EROFS: (2, "the file system is read-only: choose a writable output folder"),
    errno.ENOSPC: (1, "the disk is full: free space or choose an output folder on another disk"),
}


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception escaping a command.

    Usage errors (the library's own ``GPTQError``, bad paths, undecodable text) exit 2; every
    other failure is a runtime failure, exit 1, with a pointer to ``--debug``.
    """
    from ..errors import GPTQError

    if isinstance(exc, GPTQError):
        return 2, str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return 2, (f"a file given is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                   "convert it to UTF-8 (e.g. with iconv) or give a text file")
    if isinstance(exc, OSError):
        where = f": '{exc.filename}'" if exc.filename else ""
        problem = f"{exc.strerror or exc}{where}"
        if exc.errno in FILESYSTEM_FIXES:
            code, fix = FILESYSTEM_FIXES[exc.errno]
            return code, f"{problem}; {fix}"
        for kind, fix in BAD_PATH_FIXES:
            if isinstance(exc, kind):
                return 2, f"{problem}; {fix}"
    first = (str(exc).strip().splitlines() or [""])[0]
    return 1, (f"{type(exc).__name__}: {first} (a runtime failure; `gptq --debug ...` shows the "
               "traceback)")


def add_backend_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend-option BACKEND.NAME=VALUE`` (repeatable) for every command that loads a model;
    pass ``gptq_core.options.parse_cli_options(args.backend_option)`` as ``backend_options``."""
    parser.add_argument(
        "--backend-option", action="append", default=[], metavar="BACKEND.NAME=VALUE",
        help="a typed backend option, e.g. marlin.dense_cache_mb=512 (repeatable); "
             "`gptq backends list --options` lists every backend's options",
    )


def add_logging_arguments(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--log-level`` and ``-v`` on the top parser and on every subcommand (so both
    ``gptq -v quantize`` and ``gptq quantize ... -v`` work); a subcommand's value wins."""
    default = DEFAULT_LOG_LEVEL if top else argparse.SUPPRESS
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
                        help=f"messages shown on stderr from this level up (default {DEFAULT_LOG_LEVEL})")
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="more messages: -v for INFO, -vv for DEBUG (overrides --log-level)")


def log_level(args: argparse.Namespace) -> int:
    """The logging level the arguments ask for."""
    verbose = getattr(args, "verbose", 0)
    if verbose:
        return logging.DEBUG if verbose > 1 else logging.INFO
    return getattr(logging, getattr(args, "log_level", DEFAULT_LOG_LEVEL))


class _CliHandler(logging.StreamHandler):
    """The one stderr handler the CLI installs (replaced, never stacked, on a second run);
    it writes to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: int) -> None:
    """Send the package's log records at ``level`` and above to stderr, one line each."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        logger.removeHandler(handler)
    handler = _CliHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptq",
        description="GPTQ weight-only quantization with pluggable matmul kernels.",
    )
    parser.add_argument("--version", action="version", version=f"gptq-core {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the Python traceback of a failure (before its one-line error)")
    add_logging_arguments(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    _add_to_subcommands(parser)
    return parser


def _add_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """The logging arguments on every subcommand, nested ones (``backends list``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                add_logging_arguments(command, top=False)
                _add_to_subcommands(command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    configure_logging(log_level(args))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"gptq {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if args.debug:
            traceback.print_exc()
        code, message = describe_failure(exc)
        print(f"gptq {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
