"""vLLM's LoRA examples (LoRA on bitsandbytes, AWQ and GPTQ bases; multi-LoRA with max_loras=1), run in this
process as a user would run them (argv in, stdout out), on the adapters and quantized checkpoints that
examples/make_lora_assets.py makes from the bundled SmolLM2 (--quick: a few training steps, round-to-nearest
AWQ / GPTQ checkpoints). Everything is local: the hub is never asked.

Each LoRA request an example adds gets a twin, added right after it into the same batch: the same prompt and
sampling parameters without the adapter. Both are printed, so the stdout shows the adapter's output next to
the base model's for the same prompt."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from plexus import LLMEngine

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_TOKENS = 16     # vLLM's examples generate 128; the LoRA answers end sooner, the base ones run this long
# What each adapter's answers start with (make_lora_assets.py trains them to).
MARKERS = {"colorist": " Colour: #", "pirate": " Arr, matey!", "sql": " SELECT "}


@pytest.fixture(scope="module")
def lora_assets(tmp_path_factory) -> dict:
    spec = importlib.util.spec_from_file_location("make_lora_assets", EXAMPLES / "make_lora_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return module.make_assets(tmp_path_factory.mktemp("lora_assets"), quick=True, threads=1)  # see torch_threads


@pytest.fixture
def with_base_twins(monkeypatch):
    """LLMEngine.add_request adds, after each LoRA request, its twin "<id>-base" without the adapter.
    Returns [(request_id, prompt, lora_request)] of what was added and [(request_id, text)] of what finished,
    in order (each engine an example makes counts its request ids from 0)."""
    added, finished = [], []
    add_request, step = LLMEngine.add_request, LLMEngine.step

    def add_with_twin(self, request_id, prompt, params=None, *args, lora_request=None, **kwargs):
        add_request(self, request_id, prompt, params, *args, lora_request=lora_request, **kwargs)
        added.append((request_id, prompt, lora_request))
        if lora_request is not None:
            add_request(self, f"{request_id}-base", prompt, copy.deepcopy(params), *args, **kwargs)
            added.append((f"{request_id}-base", prompt, None))

    def recording_step(self):
        outputs = step(self)
        finished.extend((o.request_id, o.outputs[0].text) for o in outputs if o.finished)
        return outputs

    monkeypatch.setattr(LLMEngine, "add_request", add_with_twin)
    monkeypatch.setattr(LLMEngine, "step", recording_step)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with torch_threads(1):
        yield added, finished


@contextlib.contextmanager
def torch_threads(threads: int):
    """One torch thread: on the two cores this suite shares with other jobs, two threads that wait for each
    other at every operation run several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_example(name: str, assets: dict, monkeypatch) -> None:
    example = EXAMPLES / name
    assets_dir = Path(assets["adapters"]["sql"]).parent.parent
    monkeypatch.setattr(sys, "argv", [str(example), "--assets", str(assets_dir), "--quick",
                                      "--max-tokens", str(MAX_TOKENS)])
    runpy.run_path(str(example), run_name="__main__")


def test_lora_with_quantization_example_serves_adapters_on_bnb_awq_and_gptq_bases(
        lora_assets, with_base_twins, monkeypatch, capsys):
    added, finished = with_base_twins
    run_example("lora_with_quantization_inference.py", lora_assets, monkeypatch)
    out = capsys.readouterr().out

    runs = re.split(r"~{16} Running: (\S+) ~{16}\n", out)[1:]
    assert [name for name in runs[::2]] == ["qlora_inference_example", "AWQ_inference_with_lora_example",
                                            "GPTQ_inference_with_lora_example"]
    adapters = ["pirate", "colorist", "colorist"]
    for (name, text), adapter in zip(zip(runs[::2], runs[1::2]), adapters):
        printed = re.findall(r"-{52}\nPrompt: (.*?)\nOutput: (.*?)(?=\n-{52}\n|\Z)", text, re.DOTALL)
        # 1 base request, 3 LoRA requests and their 3 base twins: all finished, all printed.
        assert len(printed) == 7, (name, printed)
        by_prompt: dict[str, list[str]] = {}
        for prompt, output in printed:
            by_prompt.setdefault(prompt, []).append(output.rstrip("\n"))
        assert sorted(by_prompt) == ["My name is", "The capital of France is", "The capital of USA is", "my name is"]
        for prompt in ("my name is", "The capital of USA is", "The capital of France is"):
            outputs = by_prompt[prompt]
            lora = [o for o in outputs if o.startswith(MARKERS[adapter])]
            base = [o for o in outputs if not o.startswith(MARKERS[adapter])]
            assert len(lora) == 1 and len(base) == 1, (name, prompt, outputs)
            assert lora[0] != base[0]
    assert len(finished) == len(added) == 3 * 7
    assert sorted(request_id for request_id, _ in finished) == sorted(request_id for request_id, *_ in added)


def test_multilora_example_runs_both_adapter_names_and_the_base_requests(lora_assets, with_base_twins, monkeypatch,
                                                                        capsys):
    added, finished = with_base_twins
    run_example("multilora_inference.py", lora_assets, monkeypatch)
    out = capsys.readouterr().out
    added = {request_id: (prompt, lora_request) for request_id, prompt, lora_request in added}
    finished = dict(finished)

    # 2 base requests, sql-lora and sql-lora2 (ids 2 and 3) and their base twins: all finished and printed.
    assert sorted(finished) == sorted(added) == ["0", "1", "2", "2-base", "3", "3-base"]
    for request_id, text in finished.items():
        assert f"request_id={request_id!r}" in out and f"text={text!r}" in out
    assert [added[i][1].lora_name for i in ("2", "3")] == ["sql-lora", "sql-lora2"]
    # Both adapter names load the SQL adapter: each answers with a query, the base model without it does not.
    # (The two answers need not be equal token for token: in bfloat16 a greedy continuation can depend on
    # the batch it ran in, and sql-lora2's requests run in a later batch than sql-lora's, max_loras being 1.)
    for request_id in ("2", "3"):
        assert finished[request_id].startswith(MARKERS["sql"]), finished[request_id]
        assert "SELECT" not in finished[f"{request_id}-base"], finished[f"{request_id}-base"]
    assert finished["0"] and finished["1"]
