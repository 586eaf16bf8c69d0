"""Hub model ids resolve as vLLM resolves them, through huggingface_hub: here from a Hugging Face cache
built in a temporary HF_HOME with the layout huggingface_hub writes (refs/<revision> naming a commit,
snapshots/<commit>/ holding the files), with HF_HUB_OFFLINE=1. No test reaches the network."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from plexus import LLM, SamplingParams

REPO = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
COMMIT = "fe8a4ea1ffedaf415f4da2f062534de366a451e6"
ROOT = Path(__file__).resolve().parent.parent


def _add_to_cache(hub: Path, repo: str, commit: str, source: Path, revision: str = "main") -> Path:
    """Put `source`'s files into the cache as huggingface_hub lays out a downloaded snapshot."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix in (".json", ".safetensors", ".jinja", ".model", ".txt"):
            blob = repo_dir / "blobs" / f"{commit[:8]}-{file.name}"
            if not blob.exists():
                blob.symlink_to(file.resolve())
            target = snapshot / file.name
            if not target.exists():
                target.symlink_to(blob)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, smollm_dir):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _add_to_cache(tmp_path / "hf" / "hub", REPO, COMMIT, smollm_dir)
    return tmp_path / "hf" / "hub", snapshot


def test_a_vllm_script_naming_a_hub_id_runs_from_the_cache(offline_cache, monkeypatch, capsys, llm_fp32):
    """vLLM's cli.py example, given --model TinyLlama/TinyLlama-1.1B-Chat-v1.0, serves the cached snapshot."""
    hub, snapshot = offline_cache
    monkeypatch.setattr(sys, "argv", ["cli.py", "--model", REPO, "--max-model-len", "256", "--kv-cache-space",
                                      "0.05", "--temperature", "0", "--dtype", "float32", "--num-prompts", "1"])
    runpy.run_path(str(ROOT / "examples" / "offline_inference" / "cli.py"), run_name="__main__")
    out = capsys.readouterr().out
    expected = llm_fp32.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=16),
                                 use_tqdm=False)[0].outputs[0].text
    assert f"Prompt: 'Hello, my name is', Generated text: {expected!r}" in out


def test_the_hub_id_resolves_to_the_snapshot_and_revisions_are_honoured(offline_cache):
    from plexus import EngineArgs

    hub, snapshot = offline_cache
    config = EngineArgs(model=REPO, tokenizer=REPO).create_engine_config()
    assert config.model.model_dir == snapshot and config.model.tokenizer_dir == snapshot
    assert config.model.served_model_name == REPO
    pinned = EngineArgs(model=REPO, revision=COMMIT).create_engine_config()
    assert pinned.model.model_dir == snapshot
    with pytest.raises(ValueError, match=rf"model '{REPO}': not a local path, and not in the Hugging Face cache "
                                         rf".*at revision 'v2'.*HF_HUB_OFFLINE=1 forbids downloading it"):
        EngineArgs(model=REPO, revision="v2").create_engine_config()


def test_download_dir_is_the_cache_searched(offline_cache, tmp_path, smollm_dir):
    from plexus import EngineArgs

    other = tmp_path / "elsewhere"
    snapshot = _add_to_cache(other, "acme/smol", "a" * 40, smollm_dir)
    assert EngineArgs(model="acme/smol", download_dir=str(other)).create_engine_config().model.model_dir == snapshot
    with pytest.raises(ValueError, match="model 'acme/smol': not a local path, and not in the Hugging Face cache"):
        EngineArgs(model="acme/smol").create_engine_config()


def test_a_name_that_is_neither_a_path_nor_a_hub_id_says_so(offline_cache):
    with pytest.raises(ValueError, match=r"model '/no/such/model': no such file or directory; pass a local "
                                         r"model directory"):
        LLM(model="/no/such/model")


def test_the_bundled_model_keeps_its_name(offline_cache):
    from plexus import EngineArgs

    config = EngineArgs(model="HuggingFaceTB/SmolLM2-135M-Instruct").create_engine_config()
    assert config.model.model_dir.name.startswith("SmolLM2-135M-Instruct")
