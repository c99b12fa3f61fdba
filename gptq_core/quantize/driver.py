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
from contextlib import AbstractContextManager, contextmanager
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
from .gptq import GPTQ, quantize_linear
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
    """Raised by a hook once every linear of the current group has seen the batch."""


# ---------------------------------------------------------------------------- linears
def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or Conv1D as [out_features, in_features]."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_quantized(module: nn.Module, packed: PackedWeight) -> None:
    """Replace the module's weight (and bias) by what the packed layer dequantizes to."""
    w = module.weight
    deq = packed.dequantize(torch.float32)  # [K, N]
    deq = deq if is_conv1d(module) else deq.t()
    with torch.no_grad():
        w.copy_(deq.to(device=w.device, dtype=w.dtype))
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
    layer_source: LayerSource,
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
    }


def _pick_device(device: torch.device | str | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


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
    """
    if not isinstance(config, QuantizeConfig):
        raise GPTQError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise GPTQError("layers must be the model's non-empty decoder-layer nn.ModuleList")
    device = _pick_device(device)
    prefix = _prefix_of(model, layers)
    batches = make_batches(samples, batch_size)
    all_groups = [_layer_groups(i, layer, groups, config) for i, layer in enumerate(layers)]
    for i, layer in enumerate(layers):
        _resolve(layer, i, [n for g in all_groups[i] for n in g])
    state = None
    if work_dir is not None:
        state = WorkDir(work_dir, _fingerprint(config, batches, layers, all_groups, layer_source), resume=resume)
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
        memo: dict[int, Any] = {}
        hidden = [h.to(device) for h in hidden]
        calls = [[c.to(device, memo) for c in per_layer] for per_layer in captured.calls]
        masks = [None if m is None else m.to(device) for m in captured.masks]
        bar = tqdm(total=len(layers), desc="GPTQ", unit="layer", disable=not progress, initial=done)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
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
                    calls[i], masks, config, device, state, result, bar, layer_source,
                )
                result.update({f"{full}.{n}": p for n, p in packed_layer.items()})
                if state:
                    state.commit(i, packed_layer, hidden)
                bar.update(1)
        finally:
            bar.close()
    logger.info("quantized %d decoder layers in %.1f s%s", len(layers) - done, time.perf_counter() - start,
                _peak_memory(device))
    return result


def _peak_memory(device: torch.device) -> str:
    """'; peak GPU memory X GiB' on CUDA and '; peak host memory Y GiB' (the process's peak
    RSS): what sizes the GPU and the host a model needs."""
    text = ""
    if device.type == "cuda":
        text += f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
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
    device: torch.device,
    state: WorkDir | None,
    result: QuantizeResult,
    bar: tqdm,
    layer_source: LayerSource = resident_layer,
) -> tuple[dict[str, PackedWeight], list[torch.Tensor]]:
    """GPTQ of one decoder layer, group by group, its float weights on ``device`` from
    ``layer_source`` (before the float pass: it runs the still-float layer); returns its packed
    linears and its outputs (followed by its float outputs when ``float_hidden`` is given: the
    float target)."""
    packed: dict[str, PackedWeight] = {}
    names = [n for g in groups for n in g]
    memo = FinishedOutputs(layer, names)
    with layer_source(index, layer, device):
        references, float_outputs = None, []
        if float_hidden:
            references, float_outputs = _float_pass(layer, _resolve(layer, index, names), float_hidden, calls)
        with memo.installed():
            for group in groups:
                modules = _resolve(layer, index, group)
                accs = _collect_hessians(layer, modules, hidden, calls, masks, device, memo=memo,
                                         references=references)
                if references is not None:
                    for refs in references:  # this group's float inputs are not needed again
                        for key in [k for k in refs if k[0] in modules]:
                            del refs[key]
                for name, module in modules.items():
                    bias = module.bias if module.bias is not None else None
                    pw, stats = quantize_linear(linear_weight(module), accs[name], config, bias, device=device)
                    set_quantized(module, pw)
                    memo.finish(name)
                    packed[name] = pw
                    record = {"layer": index, "module": name, "name": f"{full}.{name}", **stats.to_dict()}
                    result.records.append(record)
                    if state:
                        state.append_log(record)
                    if stats.warning:
                        logger.warning("%s.%s: %s", full, name, stats.warning)
                    bar.set_postfix_str(f"layer {index} {name} err={stats.error:.4g} {stats.seconds:.2f}s")
            outputs = []
            for number, (call, h) in enumerate(zip(calls, hidden)):
                memo.begin(number)
                outputs.append(call(layer, h))
    return packed, outputs + float_outputs


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
) -> dict[str, GPTQ]:
    """Run the layer on every batch; hooks fold each module's inputs into its Hessian.

    Linears that read the very same input tensor (q/k/v, gate/up: DESIGN.md §6's
    true-sequential groups) share one accumulator, so each batch costs one ``X^T X`` per
    distinct input. The sharing found on the first batch must hold on every batch; if it
    does not (a model that feeds them different tensors later), the Hessians are collected
    again without sharing. ``references``: the float pass's inputs (float target); a linear
    whose call in this pass has no float counterpart of the same shape loses its reference.
    """
    accs: dict[str, GPTQ] = {}
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
        def hook(module, inputs, output):
            x = inputs[0]
            # the tensor itself is kept in ``seen`` so its memory cannot be reused this batch
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x._version)
            first = seen.setdefault(key, (name, x))[0] if share else name
            if name not in owner:  # the first batch that reaches it decides the sharing
                fresh = first == name or born[first] != batch[0]
                owner[name] = name if fresh else first
                born[name] = batch[0]
                accs[name] = GPTQ(linear_weight(module).shape[1], device=device) if fresh else accs[first]
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
                        accs[name].D = None
                        logger.info("%s: its inputs differ between the float and the quantized "
                                    "pass; quantized without the float target", name)
                        ref = None
                m = mask[0]
                if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                    x = x[m]  # padding tokens do not count
                    ref = None if ref is None else ref[m]
                accs[name].add_batch(x, ref)
            fired.add(name)
            if len(fired) == len(modules):
                raise _StopLayer  # the rest of the layer is not needed for this group

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        for number, (call, h, m) in enumerate(zip(calls, hidden, masks)):
            fired.clear()
            seen.clear()
            calls_seen.clear()
            mask[0] = m
            batch[0] = number
            if memo is not None:
                memo.begin(number)
            try:
                call(layer, h)
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
        return _collect_hessians(layer, modules, hidden, calls, masks, device, share=False, memo=memo,
                                 references=references)
    for name, module in modules.items():  # a linear no batch reached: empty Hessian, RTN fallback
        accs.setdefault(name, GPTQ(linear_weight(module).shape[1], device=device))
    return accs
