"""Entry point of the ``gptq`` command: one module per subcommand, each with ``register``."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import traceback

from .._version import __version__

#: Subcommand modules of this package; each defines ``register(subparsers)`` which adds its
#: parser and sets ``func`` (args -> exit code) as the default.
COMMANDS: tuple[str, ...] = ("backends", "quantize", "generate", "eval", "demo", "models", "bench")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptq",
        description="GPTQ weight-only quantization with pluggable matmul kernels.",
    )
    parser.add_argument("--version", action="version", version=f"gptq-core {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the Python traceback of a failure (before its one-line error)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
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
