"""``gptq backends list``: every installed backend, its status and why it is usable here or not."""

from __future__ import annotations

import argparse
import json

from ..device import DeviceInfo
from ..registry import get_registry
from ..spec import dtype_name


def _fmt_group_sizes(group_sizes) -> str:
    return "any" if group_sizes is None else ",".join(map(str, group_sizes))


def backend_rows(device: DeviceInfo) -> list[dict]:
    """One dict per backend (loaded, broken or disabled) describing it on ``device``."""
    reg = get_registry()
    rows = []
    for name in sorted(reg.backends):
        b = reg.backends[name]
        caps = b.info.capabilities
        reasons = b.reasons(device)
        rows.append(
            {
                "name": name,
                "distribution": b.info.distribution,
                "version": b.info.version,
                "status": "unavailable" if reasons else "available",
                "device": device.describe(),
                "device_kinds": sorted(caps.device_kinds),
                "bits": list(caps.bits),
                "group_sizes": None if caps.group_sizes is None else list(caps.group_sizes),
                "sym": caps.sym,
                "asym": caps.asym,
                "desc_act": caps.desc_act,
                "act_dtypes": [dtype_name(d) for d in caps.act_dtypes],
                "priority": b.info.priority_for(device),
                "training": caps.training,
                "compile": caps.compile,
                "description": b.info.description,
                "options": b.info.options.fields_table(),
                "reasons": reasons,
            }
        )
    for _, broken in sorted(reg.broken.items()):
        rows.append(_unloaded_row(broken, "broken", broken.error, device))
    for _, disabled in sorted(reg.disabled.items()):
        rows.append(_unloaded_row(disabled, "disabled", disabled.reason, device))
    return rows


def _unloaded_row(record, status: str, reason: str, device: DeviceInfo) -> dict:
    """A backend that was not loaded (broken or disabled): who it is and why."""
    return {
        "name": record.name,
        "distribution": record.distribution,
        "version": record.version,
        "status": status,
        "device": device.describe(),
        "device_kinds": [],
        "bits": [],
        "group_sizes": [],
        "priority": None,
        "entry_point": record.entry_point,
        "options": None,  # unknown: the plugin was not loaded
        "reasons": [reason],
    }


def text_table(headers: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell, a rule under the headers; the last column is not
    padded (it holds free text)."""
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
    return lines


def _table(rows: list[dict]) -> str:
    headers = ("name", "distribution", "status", "kinds", "bits", "groups", "prio", "here")
    body = [
        (
            r["name"],
            f"{r['distribution']} {r['version']}",
            r["status"],
            ",".join(r["device_kinds"]) or "-",
            ",".join(map(str, r["bits"])) or "-",
            _fmt_group_sizes(r["group_sizes"]) if r["device_kinds"] else "-",
            "-" if r["priority"] is None else str(r["priority"]),
            "usable" if not r["reasons"] else "; ".join(r["reasons"]),
        )
        for r in rows
    ]
    return "\n".join(text_table(headers, body))


def _options_tables(rows: list[dict]) -> str:
    """Each backend's typed options (``--backend-option NAME.OPTION=VALUE``, docs/DESIGN.md §12)."""
    lines = []
    for r in rows:
        if r["options"] is None:
            lines.append(f"{r['name']}: options unknown ({r['status']}: not loaded)")
        elif not r["options"]:
            lines.append(f"{r['name']}: no options")
        else:
            lines.append(f"{r['name']}:")
            body = [(o["name"], o["type"], str(o["default"]), o["env"] or "-", o["help"])
                    for o in r["options"]]
            lines += ["  " + line for line in text_table(("option", "type", "default", "env", "help"), body)]
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    device = DeviceInfo.of(args.device)
    rows = backend_rows(device)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))  # default=str: Path option defaults
    else:
        print(f"backends for {device.describe()}:")
        print(_table(rows))
        if args.options:
            print()
            print("options (set with --backend-option BACKEND.OPTION=VALUE or "
                  "from_quantized(backend_options={BACKEND: {OPTION: VALUE}})):")
            print(_options_tables(rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("backends", help="list installed backends and explain choices")
    bsub = parser.add_subparsers(dest="backends_command", metavar="SUBCOMMAND")
    lst = bsub.add_parser("list", help="every backend, its status and why it is usable or not")
    lst.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    lst.add_argument("--device", default=None, help="device to judge against (default: cuda if present, else cpu)")
    lst.add_argument("--options", action="store_true",
                     help="also print each backend's typed options (--json always has them)")
    lst.set_defaults(func=_list)
    from .explain import register_explain

    register_explain(bsub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
