"""vLLM scripts run after changing only their import line: every import path in the README's table
exists, and vLLM's own offline examples run in process (import line and model changed) with the outputs
they print checked."""
from __future__ import annotations

import importlib
import re
import runpy
import sys
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "offline_inference"


def _readme_import_table() -> list[tuple[str, list[str]]]:
    """(module, names) for each `from plexus... import ...` in the README's table of vLLM imports."""
    rows = []
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| `from vllm[\w.]* import [^`]*` \| `from (plexus[\w.]*) import ([^`]*)` \|", line)
        if match:
            rows.append((match.group(1), [n.strip() for n in match.group(2).split(",")]))
    return rows


def test_the_readme_table_lists_every_vllm_path_the_issue_names():
    modules = {module for module, _ in _readme_import_table()}
    assert modules >= {"plexus", "plexus.engine.arg_utils", "plexus.utils", "plexus.utils.argparse_utils",
                       "plexus.distributed", "plexus.sampling_params", "plexus.outputs", "plexus.inputs",
                       "plexus.config", "plexus.lora.request"}


@pytest.mark.parametrize("module, names", _readme_import_table(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_import_in_the_readme_table_works(module, names):
    imported = importlib.import_module(module)
    for name in names:
        assert hasattr(imported, name), f"{module} has no {name}"


def test_vllm_names_are_the_same_objects_everywhere():
    import plexus
    from plexus.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from plexus.sampling_params import RequestOutputKind, SamplingParams

    assert EngineArgs is plexus.EngineArgs and issubclass(AsyncEngineArgs, EngineArgs)
    assert SamplingParams is plexus.SamplingParams and RequestOutputKind.DELTA.name == "DELTA"


def _run_example(path: Path, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.syspath_prepend(str(path.parent))
    runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


SMALL = ["--max-model-len", "512", "--kv-cache-space", "0.05"]


def test_vllm_llm_engine_example_with_best_of(monkeypatch, capsys):
    out = _run_example(EXAMPLES / "llm_engine_example.py", SMALL, monkeypatch, capsys)
    assert out.count("finished=True") == 3
    # n=2 of best_of=5: two completions; the greedy request carries prompt logprobs and logprobs.
    assert out.count("CompletionOutput(index=") == 4 and "CompletionOutput(index=1" in out
    assert "prompt_logprobs=[None, {" in out


def test_vllm_prefix_caching_example_runs(monkeypatch, capsys):
    """It runs both engines and compares. In bf16 (the CPU default) a prompt served from the prefix cache
    computes its suffix with matmuls of fewer rows and a masked attention call, whose rounding differs, so
    greedy text may part after some tokens and the script may print False; in fp32 cached and uncached
    runs are token-identical (test_parity.py::test_greedy_fp32_matches_hf_token_for_token[prefix-cache])."""
    out = _run_example(EXAMPLES / "prefix_caching.py", [], monkeypatch, capsys)
    assert out.count("Generated text: ") == 8
    assert re.search(r"Generated answers are the same: (True|False)", out)


def test_vllm_cli_example(monkeypatch, capsys):
    out = _run_example(EXAMPLES / "cli.py", SMALL + ["--seed", "1"], monkeypatch, capsys)
    lines = [line for line in out.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 4 and all(not line.endswith("Generated text: ''") for line in lines)


def test_vllm_chat_example(monkeypatch, capsys):
    out = _run_example(EXAMPLES / "basic" / "chat.py", SMALL + ["--max-tokens", "8", "--temperature", "0"],
                       monkeypatch, capsys)
    texts = re.findall(r"Generated text: '(.*)'", out)
    # Greedy: the batch of ten identical conversations gives ten identical replies (the single one before it
    # may differ in bf16 rounding, see test_vllm_prefix_caching_example_runs).
    assert len(texts) == 11 and all(texts) and len(set(texts[1:])) == 1


def test_vllm_structured_outputs_example(monkeypatch, capsys):
    """Its four constraints with SamplingParams' default max_tokens=16, so an output may be cut short: each is
    (a prefix of) a string its constraint allows."""
    import itertools

    out = _run_example(EXAMPLES / "structured_outputs.py", [], monkeypatch, capsys)
    results = dict(re.findall(r"Structured outputs by (\w+): (.*?)\n-{50}", out, re.S))
    assert results["Choice"] in ("Positive", "Negative")
    assert re.fullmatch(r"\w+(@\w*(\.(c(om?)?)?)?)?", results["Regex"])
    assert results["JSON"].startswith("{") and '"brand"' in results["JSON"]
    queries = ["SELECT " + c1 + " from " + t + " where " + c2 + "= " + n for c1, t, c2, n in itertools.product(
        ("col_1 ", "col_2 "), ("table_1 ", "table_2 "), ("col_1 ", "col_2 "), ("1 ", "2 "))]
    assert results["Grammar"] and any(q.startswith(results["Grammar"]) for q in queries)


def test_cleanup_dist_env_and_memory_frees_the_engine_and_the_process_group():
    import torch.distributed as dist

    from plexus import LLM
    from plexus.distributed import cleanup_dist_env_and_memory

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    llm = LLM(dtype="float32", max_model_len=128, kv_cache_space=0.02)
    model = weakref.ref(llm.llm_engine.executor.worker.model)
    del llm
    cleanup_dist_env_and_memory()
    assert model() is None and not dist.is_initialized()


def test_plexus_version_and_python_dash_m(capsys, monkeypatch):
    from plexus.entrypoints.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == "plexus 0.1.0"
    monkeypatch.setattr(sys, "argv", ["plexus", "--version"])
    with pytest.raises(SystemExit):
        runpy.run_module("plexus", run_name="__main__")
    assert "plexus 0.1.0" in capsys.readouterr().out


def test_logging_level_comes_from_plexus_or_vllm_variables():
    from plexus.envs import logging_level

    assert logging_level({}) == "INFO"
    assert logging_level({"VLLM_LOGGING_LEVEL": "debug"}) == "DEBUG"
    assert logging_level({"VLLM_LOGGING_LEVEL": "debug", "PLEXUS_LOGGING_LEVEL": "WARNING"}) == "WARNING"
    with pytest.raises(ValueError, match="PLEXUS_LOGGING_LEVEL='LOUD' is not a logging level; allowed: DEBUG"):
        logging_level({"PLEXUS_LOGGING_LEVEL": "LOUD"})
