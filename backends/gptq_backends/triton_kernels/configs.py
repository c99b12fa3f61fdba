"""Launch configurations of the triton backend: the default rules, tuned tables, and candidates.

A configuration says which path serves a call (the fused kernel, or "dequant": dequantize
once and let cuBLAS/rocBLAS multiply) and, for the fused kernel, its tile shape, split-K and
warps. Configurations are chosen per M bucket (``m_bucket``) and keyed by GPU name and (bits,
group size, dtype, K, N, M bucket); act-order and zero points share the entry of the same
shape. Where a layer's configuration for a bucket comes from, in order (``dispatch``, when the
layer is prepared; the result is its dispatch policy, docs/DESIGN.md §12):

1. the user's tuned table in the options' ``cache_dir`` (default ``~/.cache/gptq_core/triton``);
2. the table shipped in ``tuned/<GPU name>.json`` (measured on that GPU), unless the option
   ``shipped_configs`` is off: then a GPU run with an empty user folder tunes every key it
   meets with today's tuner and kernels, and its user table (same format) can replace the
   shipped one;
3. with the option ``autotune`` (on a GPU): tuning at the first call of the bucket, outside
   CUDA-graph capture (the result is written to the user's table, so later layers of the same
   shape and later processes find it in step 1);
4. the default rules below (``DEFAULT_RULES``), which need no measurement.

Entries of tuned tables carry the layout version (``layout.LAYOUT_VERSIONS``) of their bit
width they were measured on; an entry of another version (or without one, for a width whose
version is above 1) is ignored. They also record whether the fused kernel dequantized through
the single-LOP3 inline PTX (``"asm"``, ``target.use_asm``: fp16 on CUDA); a user entry tuned
the other way (no field: without it) is re-tuned. Shipped entries are used either way (the
H100 table was tuned without it; the asm dequant measured faster on every tile it ran, with
the same tile winners at 4096x4096, NOTES/perf-triton.md).
If a configuration cannot compile or launch on this GPU (e.g. Triton's OutOfResources),
``ops.run`` falls back (fewer stages, the default rule, then dequant + matmul), keeps the one
that works for that key in-process, and warns once.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .layout import LAYOUT_VERSIONS
from .options import DEFAULT_CACHE_DIR, TritonOptions
from .target import is_hip

#: Small-M split-K aims at this many programs per SM.
PROGRAMS_PER_SM = 2
MAX_SPLIT_K = 16
SHIPPED_DIR = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class KernelConfig:
    """One way to run a call. ``split_k=0`` means "choose to fill the GPU" (resolved at launch).

    ``block_m`` is the MMA's N side (the kernels compute out^T = W^T x^T), so 16 serves M = 1.
    """

    path: str = "fused"  # "fused" | "dequant"
    block_m: int = 16
    block_n: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        if self.path == "dequant":
            return "dequant+matmul"
        return (f"m{self.block_m} n{self.block_n} sk{self.split_k} "
                f"w{self.num_warps} s{self.num_stages}")

    def path_name(self, blas: str = "cublas") -> str:
        """The path as ``gptq backends explain`` names it: ``triton:splitk 16x64`` (K split
        across programs, ``split_k`` 0 or > 1), ``triton:dot 128x128`` (one program per output
        tile) or ``triton:dequant+cublas`` (tile sizes are M x N rows x columns)."""
        if self.path == "dequant":
            return f"triton:dequant+{blas}"
        kind = "dot" if self.split_k == 1 else "splitk"
        return f"triton:{kind} {self.block_m}x{self.block_n}"


#: (largest M, config) rows, first match wins: the defaults when nothing was tuned. They are
#: the H100 tuner's most frequent winners (NOTES/perf-triton.md): split-K 16x64 tiles for
#: decode, 32x128 for mid M, 128x128 up to 256, and dequantize + cuBLAS above, where the
#: measured break-even lies (between M=128 and M=1024 depending on the shape).
DEFAULT_RULES: tuple[tuple[int, KernelConfig], ...] = (
    (16, KernelConfig("fused", 16, 64, 0, 4, 3)),
    (64, KernelConfig("fused", 32, 128, 0, 4, 3)),
    (256, KernelConfig("fused", 128, 128, 1, 8, 3)),
    (math.inf, KernelConfig("dequant")),
)


#: The default rules on AMD GPUs (``target.is_hip``): the same buckets, sized for CDNA's 64-lane
#: wavefronts and MFMA. 4 waves are 256 lanes (what 8 warps are on NVIDIA), so the 128x128 tile
#: takes 4; 2 stages, the depth Triton's AMD stream pipeliner is built around. Every tile
#: compiles for gfx90a and gfx942 through Triton's AMD backend, lowers to v_mfma and fits their
#: 64 KiB of LDS (backend_rocm/tests/test_rocm_triton_compile.py); none was timed on AMD
#: hardware yet (backend_rocm/README.md).
AMD_DEFAULT_RULES: tuple[tuple[int, KernelConfig], ...] = (
    (16, KernelConfig("fused", 16, 64, 0, 4, 2)),
    (64, KernelConfig("fused", 32, 128, 0, 4, 2)),
    (256, KernelConfig("fused", 128, 128, 1, 4, 2)),
    (math.inf, KernelConfig("dequant")),
)


#: The largest M bucket: every M above 4096 shares its configuration.
MAX_BUCKET = 4096
#: Every M bucket, smallest first (the bounds of a dispatch policy's routes).
BUCKETS: tuple[int, ...] = tuple(1 << i for i in range(MAX_BUCKET.bit_length()))


def m_bucket(m: int) -> int:
    """Calls with M in (bucket/2, bucket] share a configuration (powers of two, 4096 and up one)."""
    return min(1 << max(0, (m - 1).bit_length()), MAX_BUCKET)


def default_config(m: int, bits: int | None = None, hip: bool | None = None) -> KernelConfig:
    """The rule for M (and the bit width, where given). 3-bit tiles are 512 channels deep, so
    x's share of shared memory is 2-4x that of other widths: 128x128 at 3 stages needs
    450560 B (the H100 has 232448; ``benchmarks/triton_sass.py --bits 3``), and 3-bit
    takes dequant + matmul from M > 64 (what the H100 table chose at M=256). ``hip`` picks
    ``AMD_DEFAULT_RULES`` (default: whether this torch is a ROCm build, ``target.is_hip``)."""
    rules = AMD_DEFAULT_RULES if (is_hip() if hip is None else hip) else DEFAULT_RULES
    if bits == 3 and m > 64:
        return rules[-1][1]
    for limit, cfg in rules:
        if m <= limit:
            return cfg
    return rules[-1][1]


def resolve_split_k(cfg: KernelConfig, m: int, n: int, tiles: int, sm_count: int) -> int:
    """Concrete split-K: the configured one, or enough programs to fill the GPU (split_k=0)."""
    if cfg.path != "fused":
        return 1
    grid = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    split = cfg.split_k or math.ceil(PROGRAMS_PER_SM * sm_count / grid)
    split = max(1, min(split, MAX_SPLIT_K, tiles))
    # Equalise: every split gets a whole number of tiles and none is empty.
    per = math.ceil(tiles / split)
    return math.ceil(tiles / per)


def shape_key(bits: int, group_size: int, dtype: torch.dtype, k: int, n: int, m: int) -> str:
    dt = str(dtype).replace("torch.", "")
    return f"b{bits}-g{group_size}-{dt}-K{k}-N{n}-M{m_bucket(m)}"


def gpu_file_name(gpu_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3.json"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_") + ".json"


def layout_version(key: str) -> int:
    """The current layout version of a key's bit width ("b3-..." -> LAYOUT_VERSIONS[3])."""
    m = re.match(r"b(\d+)-", key)
    return LAYOUT_VERSIONS.get(int(m.group(1)), 1) if m else 1


def _read_table(path: Path) -> tuple[dict[str, KernelConfig], dict[str, dict], dict[str, bool]]:
    """(configurations, the timings that chose them, whether the asm dequant was on when they
    were tuned) of a tuned file; empty if unreadable.

    Entries measured on another layout version than today's (no "layout" field: version 1), or
    with a kernel variant since removed (``"postzero"``), are left out."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, {}, {}
    configs, timings, asm = {}, {}, {}
    for key, entry in data.get("entries", {}).items():
        if entry.get("layout", 1) != layout_version(key) or entry.get("postzero", 0):
            continue  # measured on an older layout of this bit width, or a removed variant
        try:
            configs[key] = KernelConfig(**entry["config"])
        except (TypeError, KeyError):
            continue  # an entry from another version of this file: ignore it
        timings[key] = entry.get("timings_us", {})
        asm[key] = bool(entry.get("asm", False))
    return configs, timings, asm


class ConfigTable:
    """Configurations for one GPU: the shipped entries (unless ``shipped`` is off) and the
    user's tuned entries in ``user_dir``, both read once per process."""

    def __init__(self, gpu_name: str, shipped: bool = True,
                 user_dir: Path = DEFAULT_CACHE_DIR) -> None:
        self.gpu_name = gpu_name
        self.file_name = gpu_file_name(gpu_name)
        self.user_dir = user_dir
        self.shipped = {}
        if shipped:
            self.shipped, _, _ = _read_table(SHIPPED_DIR / self.file_name)
        self.user, self.timings, self.asm = _read_table(user_dir / self.file_name)
        self.lock = threading.Lock()

    def lookup(self, key: str, asm: bool = False) -> KernelConfig | None:
        """The user's entry if it was tuned with the same asm setting, else the shipped one
        (tuned without the asm dequant, and used either way: the asm dequant was faster on
        every tile it ran, NOTES/perf-triton.md)."""
        cfg = self.user.get(key)
        if cfg is not None and self.asm.get(key, False) == bool(asm):
            return cfg
        return self.shipped.get(key)

    def store(self, key: str, cfg: KernelConfig, timings: dict[str, float],
              asm: bool = False) -> None:
        """Remember a tuned entry in-process and in the user's file (best effort)."""
        with self.lock:
            self.user[key] = cfg
            self.timings[key] = timings
            self.asm[key] = bool(asm)
            path = self.user_dir / self.file_name
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.save(path)
            except OSError:
                pass  # a read-only home still tunes, it just does not remember

    def save(self, path: Path) -> None:
        """Write every user-tuned entry (with the timings that chose it) as JSON."""
        entries = {
            k: {"config": asdict(v), "layout": layout_version(k), "asm": self.asm.get(k, False),
                "timings_us": self.timings.get(k, {})}
            for k, v in sorted(self.user.items())
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpu": self.gpu_name, "entries": entries}, indent=1))
        tmp.replace(path)


_tables: dict[tuple[str, bool, Path], ConfigTable] = {}


def table_for(gpu_name: str, options: TritonOptions) -> ConfigTable:
    """The process's table for this GPU and these options (read once, shared by every layer
    with the same options, so a key tuned for one layer serves the next)."""
    key = (gpu_name, options.shipped_configs, options.tuned_dir)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = ConfigTable(gpu_name, options.shipped_configs, options.tuned_dir)
    return table


#: Fused tiles that cannot fit any supported GPU's shared memory (the H100's 232448 B is the
#: largest), by bit width: (block_m, num_stages) -> what Triton asked for at 3 stages on the
#: H100 (``benchmarks/triton_precompile.py``). 3-bit tiles are 512 channels deep: m64 needs
#: 246016 B (m64 at 2 stages fits: 26.2 us at 4096x4096 M=64), m128 450560-492032, m256
#: 843776; 2-bit m256 n128 needs 413696. Such tiles are left out of the tuner's candidates
#: (3-bit m64 runs at 2 stages), so no GPU run spends compile time on them.
MAX_BLOCK_M_3STAGE = {3: 32, 2: 128}


def fits(cfg: KernelConfig, bits: int | None) -> bool:
    """False for a fused tile known not to fit (``MAX_BLOCK_M_3STAGE``) at >= 3 stages."""
    if cfg.path != "fused" or bits not in MAX_BLOCK_M_3STAGE:
        return True
    return cfg.block_m <= MAX_BLOCK_M_3STAGE[bits] or cfg.num_stages < 3


def candidates(m: int, k: int, n: int, bits: int | None = None) -> list[KernelConfig]:
    """Configurations the tuner times for one M bucket (the default always among them).

    Kept short on purpose: every distinct tile shape is one more kernel to compile. With
    ``bits``, tiles that cannot fit (``fits``) are left out; 3-bit 64-row tiles run at 2
    stages and 3-bit above M=64 has only dequant + matmul (its default).
    """
    mb = m_bucket(m)
    F = KernelConfig
    if mb <= 16:
        out = [F("fused", 16, 64, 0, 4, 3), F("fused", 16, 128, 0, 4, 3),
               F("fused", 16, 128, 0, 4, 4), F("fused", 16, 256, 0, 8, 3),
               F("fused", 16, 128, 1, 4, 3)]
    elif mb <= 64:
        out = [F("fused", bm, 128, sk, 4, 2 if (bits == 3 and bm == 64) else 3)
               for bm in (16, 32, 64) if bm <= mb for sk in (0, 1)]
    else:
        out = [F("fused", 64, 128, 1, 4, 2 if bits == 3 else 3), F("fused", 128, 128, 1, 8, 3),
               F("fused", 128, 256, 1, 8, 3), F("fused", 256, 128, 1, 8, 3), F("dequant")]
        if bits == 3:
            out = [F("dequant")]
    out = [c for c in out if fits(c, bits)]
    base = default_config(mb, bits)
    if base not in out:
        out.insert(0, base)
    return out
