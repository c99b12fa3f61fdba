"""Every CLI flag out of its range is refused through the real ``gptq`` entry point: exit 2,
one stderr line naming the flag and what it must be, before any model is loaded (issue 12:
such values ran silently, changed the result, or ended in a transformers traceback)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gptq_core.cli.main import main
from gptq_core.cli.quantize import check_quantize_arguments

MAX_POSITIONS = 64


@pytest.fixture
def model_dir(tmp_path):
    """A folder with only a config.json: enough for every check, which runs before loading."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": MAX_POSITIONS}))
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Once upon a time there was a small model.\n")
    return path


def refused(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith(f"gptq {argv[0]}: error: "), err
    assert message in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens 0 is out of range; it must be at least 1"),
        (["--max-new-tokens", "-5"], "--max-new-tokens -5 is out of range"),
        (["--temperature", "-1"], "--temperature -1.0 is out of range; it must be a positive number"),
        (["--temperature", "nan"], "--temperature nan is out of range"),
        (["--top-p", "0"], "--top-p 0.0 is out of range; it must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p 1.5 is out of range"),
        (["--top-k", "-1"], "--top-k -1 is out of range; it must be 0 (off) or a positive"),
        (["--repetition-penalty", "0"], "--repetition-penalty 0.0 is out of range"),
        (["--device", "tpu"], "--device 'tpu' is not a device gptq-core can run on; use cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "--device 'cuda:x' is not a device gptq-core can run on"),
    ],
)
def test_generate_refuses_out_of_range_flags(capsys, model_dir, flags, message):
    refused(capsys, ["generate", str(model_dir), "--prompt", "hi", *flags], message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_generate_refuses_cuda_without_a_gpu(capsys, model_dir):
    refused(capsys, ["generate", str(model_dir), "--prompt", "hi", "--device", "cuda"],
            "--device 'cuda': no cuda device is available on this machine; use --device cpu")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-tokens", "-1"], "--max-tokens -1 is out of range; it must be at least 2"),
        (["--max-tokens", "1"], "--max-tokens 1 is out of range"),
        (["--window", "1"], "--window 1 is out of range; it must be at least 2"),
        (["--window", "4096"], f"--window 4096 is longer than the model's {MAX_POSITIONS} positions "
                               f"(config.json); use --window {MAX_POSITIONS} or less"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_eval_refuses_out_of_range_flags(capsys, model_dir, text_file, flags, message):
    refused(capsys, ["eval", str(model_dir), "--text", str(text_file), *flags], message)


def test_eval_calls_its_input_a_text_file(capsys, model_dir, tmp_path):
    refused(capsys, ["eval", str(model_dir), "--text", str(tmp_path / "missing.txt"), "--window", "32"],
            f"--text: the text file '{tmp_path / 'missing.txt'}' does not exist")
    refused(capsys, ["eval", str(model_dir), "--text", str(tmp_path), "--window", "32"], "is a folder")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seqlen", "4096"], f"--seqlen 4096 is longer than the model's {MAX_POSITIONS} positions "
                               f"(config.json); use --seqlen {MAX_POSITIONS} or less"),
        (["--seqlen", "0"], "--seqlen 0 is out of range; it must be at least 1"),
        (["--nsamples", "0"], "--nsamples 0 is out of range; it must be at least 1"),
        (["--calibration-batch-size", "0"], "--calibration-batch-size 0 is out of range; it must be at least 1"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_quantize_refuses_out_of_range_flags(capsys, model_dir, text_file, tmp_path, flags, message):
    refused(capsys, ["quantize", str(model_dir), str(tmp_path / "out"), "--calibration", str(text_file), *flags],
            message)
    assert not (tmp_path / "out").exists()


def test_quantize_default_seqlen_fits_the_model(model_dir):
    args = argparse.Namespace(model_dir=str(model_dir), seqlen=None, nsamples=128, device=None,
                              calibration_batch_size=None)
    check_quantize_arguments(args)
    assert args.seqlen == MAX_POSITIONS


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seconds", "-1"], "--seconds -1.0 is out of range; it must be a number of seconds >= 0"),
        (["--seconds", "nan"], "--seconds nan is out of range"),
        (["--seconds", "inf"], "--seconds inf is out of range"),
        (["--copies", "-1"], "--copies -1 is out of range; it must be 0 (enough copies"),
        (["--m", "0"], "--m needs positive batch sizes"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_bench_refuses_out_of_range_flags(capsys, flags, message):
    refused(capsys, ["bench", "--shapes", "64x64", "--m", "1", "--quiet", *flags], message)


def test_bench_generate_refuses_out_of_range_flags(capsys):
    refused(capsys, ["bench", "generate", "--synthetic", "llama-3-8b", "--seconds", "-1"],
            "--seconds -1.0 is out of range")


def test_bench_csv_unwritable_fails_before_the_run(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(capsys, ["bench", "--shapes", "64x64", "--m", "1", "--quiet", "--csv", str(blocker / "rows.csv")],
            f"--csv {blocker / 'rows.csv'} cannot be written")


def test_perplexity_refuses_a_window_beyond_the_model():
    """The API too: a window past the model's positions scores tokens it cannot place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptq_core.errors import GPTQError
    from gptq_core.eval import perplexity

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         max_position_embeddings=MAX_POSITIONS))
    with pytest.raises(GPTQError, match=r"window=128 is longer than the model's 64 positions; use a window of at most 64"):
        perplexity(model, list(range(1, 60)) * 4, window=128)
