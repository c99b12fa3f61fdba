"""Entry point of the ``gptq`` command: one module per subcommand, each with ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys

from .._version import __version__

#: Subcommand modules of this package; each defines ``register(subparsers)`` which adds its
#: parser and sets ``func`` (args -> exit code) as the default.
COMMANDS: tuple[str, ...] = ("backends", "quantize", "generate", "eval", "demo", "models", "bench")


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
    from ..errors import GPTQError

    try:
        return int(args.func(args) or 0)
    except GPTQError as exc:
        print(f"gptq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
