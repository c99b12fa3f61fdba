"""Checkpoints written "by another tool": an independent GPTQ writer/reader in numpy.

The packer below follows docs/DESIGN.md §2 bit by bit (value j of a column occupies bits
[j*b, (j+1)*b) of one little-endian stream cut into 32-bit words) with per-bit loops, sharing
no code with gptq_core.packing. Checkpoints it writes, in the shapes AutoGPTQ, optimum and
GPTQModel use, must load with ``load_quantized`` and give the logits of the float64 model
built from the spec's dequantization; and checkpoints gptq-core writes must read back by the
same independent reader as the weights gptq-core computes with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from transformers import LlamaConfig, LlamaForCausalLM

from gptq_core import QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import load_quantized, save_quantized
from gptq_core.quant_linear import QuantLinear


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------- the other tool
def np_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ints [count, cols] along axis 0 into int32 words, one bit at a time."""
    count, cols = values.shape
    words = np.zeros((math.ceil(count * bits / 32), cols), dtype=np.uint64)
    v = values.astype(np.uint64)
    for j in range(count):
        for bit in range(bits):
            pos = j * bits + bit
            words[pos // 32] |= ((v[j] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(pos % 32)
    return words.astype(np.uint32).view(np.int32)


def np_unpack(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`np_pack`, one bit at a time."""
    w = words.view(np.uint32).astype(np.uint64)
    out = np.zeros((count, w.shape[1]), dtype=np.int64)
    for j in range(count):
        for bit in range(bits):
            pos = j * bits + bit
            out[j] |= (((w[pos // 32] >> np.uint64(pos % 32)) & np.uint64(1)) << np.uint64(bit)).astype(np.int64)
    return out


def spec_dequantize(qweight, qzeros, scales, g_idx, bits, v2: bool) -> np.ndarray:
    """W [N, K] in float64 by the spec: scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k]."""
    K, N = g_idx.shape[0], scales.shape[1]
    q = np_unpack(qweight, bits, K)
    z = np_unpack(np.ascontiguousarray(qzeros.T), bits, N).T + (0 if v2 else 1)
    g = g_idx.astype(np.int64)
    return (scales.astype(np.float64)[g] * (q - z[g])).T


def peer_layer(rng, N: int, K: int, bits: int, group_size: int, sym: bool, act_order: bool, v2: bool,
               bias: str):
    """Random quantized layer as a peer stores it, plus its float64 weight and bias by the spec."""
    G = 1 if group_size == -1 else math.ceil(K / group_size)
    maxq = 2**bits - 1
    q = rng.integers(0, maxq + 1, size=(K, N))
    if sym:
        zeros = np.full((G, N), 2 ** (bits - 1))
    else:
        zeros = rng.integers(0 if v2 else 1, maxq + 1, size=(G, N))
        if v2:
            zeros[0, :3] = 0  # a zero point GPTQ v1 cannot store
    scales = (rng.uniform(0.5, 1.5, size=(G, N)) * 2.0 / ((maxq + 1) * math.sqrt(K))).astype(np.float16)
    g_idx = (np.zeros(K, dtype=np.int32) if group_size == -1 else np.arange(K, dtype=np.int32) // group_size)
    if act_order:
        g_idx = g_idx[rng.permutation(K)]
    stored = zeros if v2 else (zeros - 1) & maxq
    tensors = {
        "qweight": np_pack(q, bits),
        "qzeros": np.ascontiguousarray(np_pack(stored.T, bits).T),
        "scales": scales,
        "g_idx": g_idx.astype(np.int32),
    }
    b = None
    if bias == "real":
        b = rng.normal(0, 0.1, size=N).astype(np.float16)
        tensors["bias"] = b
    elif bias == "zero":
        tensors["bias"] = np.zeros(N, dtype=np.float16)  # AutoGPTQ writes these for bias-free layers
    w = (scales.astype(np.float64)[g_idx] * (q - zeros[g_idx])).T  # straight from the ints
    return tensors, w, b


# ---------------------------------------------------------------------------- scenarios
CASES = {
    # AutoGPTQ: quantize_config.json with model_file_base_name, zero biases, tied embeddings
    "autogptq-sym4-g32-zero-bias": dict(bits=4, group_size=32, sym=True, act_order=False, v2=False,
                                       bias="zero", style="autogptq", tie=True, attn_bias=False),
    # optimum: config.json only, act-order asymmetric
    "optimum-asym4-g32-act-order": dict(bits=4, group_size=32, sym=False, act_order=True, v2=False,
                                        bias="none", style="optimum", tie=False, attn_bias=False),
    # 3-bit with real biases (attention_bias), K=80 not a multiple of the group size
    "autogptq-asym3-g32-act-order-bias": dict(bits=3, group_size=32, sym=False, act_order=True, v2=False,
                                              bias="real", style="autogptq", tie=True, attn_bias=True),
    # GPTQModel v2 zeros (including zero points of 0), declared as gptq_v2
    "gptqmodel-v2-asym4-g16": dict(bits=4, group_size=16, sym=False, act_order=False, v2=True,
                                   bias="none", style="gptqmodel", tie=False, attn_bias=False),
    "gptqmodel-v2-sym8-act-order": dict(bits=8, group_size=64, sym=True, act_order=True, v2=True,
                                        bias="none", style="gptqmodel", tie=True, attn_bias=False),
    # 2-bit, one group per column, sharded with an index
    "sharded-sym2-g-1": dict(bits=2, group_size=-1, sym=True, act_order=False, v2=False,
                             bias="none", style="sharded", tie=False, attn_bias=False),
}


def tiny_config(tie: bool, attn_bias: bool) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
        tie_word_embeddings=tie, attention_bias=attn_bias, bos_token_id=1, eos_token_id=2,
    )


def write_peer_checkpoint(folder: Path, case: dict, seed: int) -> LlamaForCausalLM:
    """Write the case's checkpoint; return the float64 model it must behave like."""
    rng = np.random.default_rng(seed)
    cfg = tiny_config(case["tie"], case["attn_bias"])
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(cfg).eval()
    tensors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for key, value in ref.state_dict().items():
            if case["tie"] and key == "lm_head.weight":
                continue
            if not any(f".{lin}." in key for lin in LINEARS):
                half = value.to(torch.float16)
                tensors[key] = half.numpy()
                value.copy_(half.float())  # the reference holds what the file holds
        ref = ref.double()
        for i in range(cfg.num_hidden_layers):
            for lin in LINEARS:
                name = f"model.layers.{i}.{lin}"
                module = ref.get_submodule(name)
                has_bias = module.bias is not None
                layer, w, b = peer_layer(
                    rng, module.out_features, module.in_features, case["bits"], case["group_size"],
                    case["sym"], case["act_order"], case["v2"],
                    "real" if has_bias else ("zero" if case["bias"] == "zero" else "none"),
                )
                for field, value in layer.items():
                    tensors[f"{name}.{field}"] = value
                module.weight.copy_(torch.from_numpy(w))
                if has_bias:
                    module.bias.copy_(torch.from_numpy(b.astype(np.float64)))
    qcfg = {"bits": case["bits"], "group_size": case["group_size"], "desc_act": case["act_order"],
            "sym": case["sym"], "damp_percent": 0.01, "true_sequential": True, "quant_method": "gptq"}
    config = cfg.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    style = case["style"]
    if style == "autogptq":
        qcfg.update(static_groups=False, model_name_or_path=None, model_file_base_name="gptq_model-peer")
        (folder / "quantize_config.json").write_text(json.dumps(qcfg))
        np_save_file(tensors, str(folder / "gptq_model-peer.safetensors"), metadata={"format": "pt"})
    elif style == "optimum":
        config["quantization_config"] = {**qcfg, "use_exllama": True, "max_input_length": None,
                                         "tokenizer": None, "dataset": None, "use_cuda_fp16": False}
        np_save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif style == "gptqmodel":
        qcfg.update(checkpoint_format="gptq_v2", meta={"quantizer": ["gptqmodel:1.0.0"]})
        (folder / "quantize_config.json").write_text(json.dumps(qcfg))
        config["quantization_config"] = qcfg
        np_save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:  # sharded
        (folder / "quantize_config.json").write_text(json.dumps(qcfg))
        keys = sorted(tensors)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for file, names in shards.items():
            np_save_file({k: tensors[k] for k in names}, str(folder / file), metadata={"format": "pt"})
        index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ns in shards.items() for k in ns}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return ref


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_peer_checkpoint_loads_with_spec_logits(tmp_path, case_name):
    case = CASES[case_name]
    ref = write_peer_checkpoint(tmp_path, case, seed=len(case_name))
    model = load_quantized(tmp_path, device="cpu", torch_dtype=torch.float32)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 2 * len(LINEARS)
    for name, layer in layers.items():
        # the project's dequantization equals the spec's, exactly (fp16 scales x small ints)
        want = ref.get_submodule(name).weight.detach()
        assert torch.equal(layer.packed().dequantize(torch.float64).t(), want), name
        assert layer.zero_format == ("v2" if case["v2"] else "v1")
        assert layer.binding is not None  # bound at load
    if case["tie"]:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(ids).logits.double()
        want = ref(ids).logits
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-5, f"{case_name}: relative logit error {err:.3g}"


@pytest.mark.parametrize("bits,group_size,sym,fmt", [(4, 32, True, "gptq"), (3, 32, False, "gptq"),
                                                     (2, 16, False, "gptq_v2"), (8, -1, True, "gptq")])
def test_gptq_core_checkpoint_reads_back_by_the_spec(tmp_path, bits, group_size, sym, fmt):
    """What gptq-core writes, the independent reader dequantizes to the weights gptq-core uses."""
    cfg = tiny_config(tie=True, attn_bias=False)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg)
    qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    packed = {
        f"model.layers.{i}.{lin}": quantize_rtn(model.get_submodule(f"model.layers.{i}.{lin}").weight,
                                                bits, group_size, sym, zero_format=qcfg.zero_format)
        for i in range(2) for lin in LINEARS
    }
    save_quantized(model, packed, qcfg, tmp_path / "ckpt")
    stored = np_load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name, pw in packed.items():
        w = spec_dequantize(stored[f"{name}.qweight"], stored[f"{name}.qzeros"], stored[f"{name}.scales"],
                            stored[f"{name}.g_idx"], bits, v2=fmt == "gptq_v2")
        assert np.array_equal(w, pw.dequantize(torch.float64).t().numpy()), name
    if sym and bits == 4 and fmt == "gptq":
        assert (stored["model.layers.0.self_attn.q_proj.qzeros"].view(np.uint32) == 0x77777777).all()
