"""plexus alone, one speed lever at a time: which part buys what.

Each configuration runs in a fresh process (the kernels' switches are read
once per process) and measures, in bf16 with 2 threads: batch-1 decode
tok/s (32-token prompt, 128 new tokens), prefill tok/s of a 512-token prompt,
and decode tok/s of 64 sequences (32-token prompts, 64 new tokens).

    .venv/bin/python benchmarks/levers.py [--runs 3]

Run it on a quiet machine (see benchmarks/README.md)."""
from __future__ import annotations

import argparse
import os
import time

from common import hf_model_dir, limit_threads, median, run_isolated

# name -> (environment, LLM keyword arguments)
CONFIGS = {
    "pure torch (PLEXUS_CPU_KERNELS=0)": ({"PLEXUS_CPU_KERNELS": "0"}, {}),
    "C++ kernels, layer by layer (PLEXUS_FUSED_DECODE=0)": ({"PLEXUS_FUSED_DECODE": "0"}, {}),
    "C++ kernels + fused decode step (default)": ({}, {}),
    "C++ kernels + torch.compile decode graphs (compilation_config=3)": (
        {"PLEXUS_FUSED_DECODE": "0"}, {"compilation_config": {"level": 3, "cudagraph_capture_sizes": [1, 64]}}),
}


def measure(model_dir: str, env: dict[str, str], kwargs: dict, runs: int) -> dict[str, float]:
    limit_threads()
    os.environ.update(env)
    import random

    from plexus import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="bfloat16", max_num_seqs=64, enable_prefix_caching=False, **kwargs)
    rng = random.Random(0)

    def prompt(n: int) -> dict:
        return {"prompt_token_ids": [rng.randrange(20, 40000) for _ in range(n)]}

    def timed(prompts: list, max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    one, many, long = [prompt(32)], [prompt(32) for _ in range(64)], [prompt(512)]
    timed(one, 129), timed(many, 65), timed(long, 1)       # warm up (and compile graphs, if any)
    b1, b64, pre = [], [], []
    for _ in range(runs):
        b1.append(128 / (timed(one, 129) - timed(one, 1)))
        b64.append(64 * 64 / (timed(many, 65) - timed(many, 1)))
        pre.append(512 / timed(long, 1))
    return {"batch 1 decode tok/s": median(b1), "prefill 512 tok/s": median(pre),
            "batch 64 decode tok/s": median(b64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model_dir = str(hf_model_dir())
    rows = {}
    for name, (env, kwargs) in CONFIGS.items():
        print(f"Running {name} ...", flush=True)
        rows[name] = run_isolated(measure, model_dir, env, kwargs, args.runs)
    metrics = list(next(iter(rows.values())))
    print("\n| configuration | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[m]:.0f}" for m in metrics) + " |")


if __name__ == "__main__":
    main()
