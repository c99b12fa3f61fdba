"""Unfusing mixture-of-experts weights into one ``nn.Linear`` per expert projection.

transformers 5 stores the experts of most MoE models as 3-D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I], sometimes transposed, interleaved or with biases) and
computes them in one module. GPTQ quantizes ``nn.Linear`` modules one by one, and GPTQ
checkpoints store one tensor set per expert, so :func:`unfuse_experts` replaces such a module
with :class:`UnfusedExperts`: the same routing arithmetic over per-expert linears, whose
outputs equal the fused module's up to float rounding. An expert that receives no token is
never called, which the driver sees (no inputs) and answers with its round-to-nearest fallback.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GPTQError
from .architecture import MoE


class Expert(nn.Module):
    """One expert: ``down(gate_fn(gate(x), up(x)))``, or ``down(act(up(x)))`` without a gate.

    Its linears carry the names of ``MoE`` (``gate_proj``/``up_proj``/``down_proj`` or
    ``w1``/``w3``/``w2``...), so they match per-expert checkpoint tensor names.
    """

    def __init__(self, moe: MoE, gate: nn.Linear | None, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self._names = (moe.gate, moe.up, moe.down)
        if moe.gate is not None:
            if gate is None:
                raise GPTQError(f"expert layout {moe} names a gate projection but none was given")
            self.add_module(moe.gate, gate)
        self.add_module(moe.up, up)
        self.add_module(moe.down, down)

    def forward(self, x: torch.Tensor, combine) -> torch.Tensor:
        gate_name, up_name, down_name = self._names
        up = getattr(self, up_name)(x)
        gate = getattr(self, gate_name)(x) if gate_name is not None else None
        return getattr(self, down_name)(combine(gate, up))


class UnfusedExperts(nn.Module):
    """Per-expert linears with the forward of the fused experts module they replace.

    ``fused`` is the original module with its weights removed; it is kept, unregistered, only
    for its activation (``act_fn``) and custom gating (``_apply_gate``, e.g. GPT-OSS's clamped
    SwiGLU), so the arithmetic stays exactly that of the model's own code.
    """

    def __init__(self, moe: MoE, experts: list[Expert], fused: nn.Module, list_attr: str = "") -> None:
        super().__init__()
        self.moe = moe
        self.num_experts = len(experts)
        self.list_attr = list_attr
        if list_attr:
            self.add_module(list_attr, nn.ModuleList(experts))
        else:
            for i, e in enumerate(experts):
                self.add_module(str(i), e)
        object.__setattr__(self, "_fused", fused)  # not a submodule: no state, no parameters
        self.has_gate = moe.gate is not None
        self.is_concatenated = bool(getattr(fused, "is_concatenated", True))
        self._custom_gate = moe.style == "routed" and hasattr(type(fused), "_apply_gate")

    def expert(self, index: int) -> Expert:
        holder = getattr(self, self.list_attr) if self.list_attr else self
        return holder[index] if self.list_attr else getattr(holder, str(index))

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> Expert:
        return self.expert(index)

    def __iter__(self):
        return (self.expert(i) for i in range(self.num_experts))

    def _act(self):
        fused = self._fused
        act = getattr(fused, "act_fn", None) or getattr(getattr(fused, "mlp", None), "activation_fn", None)
        if act is None:
            raise GPTQError(
                f"{type(fused).__name__} has no act_fn; cannot reproduce its activation after unfusing"
            )
        return act

    def _combine(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """gate/up outputs -> the activation input of ``down``, as the fused module computes it."""
        if gate is None:
            return self._act()(up)
        if self._custom_gate:
            # Rebuild the fused layout the model's own gating expects, then call it.
            if self.is_concatenated:
                both = torch.cat([gate, up], dim=-1)
            else:
                both = torch.stack([gate, up], dim=-1).flatten(-2)
            return type(self._fused)._apply_gate(self._fused, both)
        if self.moe.style == "dense":  # Llama 4 writes up * act(gate)
            return up * self._act()(gate)
        return self._act()(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.moe.style == "dense":
            return self._forward_dense(hidden_states)
        if top_k_index is None or top_k_weights is None:
            raise GPTQError("routed experts need top_k_index and top_k_weights from the router")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue  # never calling the expert is how the driver learns it got no tokens
            y = self.expert(e)(x[token_idx], self._combine)
            y = y * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        if self.moe.style == "dbrx":
            return out.view(shape[0], -1, shape[-1])
        return out.view(shape)

    def _forward_dense(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states.shape[-1]
        x = hidden_states.view(self.num_experts, -1, hidden)
        outs = [self.expert(e)(x[e], self._combine) for e in range(self.num_experts)]
        return torch.stack(outs).view(-1, outs[0].shape[-1])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, style={self.moe.style}, fused={type(self._fused).__name__}"


# ---------------------------------------------------------------------------------------- weights
def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of ``weight`` [out, in] and ``bias`` (meta stays meta)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    if weight.device.type != "meta":
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
    lin.weight.requires_grad_(False)
    if lin.bias is not None:
        lin.bias.requires_grad_(False)
    return lin


def _routed_weights(fused: nn.Module, e: int):
    """(gate W, gate b, up W, up b, down W, down b) of expert ``e`` in nn.Linear orientation."""
    for attr in ("is_transposed", "has_bias", "has_gate"):
        if not hasattr(fused, attr):
            raise GPTQError(
                f"{type(fused).__name__} does not declare '{attr}' (transformers' experts interface); "
                "its weight layout is unknown, so it cannot be unfused safely. Add its layout to "
                "gptq_core.models (style 'dense' or 'dbrx', or a new style)."
            )
    t = fused.is_transposed

    def w(name: str) -> torch.Tensor:
        x = getattr(fused, name)[e]
        return x.t() if t else x

    def b(name: str) -> torch.Tensor | None:
        return getattr(fused, name + "_bias")[e] if fused.has_bias else None

    down_w, down_b = w("down_proj"), b("down_proj")
    if not fused.has_gate:
        return None, None, w("up_proj"), b("up_proj"), down_w, down_b
    gu, gu_b = w("gate_up_proj"), b("gate_up_proj")
    if getattr(fused, "is_concatenated", True):
        half = gu.shape[0] // 2
        split = lambda x: (x[:half], x[half:])  # noqa: E731
    else:
        split = lambda x: (x[0::2], x[1::2])  # noqa: E731
    gate_w, up_w = split(gu)
    gate_b, up_b = split(gu_b) if gu_b is not None else (None, None)
    return gate_w, gate_b, up_w, up_b, down_w, down_b


def _dense_weights(fused: nn.Module, e: int):
    """Llama 4: gate_up_proj [E, H, 2I] (x @ W), down_proj [E, I, H]."""
    gu = fused.gate_up_proj[e].t()
    half = gu.shape[0] // 2
    return gu[:half], None, gu[half:], None, fused.down_proj[e].t(), None


def _dbrx_weights(fused: nn.Module, e: int):
    """DBRX: w1, v1, w2 each [E*I, H]; gate = x @ w1.T, up = x @ v1.T, down = h @ w2."""
    glu = fused.mlp
    inter, hidden = glu.ffn_hidden_size, glu.hidden_size

    def part(p: torch.Tensor) -> torch.Tensor:
        return p.view(-1, inter, hidden)[e]

    return part(glu.w1), None, part(glu.v1), None, part(glu.w2).t(), None


_WEIGHTS = {"routed": _routed_weights, "dense": _dense_weights, "dbrx": _dbrx_weights}
#: Parameters to drop from the emptied fused module, per style.
_FUSED_PARAMS = {
    "routed": ("gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias"),
    "dense": ("gate_up_proj", "down_proj"),
    "dbrx": (),
}


def _num_experts(fused: nn.Module, style: str) -> int:
    for attr in ("num_experts", "moe_num_experts"):
        for owner in (fused, getattr(fused, "mlp", None)):
            n = getattr(owner, attr, None)
            if isinstance(n, int) and n > 0:
                return n
    raise GPTQError(f"{type(fused).__name__} does not say how many experts it holds (num_experts)")


def unfuse_experts(fused: nn.Module, moe: MoE) -> UnfusedExperts:
    """Build the per-expert replacement of a fused experts module (the fused one is emptied)."""
    weights_of = _WEIGHTS[moe.style]
    n = _num_experts(fused, moe.style)
    experts = []
    for e in range(n):
        gw, gb, uw, ub, dw, db = weights_of(fused, e)
        gate = _linear(gw, gb) if moe.gate is not None else None
        experts.append(Expert(moe, gate, _linear(uw, ub), _linear(dw, db)))
    for name in _FUSED_PARAMS[moe.style]:
        if name in fused._parameters:
            del fused._parameters[name]
    if moe.style == "dbrx":
        fused.mlp._parameters.clear()
    list_attr = _list_attr(moe)
    return UnfusedExperts(moe, experts, fused, list_attr)


def _list_attr(moe: MoE) -> str:
    """The attribute between the experts module and the index: "mlp" in "ffn.experts.mlp.{expert}"."""
    prefix = moe.experts + "."
    template = moe.expert
    if not template.startswith(prefix) or not template.endswith("{expert}"):
        raise GPTQError(
            f"expert template {template!r} must look like '{moe.experts}.[attr.]{{expert}}'"
        )
    middle = template[len(prefix): -len("{expert}")]
    return middle.rstrip(".")
