"""Public helpers for testing backends: random packed weights and the float64 reference.

Used by the unit tests, the conformance suite (``gptq-conformance``) and third-party backend
tests, so that every numeric check in the project is made against the same reference::

    packed = random_packed(bits=3, group_size=64, sym=False, desc_act=True,
                           in_features=172, out_features=32, seed=1, bias=True)
    x = random_activations(7, 172, torch.float16, seed=2)
    assert_matches_reference(my_qmatmul(x), x, packed)

Also the tiny random models of every listed architecture (:func:`tiny_model`) that the model
tests quantize and compare with :func:`with_dequantized_weights`.

Random data is never zeros: quantized ints span the whole range, zeros (asymmetric) and
scales vary per group and column, and act-order ``g_idx`` is a shuffled group assignment.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .backend import BackendInfo, Capabilities
from .device import DeviceInfo
from .format import PackedWeight, ZeroFormat, default_g_idx, num_groups, pack_weight
from .hookspecs import hookimpl
from .spec import LayerSpec

#: Per activation dtype: (rtol, atol) of :func:`reference_error`. ``rtol`` scales the bound
#: ``|x| @ |W| + |y|`` of each output element, so cancellation in a dot product cannot make a
#: correct kernel fail; about eight units of roundoff of the dtype (one rounding of the
#: dequantized weight and one of the output, with margin), plus fp32 accumulation error.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (4e-3, 1e-5),
    torch.bfloat16: (3e-2, 1e-4),
    torch.float32: (2e-5, 1e-7),
}


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (random data is drawn on the CPU, then moved)."""
    g = torch.Generator()
    g.manual_seed(int(seed) % (2**63))
    return g


def random_packed(
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    in_features: int = 256,
    out_features: int = 64,
    *,
    seed: int = 0,
    bias: bool = False,
    zero_format: ZeroFormat = "v1",
    device: torch.device | str = "cpu",
) -> PackedWeight:
    """A random but well-formed :class:`PackedWeight` for the given config.

    Weights are scaled so that ``x @ W`` has entries of order one for ``x ~ N(0, 1)``.
    Asymmetric zeros lie in ``[1, 2**bits - 1]`` (v1) or ``[0, 2**bits - 1]`` (v2).
    """
    g = generator(seed)
    K, N = in_features, out_features
    G = num_groups(K, group_size)
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32)
    if sym:
        zeros = torch.full((G, N), 2 ** (bits - 1), dtype=torch.int32)
    else:
        low = 1 if zero_format == "v1" else 0
        zeros = torch.randint(low, maxq + 1, (G, N), generator=g, dtype=torch.int32)
    base = math.sqrt(12.0) / ((maxq + 1) * math.sqrt(K))
    scales = (torch.rand(G, N, generator=g) + 0.5) * base
    g_idx = default_g_idx(K, group_size)
    if desc_act:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    b = (torch.randn(N, generator=g) * 0.5) if bias else None
    packed = pack_weight(
        q, scales, zeros, bits=bits, group_size=group_size, g_idx=g_idx, sym=sym,
        desc_act=desc_act, bias=b, zero_format=zero_format,
    )
    return packed if torch.device(device).type == "cpu" else packed.to(device)


def random_activations(
    *shape: int,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``N(0, 1)`` activations of ``shape`` in ``dtype`` (drawn in float32 on the CPU)."""
    return torch.randn(*shape, generator=generator(seed)).to(dtype=dtype, device=device)


_DEQUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dequantized64(packed: PackedWeight) -> torch.Tensor:
    """The float64 CPU weight [K, N] of ``packed`` (cached while ``packed`` lives)."""
    w = _DEQUANTIZED.get(packed)
    if w is None:
        w = _DEQUANTIZED[packed] = packed.to("cpu").dequantize(torch.float64)
    return w


def reference_matmul(
    x: torch.Tensor, packed: PackedWeight, bias: bool | torch.Tensor | None = True
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in float64 on the CPU: the number every backend is judged against.

    ``bias=True`` uses the packed weight's own bias (if any); a tensor overrides it.
    """
    y = x.detach().to("cpu", torch.float64) @ dequantized64(packed)
    b = packed.bias if bias is True else (None if bias is False else bias)
    if b is not None:
        y = y + b.detach().to("cpu", torch.float64)
    return y


def reference_bound(x: torch.Tensor, packed: PackedWeight, y_ref: torch.Tensor) -> torch.Tensor:
    """Per-element magnitude ``|x| @ |W| + |y_ref|`` that tolerances are relative to."""
    return x.detach().to("cpu", torch.float64).abs() @ dequantized64(packed).abs() + y_ref.abs()


@dataclass(frozen=True)
class ReferenceCheck:
    """The outcome of comparing an output to the float64 reference."""

    ok: bool
    worst: float  # largest error / allowed error (<= 1 passes)
    max_abs_error: float
    message: str


def check_close(
    got: torch.Tensor,
    ref: torch.Tensor,
    bound: torch.Tensor,
    dtype: torch.dtype,
    tolerance: tuple[float, float] | None = None,
) -> ReferenceCheck:
    """Compare ``got`` to the float64 ``ref`` (same numel) within ``rtol * bound + atol``.

    Non-finite reference entries must stay non-finite: NaN where the reference is NaN, and
    Inf of the same sign or NaN where it is +-Inf (a kernel that folds zero points computes
    ``inf - inf`` legitimately); a finite number there is a silent wrong answer.
    """
    rtol, atol = tolerance or TOLERANCES[dtype]
    ref = ref.reshape(-1, ref.shape[-1] if ref.dim() else 1)
    got = got.detach().to("cpu", torch.float64).reshape(ref.shape)
    if ref.numel() == 0:
        return ReferenceCheck(True, 0.0, 0.0, "empty output")
    finite_ref = torch.isfinite(ref)
    same_kind = finite_ref == torch.isfinite(got)
    same_kind &= ~torch.isnan(ref) | torch.isnan(got)
    same_kind &= ~torch.isinf(got) | (torch.sign(ref) == torch.sign(got))
    if not bool(same_kind.all()):
        bad = tuple((~same_kind).nonzero()[0].tolist())
        return ReferenceCheck(False, math.inf, math.inf,
                              f"non-finite mismatch at {list(bad)}: got {got[bad].item()}, "
                              f"reference {ref[bad].item()}")
    allowed = rtol * bound.reshape(ref.shape).nan_to_num(posinf=0.0) + atol
    err = torch.where(finite_ref, (got - ref).abs(), torch.zeros_like(ref))
    ratio = err / allowed
    worst_idx = int(ratio.argmax())
    worst = float(ratio.flatten()[worst_idx])
    ok = worst <= 1.0
    r, c = divmod(worst_idx, ref.shape[1])
    message = (
        f"{'within' if ok else 'OUTSIDE'} tolerance (rtol={rtol}, atol={atol} for {dtype}): "
        f"worst element [{r}, {c}] got {got[r, c].item():.6g}, reference {ref[r, c].item():.6g}, "
        f"error {err[r, c].item():.3g} = {worst:.3g} x allowed; max abs error "
        f"{float(err.max()):.3g}"
    )
    return ReferenceCheck(ok, worst, float(err.max()), message)


def reference_error(
    y: torch.Tensor,
    x: torch.Tensor,
    packed: PackedWeight,
    *,
    bias: bool | torch.Tensor | None = True,
    tolerance: tuple[float, float] | None = None,
) -> ReferenceCheck:
    """Compare ``y`` (any leading dims, last dim N) to the float64 reference for ``x``.

    Also checks the output's shape and dtype (that of ``x``).
    """
    expected = tuple(x.shape[:-1]) + (packed.out_features,)
    if tuple(y.shape) != expected:
        return ReferenceCheck(False, math.inf, math.inf,
                              f"output shape {tuple(y.shape)}, expected {expected}")
    if y.dtype != x.dtype:
        return ReferenceCheck(False, math.inf, math.inf,
                              f"output dtype {y.dtype}, expected the input's {x.dtype}")
    x2 = x.reshape(-1, packed.in_features)
    ref = reference_matmul(x2, packed, bias)
    finite_x = x2.masked_fill(~torch.isfinite(x2), 0)
    bound = reference_bound(finite_x, packed, ref.nan_to_num())
    return check_close(y, ref, bound, x.dtype, tolerance)


def assert_matches_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    packed: PackedWeight,
    *,
    bias: bool | torch.Tensor | None = True,
    context: str = "",
) -> None:
    """Raise AssertionError naming the worst element if ``y`` misses the float64 reference."""
    check = reference_error(y, x, packed, bias=bias)
    if not check.ok:
        raise AssertionError(f"{context}: {check.message}" if context else check.message)


def tensors_of(obj: object, prefix: str = "prepared") -> dict[str, torch.Tensor]:
    """Every tensor reachable in a backend's prepared object (dataclass, dict, tuple, attrs)."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(o: object, path: str, depth: int) -> None:
        if depth > 6 or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found[path] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}[{k!r}]", depth + 1)
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]", depth + 1)
        elif hasattr(o, "__dict__") or hasattr(o, "__slots__"):
            names = list(getattr(o, "__dict__", {})) + list(getattr(o, "__slots__", ()))
            for k in names:
                if hasattr(o, k) and not k.startswith("__"):
                    walk(getattr(o, k), f"{path}.{k}", depth + 1)

    walk(obj, prefix, 0)
    return found


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bit-exact copies (as raw bytes) to detect mutation, NaN-safe."""
    return {k: _raw(t).clone() for k, t in tensors.items()}


def _raw(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(torch.uint8) if t.numel() and t.dtype != torch.bool else t


def changed(before: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors whose bytes differ from their :func:`snapshot`."""
    return [k for k, t in tensors.items() if not torch.equal(before[k], _raw(t))]


def packed_tensors(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """The tensors of a :class:`PackedWeight` by field name (bias only when present)."""
    names = ("qweight", "qzeros", "scales", "g_idx", "bias")
    return {n: getattr(packed, n) for n in names if getattr(packed, n) is not None}


class StubBackend:
    """A backend plugin object assembled from parts, for registry, selector and suite tests.

    Register it with ``Registry.register(StubBackend(...))``. Without ``pack`` the prepared form
    is the :class:`PackedWeight` itself; without ``qmatmul`` it computes the reference in
    float32 (plain ATen, no custom op: fine for selector tests, not for the conformance suite).
    """

    def __init__(
        self,
        name: str,
        capabilities: Capabilities,
        priority: dict[str, int] | None = None,
        *,
        pack: Callable[..., Any] | None = None,
        qmatmul: Callable[..., torch.Tensor] | None = None,
        probe: Callable[..., list[str]] | None = None,
        distribution: str = "gptq-core-tests",
    ) -> None:
        self.info = BackendInfo(name=name, version="0.0.0", distribution=distribution,
                                capabilities=capabilities, priority=dict(priority or {}))
        self.pack, self.compute, self.probe = pack, qmatmul, probe
        self.pack_calls = 0

    @property
    def name(self) -> str:
        return self.info.name

    @hookimpl
    def gptq_backend_info(self) -> BackendInfo:
        return self.info

    @hookimpl
    def gptq_probe(self, device: DeviceInfo, spec: LayerSpec | None) -> list[str]:
        return list(self.probe(device, spec)) if self.probe is not None else []

    @hookimpl
    def gptq_pack(self, weight: PackedWeight, device: DeviceInfo, spec: LayerSpec) -> Any:
        self.pack_calls += 1
        return self.pack(weight, device, spec) if self.pack is not None else weight

    @hookimpl
    def gptq_qmatmul(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None):
        if self.compute is not None:
            return self.compute(x, prepared, bias)
        y = x.float() @ prepared.dequantize(torch.float32)
        return (y if bias is None else y + bias.float()).to(x.dtype)


# Tiny random models of every listed architecture, built from transformers' config classes: no
# download, a few thousand parameters, two layers, a vocabulary of 128; plus the float reference
# a quantized tiny model is compared with. TINY_COMMON holds the sizes every family shares (only
# the fields a config class knows are passed); TINY_OVERRIDES what a family needs beyond them.

TINY_VOCAB = 128

#: Sizes shared by every tiny model; a config class receives only the fields it defines.
TINY_COMMON: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=48, head_dim=8, max_position_embeddings=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, ffn_dim=48, word_embed_proj_dim=32,
    n_inner=48, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

_MLA = dict(num_key_value_heads=4)  # multi-head latent attention has no grouped KV heads

#: What a family needs beyond TINY_COMMON (field names of its config class).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "xglm": dict(decoder_start_token_id=2),
    "minicpm3": _MLA,
    "youtu": _MLA,
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "glm4_moe_lite": _MLA,
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    ),
    "ctrl": dict(dff=48),
    "granitemoeshared": dict(shared_intermediate_size=16),
    "llama4_text": dict(interleave_moe_layer_step=2, intermediate_size_mlp=48),
    "dbrx": dict(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
    ),
}


def tiny_config(model_type: str, **changes: Any):
    """A transformers config of ``model_type`` with tiny sizes (``changes`` override them).

    Tests assert the result stays tiny (every linear at most 256 wide), so a new family whose
    config names a size differently cannot slip in at full size.
    """
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    known |= set(getattr(cls, "attribute_map", {}))
    kwargs = {k: v for k, v in TINY_COMMON.items() if k in known}
    kwargs.update(TINY_OVERRIDES.get(model_type, {}))
    kwargs.update(changes)
    return cls(**kwargs)


def tiny_model(
    model_type: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str | None = None,
    **changes: Any,
):
    """A random causal LM of ``model_type`` (eval mode) from :func:`tiny_config`.

    ``experts_implementation="eager"`` makes fused MoE experts compute with transformers'
    reference loop (the default grouped matmul has no float64 kernel on the CPU).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **changes)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # tiny vocabularies trigger token-id warnings
    try:
        torch.manual_seed(seed)
        extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval()


def with_dequantized_weights(
    model: torch.nn.Module, packed: Mapping[str, PackedWeight], dtype: torch.dtype = torch.float64
) -> torch.nn.Module:
    """``model`` in ``dtype`` with each linear of ``packed`` holding exactly what it dequantizes to.

    The float reference a quantized model is checked against (in place; eval mode).
    """
    model = model.to(dtype)
    for name, weight in packed.items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(weight.dequantize(torch.float64).t())
            if weight.bias is not None:
                linear.bias.copy_(weight.bias.double())
    return model.eval()
