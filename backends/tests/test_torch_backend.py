"""The torch backend (the numerical reference) against float64, and what it declares: one path
at every M, backward, torch.compile with fullgraph, and (on a GPU) CUDA-graph capture."""

from __future__ import annotations

import itertools

import pytest
import torch

from gptq_core import QuantLinear, get_registry
from gptq_core.device import DeviceInfo
from gptq_core.policy import EXPLAIN_M
from gptq_core.testing import random_packed
from gptq_backends.torch_ref import kernels, plugin

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def layer(bits=4, group=128, sym=True, act=False, K=256, N=64, bias=True, seed=0,
          dtype=torch.float16, mode="inference"):
    w = random_packed(bits, group, sym, act, K, N, seed=seed, bias=bias, device=DEVICE)
    return w, QuantLinear.from_packed(w, backend="torch", act_dtype=dtype, mode=mode)


def reference(x, w):
    ref = x.double() @ w.dequantize(torch.float64)
    return ref + w.bias.double() if w.bias is not None else ref


def rel_err(y, ref) -> float:
    return float((y.double() - ref).norm() / ref.norm())


GRID = list(itertools.product((2, 3, 4, 8), (-1, 32, 128), (True, False), (False, True)))


@pytest.mark.parametrize("bits,group,sym,act", GRID,
                         ids=[f"b{b}-g{g}-{'sym' if s else 'asym'}{'-act' if a else ''}"
                              for b, g, s, a in GRID])
def test_matches_float64(bits, group, sym, act):
    i = GRID.index((bits, group, sym, act))
    dtype = (torch.float16, torch.bfloat16, torch.float32)[i % 3]
    w, q = layer(bits, group, sym, act, K=160, N=40, bias=i % 2 == 0, seed=i, dtype=dtype)
    for m in (1, 7):
        x = torch.randn(m, 160, device=DEVICE).to(dtype)
        y = q(x)
        assert y.dtype == dtype and rel_err(y, reference(x, w)) < TOL[dtype]


def test_chunks_of_k_give_the_one_chunk_result(monkeypatch):
    """Dequantizing K in several chunks (the memory bound on wide layers) changes nothing but
    the fp32 summation order."""
    w, q = layer(bits=3, group=32, sym=False, K=320, N=24, dtype=torch.float32)
    x = torch.randn(5, 320, device=DEVICE)
    whole = q(x)
    monkeypatch.setattr(kernels, "_MAX_CHUNK_ELEMENTS", 64 * 24)
    assert kernels.chunk_rows(320, 24) == 64
    chunked = q(x)
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-5)
    assert rel_err(chunked, reference(x, w)) < TOL[torch.float32]


def test_backward_is_grad_times_w():
    w, q = layer(act=True, dtype=torch.float32, mode="training")
    x = torch.randn(3, 256, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 64, device=DEVICE)
    q(x).backward(g)
    expected = g.double() @ w.dequantize(torch.float64).T
    assert rel_err(x.grad, expected) < 1e-5


def test_one_path_at_every_m():
    _, q = layer()
    policy = q.binding.prepared.policy
    assert policy is plugin.POLICY
    assert set(policy.paths(EXPLAIN_M).values()) == {"torch:dequant+matmul"}
    assert "paths: any M: torch:dequant+matmul" in q.binding.explain()


def test_pack_keeps_the_callers_tensors():
    w = random_packed(4, 32, False, True, 128, 32, seed=3, device=DEVICE)
    before = [t.clone() for t in (w.qweight, w.qzeros, w.scales, w.g_idx)]
    backend = get_registry().get("torch")
    backend.prepare(w, DeviceInfo.of(DEVICE), QuantLinear.from_packed(w, act_dtype=None).spec())
    assert all(torch.equal(a, b) for a, b in zip(before, (w.qweight, w.qzeros, w.scales, w.g_idx)))


def test_custom_ops_pass_opcheck():
    w = random_packed(4, 64, False, True, 128, 32, seed=4, bias=True, device=DEVICE)
    p = get_registry().get("torch").prepare(
        w, DeviceInfo.of(DEVICE), QuantLinear.from_packed(w, act_dtype=None).spec(torch.float32))
    x = torch.randn(3, 128, device=DEVICE, requires_grad=True)
    torch.library.opcheck(kernels.qmatmul_op, (x, p.qweight, p.zeros, p.scales, p.g_idx, w.bias, 4))
    grad = torch.randn(3, 32, device=DEVICE)
    torch.library.opcheck(kernels.qmatmul_grad_input_op, (grad, p.qweight, p.zeros, p.scales,
                                                          p.g_idx, 4))


@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_compile_fullgraph(backend):
    """Capabilities.compile=True is true: QuantLinear compiles without graph breaks (the
    inductor case generates and builds real code on this machine)."""
    w, q = layer(act=True, dtype=torch.float32, mode="compile")
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend=backend)
    for shape in ((1, 256), (2, 5, 256)):
        x = torch.randn(*shape, device=DEVICE)
        y = compiled(x)
        assert rel_err(y.reshape(-1, 64), reference(x.reshape(-1, 256), w)) < TOL[torch.float32]
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_cuda_graph_capture_and_replay_with_fresh_inputs():
    w, q = layer(act=True)
    static_x = torch.randn(4, 256, device=DEVICE, dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = q(static_x)
    for seed in range(3):
        static_x.copy_(torch.randn(4, 256, device=DEVICE).half())
        graph.replay()
        assert rel_err(static_y, reference(static_x, w)) < TOL[torch.float16], seed
