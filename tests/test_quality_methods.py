"""The quantizer's quality methods beyond the paper (DESIGN.md §6): the batched MSE scale
search, group-aware reordering and the float target, each checked against a plain float64
statement of what it computes, and end to end on the real stories260K model."""

from __future__ import annotations

import pytest
import torch

from gptq_core import GPTQError, QuantizeConfig
from gptq_core.errors import FormatError
from gptq_core.quantize import GPTQ, quantize_linear
from gptq_core.quantize.gptq import group_aware_order
from gptq_core.quantize.params import GridSpec, _minmax, dequantize_values, group_params
from gptq_core.rtn import quantize_values


def _inputs(n: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    loud = 0.2 + 3 * torch.rand(K, generator=g)
    return (torch.randn(n, K, generator=g) @ mix) * loud


def _weight(N: int, K: int, seed: int) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed + 7)) * 0.1


# ---------------------------------------------------------------------------- MSE search
def _mse_one_shrink_at_a_time(w: torch.Tensor, grid: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ reference quantizer's sequential shrink scan."""
    best = torch.full((w.shape[0],), float("inf"))
    best_s = best_z = None
    for step in range(80):
        s, z = _minmax(w * (1 - step / 100), grid)
        q = quantize_values(w, s[:, None], z[:, None], grid.bits)
        err = (dequantize_values(q, s[:, None], z[:, None]) - w).abs().pow(grid.mse).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_s = s if best_s is None else torch.where(better, s, best_s)
        best_z = z if best_z is None else torch.where(better, z, best_z)
    return best_s, best_z


@pytest.mark.parametrize("bits,sym,norm,rows,cols", [
    (4, True, 2.4, 64, 32), (3, False, 2.4, 172, 32), (2, True, 2.0, 300, 16), (8, False, 3.0, 40, 128),
])
def test_batched_mse_search_equals_the_sequential_scan(bits, sym, norm, rows, cols, monkeypatch):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(bits)) * torch.rand(rows, 1)
    w[1] = 0  # a dead row
    grid = GridSpec(bits, sym, 0 if sym else 1, norm)
    want = _mse_one_shrink_at_a_time(w, grid)
    for budget in (1, rows * cols * 7, 1 << 24):  # one shrink, several, all at once per chunk
        monkeypatch.setitem(__import__("gptq_core.quantize.params", fromlist=["x"]).MSE_CHUNK_ELEMENTS,
                            "cpu", budget)
        got = group_params(w, grid)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------- group-aware order
def test_group_aware_order_keeps_groups_whole_and_ranks_them():
    imp = torch.tensor([1.0, 5, 2, 0.5, 3, 3, 9, 1, 0, 0, 0, 4, 7, 2])
    order = group_aware_order(imp, 4).tolist()
    # groups: [0-3] peak 5, [4-7] peak 9, [8-11] peak 4, [12-13] peak 7 (a short last group)
    assert order == [6, 4, 5, 7, 12, 13, 1, 2, 0, 3, 11, 8, 9, 10]


def _naive_group_aware(W: torch.Tensor, H: torch.Tensor, cfg: QuantizeConfig) -> torch.Tensor:
    """Float64 GPTQ column by column in the group-aware order, a group's grid computed from
    its updated columns when its first column comes up; returns the integers [N, K]."""
    W, H = W.double().clone(), H.double().clone()
    K, gs = W.shape[1], cfg.group_size
    diag = torch.diag(H).tolist()
    groups = [list(range(s, min(s + gs, K))) for s in range(0, K, gs)]
    groups.sort(key=lambda g: -max(diag[c] for c in g))  # sort is stable: ties keep their order
    perm = [c for g in groups for c in sorted(g, key=lambda c: -diag[c])]
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp_percent * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    grid = GridSpec(cfg.bits, cfg.sym, 0 if cfg.sym else 1, cfg.mse)
    Q = torch.zeros_like(W)
    j = 0
    for g in groups:
        s, z = (t.double() for t in group_params(W[:, j : j + len(g)].float(), grid))
        for _ in g:
            q = torch.clamp(torch.round(W[:, j] / s) + z, 0, 2**cfg.bits - 1)
            Q[:, j] = q
            err = (W[:, j] - s * (q - z)) / U[j, j]
            W[:, j:] -= err[:, None] * U[j, j:][None, :]
            j += 1
    return Q[:, torch.argsort(torch.tensor(perm))]


@pytest.mark.parametrize("bits,gs,sym,K,block", [(4, 32, True, 96, 128), (3, 24, False, 80, 32), (2, 16, True, 72, 16)])
def test_group_aware_matches_the_plain_algorithm_with_a_monotone_g_idx(bits, gs, sym, K, block):
    cfg = QuantizeConfig(bits=bits, group_size=gs, sym=sym, act_group_aware=True)
    W, X = _weight(24, K, bits), _inputs(4 * K, K, bits)
    packed, _ = quantize_linear(W, None, cfg, inputs=X, block_size=block)
    assert torch.equal(packed.g_idx.long(), torch.arange(K) // gs) and not packed.desc_act
    H = 2 / X.shape[0] * X.double().t() @ X.double()
    ints = _naive_group_aware(W, H, cfg)
    assert (packed.unpack_qweight().t().double() == ints).double().mean() > 0.98
    plain, _ = quantize_linear(W, None, cfg.replace(act_group_aware=False), inputs=X, block_size=block)
    assert not torch.equal(plain.qweight, packed.qweight)  # the order did change something


def test_group_aware_in_the_original_order_is_plain_gptq_byte_for_byte():
    """With channels already in decreasing importance the order is the identity."""
    K = 64
    X = torch.randn(512, K, generator=torch.Generator().manual_seed(3)) * torch.linspace(4, 0.5, K)
    H = 2 / 512 * X.t() @ X
    H = torch.diag(torch.diag(H))  # exactly decreasing diagonal, no ties
    W = _weight(16, K, 3)
    cfg = QuantizeConfig(bits=3, group_size=16)
    a, _ = quantize_linear(W, H, cfg)
    b, _ = quantize_linear(W, H, cfg.replace(act_group_aware=True))
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


# ---------------------------------------------------------------------------- float target
def _accumulate(X_quant: torch.Tensor, X_float: torch.Tensor | None, rows: int = 128) -> GPTQ:
    acc = GPTQ(X_quant.shape[1])
    for i in range(0, X_quant.shape[0], rows):
        acc.add_batch(X_quant[i : i + rows], None if X_float is None else X_float[i : i + rows])
    return acc


def test_float_target_accumulates_the_cross_term_in_float64_agreement():
    X = _inputs(300, 48, 1)
    Xq = X + 0.3 * _inputs(300, 48, 2)
    acc = _accumulate(Xq, X, rows=70)
    want = 2 / 300 * (X.double() - Xq.double()).t() @ Xq.double()
    assert torch.allclose(acc.D.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_float_target_with_identical_inputs_changes_no_byte():
    X, W = _inputs(256, 64, 4), _weight(32, 64, 4)
    cfg = QuantizeConfig(bits=3, group_size=16)
    plain, _ = quantize_linear(W, _accumulate(X, None), cfg)
    same, _ = quantize_linear(W, _accumulate(X, X.clone()), cfg.replace(float_target=1.0))
    assert torch.equal(plain.qweight, same.qweight) and torch.equal(plain.scales, same.scales)


@pytest.mark.parametrize("order", [{}, {"desc_act": True}, {"act_group_aware": True}])
def test_float_target_lowers_the_error_against_the_float_output(order):
    """||X W - X~ Q|| (what the float target minimises) drops, at 1 as the least-squares
    projection predicts: GPTQ on W + W D Hd^-1 with the same Hessian."""
    K, N, n = 96, 48, 1024
    X, W = _inputs(n, K, 5), _weight(N, K, 5)
    Xq = X + 0.4 * _inputs(n, K, 6)  # what the quantized predecessors feed the layer
    cfg = QuantizeConfig(bits=3, group_size=32, **order)
    acc = _accumulate(Xq, X)
    target = X.double() @ W.double().t()

    def err(packed) -> float:
        return float((Xq.double() @ packed.dequantize(torch.float64) - target).square().sum())

    plain, _ = quantize_linear(W, _accumulate(Xq, None), cfg)
    full, _ = quantize_linear(W, acc, cfg.replace(float_target=1.0))
    half, _ = quantize_linear(W, acc, cfg.replace(float_target=0.5))
    assert err(full) < err(half) < 0.9 * err(plain)

    H = acc.H.double()
    Hd = H + cfg.damp_percent * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    moved = W.double() + W.double() @ acc.D.double() @ torch.linalg.inv(Hd)
    projected, _ = quantize_linear(moved.float(), H.float(), cfg)
    assert (projected.unpack_qweight() == full.unpack_qweight()).double().mean() > 0.97


def test_float_reference_errors():
    acc = GPTQ(8)
    with pytest.raises(GPTQError, match="same rows"):
        acc.add_batch(torch.randn(4, 8), torch.randn(5, 8))
    acc.add_batch(torch.randn(4, 8))
    with pytest.raises(GPTQError, match="every batch or with none"):
        acc.add_batch(torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.parametrize("kwargs,match", [
    ({"float_target": 1.5}, r"float_target=1.5 must lie in \[0, 1\]"),
    ({"float_target": float("nan")}, "not a finite number"),
    ({"act_group_aware": True, "desc_act": True}, "pick one"),
    ({"act_group_aware": "yes"}, "not a bool"),
])
def test_config_refuses_bad_quality_settings(kwargs, match):
    with pytest.raises(FormatError, match=match):
        QuantizeConfig(**kwargs)


def test_quality_settings_round_trip_through_the_checkpoint_metadata():
    cfg = QuantizeConfig(mse=2.4, act_group_aware=True, float_target=0.25)
    back = QuantizeConfig.from_dict(cfg.to_dict())
    assert (back.mse, back.act_group_aware, back.float_target) == (2.4, True, 0.25)
    # a config read from disk and changed writes the change, not the stale metadata
    assert QuantizeConfig.from_dict(back.replace(float_target=0.0).to_dict()).float_target == 0.0


def test_a_peer_config_with_both_orders_still_loads_as_act_order():
    """The quantizer's order is not needed to read a checkpoint: desc_act decides."""
    cfg = QuantizeConfig.from_dict({"bits": 4, "group_size": 128, "desc_act": True, "act_group_aware": True})
    assert cfg.desc_act and not cfg.act_group_aware
