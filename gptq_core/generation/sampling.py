"""Choosing the next token on the device, inside the captured decode step (docs/DESIGN.md §11).

Everything here is tensor ops with fixed shapes: no host synchronisation, no Python branch on a
tensor value, so one CUDA graph replays the whole choice. The knobs are device scalars
(:class:`SamplerState`) filled before a run, so changing temperature or top-p does not need a new
graph; only the *kind* of choice (:attr:`Sampling.kind`) selects which ops run.

The logits processing follows transformers' order and arithmetic (repetition penalty, then
temperature, top-k, top-p), so greedy decoding with a penalty picks the same tokens as
``generate(repetition_penalty=...)``. Sampling draws by the Gumbel-max rule,
``argmax(logits + Gumbel noise)``, which has the distribution of softmax sampling and needs only
``torch.rand`` with a generator (capturable when the generator is registered with the graph),
where ``torch.multinomial`` would synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GPTQError

#: Smallest uniform draw used for Gumbel noise: keeps ``log(-log(u))`` finite.
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the meaning of each field is transformers' ``generate``'s."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise GPTQError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0: off)")
        if self.do_sample:
            if not self.temperature > 0:
                raise GPTQError(
                    f"temperature={self.temperature} must be > 0 when sampling; use do_sample=False "
                    "for greedy decoding"
                )
            if self.top_k is not None and self.top_k < 0:
                raise GPTQError(f"top_k={self.top_k} must be >= 0 (0 or None: off)")
            if not 0 < self.top_p <= 1:
                raise GPTQError(f"top_p={self.top_p} must lie in (0, 1] (1.0: off)")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def kind(self) -> tuple[bool, bool, bool, bool]:
        """(sample, penalty, top-k, top-p): which ops run; one captured graph per kind."""
        if not self.do_sample:
            return (False, self.penalised, False, False)
        return (True, self.penalised, bool(self.top_k), self.top_p < 1.0)


class SamplerState:
    """Device scalars holding a :class:`Sampling`'s values, read by the captured step."""

    def __init__(self, device: torch.device) -> None:
        self.penalty = torch.ones((), dtype=torch.float32, device=device)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_k = torch.ones(1, dtype=torch.long, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)

    def load(self, sampling: Sampling, vocab: int) -> None:
        """Fill the scalars (device-side fills: no synchronisation)."""
        self.penalty.fill_(float(sampling.repetition_penalty))
        self.temperature.fill_(float(sampling.temperature))
        self.top_k.fill_(min(int(sampling.top_k or vocab), vocab))
        self.top_p.fill_(float(sampling.top_p))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' rule on every token already in the row: negative logits times the
    penalty, positive ones divided by it."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Logits outside the top-k, then outside the top-p mass, set to -inf, from one sort.

    Ties with the k-th value are kept, and top-p keeps the most likely token always, as
    transformers' warpers do.
    """
    vocab = logits.shape[-1]
    ascending, order = logits.sort(dim=-1)
    remove = torch.zeros_like(ascending, dtype=torch.bool)
    if top_k is not None:
        kth = ascending.gather(-1, (vocab - top_k).expand(logits.shape[0], 1))
        remove = ascending < kth
        ascending = ascending.masked_fill(remove, float("-inf"))
    if top_p is not None:
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove = remove | (cumulative <= 1 - top_p)
        remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def gumbel_argmax(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from ``softmax(logits)`` per row, by ``argmax(logits - log(-log(u)))``."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    return (logits - torch.log(-torch.log(u.clamp_(min=_TINY)))).argmax(dim=-1)


def next_tokens(
    logits: torch.Tensor,
    kind: tuple[bool, bool, bool, bool],
    state: SamplerState,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row [B] from float32 ``logits`` [B, V]."""
    sample, penalty, top_k, top_p = kind
    if penalty:
        logits = apply_repetition_penalty(logits, seen, state.penalty)
    if not sample:
        return logits.argmax(dim=-1)
    logits = logits / state.temperature
    if top_k or top_p:
        logits = filter_top_k_top_p(logits, state.top_k if top_k else None, state.top_p if top_p else None)
    return gumbel_argmax(logits, generator)
