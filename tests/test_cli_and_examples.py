"""The command line and the examples run as a user would run them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_plexus_generate_prints_the_greedy_continuation(llm_fp32):
    result = _run([str(BIN / "plexus"), "generate", "The capital of France is", "--max-tokens", "6",
                   "--dtype", "float32", "--max-model-len", "512"])
    assert result.returncode == 0, result.stderr
    from plexus import SamplingParams

    expected = llm_fp32.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6),
                                 use_tqdm=False)[0].outputs[0].text
    assert result.stdout.strip() == expected.strip()


def test_plexus_generate_reports_bad_input_without_a_traceback():
    result = _run([str(BIN / "plexus"), "generate", "hi", "--max-tokens", "0"])
    assert result.returncode == 2
    assert "max_tokens must be at least 1" in result.stderr and "Traceback" not in result.stderr


def test_llm_engine_example_runs_unchanged():
    result = _run([sys.executable, "examples/llm_engine_example.py", "--max-model-len", "256",
                   "--kv-cache-space", "0.05"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished=True") == 3


def test_neuron_int8_example_runs_on_the_cpu_reference_backend():
    """vLLM's Neuron int8 example with its settings (buckets 128..2048, s8, batch 8, tp 2, bf16 logits)."""
    result = _run([sys.executable, "examples/offline_inference_neuron_int8_quantization.py", "--cpu-reference"],
                  timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 4 and all(not line.endswith("Generated text: ''") for line in lines)


def test_neuron_int8_example_without_a_device_says_how_to_install_the_sdk():
    result = _run([sys.executable, "examples/offline_inference_neuron_int8_quantization.py"])
    assert result.returncode != 0
    assert "the Neuron platform needs the transformers-neuronx package" in result.stderr
    assert "pip install --extra-index-url=https://pip.repos.neuron.amazonaws.com" in result.stderr
