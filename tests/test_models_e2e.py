"""Every listed model type end to end: prepare, GPTQ, save, reload, generate.

Each type is a tiny random model built from its transformers config class (no download),
quantized by the real sequential driver on a few random-token samples, saved as a GPTQ
checkpoint, reloaded with ``AutoGPTQForCausalLM.from_quantized`` and run. The reloaded model's
logits must match the float model carrying the dequantized weights (computed here in float64
from the packed tensors), and greedy ``generate()`` must produce the same tokens.
"""

from __future__ import annotations

import pytest
import torch

from gptq_core import QuantizeConfig, QuantLinear
from gptq_core.auto import AutoGPTQForCausalLM
from gptq_core.checkpoint import save_quantized
from gptq_core.models import (
    ARCHITECTURES,
    decoder_layers,
    get_architecture,
    prepare_model_for_quantization,
    quantized_linear_names,
    sequential_groups,
)
from gptq_core.testing import TINY_VOCAB as VOCAB
from gptq_core.testing import tiny_model, with_dequantized_weights
from gptq_core.threads import single_thread
from gptq_core.quantize.driver import quantize_model

ALL_TYPES = sorted(ARCHITECTURES)
#: Cycled over the types so that every bit width / sym / act-order path meets several families.
CONFIGS = (
    dict(bits=4, group_size=16),
    dict(bits=4, group_size=16, sym=False, desc_act=True),
    dict(bits=8, group_size=-1, sym=False),
    dict(bits=3, group_size=16, desc_act=True),
    dict(bits=2, group_size=32, sym=False, checkpoint_format="gptq_v2"),
)
#: Types whose modeling code cannot run in float64 (XGLM fills a float32 mask with the
#: float64 minimum); their reference runs in float32.
REFERENCE_DTYPE = {"xglm": torch.float32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def quantize(model, config: QuantizeConfig, seed: int = 0):
    arch = get_architecture(model)
    prepare_model_for_quantization(model, arch)
    packed = quantize_model(
        model, tokens(4, 16, seed), config, decoder_layers(model, arch),
        lambda index, layer: sequential_groups(layer, arch), device="cpu", progress=False,
    )
    return arch, packed


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_quantize_save_reload_generate(model_type, tmp_path):
    config = QuantizeConfig(**CONFIGS[ALL_TYPES.index(model_type) % len(CONFIGS)])
    model = tiny_model(model_type, seed=1)
    arch, packed = quantize(model, config)
    assert set(packed) == set(quantized_linear_names(model, arch))  # experts included

    save_quantized(model, packed, config, tmp_path / "q", torch_dtype=None)
    loaded = AutoGPTQForCausalLM.from_quantized(tmp_path / "q", device="cpu", torch_dtype=torch.float32)
    layers = loaded.quant_linears()
    assert set(layers) == set(packed)
    assert all(isinstance(m, QuantLinear) and m.bits == config.bits for m in layers.values())

    reference = with_dequantized_weights(model, packed, REFERENCE_DTYPE.get(model_type, torch.float64))
    x = tokens(2, 6, seed=7)
    with torch.no_grad():
        want = reference(x).logits
        got = loaded(x).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)

    prompt = x[:, :3]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    out = loaded.generate(prompt, **kw)
    assert out.shape == (2, 7)
    assert torch.equal(out, reference.generate(prompt, **kw))


def test_experts_without_calibration_tokens_are_quantized_by_rtn(tmp_path):
    """An expert the router never picks gets no Hessian: it is still quantized, and logged."""
    model = tiny_model("gpt_oss", seed=3)
    for layer in model.model.layers:
        with torch.no_grad():
            layer.mlp.router.bias[3] = -1e4  # no token is ever routed to expert 3
    config = QuantizeConfig(bits=4, group_size=16)
    arch, packed = quantize(model, config)
    starved = [n for n in quantized_linear_names(model, arch) if ".experts.3." in n]
    assert len(starved) == 2 * 3 and all(n in packed for n in starved)
    records = {r["name"]: r for r in packed.records}
    assert all(records[n]["fallback"] and records[n]["tokens"] == 0 for n in starved)
    fed = [n for n in packed if ".experts." in n and n not in starved]
    assert fed and not any(records[n]["fallback"] for n in fed)

    save_quantized(model, packed, config, tmp_path / "q", torch_dtype=None)
    loaded = AutoGPTQForCausalLM.from_quantized(tmp_path / "q", device="cpu", torch_dtype=torch.float32)
    x = tokens(1, 5, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x).logits.double(), with_dequantized_weights(model, packed)(x).logits, rtol=1e-4, atol=1e-4
        )
