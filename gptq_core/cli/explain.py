"""``gptq backends explain MODEL_DIR``: which backend, and which of its paths per batch size,
serves each layer of a checkpoint, and why every other backend does not.

The checkpoint is really loaded and bound (as ``from_quantized`` does), so the answer includes
backends that accepted a layer but then failed to pack or build for it, and each layer's
dispatch policy as its backend decided it at bind time (docs/DESIGN.md §12).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable

from torch import nn

from ..options import parse_cli_options
from ..policy import EXPLAIN_M
from .backends import text_table
from .generate import add_placement_arguments
from .main import add_backend_option_argument

#: "model.layers.12.mlp.down_proj" -> ("model.layers", 12, "mlp.down_proj"): the first index.
_INDEXED = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<suffix>.+)$")


def layer_choices(model: nn.Module) -> list[dict]:
    """One record per QuantLinear: its spec, the backend serving it and its path per M,
    fallbacks and rejections."""
    from ..backend import hint_of
    from ..quant_linear import QuantLinear

    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear) or layer.binding is None:
            continue
        b = layer.binding
        policy = b.policy
        rows.append(
            {
                "layer": name,
                "spec": b.plan.spec.describe(),
                "device": b.plan.device.describe(),
                "backend": b.backend.name,
                "paths": {str(m): path for m, path in policy.paths(EXPLAIN_M).items()},
                "policy": policy.describe(),
                "fusion": layer.fusion,
                "hint": hint_of(b.prepared),
                "fallbacks": [x.name for x in b.plan.ranked if x.name != b.backend.name and x.name not in b.failures],
                "failed": dict(b.failures),
                "rejected": {k: list(v) for k, v in b.plan.rejected.items()},
                "explain": b.explain(),
            }
        )
    return rows


def _ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def group_layers(names: list[str]) -> list[str]:
    """Layer names folded where only the layer index or the last name part differs:
    ``model.layers.[0-31].self_attn.{q_proj,k_proj,v_proj}``."""
    by_place: dict[tuple[str, str], list[int]] = {}
    plain: list[str] = []
    for name in names:
        m = _INDEXED.match(name)
        if m is None:
            plain.append(name)
        else:
            by_place.setdefault((m["prefix"], m["suffix"]), []).append(int(m["index"]))
    by_indices: dict[tuple[str, str, str], list[str]] = {}  # (prefix, indices, parent) -> leaves
    for (prefix, suffix), indices in by_place.items():
        parent, _, leaf = suffix.rpartition(".")
        by_indices.setdefault((prefix, _ranges(indices), parent), []).append(leaf)
    folded = []
    for (prefix, indices, parent), leaves in by_indices.items():
        index = indices if indices.isdigit() else f"[{indices}]"
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        folded.append(".".join(p for p in (prefix, index, parent, leaf) if p))
    return plain + folded


def format_choices(rows: list[dict]) -> str:
    """One line per group of layers with the same choice (backend, path per M, spec), then one
    explanation per distinct (spec, outcome)."""
    if not rows:
        return "no quantized layers"
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        key = (r["backend"], tuple(r["paths"].values()), r["spec"], r.get("fusion") or "-")
        groups.setdefault(key, []).append(r["layer"])
    headers = ("layers", "backend", *(f"M={m}" for m in EXPLAIN_M), "spec", "fusion")
    body = [
        (", ".join(group_layers(layers)), backend, *paths, spec, fusion)
        for (backend, paths, spec, fusion), layers in groups.items()
    ]
    lines = text_table(headers, body)
    seen: dict[str, list[str]] = {}
    for r in rows:
        seen.setdefault(r["explain"], []).append(r["layer"])
    lines.append("")
    lines.append("why (each distinct layer kind once):")
    for text, layers in seen.items():
        lines.append(f"{len(layers)} layer(s), e.g. {layers[0]}:")
        lines.append(text)
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_quantized
    from .generate import placement_arguments

    model = load_quantized(
        args.model_dir, device=args.device, backend=args.backend, torch_dtype=args.dtype,
        backend_options=parse_cli_options(args.backend_option), **placement_arguments(args),
    )
    rows = layer_choices(model)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "explain"} for r in rows], indent=2))
    else:
        print(f"{len(rows)} quantized layers of {args.model_dir}:")
        print(format_choices(rows))
    return 0


def register_explain(bsub: argparse._SubParsersAction) -> None:
    """Add ``explain`` under ``gptq backends``."""
    parser = bsub.add_parser(
        "explain", help="the backend and path per batch size chosen for each layer of a checkpoint, and why")
    parser.add_argument("model_dir", metavar="MODEL", help="GPTQ checkpoint folder or hub id org/name")
    parser.add_argument("--device", default=None, help="device to load on (default: cuda if present, else cpu)")
    parser.add_argument("--backend", default="auto", help="backend name or 'a,b' preference (default auto)")
    parser.add_argument("--dtype", default="auto", help="activation dtype (default: fp16 on GPU, fp32 on CPU)")
    add_backend_option_argument(parser)
    add_placement_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list, one object per layer, each with its 'paths' per M")
    parser.set_defaults(func=_run)
