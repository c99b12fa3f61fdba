"""``gptq backends explain MODEL_DIR``: which backend serves each layer of a checkpoint, and why
every other backend does not.

The checkpoint is really loaded and bound (as ``from_quantized`` does), so the answer includes
backends that accepted a layer but then failed to pack or build for it.
"""

from __future__ import annotations

import argparse
import json

from torch import nn


def layer_choices(model: nn.Module) -> list[dict]:
    """One record per QuantLinear: its spec, the backend serving it, fallbacks and rejections."""
    from ..quant_linear import QuantLinear

    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear) or layer.binding is None:
            continue
        b = layer.binding
        rows.append(
            {
                "layer": name,
                "spec": b.plan.spec.describe(),
                "device": b.plan.device.describe(),
                "backend": b.backend.name,
                "fallbacks": [x.name for x in b.plan.ranked if x.name != b.backend.name and x.name not in b.failures],
                "failed": dict(b.failures),
                "rejected": {k: list(v) for k, v in b.plan.rejected.items()},
                "explain": b.explain(),
            }
        )
    return rows


def format_choices(rows: list[dict]) -> str:
    """A per-layer table, then one explanation per distinct (spec, outcome)."""
    if not rows:
        return "no quantized layers"
    width = max(len(r["layer"]) for r in rows)
    bwidth = max(len("backend"), *(len(r["backend"]) for r in rows))
    lines = [f"{'layer'.ljust(width)}  {'backend'.ljust(bwidth)}  spec"]
    lines += [f"{r['layer'].ljust(width)}  {r['backend'].ljust(bwidth)}  {r['spec']}" for r in rows]
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

    model = load_quantized(args.model_dir, device=args.device, backend=args.backend, torch_dtype=args.dtype)
    rows = layer_choices(model)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "explain"} for r in rows], indent=2))
    else:
        print(f"{len(rows)} quantized layers of {args.model_dir}:")
        print(format_choices(rows))
    return 0


def register_explain(bsub: argparse._SubParsersAction) -> None:
    """Add ``explain`` under ``gptq backends``."""
    parser = bsub.add_parser("explain", help="the backend chosen for each layer of a checkpoint, and why")
    parser.add_argument("model_dir", help="GPTQ checkpoint folder")
    parser.add_argument("--device", default=None, help="device to load on (default: cuda if present, else cpu)")
    parser.add_argument("--backend", default="auto", help="backend name or 'a,b' preference (default auto)")
    parser.add_argument("--dtype", default="auto", help="activation dtype (default: fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per layer")
    parser.set_defaults(func=_run)
