"""Perplexity of SmolLM2 on plexus/data/perplexity.txt (5,031 tokens in windows of 512, fp32 compute) for
each quantization method, against the unquantized fp32 model, with bounds set from what was measured:

| method                                   | measured | held to    |
|------------------------------------------|----------|------------|
| fp32                                     | 26.17    |            |
| int8 on load (W8A16)                     | +0.43 %  | < 1 %      |
| plexus quantize RTN W8 (gptq, compressed-tensors) | +0.3 % | < 1 % |
| fp8 on load (e4m3 per channel)           | +1.9 %   | < 3 %      |
| w8a8 on load (int8 activations per token)| +3.0 %   | < 4.5 %    |
| RTN W4 g64 symmetric / GPTQ              | 40.06 / 35.79 | GPTQ < 0.95 x RTN |
| RTN W4 g64 asymmetric / AWQ              | 32.78 / 29.63 | AWQ < 0.95 x RTN  |

GPTQ and AWQ are calibrated on 4 x 256 tokens of the shipped calibration text here (the command's default
is 24 x 512: the same perplexities within 0.2, in minutes instead of seconds)."""
from __future__ import annotations

import pytest

from plexus import LLM
from plexus.quantize import QuantizeConfig, quantize
from plexus.utils.perplexity import perplexity

CALIBRATION = dict(num_samples=4, seq_len=256)


@pytest.fixture(scope="module")
def fp32_perplexity(llm_fp32):
    return perplexity(llm_fp32)


def _perplexity(**engine) -> float:
    llm = LLM(dtype="float32", max_model_len=1024, kv_cache_space=0.1, **engine)
    return perplexity(llm)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """plexus quantize outputs, made once per module: name -> checkpoint directory."""
    made = {}

    def make(name: str, **settings) -> str:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            quantize(None, QuantizeConfig(**settings), out)
            made[name] = str(out)
        return made[name]
    return make


@pytest.mark.parametrize("quantization, bound", [("int8", 1.01), ("fp8", 1.03), ("w8a8", 1.045)])
def test_8_bit_on_load_stays_within_measured_bounds_of_fp32(quantization, bound, fp32_perplexity):
    ppl = _perplexity(quantization=quantization)
    assert fp32_perplexity < ppl < bound * fp32_perplexity, (ppl, fp32_perplexity)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_8_bit_checkpoints_stay_within_1_percent_of_fp32(fmt, quantized, fp32_perplexity):
    path = quantized(f"rtn-w8-{fmt}", method="rtn", bits=8, group_size=-1, sym=True, format=fmt)
    ppl = _perplexity(model=path)
    assert ppl < 1.01 * fp32_perplexity, (ppl, fp32_perplexity)


def test_gptq_w4_beats_round_to_nearest(quantized, fp32_perplexity):
    rtn = _perplexity(model=quantized("rtn-w4-sym", method="rtn", bits=4, group_size=64, sym=True,
                                      format="compressed-tensors"))
    gptq = _perplexity(model=quantized("gptq-w4-sym", method="gptq", bits=4, group_size=64, sym=True,
                                       format="gptq", **CALIBRATION))
    assert fp32_perplexity < gptq < 0.95 * rtn, (gptq, rtn)


def test_awq_w4_beats_round_to_nearest(quantized, fp32_perplexity):
    rtn = _perplexity(model=quantized("rtn-w4-asym", method="rtn", bits=4, group_size=64, sym=False,
                                      format="compressed-tensors"))
    awq = _perplexity(model=quantized("awq-w4", method="awq", bits=4, group_size=64, sym=False, format="awq",
                                      **CALIBRATION))
    assert fp32_perplexity < awq < 0.95 * rtn, (awq, rtn)
