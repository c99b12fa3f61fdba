"""``gptq models list``: every supported model_type, where its layers are and how they quantize."""

from __future__ import annotations

import argparse
import json
import textwrap

from ..models import ARCHITECTURE_LIST, Architecture


def architecture_row(arch: Architecture) -> dict:
    """One family as plain data (the ``--json`` output)."""
    moe = arch.moe
    return {
        "family": arch.name,
        "model_types": list(arch.model_types),
        "layers": arch.layers,
        "outside": list(arch.outside),
        "head": arch.head,
        "groups": [list(g) for g in arch.groups],
        "skip": list(arch.skip),
        "experts": None if moe is None else {
            "fused_module": moe.experts, "expert": moe.expert, "linears": list(moe.linear_names()),
            "style": moe.style,
        },
        "checkpoint_renames": [list(p) for p in arch.checkpoint_renames],
    }


def render(archs: tuple[Architecture, ...] = ARCHITECTURE_LIST, width: int = 100) -> str:
    """The human table: one block per family."""
    count = sum(len(a.model_types) for a in archs)
    lines = [f"{count} model types in {len(archs)} families "
             "(groups quantize left to right; {expert} = every expert)"]
    for arch in archs:
        lines.append("")
        lines.append(f"{arch.name}  (layers: {arch.layers}, head: {arch.head})")
        wrap = dict(width=width, initial_indent="  types:  ", subsequent_indent=" " * 10)
        lines += textwrap.wrap(", ".join(arch.model_types), **wrap)
        wrap.update(initial_indent="  groups: ")
        lines += textwrap.wrap(arch.describe_groups(), break_on_hyphens=False, **wrap)
        if arch.moe is not None:
            lines.append(
                f"  experts: {arch.moe.experts} unfused to {arch.moe.expert}."
                f"{{{','.join(arch.moe.linear_names())}}} ({arch.moe.style})"
            )
        if arch.skip:
            lines.append(f"  float:  {', '.join(arch.skip)}")
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([architecture_row(a) for a in ARCHITECTURE_LIST], indent=2))
    else:
        print(render())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list the supported model architectures")
    msub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    lst = msub.add_parser("list", help="every model_type: decoder layers, groups, experts")
    lst.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    lst.set_defaults(func=_list)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
