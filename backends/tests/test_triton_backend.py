"""The triton backend against the float64 reference: every bit width, sym/asym, act-order, dtypes.

On a machine without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set by a fixture for this module's tests); on a CUDA machine they run compiled. Shapes
are tiny so the interpreter finishes in about a minute on two cores.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
from gptq_core import DeviceInfo, LayerSpec, NotSupportedError, QuantLinear, get_registry  # noqa: E402
from gptq_core.format import PackedWeight, pack_weight  # noqa: E402
from gptq_backends.triton_kernels import configs, dispatch, launch, layout, ops, target  # noqa: E402
from gptq_backends.triton_kernels.configs import KernelConfig  # noqa: E402
from gptq_backends.triton_kernels.options import TritonOptions  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
#: The default rules whatever the machine: no tuning, no shipped table, no user table (a folder
#: that cannot exist, so nothing is read or written).
OPTIONS = TritonOptions(autotune=False, shipped_configs=False,
                        cache_dir=Path(os.devnull) / "no-tuned-tables")


def prepare(w: PackedWeight, dtype: torch.dtype = torch.float16):
    return dispatch.prepare(w, DEVICE, OPTIONS, dtype)


pytestmark = pytest.mark.usefixtures("triton_interpreter")

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
M_VALUES = (1, 5, 16, 33)


def random_weight(K: int, N: int, bits: int, group_size: int, *, sym: bool, act: bool,
                  bias: bool = False, zero_format: str = "v1", seed: int = 0) -> PackedWeight:
    """A random GPTQ layer: random ints, scales and zeros (v1-storable unless v2), on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = 1 if group_size == -1 else -(-K // group_size)
    q = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32)
    scales = torch.rand(G, N, generator=g) * 0.02 + 0.005
    if sym:
        zeros = torch.full((G, N), 2 ** (bits - 1), dtype=torch.int32)
    elif zero_format == "v2":
        zeros = torch.randint(0, maxq + 1, (G, N), generator=g, dtype=torch.int32)
    else:
        zeros = torch.randint(1, maxq + 2, (G, N), generator=g, dtype=torch.int32)
    g_idx = None
    if act:
        perm = torch.randperm(K, generator=g)
        gs = K if group_size == -1 else group_size
        g_idx = (torch.argsort(perm) // gs).to(torch.int32)
    b = torch.randn(N, generator=g) if bias else None
    w = pack_weight(q, scales, zeros, bits=bits, group_size=group_size, g_idx=g_idx, sym=sym,
                    desc_act=act, bias=b, zero_format=zero_format)
    return w.to(DEVICE)


def reference(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    ref = x.double() @ w.dequantize(torch.float64)
    if w.bias is not None:
        ref = ref + w.bias.double()
    return ref


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def check(w: PackedWeight, dtype: torch.dtype, ms=M_VALUES, cfg: KernelConfig | None = None,
          seed: int = 1) -> None:
    """Run qmatmul for each M on fresh random x and compare with the float64 reference."""
    p = prepare(w, dtype)
    gen = torch.Generator().manual_seed(seed)
    for m in ms:
        x = torch.randn(m, w.in_features, generator=gen).to(dtype).to(DEVICE)
        chosen = cfg or configs.default_config(m)
        y = ops.launch(x, p, w.bias, chosen) if cfg else ops.qmatmul(x, p, w.bias)
        assert y.shape == (m, w.out_features) and y.dtype == dtype
        assert torch.isfinite(y).all(), f"non-finite output for M={m}"
        err = rel_err(y, reference(x, w))
        assert err < TOL[dtype], f"M={m} {chosen.label()}: relative error {err:.2e}"


# Every bit width x sym/asym x act-order x fp16/bf16, each at M = 1, 5, 16, 33. The group size
# rotates so that every way of applying scales is met: per group after the MMA (64, 128),
# once at the end (-1), and per weight before it (32 with 4-bit tiles of 128; 48).
GRID = list(itertools.product((2, 3, 4, 8), (True, False), (False, True),
                              (torch.float16, torch.bfloat16)))
GROUPS = (128, -1, 64, 48, 32)


@pytest.mark.parametrize("bits,sym,act,dtype", GRID,
                         ids=[f"b{b}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}-"
                              f"{str(d)[6:]}" for b, s, a, d in GRID])
def test_qmatmul_matches_reference(bits, sym, act, dtype):
    i = GRID.index((bits, sym, act, dtype))
    group = GROUPS[i % len(GROUPS)]
    w = random_weight(160, 48, bits, group, sym=sym, act=act, bias=i % 2 == 0, seed=i)
    check(w, dtype, seed=100 + i)


@pytest.mark.parametrize("cfg", [
    KernelConfig("fused", 16, 64, 3, 4, 2),    # split-K: partials and the last-program sum
    KernelConfig("fused", 32, 64, 2, 4, 2),    # split-K with two M tiles
    KernelConfig("fused", 64, 32, 1, 4, 2),    # scale per weight (BLOCK_M too large to post-scale)
    KernelConfig("dequant"),                    # dequantize once + torch.matmul
], ids=lambda c: c.label().replace(" ", "-"))
def test_paths(cfg):
    w = random_weight(512, 40, 4, 64, sym=False, act=True, bias=True, seed=7)
    check(w, torch.float16, ms=(1, 33), cfg=cfg)


def test_fp32_activations_and_v2_zeros():
    w = random_weight(160, 24, 3, 32, sym=False, act=False, zero_format="v2", seed=3)
    assert bool((w.zeros() == 0).any()), "the case must hold a zero of 0, which v1 cannot store"
    check(w, torch.float32, ms=(1, 16))


def test_split_k_workspace_is_left_clean():
    """Two split-K calls in a row: the tickets reset, so the second is right too."""
    w = random_weight(512, 32, 4, 32, sym=True, act=False, seed=11)
    cfg = KernelConfig("fused", 16, 32, 4, 4, 2)
    check(w, torch.float16, ms=(2,), cfg=cfg, seed=1)
    assert int(prepare(w).scratch.tickets.abs().sum()) == 0
    check(w, torch.float16, ms=(3,), cfg=cfg, seed=2)


def test_nan_in_one_row_stays_in_that_row():
    w = random_weight(128, 32, 4, 128, sym=True, act=False, seed=5)
    p = prepare(w)
    x = torch.randn(3, 128).half().to(DEVICE)
    x[1, 7] = float("nan")
    y = ops.qmatmul(x, p, None)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


def test_empty_batch():
    w = random_weight(128, 32, 4, 128, sym=True, act=False, seed=5)
    p = prepare(w)
    y = ops.qmatmul(torch.empty(0, 128, dtype=torch.float16, device=DEVICE), p, None)
    assert y.shape == (0, 32)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_layout_round_trip(bits):
    w = random_weight(200, 40, bits, 48, sym=False, act=True, seed=bits)
    p = layout.prepare(w, DEVICE)
    q = layout.unplanar(p)
    expected = w.unpack_qweight()[p.perm[:200].long()]
    assert torch.equal(q[:200, :40].to(torch.uint8), expected)
    assert not q[200:].any() and not q[:, 40:].any()
    assert p.k_pad % layout.tile_k(bits, p.sub) == 0 and p.n_pad % 16 == 0


def test_pack_does_not_modify_the_weight():
    w = random_weight(128, 32, 4, 32, sym=False, act=True, seed=2)
    before = [t.clone() for t in (w.qweight, w.qzeros, w.scales, w.g_idx)]
    layout.prepare(w, DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(before, (w.qweight, w.qzeros, w.scales, w.g_idx)))


def test_irregular_g_idx_is_refused():
    w = random_weight(128, 32, 4, 32, sym=True, act=False, seed=2)
    g_idx = w.g_idx.clone()
    g_idx[0], g_idx[40] = 1, 1  # group 0 now has 31 channels, group 1 has 33
    with pytest.raises(NotSupportedError, match="g_idx"):
        layout.prepare(w.replace(g_idx=g_idx, desc_act=True), DEVICE)


def test_group_size_must_be_a_multiple_of_16():
    with pytest.raises(NotSupportedError, match="multiple of 16"):
        layout.sub_tile(40)


def test_quant_linear_selects_triton_by_name():
    w = random_weight(160, 48, 4, 32, sym=True, act=True, bias=True, seed=9)
    layer = QuantLinear.from_packed(w, backend="triton", act_dtype=torch.float16)
    assert layer.binding.backend.name == "triton"
    x = torch.randn(2, 3, 160).half().to(DEVICE)
    err = rel_err(layer(x).reshape(6, 48), reference(x.reshape(6, 160), w))
    assert err < TOL[torch.float16]


def test_probe_needs_the_interpreter_on_cpu(monkeypatch):
    backend = get_registry().get("triton")
    spec = LayerSpec(bits=4, group_size=128, in_features=256, out_features=64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = backend.reasons(DeviceInfo.of("cpu"), spec)
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.reasons(DeviceInfo.of("cpu"), spec) == []


def test_older_gpus_and_odd_groups_are_refused_with_reasons():
    backend = get_registry().get("triton")
    old = DeviceInfo(type="cuda", index=0, kind="cuda", name="T4", compute_capability=(7, 5))
    assert any("compute capability >= 8.0" in r for r in backend.reasons(old))
    spec = LayerSpec(bits=4, group_size=40, in_features=160, out_features=64)
    assert any("group size 40" in r for r in backend.reasons(DeviceInfo.of("cpu"), spec))


def test_custom_op_has_a_fake_implementation():
    w = random_weight(128, 32, 4, 128, sym=True, act=False, seed=4)
    p = layout.prepare(w, DEVICE)
    x = torch.randn(5, 128, dtype=torch.float16, device="meta")
    meta = {f: getattr(p, f).to("meta") for f in ("qweight", "scales")}
    y = ops.qmatmul_op(x, meta["qweight"], None, meta["scales"], None, None, None, p.bits,
                       p.group_size, p.sub, p.in_features, p.out_features, p.k_pad,
                       True, True, "")
    assert y.shape == (5, 32) and y.device.type == "meta"


def test_config_rules():
    assert [configs.m_bucket(m) for m in (1, 2, 3, 16, 17, 5000)] == [1, 2, 4, 16, 32, 4096]
    assert configs.default_config(1).path == "fused"
    assert configs.default_config(4096).path == "dequant"
    cfg = KernelConfig("fused", 16, 128, 0, 4, 3)
    split = configs.resolve_split_k(cfg, 1, 4096, tiles=32, sm_count=132)
    assert 1 < split <= 16 and 32 % -(-32 // split) < -(-32 // split) + 1
    assert configs.resolve_split_k(cfg, 1, 4096, tiles=1, sm_count=132) == 1
    for m in (1, 16, 64, 512):
        cands = configs.candidates(m, 4096, 4096)
        assert configs.default_config(configs.m_bucket(m)) in cands and len(set(cands)) == len(cands)


def test_tuned_table_round_trip(tmp_path):
    table = configs.ConfigTable("Test GPU 80GB", user_dir=tmp_path)
    key = configs.shape_key(4, 128, torch.float16, 4096, 4096, 3)
    cfg = KernelConfig("fused", 16, 64, 2, 4, 3)
    table.store(key, cfg, {cfg.label(): 12.5})
    again = configs.ConfigTable("Test GPU 80GB", user_dir=tmp_path)
    assert again.lookup(key) == cfg
    assert again.timings[key] == {cfg.label(): 12.5}  # kept when another process rewrites it
    assert (tmp_path / "Test_GPU_80GB.json").exists()


def test_shipped_h100_table_is_read():
    table = configs.ConfigTable("NVIDIA H100 80GB HBM3", shipped=True)
    key = configs.shape_key(4, 128, torch.float16, 8192, 28672, 1)
    assert table.shipped[key].path == "fused"
    assert table.shipped[configs.shape_key(4, 128, torch.float16, 8192, 28672, 4096)].path == "dequant"


def _patched_choice(monkeypatch, cfg: KernelConfig) -> None:
    """Make every call of this test choose ``cfg`` (the in-process fallbacks are reset)."""
    ops.forget_choices()
    monkeypatch.setattr(ops, "choose", lambda x, p: (cfg, True))
    monkeypatch.setattr(ops, "_replaced", {})


def test_a_config_that_cannot_compile_falls_back(monkeypatch):
    """A tile Triton cannot compile (BLOCK_N 48 is not a power of two) must not fail the call:
    the next working fallback serves it, is remembered for the key, and one warning names both."""
    bad = KernelConfig("fused", 16, 48, 0, 4, 3)
    _patched_choice(monkeypatch, bad)
    w = random_weight(256, 40, 4, 128, sym=True, act=True, seed=5)
    p = prepare(w)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
    with pytest.warns(RuntimeWarning, match="m16 n48") as rec:
        y = ops.qmatmul(x, p, None)
    assert len(rec) == 1 and "b4-g128-float16-K256-N40-M4" in str(rec[0].message)
    assert rel_err(y, reference(x, w)) < TOL[torch.float16]
    key = (p.gpu, "b4-g128-float16-K256-N40-M4", bad)
    assert ops._replaced[key] == configs.default_config(3)
    import warnings  # noqa: PLC0415
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls, of this layer or another, neither retry nor warn
        y2 = ops.qmatmul(x, p, None)
        y3 = ops.qmatmul(x, prepare(w), None)
    assert torch.equal(y, y2) and torch.equal(y, y3)


def _failing_plans(monkeypatch, fails) -> list[KernelConfig]:
    """Plans whose first launch raises ``fails(cfg)`` (an exception, or None to run)."""
    tried = []

    class Failing(launch.Plan):
        __slots__ = ()

        def first(self, x, bias):
            tried.append(self.cfg)
            exc = fails(self.cfg)
            if exc is not None:
                raise exc
            return super().first(x, bias)

    monkeypatch.setattr(ops, "Plan", Failing)
    return tried


def test_out_of_resources_falls_back_to_fewer_stages(monkeypatch):
    """Triton's OutOfResources at the first launch (a tile tuned for another layout needing too
    much shared memory, as 3-bit M=64 did on the H100): the same tile with fewer stages runs."""
    from triton.runtime.errors import OutOfResources  # noqa: PLC0415

    big = KernelConfig("fused", 16, 64, 0, 4, 3)
    _patched_choice(monkeypatch, big)
    tried = _failing_plans(
        monkeypatch, lambda c: OutOfResources(246016, 232448, "shared memory") if c == big else None)
    w = random_weight(256, 40, 3, 128, sym=False, act=False, bias=True, seed=6)
    p = prepare(w)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        y = ops.qmatmul(x, p, w.bias)
    assert rel_err(y, reference(x, w)) < TOL[torch.float16]
    assert tried == [big, KernelConfig("fused", 16, 64, 0, 4, 2)]
    assert p.plans[(2, torch.float16, True)].cfg == KernelConfig("fused", 16, 64, 0, 4, 2)
    p.plans.clear()  # a fresh first launch goes straight to the replacement
    ops.qmatmul(x, p, w.bias)
    assert tried[-1] == KernelConfig("fused", 16, 64, 0, 4, 2) and len(tried) == 3


def test_fallback_order_and_nothing_works(monkeypatch):
    cfg = KernelConfig("fused", 64, 128, 1, 4, 3)
    assert ops.fallbacks(cfg, 64) == [cfg, KernelConfig("fused", 64, 128, 1, 4, 2),
                                      KernelConfig("fused", 64, 128, 1, 4, 1),
                                      configs.default_config(64), KernelConfig("dequant")]
    _patched_choice(monkeypatch, cfg)
    tried = _failing_plans(monkeypatch, lambda c: ValueError(f"broken {c.label()}"))
    w = random_weight(128, 16, 4, 128, sym=True, act=False, seed=2)
    p = prepare(w)
    with pytest.raises(ValueError, match="broken m64 n128 sk1 w4 s3"):  # the first error
        ops.qmatmul(torch.zeros(1, 128, dtype=torch.float16, device=DEVICE), p, None)
    assert tried == ops.fallbacks(cfg, 1, 4) and not p.plans


def test_entries_of_an_older_layout_are_ignored(tmp_path):
    """Tuned entries carry their bit width's layout version; others (3-bit before its int32
    third-bit plane: no version field) are ignored, in users' files and the shipped table."""
    cfg = {"path": "fused", "block_m": 64, "block_n": 128, "split_k": 1, "num_warps": 4,
           "num_stages": 3}
    k3 = configs.shape_key(3, 128, torch.float16, 4096, 4096, 64)
    k4 = configs.shape_key(4, 128, torch.float16, 4096, 4096, 64)
    (tmp_path / "Old_GPU.json").write_text(json.dumps({"gpu": "Old GPU", "entries": {
        k3: {"config": cfg}, k4: {"config": cfg}}}))
    table = configs.ConfigTable("Old GPU", user_dir=tmp_path)
    assert table.lookup(k3) is None and table.lookup(k4) == KernelConfig(**cfg)
    assert layout.LAYOUT_VERSIONS[3] >= 2
    table.store(k3, KernelConfig(**cfg), {})
    assert configs.ConfigTable("Old GPU", user_dir=tmp_path).lookup(k3) == KernelConfig(**cfg)
    # the shipped 3-bit entries are those that ran on the int32 plane on the H100; the M=64
    # ones (a tile needing 246016 B of shared memory now) are gone
    raw = json.loads((configs.SHIPPED_DIR / "NVIDIA_H100_80GB_HBM3.json").read_text())["entries"]
    b3 = {k: v for k, v in raw.items() if k.startswith("b3-")}
    assert b3 and all(v["layout"] == 2 for v in b3.values())
    assert not [k for k in b3 if k.endswith("-M64")]
    shipped = configs.ConfigTable("NVIDIA H100 80GB HBM3", user_dir=tmp_path).shipped
    assert set(b3) <= set(shipped)
    # and 3-bit's default above M=64 is dequant + matmul: its 128x128 tile needs 450560 B
    assert configs.default_config(256, 3).path == "dequant"
    assert configs.default_config(256, 4) == configs.default_config(256)


def test_act_order_gather():
    """The act-order gather gives x[:, perm[:K]] and the right product, K over one gather block."""
    w = random_weight(1100, 24, 4, 128, sym=True, act=True, seed=9)
    p = prepare(w)
    x = torch.randn(3, 1100, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    assert torch.equal(ops.gather_columns(x, p.perm), x[:, p.perm[:1100].long()])
    check(w, torch.float16, ms=(1, 2, 3), cfg=KernelConfig("fused", 16, 32, 2, 4, 2))
    check(w, torch.float16, ms=(2,), cfg=KernelConfig("fused", 16, 32, 1, 4, 2))
    w = random_weight(160, 40, 4, 32, sym=False, act=True, bias=True, seed=4)  # K % tile != 0
    check(w, torch.float16, ms=(1, 2), cfg=KernelConfig("fused", 16, 32, 0, 4, 2))


def test_asm_dequant_is_cuda_fp16_only():
    """The inline-PTX dequant never reaches the interpreter, a CPU tensor, bf16/fp32 or 3-bit."""
    assert target.use_asm(DEVICE, torch.float16, 4) == (ON_GPU and torch.version.hip is None)
    assert not target.use_asm(DEVICE, torch.bfloat16, 4)
    assert not target.use_asm(DEVICE, torch.float32, 4)
    assert not target.use_asm(DEVICE, torch.float16, 3)  # 3-bit has its own dequant sequence
    assert not target.use_asm(torch.device("cpu"), torch.float16, 4)


def test_asm_recorded_in_tuned_entries(tmp_path):
    """A user entry tuned with the other asm setting (no field: off) is not reused; entries
    tuned with the removed zero-point-after-the-MMA variant are ignored."""
    key = configs.shape_key(4, 128, torch.float16, 4096, 4096, 1)
    cfg = KernelConfig("fused", 16, 128, 0, 4, 3)
    configs.ConfigTable("Asm GPU", user_dir=tmp_path).store(key, cfg, {}, asm=False)
    raw = json.loads((tmp_path / "Asm_GPU.json").read_text())
    assert raw["entries"][key]["asm"] is False and "postzero" not in raw["entries"][key]
    table = configs.ConfigTable("Asm GPU", user_dir=tmp_path)
    assert table.lookup(key, asm=False) == cfg and table.lookup(key, asm=True) is None
    del raw["entries"][key]["asm"]  # files from before the field: tuned with asm off
    (tmp_path / "Asm_GPU.json").write_text(json.dumps(raw))
    table = configs.ConfigTable("Asm GPU", user_dir=tmp_path)
    assert table.lookup(key) == cfg and table.lookup(key, asm=True) is None
    raw["entries"][key]["postzero"] = 3
    (tmp_path / "Asm_GPU.json").write_text(json.dumps(raw))
    assert configs.ConfigTable("Asm GPU", user_dir=tmp_path).lookup(key) is None


def test_shipped_table_switch(tmp_path):
    """shipped_configs=False ignores the shipped table (every key is tuned afresh)."""
    key = configs.shape_key(4, 128, torch.float16, 8192, 28672, 1)
    shipped = configs.ConfigTable("NVIDIA H100 80GB HBM3", user_dir=tmp_path).shipped
    assert shipped[key] == KernelConfig("fused", 16, 64, 0, 4, 3)  # measured best on the H100
    off = configs.ConfigTable("NVIDIA H100 80GB HBM3", shipped=False, user_dir=tmp_path)
    assert off.shipped == {}


def test_candidates_fit_shared_memory():
    """Tiles that cannot fit any supported GPU (H100 OutOfResources) are not tuned."""
    for bits, m in itertools.product((2, 3, 4, 8), (1, 16, 32, 64, 256, 4096)):
        out = configs.candidates(m, 4096, 4096, bits)
        assert configs.default_config(m, bits) in out
        for c in out:
            assert configs.fits(c, bits)
            if c.path == "fused" and c.num_stages >= 3:
                assert not (bits == 3 and c.block_m >= 64)
                assert not (bits == 2 and c.block_m >= 256)
    assert configs.candidates(256, 4096, 4096, 3) == [KernelConfig("dequant")]
    assert KernelConfig("fused", 64, 128, 0, 4, 2) in configs.candidates(64, 4096, 4096, 3)
    assert KernelConfig("fused", 256, 128, 1, 8, 3) in configs.candidates(256, 4096, 4096, 4)
