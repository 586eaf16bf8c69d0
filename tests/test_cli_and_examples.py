"""The command line and the examples, run in this process as a user would run them (argv in, stdout out)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from plexus import SamplingParams
from plexus.entrypoints.cli import main

ROOT = Path(__file__).resolve().parent.parent
NEURON_EXAMPLE = ROOT / "examples" / "offline_inference_neuron_int8_quantization.py"


def test_plexus_generate_prints_the_greedy_continuation(llm_fp32, capsys):
    assert main(["generate", "The capital of France is", "--max-tokens", "6", "--dtype", "float32",
                 "--max-model-len", "512"]) == 0
    expected = llm_fp32.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6),
                                 use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out.strip() == expected.strip()


def test_plexus_generate_reports_bad_input_without_a_traceback(capsys):
    assert main(["generate", "hi", "--max-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_tokens must be at least 1" in err and "Traceback" not in err


def _run_neuron_example(argv: list[str], monkeypatch) -> None:
    for name in ("NEURON_CONTEXT_LENGTH_BUCKETS", "NEURON_TOKEN_GEN_BUCKETS", "NEURON_QUANT_DTYPE"):
        monkeypatch.setenv(name, "")      # the example sets them: monkeypatch puts back what was there
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", [str(NEURON_EXAMPLE), *argv])
    runpy.run_path(str(NEURON_EXAMPLE), run_name="__main__")


def test_neuron_int8_example_runs_on_the_cpu_reference_backend(monkeypatch, capsys):
    """vLLM's Neuron int8 example with its settings (buckets 128..2048, s8, batch 8, tp 2, bf16 logits)."""
    _run_neuron_example(["--cpu-reference"], monkeypatch)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 4 and all(not line.endswith("Generated text: ''") for line in lines)


def test_neuron_int8_example_without_a_device_says_how_to_install_the_sdk(monkeypatch):
    with pytest.raises(RuntimeError, match=r"the Neuron platform needs the transformers-neuronx package.*"
                                           r"pip install --extra-index-url=https://pip.repos.neuron.amazonaws.com"):
        _run_neuron_example([], monkeypatch)


def test_quantized_checkpoint_example_quantizes_serves_and_compares_perplexity(monkeypatch, capsys):
    example = ROOT / "examples" / "offline_inference" / "quantized_checkpoint.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--method", "rtn", "--windows", "1"])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("Prompt: ") == 2 and "Generated text: ''" not in out
    line = next(line for line in out.splitlines() if line.startswith("perplexity: "))
    original, quantized = (float(part.split()[-1]) for part in line.removeprefix("perplexity: ").split(", "))
    assert original < quantized < 2 * original


CUDA_EXAMPLE = ROOT / "examples" / "offline_inference_cuda.py"


def _run_cuda_example(argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(CUDA_EXAMPLE), *argv])
    runpy.run_path(str(CUDA_EXAMPLE), run_name="__main__")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_example_runs_on_the_gpu(monkeypatch, capsys):
    _run_cuda_example([], monkeypatch)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 4 and all(not line.endswith("Generated text: ''") for line in lines)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: the example runs")
def test_cuda_example_without_a_gpu_says_why(monkeypatch):
    with pytest.raises(RuntimeError, match=r"device='cuda': (this torch build .* has no CUDA support; install a "
                                           r"CUDA build of torch|no CUDA GPU is visible)"):
        _run_cuda_example(["--enforce-eager"], monkeypatch)
