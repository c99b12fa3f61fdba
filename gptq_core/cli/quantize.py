"""``gptq quantize MODEL_DIR OUTPUT_DIR``: GPTQ-quantize a float model and save the checkpoint.

Progress is kept in a work folder (default: ``.OUTPUT_DIR.gptq-work`` beside the output), so
running the same command again after a crash or Ctrl-C continues from the last finished
layer; the folder is removed once the checkpoint is written.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from ..checkpoint.files import check_apart, check_target, check_writable
from ..config import QuantizeConfig
from ..quantize.streaming import peak_host_memory_bytes
from ..quantize.workdir import check_work_dir
from ..errors import GPTQError
from .generate import Rule, check_arguments, check_device_argument, model_max_positions

#: The quantizer's defaults, shown in the flags' help and used when a flag is not given.
DEFAULTS = QuantizeConfig()

#: --seqlen when none is given: the usual GPTQ calibration length, or the model's own if shorter.
DEFAULT_SEQLEN = 2048

#: Range rules of ``gptq quantize``'s calibration flags.
QUANTIZE_RULES: tuple[Rule, ...] = (
    ("--nsamples", lambda v: v >= 1, "at least 1 calibration sample (128 is usual)"),
    ("--seqlen", lambda v: v >= 1, "at least 1 token per sample (2048 is usual)"),
    ("--calibration-batch-size", lambda v: v >= 1, "at least 1 sample per forward pass (8 is the default)"),
)


def default_work_dir(output_dir: str | Path) -> Path:
    """Where an interrupted run of this output keeps its progress."""
    out = Path(output_dir).absolute()
    return out.with_name(f".{out.name}.gptq-work")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """The GPTQ settings, shared with ``gptq demo``."""
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="bits per weight (default 4)")
    parser.add_argument("--group-size", type=int, default=128, help="input channels per scale; -1 for one group (default 128)")
    parser.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing Hessian diagonal")
    parser.add_argument("--asym", action="store_true", help="asymmetric quantization (a zero point per group)")
    parser.add_argument("--damp", type=float, default=0.01, help="damping, fraction of the mean Hessian diagonal (default 0.01)")
    parser.add_argument("--static-groups", action="store_true", help="fix every group's grid before act-order")
    parser.add_argument("--mse", type=float, default=DEFAULTS.mse,
                        help=f"MSE scale search norm, e.g. 2.4; 0: min-max (default {DEFAULTS.mse:g})")
    parser.add_argument("--act-group-aware", action="store_true",
                        help="group-aware act-order: whole groups by importance, g_idx stays monotone")
    parser.add_argument("--float-target", type=float, default=DEFAULTS.float_target,
                        help="0-1: pull each layer toward the float model's outputs (GPTAQ-style "
                             f"asymmetric calibration); 0: off (default {DEFAULTS.float_target:g})")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    parser.add_argument("--seqlen", type=int, default=None,
                        help=f"tokens per calibration sample (default {DEFAULT_SEQLEN}, or the model's maximum if shorter)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing calibration samples (default 0)")
    parser.add_argument("--calibration-batch-size", type=int, default=None,
                        help="calibration samples per forward pass (default 8; lower it to save memory)")
    parser.add_argument("--device", default=None, help="device to quantize on: cpu, cuda, cuda:1 (default: cuda if present)")


def check_quantize_arguments(args: argparse.Namespace) -> None:
    """The calibration flags checked before hours of work; fills in the default --seqlen.

    A --seqlen beyond the model's positions is refused, not clamped: the user asked for a
    length the model cannot attend over, and silently changing it would change the result.
    """
    check_arguments(args, QUANTIZE_RULES)
    check_device_argument(args.device)
    devices = getattr(args, "devices", None)
    if devices is not None:  # a bad list fails now, not at the first layer
        from ..device import default_device
        from ..quantize.parallel import resolve_devices

        try:
            resolve_devices(devices, args.device, default_device())
        except GPTQError as exc:
            raise GPTQError(f"--devices {devices!r}: {exc}") from None
    longest = model_max_positions(args.model_dir)
    if args.seqlen is None:
        args.seqlen = min(DEFAULT_SEQLEN, longest or DEFAULT_SEQLEN)
    elif longest is not None and args.seqlen > longest:
        raise GPTQError(
            f"--seqlen {args.seqlen} is longer than the model's {longest} positions "
            f"(config.json); use --seqlen {longest} or less"
        )


def quantize_config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    return QuantizeConfig(
        bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=not args.asym,
        damp_percent=args.damp, static_groups=args.static_groups, mse=args.mse,
        act_group_aware=args.act_group_aware, float_target=args.float_target,
        checkpoint_format=getattr(args, "format", "gptq"),
    )


def _run(args: argparse.Namespace) -> int:
    from ..auto import AutoGPTQForCausalLM

    check_quantize_arguments(args)  # before anything is checked on disk or written
    out = Path(args.output_dir)
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(out)
    check_apart(out, model_dir=args.model_dir, work_dir=work_dir)  # before anything is written
    check_apart(work_dir, what="work folder", model_dir=args.model_dir)
    check_work_dir(work_dir)
    check_target(out.absolute(), args.overwrite)  # fail before hours of work, not after
    config = quantize_config_from_args(args)
    start = time.perf_counter()
    model = AutoGPTQForCausalLM.from_pretrained(args.model_dir, config, torch_dtype=args.dtype,
                                                stream_weights=args.stream_weights)
    model.quantize(
        args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        device=args.device, work_dir=work_dir, progress=not args.no_progress,
        batch_size=args.calibration_batch_size,
        devices=args.devices,
    )
    model.save_quantized(out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    if not args.keep_work_dir and not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    peak = peak_host_memory_bytes()
    print(
        f"quantized {len(model.packed)} linear layers to {config.bits}-bit g{config.group_size} "
        f"({'sym' if config.sym else 'asym'}{', act-order' if config.desc_act else ''}, "
        f"{config.checkpoint_format}) in {seconds:.1f} s"
        f"{f', peak host memory {peak / 2**30:.2f} GiB' if peak is not None else ''} -> {out}"
    )
    return 0


def _run_locked(args: argparse.Namespace) -> int:
    """:func:`_run` holding the locks of the output and work folders, so a second run to
    either stops at once naming this one (:mod:`gptq_core.checkpoint.locks`)."""
    from ..checkpoint.locks import hold_locks

    out = Path(args.output_dir)
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(out)
    check_writable(out)  # a read-only or full file system fails now, not after the work
    check_writable(work_dir, "work folder")
    with hold_locks({"output folder": out, "work folder": work_dir}):
        return _run(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by ``timeout``, Docker, SLURM) raised like Ctrl-C, so the same cleanup runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _run_until_terminated(args: argparse.Namespace) -> int:
    """:func:`_run` with SIGTERM handled as SIGINT: the temporary checkpoint folder is removed,
    finished layers stay in the work folder, and the exit status is 143."""
    if threading.current_thread() is not threading.main_thread():
        return _run_locked(args)  # signal handlers can only be set from the main thread
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run_locked(args)
    except Terminated:
        print("gptq quantize: terminated (SIGTERM); no checkpoint was written, finished layers "
              "are kept: rerun the same command to resume", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quantize", help="GPTQ-quantize a float model folder and save the checkpoint",
        description="GPTQ-quantize MODEL_DIR (a transformers causal LM folder) on calibration "
        "text and write a GPTQ checkpoint to OUTPUT_DIR. Rerun the same command to resume.",
    )
    parser.add_argument("model_dir", help="float model folder (config.json + safetensors)")
    parser.add_argument("output_dir", help="folder to write the GPTQ checkpoint to")
    parser.add_argument("--calibration", required=True, help="calibration text: .txt, .jsonl or .json file")
    add_quantize_arguments(parser)
    parser.add_argument("--format", choices=("gptq", "gptq_v2"), default="gptq", help="checkpoint format: gptq (v1, default) or gptq_v2")
    parser.add_argument("--dtype", default="auto", help="dtype to load the float model in (default: the checkpoint's)")
    parser.add_argument("--stream-weights", action="store_true",
                        help="read each decoder layer's float weights from the safetensors shards when it is "
                             "quantized, never the whole model in memory (same checkpoint bytes)")
    parser.add_argument("--devices", default=None,
                        help="spread the work over identical devices, e.g. cuda:0,cuda:1: calibration batches and "
                             "each group's linears run on all at once, to the same checkpoint bytes as on the first alone")
    parser.add_argument("--work-dir", default=None, help="folder for resumable progress (kept when given)")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the default work folder after success")
    parser.add_argument("--max-shard-size", default="4GB", help="split weights into files of at most this size (default 4GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run_until_terminated)
