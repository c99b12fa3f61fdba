"""Quantization spread over several devices (docs/DESIGN.md §6, gptq_core/quantize/parallel.py)
gives the bytes of one device: tested on lists of CPU devices, where threads run the shares.

The Hessian is a fold over chunks of samples fixed by the calibration data alone, so one, two
or three devices add the same partial sums in the same order; the layer replicas must receive
every group's quantized weights, or the later groups' Hessians (and bytes) change.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gptq_core import GPTQError, QuantizeConfig
from gptq_core.cli.main import main
from gptq_core.models import get_architecture
from gptq_core.quantize import GPTQ, prepare_calibration, quantize_model
from gptq_core.quantize.calibration import _read_text_file
from gptq_core.quantize.parallel import ChunkedHessian, combine, merge, plan_shards, resolve_devices

DATA = Path(__file__).resolve().parents[1] / "gptq_core" / "data"
#: Llama's true-sequential groups, from the architecture table
LLAMA_GROUPS = [list(g) for g in get_architecture(LlamaConfig()).groups]
#: float target (the default) and group-aware order: the settings most sensitive to last bits
CONFIG = QuantizeConfig(bits=4, group_size=32, act_group_aware=True)
CPU = torch.device("cpu")


def same_bytes(a: dict, b: dict) -> list[str]:
    """Names whose packed tensors differ (empty: byte-identical)."""
    assert a.keys() == b.keys()
    return [n for n in a if not all(torch.equal(getattr(a[n], t), getattr(b[n], t))
                                    for t in ("qweight", "qzeros", "scales", "g_idx"))]


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(DATA / "stories260K")
    docs = _read_text_file(DATA / "text" / "tinystories-sample.txt", "calibration")
    return prepare_calibration(docs, tok, nsamples=12, seqlen=64, seed=1)


def stories(calibration, devices, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(DATA / "stories260K")
    options = {"batch_size": 2, "chunk_samples": 2, **kwargs}  # 6 chunks of one batch each
    return model, quantize_model(model, calibration, CONFIG, model.model.layers, LLAMA_GROUPS,
                                 devices=devices, progress=False, **options)


@pytest.fixture(scope="module")
def one_device(calibration):
    return stories(calibration, ["cpu"])


@pytest.mark.parametrize("count", [2, 3])
def test_several_devices_give_the_bytes_of_one(calibration, one_device, count):
    model_one, one = one_device
    threads: set[str] = set()
    model = AutoModelForCausalLM.from_pretrained(DATA / "stories260K")
    # hooks travel into the replicas: record which threads ran layer 1's MLP
    model.model.layers[1].mlp.register_forward_hook(lambda *a: threads.add(threading.current_thread().name))
    many = quantize_model(model, calibration, CONFIG, model.model.layers, LLAMA_GROUPS, devices=["cpu"] * count,
                          progress=False, batch_size=2, chunk_samples=2)
    assert sum(name.startswith("gptq-device") for name in threads) == count  # every share ran in its thread
    assert same_bytes(one, many) == []
    assert [r["error"] for r in one.records] == [r["error"] for r in many.records]
    assert [(r["layer"], r["module"]) for r in one.records] == [(r["layer"], r["module"]) for r in many.records]
    for name in one:  # the model itself holds the same dequantized weights
        assert torch.equal(model.get_submodule(name).weight, model_one.get_submodule(name).weight)


def test_one_chunk_is_the_plain_running_mean_and_more_chunks_stay_close(calibration, one_device):
    """chunk_samples fixes the summation order: a different one moves only last bits."""
    _, chunked = one_device
    _, single = stories(calibration, "cpu", chunk_samples=12)  # one chunk
    ratios = [b["error"] / a["error"] for a, b in zip(single.records, chunked.records)]
    assert all(abs(r - 1) < 0.06 for r in ratios), ratios


def test_string_device_list_and_padding():
    rows = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": r, "attention_mask": (torch.arange(24) < 24 - 3 * i).long()} for i, r in enumerate(rows)]
    results = []
    for devices in ("cpu", "cpu,cpu"):
        torch.manual_seed(3)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                             max_position_embeddings=64)).eval()
        results.append(quantize_model(model, data, CONFIG, model.model.layers, LLAMA_GROUPS, devices=devices,
                                      progress=False, batch_size=1, chunk_samples=1))
    assert same_bytes(*results) == []
    assert results[0].records[0]["tokens"] == sum(24 - 3 * i for i in range(6))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt2"])
def test_moe_and_conv1d_models_on_two_devices(model_type):
    from gptq_core.models import decoder_layers, prepare_model_for_quantization, sequential_groups
    from gptq_core.testing import TINY_VOCAB, tiny_model

    data = torch.randint(3, TINY_VOCAB, (8, 16), generator=torch.Generator().manual_seed(5))
    results = []
    for devices in (["cpu"], ["cpu", "cpu"]):
        model = tiny_model(model_type, seed=2)
        arch = get_architecture(model)
        prepare_model_for_quantization(model, arch)
        results.append(quantize_model(model, data, CONFIG, decoder_layers(model, arch),
                                      lambda index, layer: sequential_groups(layer, arch), devices=devices,
                                      progress=False, batch_size=2, chunk_samples=2))
    assert same_bytes(*results) == []


def test_interrupted_multi_device_run_resumes_to_the_same_bytes(calibration, one_device, tmp_path):
    _, one = one_device
    crashing = AutoModelForCausalLM.from_pretrained(DATA / "stories260K")

    def crash(*_):
        raise RuntimeError("simulated crash")

    handle = crashing.model.layers[1].mlp.down_proj.register_forward_hook(crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize_model(crashing, calibration, CONFIG, crashing.model.layers, LLAMA_GROUPS, devices=["cpu", "cpu"],
                       work_dir=tmp_path / "w", progress=False, batch_size=2, chunk_samples=2)
    handle.remove()
    assert json.loads((tmp_path / "w" / "progress.json").read_text()) == {"done": 1}
    # resumed on three devices: the device count is not part of the run's identity
    _, resumed = stories(calibration, ["cpu"] * 3, work_dir=tmp_path / "w")
    assert same_bytes(one, resumed) == []
    # a different chunk size is a different run: the folder is refused
    with pytest.raises(GPTQError, match="differs"):
        stories(calibration, ["cpu"], work_dir=tmp_path / "w", chunk_samples=4)


def test_streamed_weights_on_two_devices(calibration, one_device):
    """The streaming layer source brings each layer onto the primary device; the replicas
    are copied from it there."""
    from gptq_core import AutoGPTQForCausalLM
    from gptq_core.models import decoder_layers, prepare_model_for_quantization

    _, one = one_device
    wrapper = AutoGPTQForCausalLM.from_pretrained(DATA / "stories260K", CONFIG, stream_weights=True)
    model = wrapper.model
    arch = get_architecture(model)
    prepare_model_for_quantization(model, arch)
    names = [n for g in LLAMA_GROUPS for n in g]
    streamed = quantize_model(model, calibration, CONFIG, decoder_layers(model, arch), LLAMA_GROUPS,
                              devices=["cpu", "cpu"], progress=False, batch_size=2, chunk_samples=2,
                              layer_source=wrapper.stream.source(lambda index, layer: names))
    assert same_bytes(one, streamed) == []


# ---------------------------------------------------------------------------- the pieces
def test_chunks_follow_the_samples_and_devices_take_contiguous_runs():
    sizes = [2, 2, 2, 2, 2, 2, 1]  # 13 samples, chunks of 4 samples: batches (0,1) (2,3) (4,5) (6)
    for count in (1, 2, 3, 5):
        plan = plan_shards(sizes, 4, [CPU] * count)
        assert plan.chunk_of == (0, 0, 1, 1, 2, 2, 3)
        assert list(plan.device_of) == sorted(plan.device_of)  # contiguous, in order
        assert plan.device_of[0] == 0 and len(plan.busy) == min(count, 4)
    assert plan_shards(sizes, 4, [CPU] * 2).device_of == (0, 0, 0, 0, 1, 1, 1)
    with pytest.raises(GPTQError, match="chunk_samples=0 must be >= 1"):
        plan_shards(sizes, 0, [CPU])


def test_chunked_hessian_folds_in_chunk_order():
    torch.manual_seed(0)
    xs = [torch.randn(5 + i, 8) for i in range(6)]
    chunk_of = [0, 0, 1, 2, 2, 3]
    reference = GPTQ(8)
    for x in xs:
        reference.add_batch(x)
    # one device: folding as it goes
    alone = ChunkedHessian(8, CPU, fold=True)
    for c, x in zip(chunk_of, xs):
        alone.add_batch(c, x)
    one = combine([{"a": alone}], {"a": 8}, CPU)["a"]
    # two devices: chunks 0-1 and 2-3
    first, second = ChunkedHessian(8, CPU, fold=True), ChunkedHessian(8, CPU, fold=False)
    for c, x in zip(chunk_of, xs):
        (first if c < 2 else second).add_batch(c, x)
    two = combine([{"a": first, "b": first}, {"a": second, "b": second}], {"a": 8, "b": 8}, CPU)
    assert two["a"] is two["b"]  # shared on every device: shared result
    assert torch.equal(one.H, two["a"].H) and one.nsamples == two["a"].nsamples == reference.nsamples
    torch.testing.assert_close(one.H, reference.H)
    # a single chunk is the running mean itself, bit for bit
    single = ChunkedHessian(8, CPU, fold=True)
    for x in xs:
        single.add_batch(0, x)
    assert torch.equal(combine([{"a": single}], {"a": 8}, CPU)["a"].H, reference.H)
    # a linear no batch reached gets an empty Hessian (RTN fallback); an empty part changes nothing
    assert combine([{}], {"z": 8}, CPU)["z"].nsamples == 0
    assert merge(one, GPTQ(8), CPU) is one


def test_a_lost_float_reference_on_any_device_drops_it_everywhere():
    x = torch.randn(6, 4)
    first, second = ChunkedHessian(4, CPU, fold=True), ChunkedHessian(4, CPU, fold=False)
    first.add_batch(0, x, x + 1)
    second.add_batch(1, x, x + 1)
    assert combine([{"a": first}, {"a": second}], {"a": 4}, CPU)["a"].D is not None
    first, second = ChunkedHessian(4, CPU, fold=True), ChunkedHessian(4, CPU, fold=False)
    first.add_batch(0, x, x + 1)
    second.drop_reference()
    second.add_batch(1, x)
    assert combine([{"a": first}, {"a": second}], {"a": 4}, CPU)["a"].D is None


@pytest.mark.parametrize(("devices", "device", "message"), [
    ([], None, "names no device"),
    ("cpu,,cpu", None, "names no device"),
    (["cpu", "gpu0"], None, "'gpu0' is not a device name"),
    (["cpu", "cuda:0"], None, "mix device kinds (cpu, cuda)"),
    (["mps", "mps"], None, "several mps devices are not supported"),
    (["cpu", "cpu"], "meta", "is not the first of devices"),
    (3, None, "must be a list of devices"),
])
def test_bad_device_lists_are_refused_in_one_line(devices, device, message):
    with pytest.raises(GPTQError, match=None) as info:
        resolve_devices(devices, device, CPU)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_devices_without_cuda_are_refused(capsys, tmp_path):
    with pytest.raises(GPTQError, match="no CUDA GPU is available"):
        resolve_devices(["cuda:0", "cuda:1"], None, CPU)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time.\n")
    argv = ["quantize", str(model_dir), str(tmp_path / "out"), "--calibration", str(text), "--devices", "cuda:0,cuda:1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--devices 'cuda:0,cuda:1'" in err and "no CUDA GPU" in err, err
    assert not (tmp_path / "out").exists()
