"""Quantize a model with `plexus quantize`, then serve the checkpoint as any quantized checkpoint is served.

The checkpoint is an ordinary compressed-tensors / GPTQ / AWQ directory: LLM(model=...) reads the method
from its config.json (as vLLM does), and so do vLLM and the format's own library. The perplexity of the
original and the quantized model on the text plexus ships for that purpose shows what 4 bits cost.

    python examples/offline_inference/quantized_checkpoint.py [--method gptq|awq|rtn] [--format gptq]
The same from the shell:
    plexus quantize --method gptq --bits 4 --group-size 64 --format gptq --out smollm2-gptq
"""
from __future__ import annotations

import argparse
import tempfile

from plexus import LLM, SamplingParams
from plexus.quantize import QuantizeConfig, quantize
from plexus.utils.perplexity import perplexity

PROMPTS = ["The capital of France is", "The three primary colours are"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gptq", "awq"])
    parser.add_argument("--num-samples", type=int, default=8, help="calibration sequences of 256 tokens")
    parser.add_argument("--windows", type=int, default=2, help="perplexity windows of 512 tokens")
    args = parser.parse_args()

    sym = args.format != "awq"      # AutoAWQ's layout always has zero points
    config = QuantizeConfig(method=args.method, bits=4, group_size=64, sym=sym, format=args.format,
                            num_samples=args.num_samples, seq_len=256)
    params = SamplingParams(temperature=0, max_tokens=16)
    with tempfile.TemporaryDirectory() as out:
        quantize(None, config, out)           # None: the bundled SmolLM2-135M-Instruct
        quantized = LLM(model=out, max_model_len=1024)
        for output in quantized.generate(PROMPTS, params, use_tqdm=False):
            print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
        ppl_quantized = perplexity(quantized, max_windows=args.windows)
        del quantized
    ppl_original = perplexity(LLM(max_model_len=1024), max_windows=args.windows)
    print(f"perplexity: original bf16 {ppl_original:.3f}, {args.method} W4 g64 ({args.format}) {ppl_quantized:.3f}")


if __name__ == "__main__":
    main()
