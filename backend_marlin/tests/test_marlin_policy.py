"""The dispatch policy decided at bind, the kinds the op receives, and prepare() on the CPU."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch

from gptq_core.testing import random_packed
from gptq_backend_marlin import plugin, policy, prepare, workspace
from gptq_backend_marlin.build import CSRC
from gptq_backend_marlin.options import MarlinOptions
from gptq_backend_marlin.policy import GpuFacts

H200 = GpuFacts(sm_count=132, compute_capability=(9, 0))
A100 = GpuFacts(sm_count=108, compute_capability=(8, 0))
WIDE_GPU = GpuFacts(sm_count=160, compute_capability=(9, 0))  # more SMs than 4096x14336 fills

# (bits, K, N, gpu): expected routes as "upto:path" (the table default thresholds).
ROUTES = [
    (4, 8192, 28672, H200, "8:marlin:wide4-swap 32:marlin:wide4 192:marlin:wide -:dequant+cublas"),
    (4, 4096, 14336, H200, "8:marlin:wide4-swap 32:marlin:wide4 192:marlin:wide -:dequant+cublas"),
    (4, 4096, 14336, WIDE_GPU, "8:marlin:wide-swap 192:marlin:wide -:dequant+cublas"),
    (4, 14336, 4096, H200, "8:marlin:wide4-swap 32:marlin:wide4 192:marlin:wide -:dequant+cublas"),
    (4, 4096, 11008, H200, "8:marlin:wide-swap 192:marlin:wide -:dequant+cublas"),
    (4, 11008, 4096, H200, "8:marlin:wide-swap 192:marlin:wide -:dequant+cublas"),
    (4, 4096, 4096, H200, "8:marlin:wide-swap 192:marlin:wide -:dequant+cublas"),
    (4, 4096, 4096, A100, "8:marlin:wide-swap 192:marlin:wide -:dequant+cublas"),
    (4, 8192, 28672, A100, "8:marlin:wide4-swap 32:marlin:wide4 192:marlin:wide -:dequant+cublas"),
    (4, 192, 96, H200, "192:marlin:narrow -:dequant+cublas"),  # K % 128 != 0: 64-row stages
    (4, 384, 96, H200, "8:marlin:wide-swap 192:marlin:wide -:dequant+cublas"),  # K % 256 != 0
    (8, 8192, 28672, H200, "32:marlin:tma 128:marlin:narrow -:dequant+cublas"),
    (8, 8192, 28672, A100, "128:marlin:narrow -:dequant+cublas"),
    (8, 4096, 4096, H200, "32:marlin:tma 128:marlin:narrow -:dequant+cublas"),
]


def routes(p) -> str:
    return " ".join(f"{'-' if r.upto_m is None else r.upto_m}:{r.path}" for r in p.routes)


@pytest.mark.parametrize("bits,K,N,gpu,expected", ROUTES)
def test_routes_by_shape_and_gpu(bits, K, N, gpu, expected):
    p = policy.layer_policy(bits, K, N, gpu, policy.dequant_threshold(K * N, bits))
    assert routes(p) == expected


@pytest.mark.parametrize("dequant,dense,expected", [
    (192, 16, "8:marlin:wide-swap 16:marlin:wide -:dense-cublas"),
    (192, 300, "8:marlin:wide-swap 192:marlin:wide 300:dequant+cublas -:dense-cublas"),
    (4, None, "4:marlin:wide-swap -:dequant+cublas"),
    (0, None, "-:dequant+cublas"),
    (0, 0, "-:dense-cublas"),
])
def test_thresholds_cut_the_kernel_routes(dequant, dense, expected):
    assert routes(policy.layer_policy(4, 4096, 4096, H200, dequant, dense)) == expected


def test_threshold_tables_are_ascending_and_inclusive():
    for table in (policy.DEQUANT_THRESHOLDS, policy.DEQUANT_THRESHOLDS_8BIT, policy.DENSE_THRESHOLDS,
                  policy.HOPPER_THRESHOLDS, policy.HOPPER_MAX_ROWS):
        limits = [limit for limit, _ in table[:-1]]
        assert limits == sorted(limits) and table[-1][0] is None, "ascending sizes, then a catch-all"
        for (limit, rows), (_, rows_next) in zip(table, table[1:]):
            assert policy.by_size(table, limit) == rows and policy.by_size(table, limit + 1) == rows_next


def test_kinds_match_the_cpp_table():
    """policy.KINDS is csrc/kernels.h's KernelKind enum and kernel_traits names, in one order."""
    header = (CSRC / "kernels.h").read_text()
    enum = dict(re.findall(r"\b(k\w+) = (\d+)", header[header.index("enum KernelKind"):]))
    names = dict(re.findall(r"case (k\w+): return \{\"([\w-]+)\"", header))
    names["kNarrow"] = re.search(r"default: return \{\"([\w-]+)\"", header).group(1)
    cpp = {f"marlin:{names[k]}": int(enum[k]) for k in names}
    cpp["dequant+cublas"] = int(enum["kDequantCublas"])
    assert cpp == {path: kind for path, kind in policy.KINDS.items() if kind >= 0}


def test_kind_table_is_the_policy_in_ints():
    p = policy.layer_policy(4, 8192, 28672, H200, 256)
    assert policy.kind_table(p) == ((8, 4), (32, 2), (256, 1), (sys.maxsize, 6))
    assert policy.kernel_rows(p) == 256
    assert policy.kernel_rows(policy.layer_policy(4, 4096, 4096, H200, 0)) == 0


def _prepared(K=512, N=320, bits=4, options=None, gpu=H200, dtype=torch.float16, act=False):
    packed = random_packed(bits, 128, True, act, K, N, seed=K + N + bits)
    return prepare.prepare(packed, torch.device("cpu"), dtype, options or MarlinOptions(), gpu)


def test_prepare_plans_the_policy_and_shares_one_workspace():
    a = _prepared()
    b = _prepared(K=1024, N=640)
    assert routes(a.policy) == "8:marlin:wide-swap 192:marlin:wide -:dequant+cublas"
    assert a.kinds == policy.kind_table(a.policy)
    assert a.slots.dtype == torch.float32 and a.counters.dtype == torch.int32
    assert a.slots.numel() >= H200.sm_count * 2 * 2 * workspace.SLOT_FLOATS
    assert a.counters.numel() >= workspace.slices(192, 4) * -(-320 // 256)
    assert not a.counters.any(), "counters start at zero"
    assert b.slots is a.slots and b.counters is a.counters, "one workspace per device"


def test_prepare_follows_the_options():
    p = _prepared(options=MarlinOptions(dequant_threshold=40), bits=8, gpu=A100)
    assert routes(p.policy) == "40:marlin:narrow -:dequant+cublas"
    p = _prepared(options=MarlinOptions(dense_cache_mb=64))  # dense copies are made on CUDA only
    assert p.dense is None and "dense" not in routes(p.policy)


def test_a_layer_that_needs_more_gets_a_larger_workspace_and_the_old_one_stays():
    small = _prepared(N=64)
    big = _prepared(N=256 * 2000, K=128, options=MarlinOptions(dequant_threshold=4096))
    slots, counters = workspace.needs(H200, 4, 256 * 2000, 4096)
    assert big.counters.numel() >= counters and big.slots.numel() >= slots
    assert small.counters.numel() < big.counters.numel()
    assert _prepared(N=64).counters is big.counters, "later layers share the larger one"


def _traced_call(p, m: int):
    """The ops gptq_qmatmul calls for M=m, traced with fake tensors (no kernel runs)."""
    names = ("tiles", "scales", "slots", "counters")

    def call(x, *tensors):
        return plugin.gptq_qmatmul(x, dataclasses.replace(p, **dict(zip(names, tensors))), None)

    x = torch.empty(m, p.size_k, dtype=p.scales.dtype)
    gm = torch.fx.experimental.proxy_tensor.make_fx(call, tracing_mode="fake")(
        x, *(getattr(p, n) for n in names))
    return [n for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("m", [1, 8, 9, 32, 33, 192, 193, 4096])
def test_qmatmul_passes_the_policys_kind(m):
    p = _prepared(K=512, N=1024)
    calls = [n for n in _traced_call(p, m) if "gemm" in str(n.target)]
    assert len(calls) == 1
    assert calls[0].args[-1] == policy.KINDS[p.policy.path_for(m)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_route_is_the_dense_copy_plus_the_float16_bias(dtype):
    """Above dense_threshold the layer's dense copy goes to cuBLAS (torch, so it runs here);
    the bias arrives in float16 whatever the activations are."""
    p = _prepared(dtype=dtype)
    plan = policy.layer_policy(4, p.size_k, p.size_n, H200, 192, 16)
    dense = prepare.reference_weight(p).t().to(dtype).contiguous()
    p = dataclasses.replace(p, dense=dense, policy=plan, kinds=policy.kind_table(plan))
    x = torch.randn(17, p.size_k).to(dtype)
    bias = torch.randn(p.size_n).half()
    y = plugin.gptq_qmatmul(x, p, bias)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), (x.float() @ dense.float().t() + bias.float()), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- the Hopper route (issue 17)
@pytest.mark.parametrize("K,N,dequant,dense,hopper,expected", [
    (8192, 28672, 192, None, (32, 256), "8:marlin:wide4-swap 32:marlin:wide4 256:marlin:hopper -:dequant+cublas"),
    (8192, 28672, 192, None, (8, 256), "8:marlin:wide4-swap 256:marlin:hopper -:dequant+cublas"),
    (8192, 28672, 4096, None, (0, 256), "256:marlin:hopper 4096:marlin:wide -:dequant+cublas"),
    (8192, 28672, 192, 64, (32, 64), "8:marlin:wide4-swap 32:marlin:wide4 64:marlin:hopper -:dense-cublas"),
    (8192, 28672, 192, 16, (32, 16), "8:marlin:wide4-swap 16:marlin:wide4 -:dense-cublas"),  # nothing left above 32
    (8192, 28672, 100, None, (0, 100), "100:marlin:hopper -:dequant+cublas"),
    (8192, 28672, 128, None, (128, 128), "8:marlin:wide4-swap 32:marlin:wide4 128:marlin:wide -:dequant+cublas"),
    # 4096x4096: the copy stops at 160 rows (its M = 192 lost), marlin's kernel to the cut at 192
    (4096, 4096, 192, None, (8, 160), "8:marlin:wide-swap 160:marlin:hopper 192:marlin:wide -:dequant+cublas"),
    # a copy may serve above the mma.sync kernels' cut: 4096x22016 up to 512 rows
    (4096, 22016, 192, None, (16, 512), "8:marlin:wide4-swap 16:marlin:wide4 512:marlin:hopper -:dequant+cublas"),
])
def test_a_hopper_copy_takes_the_rows_of_its_range(K, N, dequant, dense, hopper, expected):
    assert routes(policy.layer_policy(4, K, N, H200, dequant, dense, hopper)) == expected


@pytest.mark.parametrize("K,N,low,high,caps,expected", [
    (4096, 4096, None, None, (), (8, 160)),
    (11008, 4096, None, None, (), (8, 256)),
    (4096, 14336, None, None, (), (8, 256)),
    (4096, 22016, None, None, (), (16, 384)),
    (8192, 28672, None, None, (), (32, 384)),
    (8192, 28672, 0, 512, (), (0, 512)),
    (8192, 28672, None, 512, (None, 64), (32, 64)),   # a dense copy's threshold caps the range
    (8192, 28672, None, None, (128, None), (32, 128)),  # so does a chosen dequant_threshold
])
def test_hopper_rows_are_the_tables_unless_chosen_and_capped(K, N, low, high, caps, expected):
    assert policy.hopper_rows(K * N, low, high, caps) == expected


@pytest.mark.parametrize("bits,K,N,gpu,serves", [
    (4, 4096, 4096, H200, True), (8, 4096, 4096, H200, False), (4, 4096, 4096, A100, False),
    (4, 4096, 4096, GpuFacts(sm_count=170, compute_capability=(10, 0)), False),  # no wgmma off sm_90a
    (4, 4096, 4160, H200, False), (4, 4160, 4096, H200, True), (4, 4128, 4096, H200, False),
])
def test_hopper_serves_4bit_layers_on_its_tiles_on_compute_capability_9_0(bits, K, N, gpu, serves):
    assert policy.hopper_serves(bits, K, N, gpu) is serves


H200_WAVES = (396, 396, 264, 264)  # the kernels' blocks per SM measured on the H200 x 132 SMs


@pytest.mark.parametrize("K,N", [(4096, 12288), (4096, 4096), (11008, 4096), (4096, 14336), (8192, 28672)])
def test_hopper_workspace_holds_the_partials_of_every_row_count_it_serves(K, N):
    from gptq_backend_marlin.hopper import ops as hopper_ops

    need = hopper_ops.workspace_floats(K, N, H200_WAVES, 0, 512)
    for m in range(1, 513):
        s = hopper_ops.splits_for(m, K, N, H200_WAVES)
        assert s == 1 or s * m * N <= need
    assert need <= workspace.needs(H200, 4, N, 256)[0], "Llama's layers fit the marlin slots already"


def test_qmatmul_sends_the_hopper_rows_to_the_hopper_op():
    """With a Hopper copy, M above the threshold traces to gptq_marlin_hopper::gemm with the
    layer's copy and the shared slots; M at or below it to the marlin op (fake tensors)."""
    from gptq_backend_marlin.hopper import ops as hopper_ops

    packed = random_packed(4, 128, True, False, 512, 256, seed=5)
    p = prepare.prepare(packed, torch.device("cpu"), torch.float16, MarlinOptions(), H200)
    h = dataclasses.replace(hopper_ops.prepare(packed, "cpu"), waves=H200_WAVES)
    plan = policy.layer_policy(4, 512, 256, H200, 192, None, (32, 160))
    p = dataclasses.replace(p, hopper=h, policy=plan, kinds=policy.kind_table(plan))
    names = ("tiles", "scales", "slots", "counters")

    def call(x, tiles, scales, slots, counters, htiles, hscales):
        q = dataclasses.replace(p, tiles=tiles, scales=scales, slots=slots, counters=counters,
                                hopper=dataclasses.replace(h, tiles=htiles, scales=hscales))
        return plugin.gptq_qmatmul(x, q, None)

    for m, op in [(32, "gptq_marlin.gemm"), (33, "gptq_marlin_hopper.gemm"), (160, "gptq_marlin_hopper.gemm"),
                  (161, "gptq_marlin.gemm"), (193, "gptq_marlin.gemm")]:
        x = torch.empty(m, 512, dtype=torch.float16)
        gm = torch.fx.experimental.proxy_tensor.make_fx(call, tracing_mode="fake")(
            x, *(getattr(p, n) for n in names), h.tiles, h.scales)
        gemms = [n for n in gm.graph.nodes if n.op == "call_function" and "gemm" in str(n.target)]
        assert [str(n.target).rsplit(".", 1)[0] for n in gemms] == [op], m
        if op.startswith("gptq_marlin_hopper"):
            assert list(gemms[0].args[-1]) == list(H200_WAVES) and gemms[0].args[-2] == 256


def test_hopper_copy_is_made_only_on_a_hopper_gpu_within_its_budget():
    packed = random_packed(4, 128, True, False, 512, 256, seed=6)
    assert prepare.hopper_copy(packed, torch.device("cpu"), torch.float16, H200,
                               MarlinOptions(hopper_cache_mb=64)) is None, "CUDA only"
    before = prepare.HOPPER_BUDGET.used
    with pytest.warns(UserWarning, match="compute capability 9.0 and this one is 8.0"):
        assert prepare.hopper_copy(packed, torch.device("cuda", 0), torch.float16, A100,
                                   MarlinOptions(hopper_cache_mb=64)) is None
    assert prepare.HOPPER_BUDGET.used == before
    assert prepare.hopper_bytes(packed) >= 512 * 256 // 2


def test_explain_hints_at_the_hopper_copy_where_it_would_serve():
    packed = random_packed(4, 128, True, False, 512, 256, seed=6)
    cuda, rows = torch.device("cuda", 0), (8, 160)
    hint = prepare.hopper_hint(packed, cuda, H200, MarlinOptions(), rows)
    assert hint.startswith("marlin option hopper_cache_mb would give this layer an sm_90a wgmma copy (")
    assert "serving M 9-160" in hint
    used_up = prepare.hopper_hint(packed, cuda, H200, MarlinOptions(hopper_cache_mb=0.01), rows)
    assert used_up.startswith("no sm_90a copy: hopper_cache_mb=0.01 MiB was used up by other layers")
    # nothing to say off Hopper, on the CPU, for 8-bit, or where the range is empty
    assert prepare.hopper_hint(packed, cuda, A100, MarlinOptions(), rows) == ""
    assert prepare.hopper_hint(packed, torch.device("cpu"), H200, MarlinOptions(), rows) == ""
    assert prepare.hopper_hint(random_packed(8, 128, True, False, 512, 256, seed=6), cuda, H200,
                               MarlinOptions(), rows) == ""
    assert prepare.hopper_hint(packed, cuda, H200, MarlinOptions(), (32, 32)) == ""
