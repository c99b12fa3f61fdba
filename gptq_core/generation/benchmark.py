"""Measuring generation end to end: float against quantized, in each decode mode, one run.

For each model (the float one and its GPTQ checkpoint), each batch size and each mode:

- ``eager``: transformers' ``generate`` with its dynamic cache;
- ``static``: ``generate(cache_implementation="static")``, which transformers compiles
  (``torch.compile``, mode reduce-overhead: CUDA graphs) on GPUs and runs uncompiled on the CPU;
- ``fast``: :class:`~gptq_core.generation.FastGenerator` (static cache, captured decode step).

Each is run once to warm up (compilation, graph capture, autotuning: reported as ``warmup_s``),
then timed generating N tokens (whose greedy tokens are compared with ``eager``'s) and 1 token,
end-of-sequence ignored. The difference is the decode time of N-1 steps, so prefill
never inflates the per-step figure (docs/DESIGN.md §9): ``ms_per_step = decode / (N-1)``,
``tok_s = batch * (N-1) / decode``.

With a ``device_map`` both models are placed across devices through accelerate (the float one
by :mod:`gptq_core.placement` as well, so both get the same map), each model's placement is
reported per device (decoder layers, weights, the backend each quantized layer is bound to),
and each batch gets a *per-layer time sum*: one decoder layer's eager decode step timed alone
on its device, times the number of layers, plus the rest of the step (embeddings, norm, head).
A decode step spread over several GPUs should cost little more than that single-device sum;
the ratio ``ms_per_step / sum`` is reported per mode (docs/DESIGN.md §9, §4); both live in
:mod:`.spread`.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import GPTQError
from ..placement import DeviceMap, input_device
from ..selector import parse_backend_options
from .fast import FastGenerator
from .spread import DevicePlacement, LayerSum, placement_of, sync, time_layer_sum

#: Decode modes in the order they run: eager first (the reference for tokens_match), the fast
#: path before transformers' compiled static cache, so a crash inside the latter's CUDA graphs
#: cannot take the fast path's figures with it.
MODES = ("eager", "fast", "static")
#: Text the prompts are cut from (real text, so prompts are real token sequences).
PROMPT_TEXT = Path(__file__).resolve().parents[1] / "data" / "text" / "tinystories-sample.txt"
#: Fewest and most timed repetitions of one measurement (the median is kept). Three at least,
#: so one scheduler hiccup in the 1-token timing cannot swallow the whole decode time.
MIN_REPEATS = 3
MAX_REPEATS = 5


@dataclass
class GenerateBenchConfig:
    batches: list[int]
    prompt_len: int
    new_tokens: int
    modes: list[str]
    device: torch.device
    backend: str = "auto"
    dtype: str = "auto"
    seconds: float = 1.0  # time budget of one timed measurement (repeats fill it)
    breakdown: bool = True  # profile one fast decode step (CUDA only)
    fast_compile: bool = True  # the fast path compiles its decode forward on GPUs (its default)
    #: Place both models across devices (accelerate): a strategy, a device or {module: device};
    #: ``device`` is then the device the map's first modules land on (the prompts go there).
    device_map: DeviceMap | None = None
    max_memory: dict[int | str, str] | None = None  # caps per device for a computed map
    layer_sum: bool = True  # with a device map: time the single-device per-layer sum
    #: Typed options of the quantized model's backends (``load_for_inference(backend_options=)``),
    #: e.g. ``{"marlin": {"dense_cache_mb": "512"}}``; parsed by :meth:`check` before any build.
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise GPTQError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
        self.modes = [m for m in MODES if m in self.modes]
        if not self.batches or min(self.batches) < 1:
            raise GPTQError(f"batch sizes must be >= 1, got {self.batches}")
        if self.new_tokens < 2:
            raise GPTQError("--new-tokens must be >= 2 (decode time is that of tokens 2..N)")
        if self.prompt_len < 1:
            raise GPTQError("--prompt-len must be >= 1")
        if self.max_memory is not None and self.device_map is None:
            raise GPTQError("--max-memory caps the devices of a device map; give --device-map auto with it")
        parse_backend_options(self.backend_options)  # a bad option fails before minutes of building

    def accounted_devices(self) -> list[torch.device]:
        """The devices whose memory and work the timings cover: ``device``, or with a device
        map on GPUs every visible GPU (the map decides which ones hold the model)."""
        if self.device_map is not None and self.device.type == "cuda":
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [self.device]


@dataclass
class ModelEntry:
    """A model to time: "float" or "quantized" (``quantized[name]`` when backends are compared),
    its folder, the backend preference that overrides the run's, and what loading it cost."""

    label: str
    folder: Path
    backend: str | None = None
    load_s: float | None = None
    weights_gb: float | None = None
    note: str = ""
    placement: list[DevicePlacement] = field(default_factory=list)  # with a device map
    layer_sums: list[LayerSum] = field(default_factory=list)  # with a device map, one per batch


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    prompt_len: int
    new_tokens: int
    status: str = "ok"  # ok, error
    note: str = ""
    tok_s: float | None = None
    ms_per_step: float | None = None
    prefill_ms: float | None = None
    warmup_s: float | None = None
    peak_gb: float | None = None
    load_s: float | None = None
    repeats: int = 0
    path: str = ""  # how the mode ran: "eager", "compiled", "cuda-graph", "transformers" ...
    compiled: bool | None = None
    tokens_match: bool | None = None  # greedy tokens equal eager's (None for eager itself)
    first_mismatch: int | None = None
    #: Eager's top-1 minus top-2 logit where the first differing row first differs: a gap of a
    #: few fp16 steps means a near-tie that other arithmetic may break the other way.
    mismatch_gap: float | None = None
    breakdown: dict[str, float] | None = field(default=None)
    layer_sum_ratio: float | None = None  # ms_per_step over the model's per-layer time sum
    peak_gb_by_device: dict[str, float] | None = None  # with a model on several GPUs

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, vocab: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[batch, length] token ids of real text (random ids when there is no tokenizer)."""
    if tokenizer is not None:
        text = PROMPT_TEXT.read_text()[: 40 * batch * length + 1000]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= batch * length and max(ids) < vocab:
            return torch.tensor(ids[: batch * length], dtype=torch.long).view(batch, length).to(device)
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def _runner(mode: str, model, batch: int, max_len: int, pad: int, log, fast_compile: bool = True
            ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if mode == "fast":
        fast = FastGenerator(model, max_batch=batch, max_len=max_len, log=log, compile=None if fast_compile else False)

        def call(ids: torch.Tensor, n: int) -> torch.Tensor:
            return fast.generate(ids, max_new_tokens=n, do_sample=False, ignore_eos=True, pad_token_id=pad)

        call.fast = fast
        return call
    extra = {"cache_implementation": "static"} if mode == "static" else {}

    def call(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, eos_token_id=None, pad_token_id=pad, **extra)

    return call


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


def measure(call, ids: torch.Tensor, new_tokens: int, device: torch.device | list[torch.device], seconds: float,
            warmup_tokens: int) -> tuple[float, float, float, int, torch.Tensor]:
    """(warm-up s, 1-token s, N-token s, repeats, output of N tokens) of ``call``; medians."""

    def timed(n: int) -> tuple[float, torch.Tensor]:
        sync(device)
        start = time.perf_counter()
        out = call(ids, n)
        sync(device)
        return time.perf_counter() - start, out

    warm, _ = timed(warmup_tokens)
    first, out = timed(new_tokens)
    repeats = max(MIN_REPEATS, min(MAX_REPEATS, int(seconds / max(first, 1e-9))))
    full = [first] + [timed(new_tokens)[0] for _ in range(repeats - 1)]
    one = [timed(1)[0] for _ in range(repeats)]
    return warm, statistics.median(one), statistics.median(full), repeats, out


def warmup_tokens(mode: str, new_tokens: int) -> int:
    """Tokens of the warm-up call: two (prefill and one decode step: compiled, captured and
    autotuned) except for transformers' static cache, whose cache length (and so its compiled
    graphs) depends on the number of new tokens."""
    return new_tokens if mode == "static" else 2


def _mismatch(out: torch.Tensor, ref: torch.Tensor, prompt_len: int) -> tuple[int, int] | None:
    """(row, generated token) of the first column where any row differs, or None when all
    agree."""
    a, b = out[:, prompt_len:].cpu(), ref[:, prompt_len:].cpu()
    n = min(a.shape[1], b.shape[1])
    differs = (a[:, :n] != b[:, :n]).any(dim=0).nonzero()
    if differs.numel():
        col = int(differs[0])
        return int((a[:, col] != b[:, col]).nonzero()[0]), col
    return None if a.shape[1] == b.shape[1] else (0, n)


@torch.no_grad()
def logit_gap(model, ref: torch.Tensor, row: int, upto: int) -> float:
    """Eager's top-1 minus top-2 logit for the token after ``ref[row, :upto]`` (one forward of
    that row's prefix, as eager generate computed it)."""
    logits = model(ref[row:row + 1, :upto]).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def load_model(entry: ModelEntry, cfg: GenerateBenchConfig) -> tuple[nn.Module, object]:
    """(model, tokenizer) of ``entry`` on ``cfg.device``, or placed by ``cfg.device_map``:
    a GPTQ checkpoint through ``load_for_inference``, a float model loaded on the CPU and then
    placed by :mod:`gptq_core.placement` (the same map computation and dispatch as the
    quantized model, so the two are spread alike)."""
    from ..auto import is_quantized_checkpoint, load_float_model, load_for_inference, load_tokenizer
    from ..checkpoint.load import resolve_dtype
    from ..placement import dispatch, planned_main_device, resolve_device_map

    backend = entry.backend or cfg.backend
    if cfg.device_map is None:  # load_for_inference reads backend_options for a GPTQ checkpoint only
        return load_for_inference(entry.folder, cfg.device, backend, cfg.dtype,
                                  backend_options=cfg.backend_options)
    if is_quantized_checkpoint(entry.folder):
        return load_for_inference(entry.folder, None, backend, cfg.dtype, device_map=cfg.device_map,
                                  max_memory=cfg.max_memory, backend_options=cfg.backend_options)
    dtype = resolve_dtype(cfg.dtype, planned_main_device(cfg.device_map))
    model = load_float_model(entry.folder, dtype).eval()
    placed = resolve_device_map(model, cfg.device_map, cfg.max_memory)
    dispatch(model, placed)  # no offload folder: a map that needs "disk" is refused in one line
    model.hf_device_map = dict(placed)
    return model, load_tokenizer(entry.folder)


def _memory(devices: list[torch.device], what) -> dict[str, float]:
    return {str(d): what(d) / 2**30 for d in devices if d.type == "cuda"}


def bench_model(entry: ModelEntry, cfg: GenerateBenchConfig, log: Callable[[str], None]) -> list[Row]:
    """Every batch x mode row of one model (loaded once)."""
    devices = cfg.accounted_devices()
    sync(devices)
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
        before = _memory(devices, torch.cuda.memory_allocated)
    start = time.perf_counter()
    model, tokenizer = load_model(entry, cfg)
    sync(devices)
    entry.load_s = time.perf_counter() - start
    if cfg.device.type == "cuda":
        after = _memory(devices, torch.cuda.memory_allocated)
        entry.weights_gb = sum(after[d] - before[d] for d in after)
    log(f"{entry.label}: loaded {entry.folder} in {entry.load_s:.1f} s")
    if cfg.device_map is not None:
        entry.placement = placement_of(model)
        for place in entry.placement:
            log(f"{entry.label} on {place.device}: {len(place.layers)} decoder layers"
                + (f", linears served by {place.backends}" if place.backends else ""))
    dev = input_device(model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    prompts = prompt_ids(tokenizer, vocab, max(cfg.batches), cfg.prompt_len, dev)
    rows: list[Row] = []
    compiled = [False]  # whether transformers compiled this model's decode (later batch sizes may reuse it)
    try:
        for batch in cfg.batches:
            ids = prompts[:batch].contiguous()
            reference = None
            layer_sum = None
            if cfg.device_map is not None and cfg.layer_sum:
                try:
                    layer_sum = time_layer_sum(model, ids, cfg.new_tokens - 1, devices, MIN_REPEATS)
                    entry.layer_sums.append(layer_sum)
                    log(f"{entry.label} batch {batch}: per-layer time sum {layer_sum.layers} x "
                        f"{layer_sum.layer_ms:.3f} ms + head {layer_sum.head_ms:.3f} ms = {layer_sum.total_ms:.2f} ms")
                except Exception as exc:  # noqa: BLE001 - the reference is a bonus, never a failure
                    log(f"{entry.label} batch {batch}: no per-layer time sum ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})")
            for mode in cfg.modes:
                row = Row(entry.label, mode, batch, cfg.prompt_len, cfg.new_tokens, load_s=entry.load_s)
                rows.append(row)
                graphs = _compiled_graphs()
                try:
                    call = _runner(mode, model, batch, cfg.prompt_len + cfg.new_tokens, int(pad), log, cfg.fast_compile)
                    if dev.type == "cuda":
                        for d in devices:
                            torch.cuda.reset_peak_memory_stats(d)
                    warm, one, full, repeats, out = measure(call, ids, cfg.new_tokens, devices, cfg.seconds,
                                                            warmup_tokens(mode, cfg.new_tokens))
                except Exception as exc:  # noqa: BLE001 - one failing mode must not stop the others
                    row.status, row.note = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    log(f"{entry.label} {mode} batch {batch}: ERROR {row.note}")
                    continue
                steps = cfg.new_tokens - 1
                decode = full - one
                row.warmup_s, row.prefill_ms, row.repeats = warm, one * 1e3, repeats
                if decode > 0:
                    row.ms_per_step = decode / steps * 1e3
                    row.tok_s = batch * steps / decode
                else:
                    row.note = "decode time below timing noise; raise --new-tokens"
                if dev.type == "cuda":
                    peaks = _memory(devices, torch.cuda.max_memory_allocated)
                    row.peak_gb = sum(peaks.values())
                    if len(devices) > 1:
                        row.peak_gb_by_device = peaks
                row.path = _path(mode, call, model, dev, _compiled_graphs() - graphs, row, compiled)
                if mode == "fast" and call.fast.fallback_reason is not None:
                    row.note = _join(row.note, f"fast path fell back to transformers' generate: {call.fast.fallback_reason}")
                if layer_sum is not None:
                    row.layer_sum_ratio = layer_sum.ratio(row.ms_per_step)
                if mode == "eager":
                    reference = out
                elif reference is not None:
                    where = _mismatch(out, reference, cfg.prompt_len)
                    row.tokens_match = where is None
                    if where is not None:
                        at_row, row.first_mismatch = where
                        row.mismatch_gap = logit_gap(model, reference, at_row, cfg.prompt_len + row.first_mismatch)
                        log(f"MISMATCH: {entry.label} {mode} batch {batch}: greedy tokens differ from "
                            f"eager's from generated token {row.first_mismatch} (row {at_row}; eager's "
                            f"top-1/top-2 logit gap there {row.mismatch_gap:.4f})")
                if mode == "fast" and cfg.breakdown and dev.type == "cuda" and call.fast.fallback_reason is None:
                    try:
                        row.breakdown = call.fast.step_breakdown(ids)
                    except Exception as exc:  # noqa: BLE001 - a profile is a bonus, never a failure
                        log(f"{entry.label} fast batch {batch}: no step breakdown ({type(exc).__name__}: {exc})")
                log(f"{entry.label} {mode} batch {batch}: "
                    + (f"{row.tok_s:.1f} tok/s, {row.ms_per_step:.2f} ms/step" if row.tok_s else row.note)
                    + f", warm-up {warm:.1f} s")
                del call
    finally:
        del model
        gc.collect()
        if dev.type == "cuda":
            torch._dynamo.reset()  # compiled code of this model must not count against the next
            torch.cuda.empty_cache()
    return rows


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _path(mode: str, call, model, dev: torch.device, new_graphs: int, row: Row, compiled: list[bool]) -> str:
    """How the mode ran; for ``static``, whether transformers really compiled (new dynamo
    graphs now, or earlier for this model and reused)."""
    if mode == "fast":
        return call.fast.last_path or ""
    if mode == "eager":
        return "eager"
    compiled[0] = compiled[0] or new_graphs > 0
    row.compiled = getattr(model, "_compiled_call", None) is not None and compiled[0]
    if row.compiled:
        return f"compiled ({new_graphs} new graphs)"
    if dev.type == "cuda":
        row.note = _join(row.note, "transformers did not compile the static-cache decode")
    return "static, not compiled" + (" (CPU)" if dev.type == "cpu" else "")


def run(models: list[ModelEntry], cfg: GenerateBenchConfig, log: Callable[[str], None]) -> list[Row]:
    cfg.check()
    rows: list[Row] = []
    for entry in models:
        rows += bench_model(entry, cfg, log)
    return rows
