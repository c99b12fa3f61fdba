"""The dispatch policy and split plan, decided once at bind, as data; the options (CPU only)."""

from __future__ import annotations

import pytest
import torch

from gptq_core.options import OptionsError
from gptq_core.registry import get_registry
from gptq_core.selector import parse_backend_options
from gptq_core.testing import random_packed
from gptq_backend_cuda import layout, policy, workspace
from gptq_backend_cuda.options import MAX_KERNEL_M, CudaOptions
from gptq_backend_cuda.prepare import prepare

H200 = policy.REFERENCE_GPU
T4 = policy.GpuFacts(sm_count=40, compute_capability=(7, 5))
A10 = policy.GpuFacts(sm_count=72, compute_capability=(8, 6))


@pytest.mark.parametrize("gpu", [H200, T4, A10], ids=["h200", "t4", "a10"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K,N", [(4096, 4096), (8192, 28672), (28672, 8192), (172, 32)])
def test_splits_fit_shared_memory_and_cover_k(gpu, bits, K, N):
    _, launches = policy.layer_policy(bits, K, N, gpu, policy.dequant_threshold(bits))
    units = layout.padded(K, N, bits)[0] // layout.unit_k(bits)
    for launch in launches[:-1]:
        rows = 8 if launch.kind == 0 else 16
        assert policy.x_smem_bytes(rows, launch.units_per_split, bits) <= gpu.smem_per_block(bits)
        splits = policy.splits_of(launch, bits, K)
        assert (splits - 1) * launch.units_per_split < units <= splits * launch.units_per_split


def test_large_layers_fill_the_h200_in_whole_waves():
    """8192x28672 at M <= 8: 448 block columns x 7 splits of 19 units (1216 channels) = 3136
    blocks, 2.97 waves of 132 SMs x 8 blocks; 4096x4096: 64 x 16 = 1024 blocks, one wave."""
    _, big = policy.layer_policy(4, 8192, 28672, H200, 64)
    assert (big[0].units_per_split, policy.splits_of(big[0], 4, 8192)) == (19, 7)
    _, small = policy.layer_policy(4, 4096, 4096, H200, 64)
    assert policy.splits_of(small[0], 4, 4096) * policy.blocks(4096) == 1024


def test_policy_routes_by_rows():
    plan, launches = policy.layer_policy(2, 4096, 4096, H200, 128)
    assert plan.paths((1, 8, 9, 16, 64, 128, 129, 4096)) == {
        1: "cuda:mma-m8", 8: "cuda:mma-m8", 9: "cuda:mma-m16", 16: "cuda:mma-m16", 64: "cuda:mma-m16",
        128: "cuda:mma-m16", 129: "dequant+cublas", 4096: "dequant+cublas"}
    assert [(x.upto_m, x.kind) for x in launches[:2]] == [(8, 0), (128, 1)]
    plan, launches = policy.layer_policy(4, 4096, 4096, H200, 4)
    assert plan.describe() == "M<=4: cuda:mma-m8; M>4: dequant+cublas"
    plan, launches = policy.layer_policy(4, 4096, 4096, H200, 0)
    assert plan.describe() == "any M: dequant+cublas" and len(launches) == 1


def test_workspace_covers_every_slice_and_split():
    _, launches = policy.layer_policy(4, 8192, 28672, H200, 64)
    floats, counters = workspace.needs(4, 8192, 28672, launches)
    m16 = launches[1]
    assert floats >= 4 * policy.splits_of(m16, 4, 8192) * 16 * 28672  # 4 slices of 16 rows at M=64
    assert counters >= 4 * policy.blocks(28672)


def test_options_reach_the_policy():
    packed = random_packed(3, 128, True, False, 256, 64, seed=1)
    prep = prepare(packed, torch.device("cpu"), torch.float16, CudaOptions(dequant_threshold=16))
    assert prep.policy.describe() == "M<=8: cuda:mma-m8; M<=16: cuda:mma-m16; M>16: dequant+cublas"


def test_options_are_declared_typed_and_checked():
    backend = get_registry().get("cuda")
    assert backend.info.options is CudaOptions and backend.pack_takes_options
    o = CudaOptions.parse({"dequant_threshold": "32", "archs": "7.5;9.0", "build_dir": "~/x"}, "cuda")
    assert o.dequant_threshold == 32 and o.archs == "7.5;9.0"
    with pytest.raises(OptionsError, match="dequant_threshold=-1 must be in"):
        CudaOptions.parse({"dequant_threshold": -1}, "cuda")
    with pytest.raises(OptionsError, match=f"0..{MAX_KERNEL_M}"):
        CudaOptions.parse({"dequant_threshold": MAX_KERNEL_M + 1}, "cuda")
    with pytest.raises(OptionsError, match="archs.*like 7.5"):
        CudaOptions.parse({"archs": "turing"}, "cuda")
    with pytest.raises(OptionsError, match="no option 'dequant_treshold'"):
        parse_backend_options({"cuda": {"dequant_treshold": 1}})


def test_explain_shows_the_paths():
    from gptq_core.backend import policy_of
    from gptq_core.policy import EXPLAIN_M

    packed = random_packed(8, 128, False, True, 256, 64, seed=2)
    prep = prepare(packed, torch.device("cpu"), torch.bfloat16)
    assert policy_of(get_registry().get("cuda"), prep).paths(EXPLAIN_M) == {
        1: "cuda:mma-m8", 16: "cuda:mma-m16", 64: "dequant+cublas", 256: "dequant+cublas", 4096: "dequant+cublas"}
