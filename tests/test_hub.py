"""Hub ids and revisions, offline, against a real huggingface_hub cache built in a temporary
HF_HOME (models--org--name/{blobs,snapshots/<commit>,refs/<name>}, checked with the hub's own
``scan_cache_dir``): ``from_quantized``, the CLI and transformers' ``from_pretrained`` read the
revision asked for, and a missing id or revision is one line advising ``hf download``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM

from gptq_core import AutoGPTQForCausalLM, CheckpointError, QuantizeConfig, quantize_rtn
from gptq_core.checkpoint import save_quantized
from gptq_core.cli.main import main
from gptq_core.hub import resolve_model_dir

STORIES = Path(__file__).resolve().parents[1] / "gptq_core" / "data" / "stories260K"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
REPO = "gptq-test/stories260K-gptq"
MAIN_COMMIT = "1" * 40
V1_COMMIT = "2" * 40


def checkpoint(out: Path, config: QuantizeConfig) -> Path:
    """A round-to-nearest checkpoint of stories260K, written by save_quantized."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    packed = {f"model.layers.{i}.{lin}": quantize_rtn(model.get_submodule(f"model.layers.{i}.{lin}").weight,
                                                      config.bits, config.group_size, config.sym)
              for i in range(5) for lin in LINEARS}
    return save_quantized(model, packed, config, out)


def put_in_cache(hub_cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...]) -> None:
    """``folder``'s files as the hub caches them: content-addressed blobs, a snapshot of
    relative symlinks per commit, and one file per ref holding the commit hash."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds REPO: main = 4-bit g32, tag v1 = 8-bit g64."""
    root = tmp_path_factory.mktemp("hub")
    home = root / "hf_home"
    put_in_cache(home / "hub", REPO, checkpoint(root / "w4", QuantizeConfig(bits=4, group_size=32)),
                 MAIN_COMMIT, ("main",))
    put_in_cache(home / "hub", REPO, checkpoint(root / "w8", QuantizeConfig(bits=8, group_size=64)),
                 V1_COMMIT, ("v1",))
    info = huggingface_hub.scan_cache_dir(home / "hub")
    (repo,) = [r for r in info.repos if r.repo_id == REPO]
    assert {r.commit_hash for r in repo.revisions} == {MAIN_COMMIT, V1_COMMIT}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v1"}
    return home


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    """This process reads only the prepared cache (the hub's constants are read at import)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_resolve_gives_the_snapshot_of_each_revision(offline):
    assert resolve_model_dir(REPO).name == MAIN_COMMIT
    assert resolve_model_dir(REPO, "v1").name == V1_COMMIT
    assert resolve_model_dir(REPO, V1_COMMIT).name == V1_COMMIT


def test_from_quantized_loads_the_revision_asked_for(offline):
    main_model = AutoGPTQForCausalLM.from_quantized(REPO)
    tagged = AutoGPTQForCausalLM.from_quantized(REPO, revision="v1")
    assert (main_model.quantize_config.bits, main_model.quantize_config.group_size) == (4, 32)
    assert (tagged.quantize_config.bits, tagged.quantize_config.group_size) == (8, 64)
    assert tagged.tokenizer is not None
    ids = tagged.tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    assert tagged.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize(("model", "revision", "message"), [
    ("gptq-test/no-such-model", None, r"not in the local cache .* `hf download gptq-test/no-such-model`"),
    (REPO, "v9", r"revision 'v9' is not in the local cache .* `hf download gptq-test/stories260K-gptq --revision v9`"),
    ("./no/such/folder", None, r"is not a folder, nor a hub id \(org/name\)"),
])
def test_missing_id_or_revision_is_one_line_with_hf_download(offline, model, revision, message):
    with pytest.raises(CheckpointError, match=message) as info:
        AutoGPTQForCausalLM.from_quantized(model, revision=revision)
    assert "\n" not in str(info.value) and "huggingface-cli" not in str(info.value)


def test_a_revision_of_a_local_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a local folder"):
        resolve_model_dir(tmp_path, "v1")


def test_cli_generate_and_explain_take_a_hub_id(offline, capsys):
    assert main(["generate", REPO, "--revision", "v1", "--prompt", "Once", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    assert main(["backends", "explain", REPO, "--revision", "v1", "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 35 and all("bits=8" in r["spec"] or "8-bit" in r["spec"] for r in rows), rows[0]["spec"]
    assert main(["eval", "gptq-test/absent", "--text", str(STORIES / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "`hf download gptq-test/absent`" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_environment_offline_transformers_and_cli(hf_home, tmp_path):
    """A fresh process with HF_HOME and HF_HUB_OFFLINE=1 in its environment (as users set
    them): transformers' from_pretrained and ``gptq generate`` read the cached revision."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = (
        "import gptq_core, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({REPO!r}, revision='v1', dtype=torch.float32)\n"
        "q = m.model.layers[0].mlp.down_proj\n"
        "print(type(q).__name__, q.bits, q.group_size, q.binding.backend.name)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[:3] == ["QuantLinear", "8", "64"], run.stdout
    run = subprocess.run([sys.executable, "-m", "gptq_core", "generate", REPO, "--prompt", "Once",
                          "--max-new-tokens", "3", "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("Once")
