"""GPTQ on one linear: checked against a plain float64 transcription of the algorithm and RTN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptq_core import FormatError, GPTQError, QuantizeConfig, quantize_rtn
from gptq_core.quantize import GPTQ, quantize_linear
from gptq_core.quantize.params import GridSpec, group_params


def _inputs(n: int, K: int, seed: int) -> torch.Tensor:
    """Correlated activations with a few loud channels, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    loud = torch.ones(K)
    loud[torch.randperm(K, generator=g)[: max(1, K // 8)]] = 6.0
    return (torch.randn(n, K, generator=g) @ mix) * loud


def _weight(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(N, K, generator=g) * 0.1


def _output_error(packed, W: torch.Tensor, X: torch.Tensor) -> float:
    """||X W^T - X Wq^T||^2 in float64: the quantity GPTQ minimises."""
    X = X.double()
    ref = X @ W.double().t()
    return float((X @ packed.dequantize(torch.float64) - ref).square().sum())


def _naive_gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantizeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper's Algorithm 1 in float64, one column at a time, no lazy batches.

    Returns (ints [N, K], dequantized weight [N, K]) in the original column order.
    """
    W = W.double().clone()
    H = H.double().clone()
    K = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if cfg.desc_act else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp_percent * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    grid = GridSpec(cfg.bits, cfg.sym, 1 if not cfg.sym else 0, cfg.mse)
    gs = K if cfg.group_size == -1 else cfg.group_size
    Q, D = torch.zeros_like(W), torch.zeros_like(W)
    for j in range(K):
        if j % gs == 0:
            s, z = (t.double() for t in group_params(W[:, j : j + gs].float(), grid))
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, 2**cfg.bits - 1)
        Q[:, j], D[:, j] = q, s * (q - z)
        err = (W[:, j] - D[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    inv = torch.argsort(perm)
    return Q[:, inv], D[:, inv]


CASES = [
    # bits, group_size, sym, desc_act, static_groups, N, K, block_size
    (4, 32, True, False, False, 24, 96, 128),
    (3, -1, False, False, False, 16, 64, 128),
    (2, 16, True, True, False, 12, 64, 128),
    (8, 32, False, True, True, 16, 64, 128),
    (4, 24, False, True, False, 20, 80, 128),  # K not divisible by the group size
    (4, 48, True, False, False, 20, 100, 32),  # groups straddle lazy-update blocks
    (3, 20, False, False, True, 12, 50, 16),
]


@pytest.mark.parametrize("bits,gs,sym,desc_act,static,N,K,block", CASES)
def test_gptq_matches_plain_algorithm_and_beats_rtn(bits, gs, sym, desc_act, static, N, K, block):
    cfg = QuantizeConfig(bits=bits, group_size=gs, sym=sym, desc_act=desc_act, static_groups=static)
    W, X = _weight(N, K, bits), _inputs(4 * K, K, bits)
    packed, stats = quantize_linear(W, None, cfg, inputs=X, block_size=block)
    rtn, rtn_stats = quantize_linear(W, None, cfg)
    assert stats.warning is None and rtn_stats.warning is not None
    assert stats.tokens == 4 * K and stats.damp == cfg.damp_percent and stats.error > 0
    gptq_err, rtn_err = _output_error(packed, W, X), _output_error(rtn, W, X)
    assert gptq_err < 0.85 * rtn_err

    g_idx = packed.g_idx.long()
    monotonic = bool((g_idx[1:] >= g_idx[:-1]).all())
    assert monotonic == (not desc_act or static or gs == -1)
    if not (desc_act and not static) or gs == -1:
        width = K if gs == -1 else gs
        assert torch.equal(g_idx, torch.arange(K) // width)
    assert packed.desc_act == desc_act and packed.sym == sym
    assert torch.bincount(g_idx, minlength=packed.num_groups).max() <= (K if gs == -1 else gs)
    if not sym:
        assert int(packed.zeros().min()) >= 1  # GPTQ v1 stores zero - 1

    if not static:  # the plain algorithm fixes grids as it goes, like our dynamic groups
        H = 2 / X.shape[0] * X.double().t() @ X.double()
        ints, deq = _naive_gptq(W, H, cfg)
        assert (packed.unpack_qweight().t().double() == ints).double().mean() > 0.98
        Xd = X.double()
        naive_err = float((Xd @ deq.t() - Xd @ W.double().t()).square().sum())
        assert abs(gptq_err - naive_err) < 0.02 * naive_err


def test_deterministic_byte_identical():
    cfg = QuantizeConfig(bits=3, group_size=16, sym=False, desc_act=True, mse=2.4)
    W, X = _weight(16, 48, 0), _inputs(96, 48, 0)
    a, _ = quantize_linear(W, None, cfg, inputs=X)
    b, _ = quantize_linear(W.clone(), None, cfg, inputs=X.clone())
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_inputs_and_hessian_paths_agree_and_hessian_is_2_over_n_xxt():
    K = 40
    X = _inputs(3 * 50, K, 3).reshape(3, 50, K)
    acc = GPTQ(K)
    for part in X:  # leading dims and several batches
        acc.add_batch(part[None])
    flat = X.reshape(-1, K).double()
    expected = 2 / flat.shape[0] * flat.t() @ flat
    assert acc.nsamples == 150
    assert torch.allclose(acc.H.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    cfg = QuantizeConfig(bits=4, group_size=8)
    W = _weight(8, K, 3)
    one = GPTQ(K)
    one.add_batch(X.reshape(-1, K))
    a, _ = quantize_linear(W, one, cfg)
    b, _ = quantize_linear(W, None, cfg, inputs=X)
    c, _ = one.quantize(W, cfg)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.qweight, c.qweight)


def test_dead_inputs_give_zero_weight_columns():
    K = 32
    X = _inputs(64, K, 4)
    X[:, [3, 17]] = 0
    for desc_act in (False, True):
        cfg = QuantizeConfig(bits=4, group_size=8, sym=False, desc_act=desc_act)
        packed, _ = quantize_linear(_weight(8, K, 4), None, cfg, inputs=X)
        deq = packed.dequantize(torch.float64)
        assert torch.all(deq[[3, 17]] == 0)
        assert (deq[[0, 4]] != 0).double().mean() > 0.5  # live columns keep their weights


def test_damp_grows_until_cholesky_succeeds():
    K = 24
    X = _inputs(8, K, 5)  # rank 8 < K: H is singular
    H = 2 / 8 * X.t() @ X
    H -= 0.02 * torch.diag(H).mean() * torch.eye(K)  # and slightly indefinite
    cfg = QuantizeConfig(bits=4, group_size=8, damp_percent=0.01, damp_auto_increment=0.0025)
    packed, stats = quantize_linear(_weight(8, K, 5), H, cfg)
    assert 0.02 < stats.damp < 0.03
    assert stats.damp == pytest.approx(0.01 + 0.0025 * round((stats.damp - 0.01) / 0.0025))
    with pytest.raises(GPTQError, match="damp"):
        quantize_linear(_weight(8, K, 5), H, cfg.replace(damp_auto_increment=0.0))


def test_rtn_fallback_without_tokens_equals_round_to_nearest():
    W = _weight(16, 64, 6)
    for sym in (True, False):
        cfg = QuantizeConfig(bits=4, group_size=32, sym=sym)
        empty = GPTQ(64)
        empty.add_batch(torch.zeros(0, 64))
        for hessian in (None, empty):
            packed, stats = quantize_linear(W, hessian, cfg)
            assert stats.fallback and "round-to-nearest" in stats.warning and stats.tokens == 0
            ref = quantize_rtn(W, bits=4, group_size=32, sym=sym)
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(getattr(packed, name), getattr(ref, name)), name


def test_mse_search_lowers_the_weight_error_norm():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 64, generator=g) ** 3  # heavy tails: min-max wastes range
    norm = 2.4
    errs = {}
    for mse in (0.0, norm):
        packed, _ = quantize_linear(W, None, QuantizeConfig(bits=3, group_size=32, mse=mse))
        errs[mse] = float((packed.dequantize(torch.float64).t() - W.double()).abs().pow(norm).sum())
    assert errs[norm] < 0.9 * errs[0.0]
    grid = GridSpec(bits=3, sym=False, zero_floor=1, mse=norm)
    scale, zero = group_params(W[:, :32], grid)
    assert torch.equal(scale, scale.half().float()) and bool((zero >= 1).all())


def test_v1_keeps_asymmetric_zeros_storable_v2_does_not_need_to():
    W = _weight(8, 32, 8).abs() + 0.01  # all positive: the natural zero is 0
    X = _inputs(64, 32, 8)
    v1, _ = quantize_linear(W, None, QuantizeConfig(bits=4, group_size=16, sym=False), inputs=X)
    v2, _ = quantize_linear(
        W, None, QuantizeConfig(bits=4, group_size=16, sym=False, checkpoint_format="gptq_v2"), inputs=X
    )
    assert v1.zero_format == "v1" and int(v1.zeros().min()) == 1
    assert v2.zero_format == "v2" and int(v2.zeros().min()) == 0


def test_nn_linear_keeps_bias_and_is_not_modified():
    torch.manual_seed(9)
    layer = nn.Linear(32, 12, bias=True)
    before = layer.weight.detach().clone()
    packed, _ = quantize_linear(layer, None, QuantizeConfig(bits=4, group_size=16), inputs=_inputs(64, 32, 9))
    assert torch.equal(layer.weight, before)
    assert torch.equal(packed.bias, layer.bias.detach().half())
    assert packed.in_features == 32 and packed.out_features == 12


def test_clear_errors():
    W, X = _weight(8, 16, 10), _inputs(32, 16, 10)
    cfg = QuantizeConfig(bits=4, group_size=8)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        quantize_linear(bad, None, cfg, inputs=X)
    Xn = X.clone()
    Xn[3, 2] = float("inf")
    with pytest.raises(GPTQError, match="NaN/Inf"):
        quantize_linear(W, None, cfg, inputs=Xn)
    with pytest.raises(GPTQError, match="inputs="):
        quantize_linear(W, X, cfg)
    with pytest.raises(GPTQError, match="not both"):
        quantize_linear(W, torch.eye(16), cfg, inputs=X)
    with pytest.raises(GPTQError, match="K=16"):
        GPTQ(16).add_batch(torch.randn(4, 15))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_quality():
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    W, X = _weight(64, 256, 11), _inputs(512, 256, 11)
    cpu, _ = quantize_linear(W, None, cfg, inputs=X)
    gpu, stats = quantize_linear(W, None, cfg, inputs=X, device="cuda")
    assert gpu.qweight.device.type == "cpu" and stats.warning is None
    e_cpu, e_gpu = _output_error(cpu, W, X), _output_error(gpu, W, X)
    assert abs(e_gpu - e_cpu) < 0.02 * e_cpu
    assert (cpu.unpack_qweight() == gpu.unpack_qweight()).float().mean() > 0.95
