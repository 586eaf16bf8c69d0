"""vLLM scripts run after changing only their import line: every import path in the README's table
exists, and vLLM's own offline examples run in process (import line and model changed) with the outputs
they print checked."""
from __future__ import annotations

import ast
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
    for prompt in ("A robot may not injure a human being", "To be or not to be,", "What is the meaning of life?"):
        assert out.count(f"prompt={prompt!r}") == 1, prompt
    # n=2 of best_of=5: two completions; the greedy request carries prompt logprobs and logprobs.
    assert out.count("CompletionOutput(index=") == 4 and "CompletionOutput(index=1" in out
    assert "prompt_logprobs=[None, {" in out


def _generated_texts(out: str) -> list[str]:
    """The texts of the examples' `print(f"Generated text: {generated_text!r}")` lines."""
    return [ast.literal_eval(text) for text in re.findall(r"^Generated text: (.*)$", out, re.M)]


def test_vllm_prefix_caching_example_prints_that_the_answers_are_the_same_in_fp32(monkeypatch, capsys):
    """Its last line compares greedy text with and without the prefix cache ("You should see the same outputs
    as before."). In fp32 it must say True: the cached prompts' suffixes are computed over cached keys and
    values that equal the recomputed ones (test_parity.py::test_greedy_fp32_matches_hf_token_for_token
    [prefix-cache] holds the tokens to HF's)."""
    import plexus

    class Float32LLM(plexus.LLM):        # the script hard-codes LLM(model=...); only the dtype is ours
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{"dtype": "float32", **kwargs})

    monkeypatch.setattr(plexus, "LLM", Float32LLM)
    out = _run_example(EXAMPLES / "prefix_caching.py", [], monkeypatch, capsys)
    texts = _generated_texts(out)
    assert len(texts) == 8 and all(texts) and texts[:4] == texts[4:], texts
    assert out.rstrip().endswith("Generated answers are the same: True")


def test_vllm_prefix_caching_example_in_bf16_is_reported(monkeypatch, capsys):
    """In bf16 (the CPU default) a prompt served from the prefix cache computes its suffix with matmuls of
    fewer rows and a masked attention call, whose rounding differs, so greedy text may part after some tokens
    and the script may print False: the test reports which, and how many of the four answers agree."""
    out = _run_example(EXAMPLES / "prefix_caching.py", [], monkeypatch, capsys)
    texts = _generated_texts(out)
    assert len(texts) == 8 and all(texts), texts
    line = re.search(r"Generated answers are the same: (True|False)", out)
    assert line
    with capsys.disabled():
        same = sum(a == b for a, b in zip(texts[:4], texts[4:]))
        print(f"\nprefix_caching.py in bf16: {line.group(0)} ({same} of 4 answers identical)")


def test_vllm_cli_example_prints_the_four_prompts_and_a_seeded_run_repeats(monkeypatch, capsys):
    """It samples (temperature 0.8, top_p 0.95) the four default prompts; with --seed the output is the same
    on a second run."""
    runs = [_run_example(EXAMPLES / "cli.py", SMALL + ["--seed", "1"], monkeypatch, capsys) for _ in range(2)]
    lines = [line for line in runs[0].splitlines() if line.startswith("Prompt: ")]
    prompts = [ast.literal_eval(re.match(r"Prompt: (.*), Generated text: ", line).group(1)) for line in lines]
    assert prompts == ["Hello, my name is", "The president of the United States is", "The capital of France is",
                       "The future of AI is"]
    assert all(not line.endswith("Generated text: ''") for line in lines)
    assert [line for line in runs[1].splitlines() if line.startswith("Prompt: ")] == lines


def test_vllm_chat_example_gives_one_greedy_reply_alone_and_in_a_batch_in_fp32(monkeypatch, capsys):
    """It chats one conversation, then the same conversation ten times in one batch: greedy in fp32, all eleven
    replies are the same text (in bf16 the single one may part from the batch's in rounding, see
    test_vllm_prefix_caching_example_in_bf16_is_reported)."""
    out = _run_example(EXAMPLES / "basic" / "chat.py",
                       SMALL + ["--max-tokens", "8", "--temperature", "0", "--dtype", "float32"], monkeypatch, capsys)
    texts = _generated_texts(out)
    assert len(texts) == 11 and all(texts) and len(set(texts)) == 1, texts


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
