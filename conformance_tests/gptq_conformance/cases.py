"""The conformance cases, generated from a backend's declared :class:`Capabilities`.

Everything here is data and pure functions (no pytest): the full list of cases for a backend
is known before any test runs, so the plugin can tell a case that was removed from one that
was never generated.

The grid is bits x group size x sym x act-order x activation dtype x awkward shape, each case
looping over M. Group sizes include one that divides neither K (``48``); shapes include
``K=172, N=32`` (K divisible by no group size, the stories260K MLP). A backend whose declared
tile constraints exclude a shape gets it rounded up to fit, and the awkward original becomes a
limit case that must raise ``NotSupportedError``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from gptq_core.backend import Capabilities
from gptq_core.device import DEVICE_KINDS, DeviceInfo
from gptq_core.packing import SUPPORTED_BITS
from gptq_core.spec import LayerSpec, Mode

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}

#: Grid of the full and the quick (``--gptq-quick``, for slow interpreters) suites.
FULL = {
    "group_sizes": (-1, 32, 64, 128, 48),
    "shapes": ((172, 32), (256, 72)),
    "m_values": (0, 1, 2, 7, 16, 64),
}
QUICK = {
    "group_sizes": (-1, 128, 48),
    "shapes": ((172, 32),),
    "m_values": (0, 1, 16),
}
#: Group sizes tried as limits when a backend declares a fixed list.
LIMIT_GROUP_SIZES = (-1, 16, 32, 48, 64, 128, 256)

#: Capture checks (docs/DESIGN.md §11). On CUDA: one case per bits x act-order, the widths
#: models ship first, at these batch sizes (the bounds of the backend's dispatch policy are
#: added at run time, so every path it has is captured). On other devices only the compiled
#: replay runs, with inductor: seconds per case on a 2-core CI machine, so two small cases.
CAPTURE = {
    "bits_first": (4, 8, 3, 2),
    "m_values": (1, 7, 16, 64),
    "graph_limit": {False: 8, True: 4},  # by quick
    "compiled_limit": {False: 4, True: 2},
}
#: Model-sized layers run on CUDA at every bound of the backend's dispatch policy (added at run
#: time, as for captures): the grid's small shapes never reach routes a backend picks by layer
#: size (docs/DESIGN.md §12), such as marlin's 256-row-stage kernel on 4096x14336 on an H200.
ROUTES = {
    "shapes": {False: ((4096, 4096), (4096, 14336)), True: ((4096, 14336),)},  # by quick
    "bits": (4, 8),
    "m_values": (1,),
}
CPU_COMPILED = {
    "picks": ((4, 128), (3, -1), (8, -1), (2, -1)),  # (bits, group size), first two declared
    "count": 2,
    "m_values": (1, 7),
}


@dataclass(frozen=True)
class Case:
    """One weight configuration run on one device; ``m_values`` are the batch sizes tried."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    in_features: int
    out_features: int
    dtype: torch.dtype
    bias: bool = False
    m_values: tuple[int, ...] = (1,)
    zero_format: str = "v1"

    @property
    def id(self) -> str:
        g = "gall" if self.group_size == -1 else f"g{self.group_size}"
        parts = [
            f"b{self.bits}", g, "sym" if self.sym else "asym",
            "act" if self.desc_act else "noact", DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            f"K{self.in_features}xN{self.out_features}",
        ]
        if self.bias:
            parts.append("bias")
        if self.zero_format != "v1":
            parts.append(self.zero_format)
        return "-".join(parts)

    def spec(self, mode: Mode = "inference") -> LayerSpec:
        return LayerSpec(
            bits=self.bits, group_size=self.group_size, in_features=self.in_features,
            out_features=self.out_features, sym=self.sym, desc_act=self.desc_act,
            act_dtype=self.dtype, mode=mode,
        )

    def seed(self, base: int = 0, salt: str = "") -> int:
        """A reproducible seed per case (and per use within the case)."""
        return zlib.crc32(f"{self.id}/{salt}".encode()) ^ (base * 0x9E3779B1 % 2**32)


@dataclass(frozen=True)
class LimitCase:
    """A combination outside the declared capabilities: it must raise NotSupportedError."""

    id: str
    what: str
    weight: Case
    spec: LayerSpec
    device: DeviceInfo | None = None  # None: the device the suite runs on


@dataclass
class SuitePlan:
    """Every case of every family, for one backend on one device."""

    families: dict[str, list] = field(default_factory=dict)
    device_reasons: list[str] = field(default_factory=list)
    #: Why a family is empty on this device (families empty by declaration say so elsewhere).
    reasons: dict[str, str] = field(default_factory=dict)


def _mult(n: int, m: int) -> int:
    return -(-n // m) * m


def fit_shape(caps: Capabilities, K: int, N: int, group_size: int) -> tuple[int, int]:
    """The smallest (K', N') >= (K, N) that satisfies the declared tile constraints."""
    k_step = caps.k_multiple
    if caps.k_divisible_by_group and group_size != -1:
        k_step = k_step * group_size // math.gcd(k_step, group_size)
    return _mult(K, k_step), _mult(N, caps.n_multiple)


def supported_group_sizes(caps: Capabilities, candidates: Iterable[int]) -> list[int]:
    """The candidates the backend declares, plus the smallest and largest of its other
    declared sizes (a long fixed list would multiply the grid, and JIT compiles with it)."""
    if caps.group_sizes is None:
        return list(candidates)
    chosen = [g for g in candidates if g in caps.group_sizes]
    others = sorted(g for g in caps.group_sizes if g not in chosen)
    return chosen + sorted(set(others[:1] + others[-1:]), key=others.index)


def _options(caps: Capabilities) -> tuple[list[int], list[bool], list[bool], list[torch.dtype]]:
    bits = [b for b in SUPPORTED_BITS if b in caps.bits]
    syms = [s for s, ok in ((True, caps.sym), (False, caps.asym)) if ok]
    acts = [False, True] if caps.desc_act else [False]
    dtypes = [d for d in (torch.float16, torch.bfloat16, torch.float32) if d in caps.act_dtypes]
    return bits, syms, acts, dtypes


def qmatmul_cases(caps: Capabilities, quick: bool,
                  shapes: tuple[tuple[int, int], ...] | None = None) -> list[Case]:
    """Every declared bits x group size x sym x act-order, each with every dtype and shape
    (quick: one dtype per case, rotating); bias on every other case. ``shapes`` replaces the
    grid's (``--gptq-shapes``)."""
    grid = QUICK if quick else FULL
    if shapes:
        grid = {**grid, "shapes": shapes}
    bits, syms, acts, dtypes = _options(caps)
    cases: list[Case] = []
    configs = [(b, g, s, a) for b in bits for g in supported_group_sizes(caps, grid["group_sizes"])
               for s in syms for a in acts]
    for i, (b, g, s, a) in enumerate(configs):
        variants = [(dtypes[i % len(dtypes)], shape) for shape in grid["shapes"]] if quick \
            else [(d, shape) for d in dtypes for shape in grid["shapes"]]
        for d, (K, N) in variants:
            K, N = fit_shape(caps, K, N, g)
            cases.append(Case(b, g, s, a, K, N, d, bias=len(cases) % 2 == 1,
                              m_values=grid["m_values"]))
    return _unique(cases)


def _unique(cases: list) -> list:
    seen, out = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def sample(cases: list[Case], key, limit: int | None = None) -> list[Case]:
    """One case per distinct ``key(case)`` value, spread over the list (rotation, not the head)."""
    groups: dict = {}
    for c in cases:
        groups.setdefault(key(c), []).append(c)
    out = [members[(i * 7) % len(members)] for i, members in enumerate(groups.values())]
    return out[:limit] if limit is not None else out


def limit_cases(caps: Capabilities) -> list[LimitCase]:
    """One case per declared limit (plus bits=5 and float64, which no backend serves)."""
    bits, syms, acts, dtypes = _options(caps)
    if not (bits and syms and dtypes):
        return []
    gs_ok = supported_group_sizes(caps, (128, 32, 64, -1))
    base_g = gs_ok[0]
    K, N = fit_shape(caps, 172, 32, base_g)
    base = Case(4 if 4 in bits else bits[0], base_g, syms[0], False, K, N, dtypes[0])
    out: list[LimitCase] = []

    def add(id_: str, what: str, weight: Case | None = None, spec: LayerSpec | None = None,
            dev: DeviceInfo | None = None) -> None:
        w = weight or base
        out.append(LimitCase(f"limit-{id_}", what, w, spec or w.spec(), dev))

    for b in SUPPORTED_BITS:
        if b not in caps.bits:
            add(f"bits{b}", f"{b}-bit weights", replace(base, bits=b))
    add("bits5", "5-bit (not a GPTQ width)", spec=replace(base.spec(), bits=5))
    if caps.group_sizes is not None:
        for g in LIMIT_GROUP_SIZES:
            if g not in caps.group_sizes:
                w = replace(base, group_size=g)
                add(f"group{g}", f"group size {g}", w)
    if not caps.sym:
        add("sym", "symmetric quantization", replace(base, sym=True))
    if not caps.asym:
        add("asym", "asymmetric quantization", replace(base, sym=False))
    if not caps.desc_act:
        add("desc_act", "act-order", replace(base, desc_act=True))
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        if d not in caps.act_dtypes:
            add(f"dtype-{DTYPE_NAMES[d]}", f"{d} activations", replace(base, dtype=d))
    if caps.k_multiple > 1:
        bad_k = base.in_features + (caps.k_multiple // 2 if caps.k_multiple % 2 == 0 else 1)
        add(f"K{bad_k}", f"K not a multiple of {caps.k_multiple}", replace(base, in_features=bad_k))
    if caps.n_multiple > 1:
        bad_n = base.out_features + (caps.n_multiple // 2 if caps.n_multiple % 2 == 0 else 1)
        add(f"N{bad_n}", f"N not a multiple of {caps.n_multiple}", replace(base, out_features=bad_n))
    if caps.k_divisible_by_group:
        # a K that meets k_multiple but not the group size (none exists when g | k_multiple)
        g = next((g for g in gs_ok if g > 1 and caps.k_multiple % g), None)
        if g is not None:
            start = _mult(g + 1, caps.k_multiple)
            bad_k = next(k for k in range(start, start + caps.k_multiple * g, caps.k_multiple)
                         if k % g)
            add(f"K{bad_k}-g{g}", f"K not divisible by group size {g}",
                replace(base, group_size=g, in_features=bad_k))
    if not caps.training:
        add("training", "training (backward)", spec=base.spec("training"))
    if not caps.compile:
        add("compile", "torch.compile", spec=base.spec("compile"))
    for kind in DEVICE_KINDS:
        if kind not in caps.device_kinds:
            fake = DeviceInfo(type=kind, index=0, kind=kind, name=f"synthetic {kind}")
            add(f"device-{kind}", f"a {kind} device", dev=fake)
    if caps.min_compute_capability is not None and "cuda" in caps.device_kinds:
        major, minor = caps.min_compute_capability
        below = (major, minor - 1) if minor else (major - 1, 9)
        fake = DeviceInfo(type="cuda", index=0, kind="cuda", name="synthetic older GPU",
                          compute_capability=below)
        add(f"cc{below[0]}{below[1]}", f"compute capability {below}", dev=fake)
    return out


def capture_cases(qm: list[Case], quick: bool) -> list[Case]:
    """CUDA capture cases: one per bits x act-order (4-bit first), bias on every other one."""
    order = CAPTURE["bits_first"]
    picked = sorted(sample(qm, key=lambda c: (c.bits, c.desc_act)),
                    key=lambda c: order.index(c.bits) if c.bits in order else len(order))
    return [replace(c, bias=i % 2 == 0, m_values=CAPTURE["m_values"])
            for i, c in enumerate(picked[:CAPTURE["graph_limit"][quick]])]


def route_cases(caps: Capabilities, quick: bool) -> list[Case]:
    """CUDA route cases: 4- and 8-bit where declared, group size 128 (else the first declared),
    symmetric where declared, fp16 (else the first declared dtype), on the model shapes of
    :data:`ROUTES` fitted to the backend's tiles."""
    bits, syms, _, dtypes = _options(caps)
    if not (syms and dtypes):
        return []
    group = supported_group_sizes(caps, (128,))[0] if caps.group_sizes else 128
    dtype = torch.float16 if torch.float16 in dtypes else dtypes[0]
    return [Case(b, group, syms[0], False, *fit_shape(caps, K, N, group), dtype, m_values=ROUTES["m_values"])
            for b in ROUTES["bits"] if b in bits for K, N in ROUTES["shapes"][quick]]


def cpu_compiled_cases(qm: list[Case]) -> list[Case]:
    """The first declared of the preferred (bits, group size) pairs, one case each."""
    out: list[Case] = []
    for bits, group in CPU_COMPILED["picks"]:
        found = next((c for c in qm if (c.bits, c.group_size) == (bits, group)), None)
        if found is not None and len(out) < CPU_COMPILED["count"]:
            out.append(replace(found, bias=not out, m_values=CPU_COMPILED["m_values"]))
    return out


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """"4096x256,512x128" -> ((4096, 256), (512, 128)); ValueError naming a bad item."""
    shapes = []
    for item in text.split(","):
        k, sep, n = item.strip().lower().partition("x")
        if not (sep and k.isdigit() and n.isdigit() and int(k) > 0 and int(n) > 0):
            raise ValueError(f"--gptq-shapes item {item.strip()!r} is not KxN with positive K and N, "
                             "e.g. 4096x256")
        shapes.append((int(k), int(n)))
    return tuple(shapes)


def build_plan(caps: Capabilities, device_reasons: list[str], quick: bool,
               device_type: str = "cpu", shapes: tuple[tuple[int, int], ...] | None = None) -> SuitePlan:
    """All families of cases for a backend on a device of torch type ``device_type``; only
    ``device`` when the device is refused."""
    plan = SuitePlan(device_reasons=list(device_reasons))
    if device_reasons:
        return plan
    qm = qmatmul_cases(caps, quick, shapes)
    by_bits = sample(qm, key=lambda c: c.bits)
    # GPTQModel's v2 zeros (including a zero of 0, which v1 cannot store), one per bit width.
    qm += [replace(c, zero_format="v2") for c in by_bits]
    plan.families["qmatmul"] = qm
    plan.families["module"] = by_bits if quick else sample(qm, key=lambda c: (c.bits, c.dtype))
    plan.families["property"] = by_bits
    plan.families["opcheck"] = sample(qm, key=lambda c: c.bits, limit=2 if quick else 4)
    plan.families["compile"] = (
        sample(qm, key=lambda c: c.dtype, limit=1 if quick else 3) if caps.compile else []
    )
    on_cuda = device_type == "cuda"  # torch's type, ROCm included
    captured = capture_cases(qm, quick) if caps.compile and on_cuda else []
    plan.families["cuda_graph"] = captured
    plan.families["routes"] = route_cases(caps, quick) if on_cuda else []
    if not on_cuda:
        plan.reasons["routes"] = (
            f"model-sized layers at every bound of the dispatch policy run on CUDA only (their "
            f"float64 reference is too slow elsewhere) and this run is on '{device_type}'"
        )
    plan.families["compile_replay"] = (
        [] if not caps.compile
        else captured[:CAPTURE["compiled_limit"][quick]] if on_cuda
        else cpu_compiled_cases(qm)
    )
    if caps.compile and not on_cuda:
        plan.reasons["cuda_graph"] = (
            f"torch.cuda.graph capture needs a CUDA or ROCm device and this run is on "
            f"'{device_type}'; test_compile_replay compiles the layer here instead"
        )
    # Every bit width (the backward dequantizes each one its own way), and in the full suite
    # every activation dtype of it (GPU GEMMs accumulate fp16/bf16 differently).
    plan.families["training"] = (
        (by_bits if quick else sample(qm, key=lambda c: (c.bits, c.dtype)))
        if caps.training else []
    )
    plan.families["limit"] = limit_cases(caps)
    return plan
