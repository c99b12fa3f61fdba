"""The sequential GPTQ driver: quantize a model's decoder layers one after another.

1. Capture the inputs of the first decoder layer (and every layer's call arguments) on the
   calibration batches, without running any decoder layer (:mod:`.capture`).
2. For each decoder layer: move only that layer to ``device`` (the rest of the model stays
   where it is, normally the CPU, so a model larger than the GPU quantizes on one GPU); for
   each true-sequential group of linears (e.g. q/k/v, then o, then gate/up, then down; all
   linears at once when ``config.true_sequential`` is False) run the layer on every batch
   while hooks accumulate each linear's Hessian, quantize the group with GPTQ and put the
   dequantized weights into the layer, so later groups see quantized inputs; then run the
   quantized layer once more to produce the next layer's inputs.
3. Where a layer's float weights are between its turns is the ``layer_source``'s business:
   by default they stay in memory and the layer is moved to ``device`` and back home
   (:func:`resident_layer`); :mod:`.streaming` reads each layer from the safetensors shards
   instead, so the whole float model never needs to fit in host memory.
4. With a ``work_dir``, every finished layer is committed atomically (:mod:`.workdir`) and a
   rerun with the same folder and settings resumes after the last finished layer.
5. With several ``devices`` the batches of every pass are split over them (each holds a
   replica of the layer and its share of the hidden states) and a group's linears are
   quantized on them at once; Hessians are folded over fixed chunks of samples, so the bytes
   do not depend on the device count (:mod:`.parallel`).

With ``config.float_target`` the float model's hidden states travel alongside: before its
first group, each layer (still float) runs once on them; the inputs its linears see there are
each Hessian's float reference (:class:`.gptq.GPTQ`), and its outputs are the next layer's
float hidden states. A linear whose calls differ between the two passes (an MoE expert the
router fed other tokens) gets plain GPTQ.

Speed (DESIGN.md §6): calibration samples go through each layer ``batch_size`` at a time
(default :data:`DEFAULT_BATCH_SIZE`), linears that read the same input tensor (q/k/v,
gate/up) share one Hessian (one ``X^T X`` per batch), and a child of the layer whose linears
are all quantized (the attention, once o_proj is done) is computed once per batch and reused
by the later passes (:mod:`.reuse`). Sharing and reuse are bit-exact; batching only reorders
floating-point sums (bound pinned in tests/test_driver.py, figures in NOTES/quantizer.md).

The driver knows no model types: it gets the decoder-layer ``ModuleList`` and the groups of
linear names (relative to a layer) from the architecture table. A linear that no calibration
token reaches (an MoE expert nobody was routed to) is round-to-nearest quantized and the log
says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantizeConfig
from ..device import default_device
from ..errors import GPTQError
from ..eval import module_device
from ..format import PackedWeight
from ..modules import is_conv1d, is_linear_like
from .capture import LayerCall, capture_inputs, make_batches
from .gptq import GPTQ, LinearStats, quantize_linear
from .parallel import (
    DEFAULT_CHUNK_SAMPLES,
    ChunkedHessian,
    ShardPlan,
    assign_linears,
    combine,
    plan_shards,
    replicate,
    resolve_devices,
    run_on_devices,
)
from .reuse import FinishedOutputs
from .streaming import peak_host_memory_bytes
from .workdir import WorkDir, samples_digest, tensor_digest

logger = logging.getLogger("gptq_core.quantize")

#: Calibration samples per layer forward. Batching 8 x 256-token samples makes quantizing
#: stories260K on the CPU ~9x faster than one sample at a time (NOTES/quantizer.md); larger
#: batches gain nothing there and only cost activation memory.
DEFAULT_BATCH_SIZE = 8

Groups = Callable[[int, nn.Module], Sequence[Sequence[str]]] | Sequence[Sequence[str]]

#: ``(layer index, layer, device) -> context``: inside the context the layer's float weights
#: are on ``device``; leaving it puts them wherever the source keeps layers between turns.
LayerSource = Callable[[int, nn.Module, torch.device], AbstractContextManager[Any]]


@contextmanager
def resident_layer(index: int, layer: nn.Module, device: torch.device) -> Iterator[None]:
    """The default :data:`LayerSource`: the layer lives in memory, moved to ``device`` and back home."""
    home = module_device(layer)
    layer.to(device)
    try:
        yield
    finally:
        layer.to(home)


class QuantizeResult(dict):
    """``{full module name: PackedWeight}`` plus ``records``: one log dict per quantized linear."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []


class _StopLayer(Exception):
    """Raised by a pre-hook once every linear of the current group has its input for the batch."""


# ---------------------------------------------------------------------------- linears
def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or Conv1D as [out_features, in_features]."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_quantized(module: nn.Module, packed: PackedWeight) -> None:
    """Replace the module's weight (and bias) by what the packed layer dequantizes to."""
    w = module.weight
    # dequantized where the module lives: the packed layer is small, its float32 [K, N] is not
    deq = packed.to(w.device).dequantize(torch.float32)  # [K, N]
    deq = deq if is_conv1d(module) else deq.t()
    with torch.no_grad():
        w.copy_(deq.to(w.dtype))
        if packed.bias is not None and module.bias is not None:
            module.bias.copy_(packed.bias.to(device=w.device, dtype=module.bias.dtype))


def _resolve(layer: nn.Module, index: int, names: Sequence[str]) -> dict[str, nn.Module]:
    out = {}
    for name in names:
        try:
            module = layer.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not is_linear_like(module):
            found = [n for n, m in layer.named_modules() if is_linear_like(m)]
            what = "does not exist" if module is None else f"is a {type(module).__name__}, not a linear"
            raise GPTQError(
                f"decoder layer {index}: '{name}' {what}; the layer's linears are {found}. "
                "Fix the architecture's sequential groups"
            )
        out[name] = module
    return out


def _layer_groups(index: int, layer: nn.Module, groups: Groups, config: QuantizeConfig) -> list[list[str]]:
    raw = groups(index, layer) if callable(groups) else groups
    result = [list(g) for g in raw if len(g)]
    if not result:
        raise GPTQError(f"decoder layer {index} has no linears to quantize (empty groups)")
    flat = [n for g in result for n in g]
    if len(set(flat)) != len(flat):
        raise GPTQError(f"decoder layer {index}: a linear is listed twice in the groups {result}")
    return result if config.true_sequential else [flat]


# ---------------------------------------------------------------------------- helpers
def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise GPTQError(
        "the given layers are not part of the model; pass the model's decoder-layer ModuleList "
        "(e.g. model.model.layers)"
    )


@contextmanager
def _quantization_mode(model: nn.Module) -> Iterator[None]:
    """eval() (no dropout: results must be deterministic) and no KV cache, restored after."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    training = model.training
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(training)
        if use_cache is not None:
            config.use_cache = use_cache


def _fingerprint(
    config: QuantizeConfig, batches: list, layers: nn.ModuleList, groups: list[list[list[str]]],
    layer_source: LayerSource, chunk_samples: int,
) -> dict[str, Any]:
    cfg = config.to_dict()
    cfg["meta"] = {k: v for k, v in cfg["meta"].items() if k != "quantizer"}
    with layer_source(0, layers[0], torch.device("cpu")):
        first_layer = tensor_digest(layers[0])
    return {
        "config": cfg,
        "samples": samples_digest(batches),
        "batches": [list(b["input_ids"].shape) for b in batches],
        "layers": len(layers),
        "layer_class": type(layers[0]).__name__,
        "groups": groups,
        "first_layer": first_layer,
        "chunk_samples": chunk_samples,  # fixes the Hessians' summation order; the devices do not
    }


# ---------------------------------------------------------------------------- the driver
def quantize_model(
    model: nn.Module,
    samples: Any,
    config: QuantizeConfig,
    layers: nn.ModuleList,
    groups: Groups,
    device: torch.device | str | None = None,
    work_dir: str | None = None,
    progress: bool = True,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resume: bool = True,
    layer_source: LayerSource = resident_layer,
    devices: Sequence[torch.device | str] | str | None = None,
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
) -> QuantizeResult:
    """Quantize every listed linear of every decoder layer of ``model`` with GPTQ.

    ``samples``: calibration token ids ([n, seqlen] tensor from :func:`prepare_calibration`, or
    a list of tensors / dicts with ``input_ids`` and ``attention_mask``). ``groups``: the
    true-sequential groups of linear names relative to a layer, or a function
    ``(layer_index, layer) -> groups``. ``device``: where each layer is quantized (default
    CUDA when available). ``work_dir``: folder for the resumable state and the per-module log
    ``quantize_log.jsonl``. The model is modified in place (its quantized linears hold the
    dequantized weights). Returns ``{full module name: PackedWeight}`` (CPU tensors) with the
    log records in ``.records``. ``batch_size``: consecutive equal-length samples run through
    each layer together (padding tokens of a given ``attention_mask`` never enter a Hessian);
    batching changes only the order of floating-point sums (tolerance pinned in
    tests/test_driver.py, figures in NOTES/quantizer.md). ``layer_source`` brings each layer's
    float weights onto the device for its turn (:data:`LayerSource`; default
    :func:`resident_layer`, :mod:`.streaming` reads them from disk); results do not depend on it.

    ``devices`` (e.g. ``["cuda:0", "cuda:1"]`` or ``"cuda:0,cuda:1"``, identical devices of one
    kind): the calibration batches and the linears of each group are spread over them
    (:mod:`.parallel`), to the same bytes as on ``devices[0]`` alone. ``chunk_samples``: the
    calibration samples per Hessian chunk, which fixes the summation order whatever the device
    count (a different value changes the last bits; one chunk is the plain running mean).
    A work folder resumes with any device list.
    """
    if not isinstance(config, QuantizeConfig):
        raise GPTQError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise GPTQError("layers must be the model's non-empty decoder-layer nn.ModuleList")
    devs = resolve_devices(devices, device, default_device())
    device = devs[0]
    prefix = _prefix_of(model, layers)
    batches = make_batches(samples, batch_size)
    plan = plan_shards([int(b["input_ids"].shape[0]) for b in batches], chunk_samples, devs)
    all_groups = [_layer_groups(i, layer, groups, config) for i, layer in enumerate(layers)]
    for i, layer in enumerate(layers):
        _resolve(layer, i, [n for g in all_groups[i] for n in g])
    state = None
    if work_dir is not None:
        fingerprint = _fingerprint(config, batches, layers, all_groups, layer_source, chunk_samples)
        state = WorkDir(work_dir, fingerprint, resume=resume)
    done = state.done if state else 0
    if done > len(layers):
        raise GPTQError(f"work_dir '{work_dir}' reports {done} finished layers, the model has {len(layers)}")

    result = QuantizeResult()
    if state:
        result.records = state.trim_log(done)
    with _quantization_mode(model), torch.no_grad():
        captured = capture_inputs(model, layers, batches)
        tracks = 2 if config.float_target > 0 else 1  # quantized (and float) hidden states
        if done == 0:
            hidden = captured.hidden * tracks
        else:
            hidden = state.load_hidden(done - 1, tracks * len(batches))
        # every batch's tensors live on the device that works on it, from layer to layer
        memo: dict[str, dict[int, Any]] = {}
        hidden = [h.to(plan.device_of_batch(j % len(batches))) for j, h in enumerate(hidden)]
        calls = [[c.to(plan.device_of_batch(b), memo.setdefault(str(plan.device_of_batch(b)), {}))
                  for b, c in enumerate(per_layer)] for per_layer in captured.calls]
        masks = [None if m is None else m.to(plan.device_of_batch(b)) for b, m in enumerate(captured.masks)]
        bar = tqdm(total=len(layers), desc="GPTQ", unit="layer", disable=not progress, initial=done)
        for d in set(devs):
            if d.type == "cuda":
                torch.cuda.reset_peak_memory_stats(d)
        start = time.perf_counter()
        try:
            for i, layer in enumerate(layers):
                full = f"{prefix}.{i}" if prefix else str(i)
                if i < done:
                    with layer_source(i, layer, torch.device("cpu")):
                        for name, packed in state.load_layer(i).items():
                            set_quantized(layer.get_submodule(name), packed)
                            result[f"{full}.{name}"] = packed
                    continue
                packed_layer, hidden = _quantize_layer(
                    i, full, layer, all_groups[i], hidden[: len(batches)], hidden[len(batches) :],
                    calls[i], masks, config, plan, state, result, bar, layer_source,
                )
                result.update({f"{full}.{n}": p for n, p in packed_layer.items()})
                if state:
                    state.commit(i, packed_layer, hidden)
                bar.update(1)
            if state:
                state.flush()  # the last layer is on disk (or its write error raised) before returning
        finally:
            bar.close()
            if state:
                # a crash in layer i+1 still leaves layer i recorded; a write error is logged, not
                # raised, so the exception already under way is the one reported
                state.flush(raise_error=False)
    logger.info("quantized %d decoder layers in %.1f s%s; devices %s", len(layers) - done,
                time.perf_counter() - start, _peak_memory(devs), ", ".join(str(d) for d in devs))
    return result


def _peak_memory(devices: Sequence[torch.device]) -> str:
    """'; peak GPU memory X GiB' per CUDA device and '; peak host memory Y GiB' (the process's
    peak RSS): what sizes the GPUs and the host a model needs."""
    text = ""
    for d in dict.fromkeys(devices):
        if d.type == "cuda":
            text += f"; peak GPU memory {torch.cuda.max_memory_allocated(d) / 2**30:.2f} GiB ({d})"
    host = peak_host_memory_bytes()
    if host is not None:
        text += f"; peak host memory {host / 2**30:.2f} GiB"
    return text


def _quantize_layer(
    index: int,
    full: str,
    layer: nn.Module,
    groups: list[list[str]],
    hidden: list[torch.Tensor],
    float_hidden: list[torch.Tensor],
    calls: list[LayerCall],
    masks: list[torch.Tensor | None],
    config: QuantizeConfig,
    plan: ShardPlan,
    state: WorkDir | None,
    result: QuantizeResult,
    bar: tqdm,
    layer_source: LayerSource = resident_layer,
) -> tuple[dict[str, PackedWeight], list[torch.Tensor]]:
    """GPTQ of one decoder layer, group by group, its float weights on the primary device from
    ``layer_source`` (before the float pass: it runs the still-float layer) and a replica on
    every other device that holds batches (:mod:`.parallel`); returns its packed linears and
    its outputs (followed by its float outputs when ``float_hidden`` is given: the float
    target), each on the device of its batch."""
    packed: dict[str, PackedWeight] = {}
    names = [n for g in groups for n in g]
    busy = plan.busy
    shares = {slot: plan.batches_on(slot) for slot in busy}
    with layer_source(index, layer, plan.devices[0]):
        replicas = {slot: layer if slot == 0 else replicate(layer, plan.devices[slot]) for slot in busy}
        memos = {slot: FinishedOutputs(replica, names) for slot, replica in replicas.items()}
        references: list[dict[tuple[str, int], torch.Tensor]] | None = None
        float_outputs: list[torch.Tensor] = []
        if float_hidden:
            def float_job(slot: int) -> tuple[list, list[torch.Tensor]]:
                replica, mine = replicas[slot], shares[slot]
                return _float_pass(replica, _resolve(replica, index, names), [float_hidden[b] for b in mine],
                                   [calls[b] for b in mine])

            references, float_outputs = [{} for _ in hidden], list(float_hidden)
            runs = run_on_devices([(plan.devices[s], partial(float_job, s)) for s in busy])
            for slot, (refs, outs) in zip(busy, runs):
                for b, ref, out in zip(shares[slot], refs, outs):
                    references[b], float_outputs[b] = ref, out
        with ExitStack() as installed:
            for slot in busy:
                installed.enter_context(memos[slot].installed())
            for group in groups:
                modules = _resolve(layer, index, group)
                accs = _collect_hessians(layer, modules, hidden, calls, masks, plan.devices[0], memo=memos[0],
                                         references=references, plan=plan, replicas=replicas, memos=memos)
                if references is not None:
                    for refs in references:  # this group's float inputs are not needed again
                        for key in [k for k in refs if k[0] in modules]:
                            del refs[key]
                for name, (pw, stats) in _quantize_group(modules, accs, config, plan.devices).items():
                    for slot, replica in replicas.items():
                        set_quantized(replica.get_submodule(name), pw)
                        memos[slot].finish(name)
                    packed[name] = pw
                    record = {"layer": index, "module": name, "name": f"{full}.{name}", **stats.to_dict()}
                    result.records.append(record)
                    if state:
                        state.append_log(record)
                    if stats.warning:
                        logger.warning("%s.%s: %s", full, name, stats.warning)
                    bar.set_postfix_str(f"layer {index} {name} err={stats.error:.4g} {stats.seconds:.2f}s")

            def output_job(slot: int) -> list[torch.Tensor]:
                replica, memo, outs = replicas[slot], memos[slot], []
                for number in shares[slot]:
                    memo.begin(number)
                    outs.append(calls[number](replica, hidden[number]))
                return outs

            outputs: list[torch.Tensor] = list(hidden)
            for slot, outs in zip(busy, run_on_devices([(plan.devices[s], partial(output_job, s)) for s in busy])):
                for number, out in zip(shares[slot], outs):
                    outputs[number] = out
    return packed, outputs + float_outputs


def _quantize_group(
    modules: dict[str, nn.Module], accs: dict[str, GPTQ], config: QuantizeConfig, devices: Sequence[torch.device]
) -> dict[str, tuple[PackedWeight, LinearStats]]:
    """GPTQ of a group's linears, spread over the devices (:func:`.parallel.assign_linears`);
    the results in the group's order. Each linear is computed whole on one device, so which
    (identical) device it is changes no byte."""
    slots = assign_linears({n: tuple(linear_weight(m).shape) for n, m in modules.items()}, len(devices))
    per_slot: dict[int, list[str]] = {}
    for name in modules:
        per_slot.setdefault(slots[name], []).append(name)

    def job(slot: int) -> list[tuple[str, tuple[PackedWeight, LinearStats]]]:
        return [(name, quantize_linear(linear_weight(modules[name]), accs[name], config, modules[name].bias,
                                       device=devices[slot])) for name in per_slot[slot]]

    done = dict(pair for out in run_on_devices([(devices[s], partial(job, s)) for s in per_slot]) for pair in out)
    return {name: done[name] for name in modules}


def _float_pass(
    layer: nn.Module, modules: dict[str, nn.Module], float_hidden: list[torch.Tensor], calls: list[LayerCall]
) -> tuple[list[dict[tuple[str, int], torch.Tensor]], list[torch.Tensor]]:
    """Run the still-float layer on the float hidden states: per batch ``{(linear, call
    number): its input}`` and the layer's outputs. Linears reading one tensor share it (no
    copy), so this holds about one layer's activations per batch."""
    references: list[dict[tuple[str, int], torch.Tensor]] = []
    current: dict[tuple[str, int], torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs):
            count = sum(1 for k in current if k[0] == name)
            current[(name, count)] = inputs[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    outputs = []
    try:
        for call, h in zip(calls, float_hidden):
            current = {}
            outputs.append(call(layer, h))
            references.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return references, outputs


def _collect_hessians(
    layer: nn.Module,
    modules: dict[str, nn.Module],
    hidden: list[torch.Tensor],
    calls: list[LayerCall],
    masks: list[torch.Tensor | None],
    device: torch.device,
    share: bool = True,
    memo: FinishedOutputs | None = None,
    references: list[dict[tuple[str, int], torch.Tensor]] | None = None,
    *,
    plan: ShardPlan | None = None,
    replicas: dict[int, nn.Module] | None = None,
    memos: dict[int, FinishedOutputs] | None = None,
) -> dict[str, GPTQ]:
    """Every linear's Hessian from running the layer on every batch (:func:`_collect_partials`
    on each device of ``plan`` at once, its replica on its batches), merged on ``device`` in
    chunk order (:func:`.parallel.combine`). Without a ``plan``: ``layer`` alone on ``device``
    with the default chunks. Linears that shared one accumulator share the result."""
    if plan is None:
        plan = plan_shards([int(h.shape[0]) for h in hidden], DEFAULT_CHUNK_SAMPLES, [device])
    replicas = replicas or {0: layer}
    memos = memos or {0: memo}
    busy = plan.busy

    def job(slot: int) -> dict[str, ChunkedHessian]:
        replica = replicas[slot]
        mine = {name: replica.get_submodule(name) for name in modules} if replica is not layer else modules
        return _collect_partials(replica, mine, plan.batches_on(slot), plan, hidden, calls, masks,
                                 slot == 0, share, memos.get(slot), references)

    partials = run_on_devices([(plan.devices[s], partial(job, s)) for s in busy])
    return combine(partials, {n: linear_weight(m).shape[1] for n, m in modules.items()}, device)


def _collect_partials(
    layer: nn.Module,
    modules: dict[str, nn.Module],
    numbers: list[int],
    plan: ShardPlan,
    hidden: list[torch.Tensor],
    calls: list[LayerCall],
    masks: list[torch.Tensor | None],
    fold: bool,
    share: bool = True,
    memo: FinishedOutputs | None = None,
    references: list[dict[tuple[str, int], torch.Tensor]] | None = None,
) -> dict[str, ChunkedHessian]:
    """Run the layer on batches ``numbers`` (one device's share); hooks fold each module's
    inputs into its per-chunk Hessian partials (:class:`.parallel.ChunkedHessian`).

    Linears that read the very same input tensor (q/k/v, gate/up: DESIGN.md §6's
    true-sequential groups) share one accumulator, so each batch costs one ``X^T X`` per
    distinct input. The sharing found on the first batch must hold on every batch; if it
    does not (a model that feeds them different tensors later), the Hessians are collected
    again without sharing. ``references``: the float pass's inputs (float target); a linear
    whose call in this pass has no float counterpart of the same shape loses its reference.
    """
    if not numbers:
        return {}
    device = hidden[numbers[0]].device
    accs: dict[str, ChunkedHessian] = {}
    fired: set[str] = set()
    mask: list[torch.Tensor | None] = [None]
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # this batch: input -> first reader
    born: dict[str, int] = {}  # linear -> the batch that first reached it
    batch = [0]
    owner: dict[str, str] = {}  # linear -> linear whose accumulator it uses
    broken: list[bool] = [False]
    calls_seen: dict[str, int] = {}  # this batch: linear -> calls so far
    unpaired: set[str] = set()  # linears that lost their float reference

    def hook_for(name: str):
        # a pre-hook: the Hessian needs only the input, and once the group's last linear has
        # its input the pass stops before that linear computes an output nobody reads
        def hook(module, inputs):
            x = inputs[0]
            # the tensor itself is kept in ``seen`` so its memory cannot be reused this batch
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x._version)
            first = seen.setdefault(key, (name, x))[0] if share else name
            if name not in owner:  # the first batch that reaches it decides the sharing
                fresh = first == name or born[first] != batch[0]
                owner[name] = name if fresh else first
                born[name] = batch[0]
                accs[name] = ChunkedHessian(linear_weight(module).shape[1], device, fold) if fresh else accs[first]
            elif owner[name] != first:
                broken[0] = True
            count = calls_seen.get(name, 0)
            calls_seen[name] = count + 1
            if owner[name] == name:
                ref = None
                if references is not None and name not in unpaired:
                    ref = references[batch[0]].get((name, count))
                    if ref is None or ref.shape != x.shape:
                        unpaired.add(name)
                        accs[name].drop_reference()
                        logger.info("%s: its inputs differ between the float and the quantized "
                                    "pass; quantized without the float target", name)
                        ref = None
                m = mask[0]
                if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                    x = x[m]  # padding tokens do not count
                    ref = None if ref is None else ref[m]
                accs[name].add_batch(plan.chunk_of[batch[0]], x, ref)
            fired.add(name)
            if len(fired) == len(modules):
                raise _StopLayer  # the rest of the layer is not needed for this group

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        for number in numbers:
            fired.clear()
            seen.clear()
            calls_seen.clear()
            mask[0] = masks[number]
            batch[0] = number
            if memo is not None:
                memo.begin(number)
            try:
                calls[number](layer, hidden[number])
            except _StopLayer:
                pass
            seen.clear()
            # an alias must see exactly the batches its owner sees
            if any((n in fired) != (o in fired) for n, o in owner.items() if n != o):
                broken[0] = True
            if broken[0]:
                break
    finally:
        for handle in handles:
            handle.remove()
    if broken[0]:
        logger.debug("linears %s did not read the same inputs on every batch; Hessians not shared", list(modules))
        return _collect_partials(layer, modules, numbers, plan, hidden, calls, masks, fold, share=False,
                                 memo=memo, references=references)
    return accs
