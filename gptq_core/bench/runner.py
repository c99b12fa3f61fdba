"""Running the benchmark: build layers, check every implementation, time it, collect rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..backend import policy_of
from ..device import DeviceInfo, default_device
from .. import selector
from ..errors import GPTQError
from ..options import BackendOptions, OptionsError
from ..quant_linear import QuantLinear
from ..registry import canonical_backend_name, get_registry
from ..spec import LayerSpec
from .baselines import Implementation, fp16_baseline, tinygemm_baseline, tinygemm_reason
from .cases import BenchConfig
from .layers import format_bytes, random_layer
from .timing import time_calls

#: Relative error ||y - ref|| / ||ref|| above which an implementation is not timed.
MAX_ERROR = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
#: Rotate enough weight copies to overflow the L2 cache this many times over.
L2_MULTIPLE = 2.0
MAX_COPIES = 32


@dataclass
class Result:
    """One (shape, M, implementation) measurement, or the reason there is none."""

    shape: str
    k: int
    n: int
    m: int
    impl: str
    quant: str
    status: str  # "ok", "check failed", "unavailable", "error"
    us: float = math.nan
    tbps: float = math.nan
    x_fp16: float = math.nan
    x_tinygemm: float = math.nan
    rel_err: float = math.nan
    method: str = ""
    eager_us: float = math.nan  # per call issued eagerly (QuantLinear.forward for backends)
    copies: int = 0
    note: str = ""
    path: str = ""  # the backend's path for this M (its dispatch policy), e.g. "gemv"

    def as_dict(self) -> dict:
        return asdict(self)


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def copies_for(cfg: BenchConfig, device: torch.device, packed_bytes: int) -> int:
    """Weight copies to rotate: enough that they cannot all sit in the L2 cache."""
    if cfg.copies:
        return cfg.copies
    l2 = _l2_bytes(device)
    if not l2:
        return 2
    return max(2, min(MAX_COPIES, math.ceil(L2_MULTIPLE * l2 / packed_bytes)))


def _backends(cfg: BenchConfig):
    reg = get_registry()
    if cfg.backends is None:
        return [reg.backends[name] for name in sorted(reg.backends)], sorted(reg.broken.items())
    return [reg.get(name) for name in cfg.backends], []


def backend_options(cfg: BenchConfig) -> dict[str, BackendOptions]:
    """``cfg.backend_options`` parsed into each backend's options class, as a model's load
    parses them: a backend that is not installed, or (with ``cfg.backends``) not benched, an
    unknown option or an unreadable value is one :class:`OptionsError`, before any work."""
    parsed = selector.parse_backend_options(cfg.backend_options)
    if cfg.backends is not None:
        running = [canonical_backend_name(b) for b in cfg.backends]
        for name in map(canonical_backend_name, cfg.backend_options):
            if name not in running:
                raise OptionsError(
                    f"backend_options names backend '{name}', which this run does not bench "
                    f"(backends: {', '.join(running)})")
    return parsed


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(y).all()):
        return math.inf
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def _implementations(cfg, device, info, spec, weights, rows, base,
                     options: dict[str, BackendOptions]) -> list[Implementation]:
    impls: list[Implementation] = []
    if cfg.baselines:
        impls.append(fp16_baseline(weights, cfg.dtype))
        reason = tinygemm_reason(weights[0])
        if reason is None:
            try:
                impls.append(tinygemm_baseline(weights, device))
            except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported
                rows.append(Result(**base, impl="tinygemm", status="error", note=str(exc)[:200]))
        else:
            rows.append(Result(**base, impl="tinygemm", status="unavailable", note=reason))
    backends, broken = _backends(cfg)
    for name, b in broken:
        rows.append(Result(**base, impl=name, status="unavailable", note=f"broken: {b.error}"))
    for backend in backends:
        reasons = backend.reasons(info, spec)
        if reasons:
            rows.append(Result(**base, impl=backend.name, status="unavailable",
                               note="; ".join(reasons)))
            continue
        try:
            prepared = [backend.prepare(w, info, spec, options.get(backend.name)) for w in weights]
        except Exception as exc:  # noqa: BLE001
            rows.append(Result(**base, impl=backend.name, status="error",
                               note=f"pack failed: {type(exc).__name__}: {exc}"[:300]))
            continue
        qm = backend.qmatmul
        calls = [lambda x, p=p, qm=qm: qm(x, p, None) for p in prepared]
        layers = [_bound_layer(w, p, backend, info, spec, options) for w, p in zip(weights, prepared)]
        impls.append(Implementation(backend.name, calls, cfg.dtype, format_bytes(weights[0]),
                                    f"{backend.info.distribution} {backend.info.version}",
                                    eager_calls=[layer.forward for layer in layers],
                                    policy=policy_of(backend, prepared[0])))
    return impls


def _bound_layer(weight, prepared, backend, info: DeviceInfo, spec: LayerSpec,
                 options: dict[str, BackendOptions]) -> QuantLinear:
    """A :class:`QuantLinear` over ``weight`` bound to ``prepared`` (no second prepare), so the
    eager column times what a model's forward pays, QuantLinear's own checks included; it keeps
    the run's options, so a rebind prepares as the bench did."""
    layer = QuantLinear.from_packed(weight, backend=backend.name, act_dtype=None)
    layer.backend_options = options
    chain = selector.plan(spec, info, backend.name)
    layer._bindings[spec.act_dtype] = selector.Binding(backend, prepared, chain)
    layer._use(layer._bindings[spec.act_dtype], spec.act_dtype)
    return layer


def run(cfg: BenchConfig, log: Callable[[str], None] = print,
        on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Benchmark every implementation on every (shape, M) of ``cfg``; return all rows."""
    device = torch.device(cfg.device) if cfg.device else default_device()
    info = DeviceInfo.of(device)
    options = backend_options(cfg)
    rows: list[Result] = []

    def emit(r: Result) -> None:
        rows.append(r)
        if on_result is not None:
            on_result(r)

    log(f"gptq bench on {info.describe()}: {cfg.describe()}{describe_options(cfg.backend_options)}")
    for s_idx, (name, k, n) in enumerate(cfg.shapes):
        spec = LayerSpec(bits=cfg.bits, group_size=cfg.group_size, in_features=k,
                         out_features=n, sym=cfg.sym, desc_act=cfg.act_order, act_dtype=cfg.dtype)
        first = random_layer(k, n, cfg.bits, cfg.group_size, sym=cfg.sym,
                             act_order=cfg.act_order, device=device, seed=1000 * s_idx)
        n_copies = copies_for(cfg, device, format_bytes(first))
        weights = [first] + [
            random_layer(k, n, cfg.bits, cfg.group_size, sym=cfg.sym, act_order=cfg.act_order,
                         device=device, seed=1000 * s_idx + i) for i in range(1, n_copies)]
        base = dict(shape=name, k=k, n=n, m=0, quant=cfg.describe(), copies=n_copies)
        pending: list[Result] = []
        impls = _implementations(cfg, device, info, spec, weights, pending, base, options)
        for r in pending:
            emit(r)
        log(f"{name} (K={k}, N={n}): {n_copies} weight copies rotated; "
            f"{', '.join(i.name for i in impls) or 'nothing to run'}")
        w64 = first.dequantize(torch.float64)
        for m in cfg.m_values:
            gen = torch.Generator(device=device)
            gen.manual_seed(7919 * m + s_idx)
            x = torch.randn(m, k, generator=gen, device=device)
            refs: dict[torch.dtype, torch.Tensor] = {}
            measured: list[Result] = []
            for impl in impls:
                xi = x.to(impl.dtype)
                if impl.dtype not in refs:
                    refs[impl.dtype] = xi.double() @ w64
                r = Result(**{**base, "m": m}, impl=impl.name, status="ok", note=impl.note,
                           path=impl.policy.path_for(m) if impl.policy is not None else "")
                try:
                    err = _relative_error(impl.calls[0](xi), refs[impl.dtype])
                    r.rel_err = err
                    if not err <= MAX_ERROR[impl.dtype]:
                        r.status = "check failed"
                        r.note = f"relative error {err:.3g} > {MAX_ERROR[impl.dtype]:g}; not timed"
                    else:
                        eager = [lambda c=c: c(xi) for c in impl.eager_calls or impl.calls]
                        t = time_calls([lambda c=c: c(xi) for c in impl.calls], device,
                                       cfg.target_seconds, eager_calls=eager)
                        r.us, r.method, r.eager_us = t.us, t.method, t.eager_us
                        moved = impl.weight_bytes + m * k * xi.element_size() + m * n * xi.element_size()
                        r.tbps = moved / (t.us * 1e-6) / 1e12
                except GPTQError as exc:
                    r.status, r.note = "error", str(exc)[:300]
                except Exception as exc:  # noqa: BLE001 - keep benchmarking the others
                    r.status, r.note = "error", f"{type(exc).__name__}: {exc}"[:300]
                measured.append(r)
            us_of = {i.kind: r.us for i, r in zip(impls, measured) if r.status == "ok"}
            for r in measured:
                if r.status == "ok":
                    r.x_fp16 = us_of.get("dense", math.nan) / r.us
                    r.x_tinygemm = us_of.get("tinygemm", math.nan) / r.us
                emit(r)
                log(_progress_line(r))
        del weights, first, w64, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def describe_options(values: dict[str, dict[str, object]]) -> str:
    """``"; options: cpu.gemm_threshold=0"`` (empty without options): the progress log says what was forced."""
    items = [f"{b}.{k}={v}" for b, fields in values.items() for k, v in fields.items()]
    return f"; options: {', '.join(items)}" if items else ""


def _progress_line(r: Result) -> str:
    if r.status != "ok":
        return f"  {r.shape} M={r.m} {r.impl}: {r.status}: {r.note}"
    path = f", path {r.path}" if r.path else ""
    return (f"  {r.shape} M={r.m} {r.impl}: {r.us:.1f} us, {r.tbps:.2f} TB/s, "
            f"x{r.x_fp16:.2f} fp16, err {r.rel_err:.1e} ({r.method}{path})")
