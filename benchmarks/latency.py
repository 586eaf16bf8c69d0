"""Batch-1 latency of plexus against HF transformers and llama.cpp on SmolLM2-135M-Instruct.

For each prompt length (32 and 512 tokens) one request generates 128 tokens
(greedy, EOS ignored) and we report:

- TTFT (ms): from submitting the request to the first generated token
  (prefill of the whole prompt plus the first sampling step);
- prefill tok/s: prompt length / TTFT;
- decode tok/s: (128 - 1) / (time from the first to the last generated token).

plexus and llama.cpp stamp every token, so one run gives all three numbers.
HF generate() has no per-token clock: its TTFT is the wall time of
generate(max_new_tokens=1) and its decode time is t(128) - t(1), two calls per run.
The metrics come from the median TTFT and the median decode time over the runs.

    .venv/bin/python benchmarks/latency.py [--runs 3] [--systems plexus-bf16,hf-bf16] [--quick]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common import (add_common_args, limit_threads, markdown_table, median, Metric, random_prompts,
                    Request, run_systems, start, vocab_range, write_results)


@dataclass(frozen=True)
class Settings:
    prompt_lengths: tuple[int, ...] = (32, 512)
    new_tokens: int = 128


QUICK = Settings(prompt_lengths=(8, 32), new_tokens=8)

METRICS = (
    Metric("ttft_ms", "TTFT (ms)", higher_is_better=False),
    Metric("prefill_tps", "prefill tok/s", higher_is_better=True),
    Metric("decode_tps", "decode tok/s", higher_is_better=True),
)


def measure(system: Any, prompt: tuple[int, ...], new_tokens: int) -> dict[str, float]:
    """One run: TTFT and the time from the first to the last generated token, in seconds."""
    if system.per_request_timing:
        timing = system.run([Request(prompt, new_tokens)]).requests[0]
        return {"ttft_s": timing.ttft_s, "decode_s": timing.decode_s}
    first = system.run([Request(prompt, 1)]).wall_s
    full = system.run([Request(prompt, new_tokens)]).wall_s
    return {"ttft_s": first, "decode_s": full - first, "t1_s": first, f"t{new_tokens}_s": full}


def summarize(samples: Sequence[dict[str, float]], prompt_len: int, new_tokens: int) -> dict[str, float | None]:
    """Metrics from the median TTFT and the median decode time of the runs."""
    ttft = median([s["ttft_s"] for s in samples])
    decode = median([s["decode_s"] for s in samples])
    if decode <= 0:   # HF's t(N) - t(1) on a busy machine
        print(f"  decode time {decode * 1e3:.1f} ms is not positive: the machine is not quiet; "
              "decode tok/s left out", flush=True)
    return {"ttft_ms": ttft * 1e3, "prefill_tps": prompt_len / ttft,
            "decode_tps": (new_tokens - 1) / decode if decode > 0 else None}


def worker(name: str, model_paths: dict[str, str], prompts: list[tuple[int, ...]], new_tokens: int,
           runs: int) -> dict[str, Any]:
    """Runs in a fresh process: load one system, measure every prompt `runs` times."""
    limit_threads()
    from systems import load_system

    seq_len = max(1024, max(len(p) for p in prompts) + new_tokens)   # llama.cpp n_ctx
    system = load_system(name, model_paths[name], max_concurrency=1, seq_len=seq_len)
    by_length: dict[str, Any] = {}
    for prompt in prompts:
        samples = [measure(system, prompt, new_tokens) for _ in range(runs)]
        by_length[str(len(prompt))] = {**summarize(samples, len(prompt), new_tokens), "runs": samples}
    system_settings = system.settings
    system.close()
    return {"by_prompt_length": by_length, "system_settings": system_settings}


def report(results: dict[str, dict], prompt_lengths: Sequence[int], new_tokens: int) -> None:
    for length in prompt_lengths:
        rows = {s: r["by_prompt_length"][str(length)] for s, r in results.items() if "error" not in r}
        print(f"\n### Batch 1, {length}-token prompt, {new_tokens} new tokens (median)\n")
        print(markdown_table(rows, METRICS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings()
    runs, info, hf_dir, paths = start(args)
    prompts = random_prompts(settings.prompt_lengths, vocab_range(hf_dir))

    results = run_systems(args.systems, worker, paths, prompts, settings.new_tokens, runs)
    report(results, settings.prompt_lengths, settings.new_tokens)
    name = "latency_quick" if args.quick else "latency"
    path = write_results(name, {"benchmark": "latency", "machine": info, "settings": asdict(settings),
                                "runs": runs, "model_paths": paths, "results": results}, args.output_json)
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
