"""The project's own decode path: static KV cache, one captured decode step (docs/DESIGN.md §11).

::

    from gptq_core.generation import FastGenerator

    fast = FastGenerator(model, max_batch=8)
    out = fast.generate(input_ids, attention_mask, max_new_tokens=128)   # like model.generate

How a call runs: the prompt rows are left-padded into one [B, L] block and prefilled eagerly
(the large-M kernels); the first token is chosen from the prefill's last logits. Every further
token is one *decode step*: the model's forward for one token per row, the token choice
(:mod:`.sampling`), and the updates of the step's own state (positions, cache column, mask,
finished rows), all device tensors changed in place. On CUDA that step is captured once into a
``torch.cuda.CUDAGraph`` per batch size and kind of sampling, and replayed; on the CPU the same
step runs eagerly, so the logic is the same one tested in CI. The host looks at the device only
every ``eos_check_every`` steps (have all rows finished?) and at the end.

On CUDA the model's decode forward is also compiled (``torch.compile``, inductor, no CUDA graphs
of its own) before capture: an uncompiled Llama layer is some fifty small kernels, and at a
couple of microseconds each a 32-layer step would spend longer launching them than reading the
4-bit weights. Compilation happens in the warm-up steps, outside the capture; if it fails the
step runs uncompiled, and the reason is logged.

A model the fast path cannot serve (:func:`.support.unsupported_reason`, or attention that turns
out to need more at the first prefill) is handed to ``model.generate`` with the reason logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import GPTQError
from . import attention
from .attention import UnservedAttention, decode_mask, prefill_mask, serving
from .sampling import SamplerState, Sampling, next_tokens
from .support import unsupported_reason

logger = logging.getLogger("gptq_core")

#: transformers' defaults for sampling knobs a model's generation_config leaves unset.
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                     "repetition_penalty": 1.0}
#: Most end-of-sequence ids one call may stop on (the step compares against a fixed buffer).
MAX_EOS_IDS = 16
#: Cache lengths are rounded up to this, so nearby requests share one session and graph.
LENGTH_STEP = 16
#: Eager steps run before a capture (lazy initialisation, autotuning) and then undone.
WARMUP_STEPS = 2


@dataclass
class _Session:
    """The static cache and step state of one batch size; the captured graphs read these."""

    batch: int
    length: int
    cache: object
    tokens: torch.Tensor  # [B, 1] the last token of each row
    positions: torch.Tensor  # [B, 1] its position id
    column: torch.Tensor  # [1] the cache column it is written to
    step: torch.Tensor  # [1] index in ``out`` of the next token
    valid: torch.Tensor  # [B, T] cache columns a query may see
    done: torch.Tensor  # [B] rows that produced an end-of-sequence token
    out: torch.Tensor  # [B, T] generated tokens
    seen: torch.Tensor  # [B, V] tokens present in each row (repetition penalty)
    eos: torch.Tensor  # [MAX_EOS_IDS] end-of-sequence ids, -1 padded
    pad: torch.Tensor  # [] token written after a row finished
    sampler: SamplerState
    generator: torch.Generator
    graphs: dict = field(default_factory=dict)

    def small_state(self) -> list[torch.Tensor]:
        """Every tensor a decode step changes, except the cache's keys and values."""
        lengths = [layer.cumulative_length for layer in self.cache.layers
                   if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
        return [self.tokens, self.positions, self.column, self.step, self.valid, self.done,
                self.seen, *lengths]


def left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, real) with each row's real tokens moved to the right end, pads to the left,
    and columns that are padding in every row dropped."""
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise GPTQError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with the ids"
        )
    real = attention_mask.to(input_ids.device).bool()
    lengths = real.sum(dim=1)
    if bool((lengths == 0).any()):
        raise GPTQError("a row of attention_mask is all zeros; every prompt needs at least one token")
    order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices  # pads first, order kept
    keep = int(lengths.max())
    return input_ids.gather(1, order)[:, -keep:], real.gather(1, order)[:, -keep:]


class FastGenerator:
    """Static-cache, CUDA-graph decoding of a loaded (quantized or float) transformers causal LM.

    ``max_batch`` bounds the rows of one call; ``max_len`` (prompt plus new tokens) fixes the
    cache length, or None to size it from the first call and grow it when a longer call comes.
    ``cuda_graphs=False`` runs the step eagerly on CUDA too (for comparisons); ``compile``
    (default: on CUDA only) compiles the decode forward with ``torch.compile`` (a string names
    its backend; True is inductor). ``eager_rounding`` (default: on with inductor) has inductor
    round every fused op's result to the activation dtype as eager does (its
    ``emulate_precision_casts``): compiled fp16 then keeps eager's greedy tokens through
    near-ties that one rounding step flips, at no measured cost (NOTES/perf-h200.md, "Greedy
    tokens"). One static cache and set of graphs is kept per batch size.
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch: int = 1,
        max_len: int | None = None,
        *,
        cuda_graphs: bool = True,
        compile: bool | str | None = None,
        eager_rounding: bool | None = None,
        eos_check_every: int = 16,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise GPTQError(f"max_batch={max_batch} must be >= 1")
        if max_len is not None and max_len < 2:
            raise GPTQError(f"max_len={max_len} must leave room for a prompt and a new token")
        if eos_check_every < 1:
            raise GPTQError(f"eos_check_every={eos_check_every} must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.max_len = max_len
        self.cuda_graphs = cuda_graphs
        self.eos_check_every = eos_check_every
        self.log = log or logger.warning
        self.device = next(model.parameters()).device
        if compile is None:
            compile = self.device.type == "cuda"
        backend = compile if isinstance(compile, str) else "inductor"
        if eager_rounding and backend != "inductor":
            raise GPTQError(f"eager_rounding is an inductor setting; compile={compile!r} names another backend")
        if eager_rounding is None:
            eager_rounding = backend == "inductor"
        options = {"emulate_precision_casts": True} if eager_rounding else None
        self._compiled = torch.compile(self._forward, backend=backend, dynamic=None,
                                       options=options) if compile else None
        self.fallback_reason: str | None = unsupported_reason(model)
        self.last_path: str | None = None  # "cuda-graph", "eager" or "transformers"
        self._sessions: dict[int, _Session] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ public
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
        ignore_eos: bool = False,
    ) -> torch.Tensor:
        """``input_ids`` [B, L] followed by up to ``max_new_tokens`` tokens per row, like
        transformers' ``generate``: rows that finish early are filled with ``pad_token_id``, and
        the output stops when every row has finished. Unset knobs come from the model's
        ``generation_config``; ``ignore_eos=True`` always generates ``max_new_tokens``.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise GPTQError(f"input_ids must be a [batch, length] LongTensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise GPTQError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if input_ids.shape[0] > self.max_batch:
            raise GPTQError(
                f"{input_ids.shape[0]} rows exceed this generator's max_batch={self.max_batch}; "
                "create the FastGenerator with a larger max_batch"
            )
        sampling = self._sampling(do_sample, temperature, top_k, top_p, repetition_penalty)
        eos = self._eos_ids(eos_token_id, ignore_eos)
        pad = self._pad_id(pad_token_id, eos)
        input_ids = input_ids.to(self.device)
        if self.fallback_reason is None:
            ids, real = left_padded(input_ids, attention_mask)
            try:
                with torch.no_grad(), serving(self.model):
                    new = self._generate(ids, real, max_new_tokens, sampling, eos, pad, seed)
                return torch.cat([input_ids, new], dim=1)
            except UnservedAttention as exc:
                self.fallback_reason = str(exc)
        return self._transformers_generate(input_ids, attention_mask, max_new_tokens, sampling, eos, pad, seed)

    def step_breakdown(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       replays: int = 8) -> dict[str, float]:
        """Milliseconds of one greedy decode step in linears, attention and the rest, after a
        prefill of ``input_ids``.

        A step is first profiled eagerly and uncompiled, so every kernel is attributed to its
        module (kernel time on CUDA, CPU time on the CPU). Where the step is captured (CUDA
        graphs on), the parts are then those of the captured, compiled step as generation
        replays it: its kernels sorted by the names the eager step launched in each module,
        and ``gaps_ms`` between them (profile.py); else the eager step's parts.
        """
        from .profile import breakdown, replayed_breakdown

        if self.fallback_reason is not None:
            raise GPTQError(f"fast decoding is not available for this model: {self.fallback_reason}")
        ids, real = left_padded(input_ids.to(self.device), attention_mask)
        kind = Sampling().kind
        names: dict[str, set[str]] = {}
        with torch.no_grad(), serving(self.model):
            # Room for the prefill, the capture's warm-up steps and every replay.
            s = self._session(ids.shape[0], ids.shape[1] + 2 + 2 * WARMUP_STEPS + 2 * replays)
            s.eos.fill_(-1)
            compiled, self._compiled = self._compiled, None
            try:
                self._prefill(s, ids, real, kind)
                self._decode_step(s, kind, s.generator)  # lazy initialisation outside the profile
                parts = breakdown(lambda: self._decode_step(s, kind, s.generator),
                                  device=self.device.type == "cuda",
                                  names=names if self._use_graphs() else None)
            finally:
                self._compiled = compiled
            if not self._use_graphs():
                return parts
            self._prefill(s, ids, real, kind)
            graph = self._graph(s, kind)
            return parts if graph is None else replayed_breakdown(graph.replay, names, replays)

    # ------------------------------------------------------------------ the loop
    def _generate(self, ids, real, max_new_tokens, sampling, eos, pad, seed) -> torch.Tensor:
        batch, length = ids.shape
        s = self._session(batch, length + max_new_tokens)
        s.sampler.load(sampling, s.seen.shape[1])
        s.eos.fill_(-1)
        if eos:
            s.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        s.pad.fill_(pad)
        s.generator.manual_seed(seed)
        kind = sampling.kind
        self._prefill(s, ids, real, kind)
        steps = max_new_tokens - 1
        graph = self._graph(s, kind) if steps and self._use_graphs() else None
        done_steps = 0
        while done_steps < steps:
            chunk = min(self.eos_check_every, steps - done_steps)
            for _ in range(chunk):
                if graph is not None:
                    graph.replay()
                else:
                    self._decode_step(s, kind, s.generator)
            done_steps += chunk
            if eos and done_steps < steps and bool(s.done.all()):
                break
        if steps:  # a prefill-only call (one new token) says nothing about how decode steps ran
            self.last_path = ("cuda-graph" if graph is not None else "eager") + (
                " compiled" if self._compiled is not None else "")
        produced = done_steps + 1
        out = s.out[:, :produced]
        if eos and bool(s.done.all()):
            hit = (out[:, :, None] == s.eos[None, None, :]).any(-1)
            produced = int(hit.to(torch.int8).argmax(dim=1).max()) + 1
        return out[:, :produced].clone()

    def _prefill(self, s: _Session, ids: torch.Tensor, real: torch.Tensor, kind) -> None:
        length = ids.shape[1]
        s.cache.reset()
        s.valid.zero_()
        s.valid[:, :length] = real
        s.done.zero_()
        s.step.zero_()
        s.column.fill_(length)
        s.positions.copy_(real.sum(dim=1, keepdim=True))
        if kind[1]:
            counts = torch.zeros(s.seen.shape, dtype=torch.int32, device=self.device)
            s.seen.copy_(counts.scatter_add_(1, ids, real.to(torch.int32)) > 0)
        positions = (real.long().cumsum(dim=1) - 1).clamp_(min=0)
        calls = attention.call_count()
        logits = self._forward(ids, prefill_mask(s.valid, length), positions, s.cache)
        if attention.call_count() == calls:
            raise UnservedAttention(
                f"{type(self.model).__name__} computed attention without the fast path's function"
            )
        if logits.shape[-1] != s.seen.shape[1]:
            raise UnservedAttention(
                f"the model returned {logits.shape[-1]} logits per token but config.vocab_size is "
                f"{s.seen.shape[1]}"
            )
        self._emit(s, logits, kind, s.generator)

    def _decode_step(self, s: _Session, kind, generator: torch.Generator) -> None:
        """One token per row; every change is an in-place update of ``s`` (capturable)."""
        s.valid.index_fill_(1, s.column, True)
        logits = self._decode_forward(s.tokens, decode_mask(s.valid), s.positions, s.cache)
        self._emit(s, logits, kind, generator)
        s.positions.add_(1)
        s.column.add_(1)

    def _emit(self, s: _Session, logits: torch.Tensor, kind, generator: torch.Generator) -> None:
        token = next_tokens(logits, kind, s.sampler, s.seen, generator)
        token = torch.where(s.done, s.pad, token)
        s.out.index_copy_(1, s.step, token[:, None])
        s.done |= (token[:, None] == s.eos[None, :]).any(dim=-1)
        if kind[1]:
            s.seen.scatter_(1, token[:, None], True)
        s.tokens.copy_(token[:, None])
        s.step.add_(1)

    def _decode_forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """The decode forward, compiled when asked; a compilation failure (raised before any
        kernel runs) switches to the plain forward for good, with the reason logged."""
        if self._compiled is not None:
            try:
                return self._compiled(ids, mask, positions, cache)
            except UnservedAttention:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever inductor raises: run uncompiled
                self._compiled = None
                self._warn_once(f"torch.compile of the decode step failed ({type(exc).__name__}: "
                                f"{_first_line(exc)}); running it uncompiled")
        return self._forward(ids, mask, positions, cache)

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    # ------------------------------------------------------------------ CUDA graphs
    def _use_graphs(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda"

    def _graph(self, s: _Session, kind) -> torch.cuda.CUDAGraph | None:
        """The captured decode step of ``s`` for ``kind`` (captured on first use), or None
        (with the reason logged once) when capture fails: then the step runs eagerly."""
        if kind in s.graphs:
            return s.graphs[kind]
        saved = [t.clone() for t in s.small_state()]
        graph = None
        try:
            scratch = torch.Generator(device=self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # lazy initialisation and autotuning happen here
                for _ in range(WARMUP_STEPS):
                    self._decode_step(s, kind, scratch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            _restore(s, saved)
            graph = torch.cuda.CUDAGraph()
            if kind[0]:
                register = getattr(graph, "register_generator_state", None)
                if register is None:
                    raise RuntimeError("this torch cannot register a generator with a CUDA graph")
                register(s.generator)
            with torch.cuda.graph(graph):
                self._decode_step(s, kind, s.generator)
        except Exception as exc:  # noqa: BLE001 - any capture failure: decode eagerly, say why
            graph = None
            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError:
                pass
            self._warn_once(f"CUDA graph capture of the decode step failed ({type(exc).__name__}: "
                            f"{_first_line(exc)}); decoding eagerly")
        _restore(s, saved)
        s.graphs[kind] = graph
        return graph

    # ------------------------------------------------------------------ setup
    def _session(self, batch: int, need: int) -> _Session:
        length = self.max_len if self.max_len is not None else -(-need // LENGTH_STEP) * LENGTH_STEP
        if need > length:
            raise GPTQError(
                f"prompt plus new tokens is {need} positions but this generator's max_len is "
                f"{self.max_len}; create it with a larger max_len"
            )
        s = self._sessions.get(batch)
        if s is not None and s.length >= need:
            return s
        self._sessions.pop(batch, None)  # free the old cache and graphs first
        from transformers import StaticCache

        config = self.model.config
        vocab = config.get_text_config(decoder=True).vocab_size
        dev = self.device

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        generator = torch.Generator(device=dev)
        s = _Session(
            batch=batch, length=length, cache=StaticCache(config=config, max_cache_len=length),
            tokens=zeros(batch, 1), positions=zeros(batch, 1), column=zeros(1), step=zeros(1),
            valid=zeros(batch, length, dtype=torch.bool), done=zeros(batch, dtype=torch.bool),
            out=zeros(batch, length), seen=zeros(batch, vocab, dtype=torch.bool),
            eos=torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=dev), pad=zeros(()),
            sampler=SamplerState(dev), generator=generator,
        )
        self._sessions[batch] = s
        return s

    def _sampling(self, do_sample, temperature, top_k, top_p, repetition_penalty) -> Sampling:
        config = getattr(self.model, "generation_config", None)
        given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "repetition_penalty": repetition_penalty}
        values = {}
        for name, value in given.items():
            if value is None:
                value = getattr(config, name, None)
            values[name] = SAMPLING_DEFAULTS[name] if value is None else value
        return Sampling(**values)

    def _eos_ids(self, eos_token_id, ignore_eos: bool) -> list[int]:
        if ignore_eos:
            return []
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            return []
        ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
        if len(ids) > MAX_EOS_IDS:
            raise GPTQError(f"{len(ids)} end-of-sequence ids given; the fast path stops on at most {MAX_EOS_IDS}")
        return ids

    def _pad_id(self, pad_token_id: int | None, eos: list[int]) -> int:
        if pad_token_id is None:
            pad_token_id = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        return int(pad_token_id)

    # ------------------------------------------------------------------ fallback
    def _transformers_generate(self, input_ids, attention_mask, max_new_tokens, sampling: Sampling,
                               eos: list[int], pad: int, seed: int) -> torch.Tensor:
        self._warn_once(f"fast decoding is not available for this model: {self.fallback_reason}; "
                        "using transformers' generate")
        self.last_path = "transformers"
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sampling.do_sample,
                  "repetition_penalty": sampling.repetition_penalty,
                  "eos_token_id": eos or None, "pad_token_id": pad}
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        torch.manual_seed(seed)
        with torch.no_grad():
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask.to(input_ids.device), **kwargs)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.log(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def _restore(s: _Session, saved: list[torch.Tensor]) -> None:
    for target, value in zip(s.small_state(), saved):
        target.copy_(value)

