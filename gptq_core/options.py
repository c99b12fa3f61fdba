"""Typed backend options: one frozen dataclass per backend, parsed once when a model loads.

Users tune a backend through ``from_quantized(..., backend_options={"marlin": {...}})`` or
``--backend-option marlin.dense_cache_mb=512`` on the command line, never through ad-hoc
environment switches (docs/DESIGN.md §12). A backend declares its options as a subclass of
:class:`BackendOptions` whose fields are made with :func:`option`; the core parses and
validates them (unknown keys and unreadable values are one clear error) and hands the
instance to the backend's ``gptq_pack`` hook. A field may name one environment variable as
its fallback (for deployment, e.g. a cache folder); it is read by :func:`parse_value` here,
with one meaning of true and false for every variable.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import GPTQError

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

T = TypeVar("T", bound="BackendOptions")


class OptionsError(GPTQError, ValueError):
    """A backend option that does not exist or whose value cannot be read."""


def parse_bool(text: str | bool, what: str = "value") -> bool:
    """``1/true/yes/on`` -> True, ``0/false/no/off`` -> False (any case); anything else is an error."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise OptionsError(f"{what}={text!r} is not a yes/no value; use one of 1/true/yes/on or 0/false/no/off")


def option(default: Any, help: str, env: str | None = None) -> Any:  # noqa: A002 - the usual name
    """A typed option field: ``dense_cache_mb: float = option(0, "memory for dense copies")``."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of an annotation like ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def parse_value(kind: type, raw: Any, what: str, optional: bool = False) -> Any:
    """Read ``raw`` (a Python value or the text of a CLI/env setting) as ``kind``."""
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        if optional:
            return None
        raise OptionsError(f"{what} needs a value")
    try:
        if kind is bool:
            return parse_bool(raw, what)
        if kind is Path:
            return Path(raw).expanduser()
        if kind in (int, float) and isinstance(raw, bool):
            raise ValueError("a yes/no value is not a number")
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError("not a whole number")
        if kind is tuple:
            items = raw.replace(";", ",").split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
        return kind(raw)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, OptionsError):
            raise
        raise OptionsError(f"{what}={raw!r} cannot be read as {kind.__name__}: {exc}") from None


@dataclass(frozen=True)
class BackendOptions:
    """Base of every backend's options (a backend without options uses it as it is)."""

    #: Where an unknown option's error sends the user.
    LISTED_BY: typing.ClassVar[str] = "`gptq backends list --options` lists every backend's options"

    @classmethod
    def fields_table(cls) -> list[dict[str, Any]]:
        """name, type, default, environment fallback and help of every field (docs, CLI help)."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            kind, optional = _base_type(hints[f.name])
            rows.append({
                "name": f.name,
                "type": kind.__name__ + (" | None" if optional else ""),
                "default": f.default,
                "env": f.metadata.get("env"),
                "help": f.metadata.get("help", ""),
            })
        return rows

    @classmethod
    def parse(cls: type[T], values: Mapping[str, Any] | None = None, backend: str = "") -> T:
        """Build the options from ``values`` (unknown keys are an error), then each field's
        environment fallback, then its default."""
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        label = f"backend '{backend}'" if backend else cls.__name__
        if unknown:
            known = ", ".join(names) or "none"
            raise OptionsError(
                f"{label} has no option {', '.join(map(repr, unknown))} (its options: {known}); "
                f"{cls.LISTED_BY}"
            )
        parsed = {}
        for f in dataclasses.fields(cls):
            kind, optional = _base_type(hints[f.name])
            env = f.metadata.get("env")
            if f.name in values:
                parsed[f.name] = parse_value(kind, values[f.name], f"{label} option {f.name}", optional)
            elif env and os.environ.get(env, "").strip():
                parsed[f.name] = parse_value(kind, os.environ[env], env, optional)
        return cls(**parsed)


def parse_cli_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``["marlin.dense_cache_mb=512", "triton.autotune=off"]`` -> ``{"marlin": {...}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        backend, dot, name = key.strip().partition(".")
        if not sep or not dot or not backend or not name:
            raise OptionsError(
                f"backend option {item!r} is not of the form BACKEND.NAME=VALUE "
                "(e.g. marlin.dense_cache_mb=512)"
            )
        out.setdefault(backend, {})[name] = value.strip()
    return out


def check_backend_names(options: Mapping[str, Any] | None, known: set[str]) -> None:
    """Options for a backend that is not installed are an error, not silently dropped."""
    for name in options or {}:
        if name not in known:
            raise OptionsError(
                f"backend_options names backend '{name}', which is not installed "
                f"(installed: {', '.join(sorted(known)) or 'none'})"
            )
