"""``gptq bench``: time every available backend against fp16 cuBLAS and PyTorch's tinygemm;
``gptq bench generate``: tokens per second of whole models, float against quantized, in every
decode mode (docs/DESIGN.md §9, §11)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from ..bench.cases import DTYPES
from ..errors import GPTQError
from ..options import parse_cli_options
from .generate import Rule, check_arguments, check_device_argument, parse_device_map, parse_max_memory
from .main import add_backend_option_argument

#: Range rules of ``gptq bench``'s flags (--m is checked by parse_m).
BENCH_RULES: tuple[Rule, ...] = (
    ("--seconds", lambda v: math.isfinite(v) and v >= 0, "a number of seconds >= 0 per measurement (0.05 is usual; 0: the fewest repeats)"),
    ("--copies", lambda v: v >= 0, "0 (enough copies to overflow the L2 cache) or a positive count"),
)

#: Range rules of ``gptq bench generate``'s flags (batches, lengths and modes: GenerateBenchConfig.check).
BENCH_GENERATE_RULES: tuple[Rule, ...] = (
    ("--seconds", lambda v: math.isfinite(v) and v >= 0, "a number of seconds >= 0 per measurement (1 is usual; 0: three repeats, the fewest)"),
    ("--layers", lambda v: v >= 1, "at least 1 decoder layer"),
)


def _run(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, cpu_shapes, parse_m, parse_shapes, run  # noqa: PLC0415
    from ..bench import report  # noqa: PLC0415
    from ..bench.cases import CPU_M  # noqa: PLC0415
    from ..bench.runner import backend_options  # noqa: PLC0415

    check_arguments(args, BENCH_RULES)
    check_device_argument(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = torch.device(device).type == "cpu"
    shapes = parse_shapes(args.shapes) if args.shapes else (cpu_shapes() if on_cpu else None)
    m_values = parse_m(args.m) if args.m else (list(CPU_M) if on_cpu else None)
    cfg = BenchConfig(
        bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
        dtype=DTYPES[args.dtype], device=device, copies=args.copies,
        backends=[b.strip() for b in args.backends.split(",")] if args.backends else None,
        baselines=not args.no_baselines, target_seconds=args.seconds,
        backend_options=parse_cli_options(args.backend_option),
    )
    backend_options(cfg)  # a bad option is one line before any file is written (run parses them too)
    if shapes is not None:
        cfg.shapes = shapes
    if m_values is not None:
        cfg.m_values = m_values
    if args.bits not in (2, 3, 4, 8):
        raise GPTQError(f"--bits {args.bits} is not a GPTQ bit width; use 2, 3, 4 or 8")
    if args.group_size != -1 and args.group_size <= 0:
        raise GPTQError(f"--group-size {args.group_size} is invalid; use -1 or a positive size")

    csv_file = writer = None
    if args.csv:  # rows are appended as they come, so an interrupted run keeps what it measured
        try:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            csv_file = open(args.csv, "w", newline="")  # noqa: SIM115
        except OSError as exc:
            raise GPTQError(f"--csv {args.csv} cannot be written ({exc.strerror}); give a writable path") from None
        writer = csv.DictWriter(csv_file, fieldnames=report.FIELDS)
        writer.writeheader()

    def on_result(r):
        if writer is not None:
            writer.writerow(r.as_dict())
            csv_file.flush()

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        rows = run(cfg, log=log, on_result=on_result)
    finally:
        if csv_file is not None:
            csv_file.close()
    print(report.table(rows))
    meta = {"device": str(device), "config": cfg.describe(), "command": " ".join(sys.argv)}
    if cfg.backend_options:
        meta["backend_options"] = cfg.backend_options
    if device != "cpu" and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(torch.device(device))
    meta["torch"] = torch.__version__
    if args.json:
        report.write_json(rows, args.json, meta)
    if args.plot:
        report.plot(rows, args.plot, f"{cfg.describe()} on {meta.get('gpu', device)}")
    failed = [r for r in rows if r.status in ("check failed", "error")]
    return 1 if failed else 0


#: ``gptq bench generate`` defaults per device kind: (batches, prompt tokens, new tokens).
GENERATE_DEFAULTS = {"cpu": ((1, 2), 16, 16), "gpu": ((1, 8, 32), 32, 128)}


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GPTQError(f"{what} {text!r} is not a comma-separated list of integers, e.g. 1,8,32") from None
    if not values:
        raise GPTQError(f"{what} is empty; give e.g. 1,8,32")
    return values


def parse_bench_device_map(text: str) -> str | dict:
    """``--device-map``: a strategy (auto, balanced, balanced_low_0, sequential), a device
    (cpu, cuda:1), a JSON file holding ``{module: device}``, or that object inline."""
    from ..placement import STRATEGIES  # noqa: PLC0415

    text = text.strip()
    if text.startswith("{"):
        value = parse_device_map(text)
    elif text in STRATEGIES:
        return text
    elif text.endswith(".json") or Path(text).is_file():
        try:
            raw = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise GPTQError(f"--device-map {text}: cannot read it ({exc.strerror}); give auto, balanced, "
                            "sequential or a JSON file {module: device}") from None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise GPTQError(f"--device-map {text} is not valid JSON ({exc}); write e.g. "
                            '{"model.layers.0": "cuda:0", "": "cuda:1"}') from None
    else:
        try:
            torch.device(text)
        except (RuntimeError, ValueError):
            raise GPTQError(f"--device-map {text!r} is not a strategy ({', '.join(STRATEGIES)}), a device "
                            "or a JSON file {module: device}; give e.g. --device-map auto") from None
        return text
    if not isinstance(value, dict) or not value:
        raise GPTQError(f"--device-map {text} must hold a JSON object {{module: device}}, got {type(value).__name__}")
    return value


def _generate_models(args, device: torch.device, work: Path, log) -> tuple[list, dict]:
    """The float/quantized folders to time, building or quantizing them when needed."""
    from ..auto import is_quantized_checkpoint, load_for_inference  # noqa: PLC0415
    from ..generation.benchmark import ModelEntry  # noqa: PLC0415
    from ..synthetic import build_synthetic, float_model_of, write_rtn_checkpoint  # noqa: PLC0415

    if args.synthetic:
        # a --work-dir that already holds the pair is reused (reruns skip the build)
        pair = build_synthetic(args.synthetic, work, device=device, layers=args.layers, overwrite=True,
                               reuse=bool(args.work_dir))
        if pair.seconds:
            log(f"built {pair.name}: random float model and its RTN 4-bit g128 checkpoint in {pair.seconds:.1f} s under {work}")
        else:
            log(f"reusing {pair.float_dir} and {pair.quantized_dir}")
        return ([ModelEntry("float", pair.float_dir), ModelEntry("quantized", pair.quantized_dir)],
                {"synthetic": pair.name, "build_s": pair.seconds})
    folder = Path(args.model_dir)
    if not folder.is_dir():
        raise GPTQError(f"{folder} is not a folder; give a model or GPTQ checkpoint folder, or --synthetic NAME")
    if is_quantized_checkpoint(folder):
        source = float_model_of(folder)
        if source is None:
            note = "its quantize_config.json records no float model (meta.float_model), so only it is timed"
            log(f"{folder}: {note}")
            return [ModelEntry("quantized", folder, note=note)], {}
        return [ModelEntry("float", source), ModelEntry("quantized", folder)], {}
    quantized = work / f"{folder.name}-gptq-4bit-g128-rtn"
    model, tokenizer = load_for_inference(folder, device, "auto", args.dtype)
    write_rtn_checkpoint(model, tokenizer, quantized, folder, overwrite=True)
    del model
    log(f"{folder} is a float model: wrote its RTN 4-bit g128 checkpoint to {quantized}")
    return ([ModelEntry("float", folder), ModelEntry("quantized", quantized, note="RTN 4-bit g128 made by the bench")],
            {"quantized_by_bench": True})


def _backend_names(text: str) -> list[str]:
    """``--compare-backends``: two or more different installed backends, checked before any
    model is built or loaded (an unknown name would otherwise fail after minutes of work)."""
    from ..registry import canonical_backend_name, get_registry  # noqa: PLC0415

    names = [canonical_backend_name(n.strip()) for n in text.split(",") if n.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise GPTQError(f"--compare-backends {text!r}: give two or more different backend names, e.g. marlin,exllama")
    registry = get_registry()
    for name in names:
        registry.get(name)  # raises one line naming what is installed
    return names


def _per_backend(models: list, wanted: list[str]) -> list:
    """``--compare-backends a,b``: the quantized model once per backend, side by side."""
    from ..generation.benchmark import ModelEntry  # noqa: PLC0415

    out = []
    for entry in models:
        if entry.label != "quantized":
            out.append(entry)
            continue
        out += [ModelEntry(f"quantized[{name}]", entry.folder, backend=name, note=entry.note) for name in wanted]
    return out


def _run_generate(args: argparse.Namespace) -> int:
    import transformers  # noqa: PLC0415

    from ..checkpoint.load import resolve_device  # noqa: PLC0415
    from ..generation import benchmark, report  # noqa: PLC0415

    check_arguments(args, BENCH_GENERATE_RULES)
    check_device_argument(args.device)
    if args.compare_backends and args.backend != "auto":
        raise GPTQError("--backend and --compare-backends both choose the backend; give one of them")
    compare = _backend_names(args.compare_backends) if args.compare_backends else None
    if (args.model_dir is None) == (args.synthetic is None):
        raise GPTQError("give a MODEL_DIR or --synthetic NAME (exactly one of them)")
    if args.layers is not None and not args.synthetic:
        raise GPTQError("--layers only applies to --synthetic models")
    if args.plot:
        report.check_plot_available()
    device_map = max_memory = None
    if args.device_map is not None:
        from ..placement import planned_main_device  # noqa: PLC0415

        if args.device is not None:
            raise GPTQError("--device and --device-map both place the models; give one of them")
        device_map = parse_bench_device_map(args.device_map)
        max_memory = parse_max_memory(args.max_memory)
        device = planned_main_device(device_map)
    elif args.max_memory:
        raise GPTQError("--max-memory caps the devices of a device map; give --device-map auto with it")
    else:
        device = resolve_device(args.device)
    batches, prompt_len, new_tokens = GENERATE_DEFAULTS["cpu" if device.type == "cpu" else "gpu"]
    cfg = benchmark.GenerateBenchConfig(
        batches=_int_list(args.batch, "--batch") if args.batch else list(batches),
        prompt_len=args.prompt_len or prompt_len, new_tokens=args.new_tokens or new_tokens,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()], device=device,
        backend=args.backend, dtype=args.dtype, seconds=args.seconds, fast_compile=not args.no_fast_compile,
        device_map=device_map, max_memory=max_memory, layer_sum=not args.no_layer_sum,
        backend_options=parse_cli_options(args.backend_option),
    )
    cfg.check()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    with ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gptq-bench-generate-")))
        models, built = _generate_models(args, device, work, log)
        if compare:
            models = _per_backend(models, compare)
        rows = benchmark.run(models, cfg, log)
    meta = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "command": " ".join(sys.argv), "batches": cfg.batches, "prompt_len": cfg.prompt_len,
            "new_tokens": cfg.new_tokens, "modes": cfg.modes, "backend": args.compare_backends or cfg.backend,
            "fast_compile": cfg.fast_compile, **built}
    if cfg.backend_options:
        meta["backend_options"] = cfg.backend_options
    if device_map is not None:
        meta.update(device_map=device_map, max_memory=max_memory)
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        if device_map is not None:
            meta["gpus"] = torch.cuda.device_count()
    print(report.table(rows, models))
    if args.json:
        report.write_json(rows, models, args.json, meta)
    if args.plot:
        name = built.get("synthetic") or Path(args.model_dir or "").name
        report.plot(rows, args.plot, f"{name} on {meta.get('gpu', device)}")
    return 1 if any(r.status == "error" for r in rows) else 0


def _register_generate(modes: argparse._SubParsersAction) -> None:
    from ..synthetic import SHAPES  # noqa: PLC0415

    g = modes.add_parser(
        "generate",
        help="tokens per second of a whole model, float against quantized, in every decode mode",
        description=(
            "Time generation end to end, side by side in one run: the float model and its GPTQ "
            "checkpoint, each with transformers' eager generate, transformers' static cache (which "
            "transformers compiles on GPUs) and gptq-core's fast path. Decode time is that of "
            "tokens 2..N (prefill excluded); greedy tokens of every mode are checked against eager's."
        ),
    )
    g.add_argument("model_dir", nargs="?", default=None,
                   help="a float model folder (a 4-bit RTN checkpoint is made beside it in a temporary "
                        "folder) or a GPTQ checkpoint (its float model is timed too if recorded)")
    g.add_argument("--synthetic", choices=list(SHAPES),
                   help="build a random-weight model of this real shape and its 4-bit checkpoint instead")
    g.add_argument("--layers", type=int, default=None, help="decoder layers of the --synthetic model (default: the real count)")
    g.add_argument("--batch", help="comma-separated batch sizes (default 1,8,32 on a GPU, 1,2 on the CPU)")
    g.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per row (default 32 on a GPU, 16 on the CPU)")
    g.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 128 on a GPU, 16 on the CPU)")
    g.add_argument("--modes", default="eager,fast,static", help="comma-separated modes: eager, fast, static (default all)")
    g.add_argument("--device", help="device to run on (default: cuda if present, else cpu)")
    g.add_argument("--device-map", metavar="MAP",
                   help="place both models across devices instead of --device (accelerate): auto, balanced, "
                        "sequential, a device, or a JSON file {module: device}; reports each device's layers "
                        "and backends, and the single-device per-layer time sum against the step")
    g.add_argument("--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
                   help="cap a device for --device-map auto, e.g. 0=20GiB (repeatable)")
    g.add_argument("--no-layer-sum", action="store_true",
                   help="with --device-map: skip timing the single-device per-layer time sum")
    g.add_argument("--backend", default="auto", help="backend name or 'a,b' preference for the quantized model")
    g.add_argument("--compare-backends", metavar="A,B",
                   help="time the quantized model once per backend, side by side (rows quantized[A], quantized[B])")
    g.add_argument("--dtype", default="auto", help="activation dtype (default: fp16 on GPUs, fp32 on the CPU)")
    add_backend_option_argument(g)  # the quantized model's load; the float model has no backends
    g.add_argument("--no-fast-compile", action="store_true",
                   help="capture the fast path's decode step without compiling it first (to measure what compiling gains)")
    g.add_argument("--seconds", type=float, default=1.0, help="time budget of each timed measurement (default 1; three repeats at least, five at most)")
    g.add_argument("--work-dir", help="where synthetic/quantized models are written and kept, and a synthetic "
                                      "pair already there is reused (default: a temporary folder)")
    g.add_argument("--json", help="write every number to this JSON file")
    g.add_argument("--plot", help="write a PNG of tokens per second (needs matplotlib)")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g.set_defaults(func=_run_generate)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark every available backend against fp16 cuBLAS and tinygemm",
        description=(
            "Benchmark every available backend side by side with fp16 torch.matmul (cuBLAS) and "
            "torch's tinygemm (4-bit), over the shapes and M values of DESIGN.md section 9. "
            "Every implementation is checked against the float64 reference before it is timed; "
            "the exit status is 1 if any check failed."
        ),
        # This parser reads every word of `bench generate ...` too: an abbreviation here would
        # make generate's --backend ambiguous (--backends, --backend-option) before it gets it.
        allow_abbrev=False,
    )
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="group size, -1 for one group")
    p.add_argument("--act-order", action="store_true", help="shuffled g_idx (desc_act)")
    p.add_argument("--asym", action="store_true", help="asymmetric zero points")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="activation dtype")
    p.add_argument("--shapes", help="KxN list, design shape names, 'all' or 'cpu' "
                                    "(default: all of DESIGN.md on a GPU, 'cpu' on a CPU)")
    p.add_argument("--m", help="comma-separated batch sizes, or 'all' (default: all on a GPU)")
    p.add_argument("--backends", help="comma-separated backend names (default: every one)")
    add_backend_option_argument(p)
    p.add_argument("--no-baselines", action="store_true", help="skip fp16 and tinygemm")
    p.add_argument("--device", help="device to run on (default: cuda if present, else cpu)")
    p.add_argument("--copies", type=int, default=0,
                   help="weight copies to rotate; 0 (the default): enough to overflow the L2 cache")
    p.add_argument("--seconds", type=float, default=0.05,
                   help="timing budget per measurement (default 0.05)")
    p.add_argument("--csv", help="write every row to this CSV file")
    p.add_argument("--json", help="write rows and metadata to this JSON file")
    p.add_argument("--plot", help="write a PNG of speed-up over fp16 against M")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run)
    _register_generate(p.add_subparsers(dest="bench_mode", metavar="generate"))
