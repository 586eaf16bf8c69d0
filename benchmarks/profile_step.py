"""Where the time of one plexus decode step goes, at a given batch size.

Runs B requests (32-token prompts) to steady-state decode, then profiles N
decode steps with cProfile and splits each step into: the model (and within
it the kernels, with PLEXUS_FUSED_DECODE=0 to see them one by one), the
sampler, the scheduler, the runner's tensor building, output processing
(detokenizer, RequestOutput) and the Python left over.

    .venv/bin/python benchmarks/profile_step.py --batch 1 --batch 64
    PLEXUS_FUSED_DECODE=0 .venv/bin/python benchmarks/profile_step.py --batch 1

Run it on a quiet machine (see benchmarks/README.md)."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random

# cumulative time of these functions, by (file suffix, function name)
PARTS = {
    "model forward (decoder layers)": ("plexus/models/layers/decoder.py", "forward"),
    "lm_head": ("plexus/models/layers/decoder.py", "compute_logits"),
    "sampler": ("plexus/core/sampler.py", "forward"),
    "sampling metadata": ("plexus/core/sampler.py", "build"),
    "attention metadata": ("plexus/models/layers/attention.py", "build"),
    "scheduler": ("plexus/core/scheduler.py", "schedule"),
    "scheduler update (append, stop, detokenize)": ("plexus/core/scheduler.py", "update_from_output"),
    "outputs (logprobs, RequestOutput)": ("plexus/core/engine.py", "_make_outputs"),
}
# self time of these kernels (visible one by one only with PLEXUS_FUSED_DECODE=0)
KERNELS = ["llama_decode_layers", "linear_quant", "linear_w8a8_amx", "linear_w8a8", "linear_bf16", "_linear_pointwise", "linear", "paged_attention_decode",
           "scaled_dot_product_attention", "rope_and_cache", "add_rms_norm", "rms_norm", "silu_and_mul",
           "embedding", "logsumexp", "log_softmax", "argmax"]


def profile(batch: int, steps: int, quantization: str | None) -> None:
    from plexus import LLM, SamplingParams
    from plexus.model_files.gguf import bundled_gguf_path, convert_gguf

    # gguf: the bundled Q4_1 file as it is stored; otherwise its dequantized checkpoint (quantized on load
    # by int8, w8a8, ...)
    model = bundled_gguf_path() if quantization == "gguf" else convert_gguf(bundled_gguf_path())
    llm = LLM(model=str(model), dtype="bfloat16", quantization=quantization, max_num_seqs=max(batch, 1),
              enable_prefix_caching=False)
    engine = llm.llm_engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 16, ignore_eos=True, detokenize=True)
    for i in range(batch):
        engine.add_request(str(i), {"prompt_token_ids": [rng.randrange(20, 40000) for _ in range(32)]}, params)
    for _ in range(4):        # prefill, then a few decode steps to warm up
        engine.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    engine.abort_request([str(i) for i in range(batch)])

    stats = pstats.Stats(prof).stats
    total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
    per_step = total / steps * 1e3

    def cumulative(suffix: str, name: str) -> float:
        # The outermost of same-named functions in the file (the layers' forwards run inside the model's).
        return max((ct for (file, _, fn), (_, _, _, ct, _) in stats.items() if file.endswith(suffix) and fn == name),
                   default=0.0)

    print(f"\n### Decode step, batch {batch}: {per_step:.2f} ms/step ({batch / per_step * 1e3:.0f} tok/s)\n")
    print("| part | ms/step | share |\n|---|---|---|")
    accounted = 0.0
    for part, (suffix, name) in PARTS.items():
        t = cumulative(suffix, name) / steps * 1e3
        accounted += t
        print(f"| {part} | {t:.2f} | {t / per_step:.0%} |")
    rest = per_step - accounted
    print(f"| rest: engine step loop, runner, Python | {rest:.2f} | {rest / per_step:.0%} |")

    print("\n| kernel (self time) | ms/step |\n|---|---|")
    for (file, _, fn), (_, _, tt, _, _) in sorted(stats.items(), key=lambda kv: -kv[1][2]):
        name = fn.strip("<>").split(" ")[-1].split(".")[-1]
        if name in KERNELS and file == "~" and tt / steps * 1e3 >= 0.01:
            print(f"| {name} | {tt / steps * 1e3:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable); default 1 and 64")
    parser.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    parser.add_argument("--quantization", default=None,
                        help="gguf (the bundled Q4_1 file as stored), int8, w8a8, ... (default: bf16)")
    args = parser.parse_args()
    for batch in args.batch or [1, 64]:
        profile(batch, args.steps, args.quantization)


if __name__ == "__main__":
    main()
