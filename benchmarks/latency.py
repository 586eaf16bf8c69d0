"""Batch-1 latency of plexus (bf16 and quantized) against HF transformers and llama.cpp on SmolLM2-135M-Instruct.

For each prompt length (32 and 512 tokens) one request generates 128 tokens
(greedy, EOS ignored) and we report, per run:

- TTFT (ms): from submitting the request to the first generated token
  (prefill of the whole prompt plus the first sampling step);
- prefill tok/s: prompt length / TTFT;
- decode tok/s: (128 - 1) / (time from the first to the last generated token).

plexus and llama.cpp stamp every token, so one run gives all three numbers.
HF generate() has no per-token clock: its TTFT is the wall time of
generate(max_new_tokens=1) and its decode time is t(128) - t(1), two calls per run.

Interleaved: every selected system is loaded once, each in its own spawned
process (common.Workers), and the runs go round-robin: for each prompt length,
for each run index, every system once (A, B, C, A, B, C, ...), so that the
machine's drift hits all of them alike. Only one process works at a time; each
settles (its OpenMP threads asleep) before the next one starts. Reported: each
metric's median with (min-max) over the runs, the ratios of medians of each
plexus column against its references (common.COMPARISONS) with their spread,
and every worker's resident memory.

    .venv/bin/python benchmarks/latency.py [--runs 5] [--systems plexus-bf16,llamacpp-bf16] [--quick]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    SYSTEMS,
    Metric,
    Request,
    Workers,
    add_common_args,
    comparisons,
    kv_cache_space_gib,
    legend,
    memory_table,
    random_prompts,
    ratio_table,
    resolve_runs,
    run_stats,
    start,
    stats_table,
    vocab_range,
    write_results,
)

DEFAULT_RUNS = 5
DEFAULT_SYSTEMS = SYSTEMS          # all of them, HF included (about 12 minutes with 5 runs, see README.md)


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


class Runner:
    """Lives in a system's worker process: the system, loaded and warmed up; measure() is one run."""

    def __init__(self, name: str, model_path: str, seq_len: int, kv_cache_space: float) -> None:
        from systems import load_system

        self.system = load_system(name, model_path, max_concurrency=1, seq_len=seq_len, kv_cache_space=kv_cache_space)

    @property
    def settings(self) -> dict[str, Any]:
        return self.system.settings

    def measure(self, prompt: tuple[int, ...], new_tokens: int) -> dict[str, float | None]:
        """One run: TTFT and the time from the first to the last generated token, and the metrics."""
        if self.system.per_request_timing:
            timing = self.system.run([Request(prompt, new_tokens)]).requests[0]
            run = {"ttft_s": timing.ttft_s, "decode_s": timing.decode_s}
        else:
            first = self.system.run([Request(prompt, 1)]).wall_s
            full = self.system.run([Request(prompt, new_tokens)]).wall_s
            run = {"ttft_s": first, "decode_s": full - first, "t1_s": first, f"t{new_tokens}_s": full}
        decode = run["decode_s"]
        # HF's t(N) - t(1) can come out <= 0 on a busy machine: that run has no decode tok/s.
        return {**run, "ttft_ms": run["ttft_s"] * 1e3, "prefill_tps": len(prompt) / run["ttft_s"],
                "decode_tps": (new_tokens - 1) / decode if decode > 0 else None}

    def close(self) -> None:
        self.system.close()


def measure(workers: Workers, prompts: Sequence[tuple[int, ...]], new_tokens: int,
            runs: int) -> dict[str, dict[str, list[dict]]]:
    """system -> prompt length -> its runs, interleaved: for each prompt, for each run, every system once."""
    found: dict[str, dict[str, list[dict]]] = {name: {} for name in workers.alive}
    for prompt in prompts:
        for r in range(runs):
            print(f"{len(prompt)}-token prompt, run {r + 1}/{runs}:", flush=True)
            for name in workers.alive:
                run = workers.call(name, "measure", prompt, new_tokens)
                if run is None:
                    continue
                found[name].setdefault(str(len(prompt)), []).append(run)
                decode = f"{run['decode_tps']:.1f}" if run["decode_tps"] else "n/a"
                print(f"  {name}: TTFT {run['ttft_ms']:.1f} ms, decode {decode} tok/s", flush=True)
    return found


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """For one prompt length: system -> metric -> run_stats."""
    return {name: {m.key: run_stats(run[m.key] for run in found) for m in METRICS} for name, found in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, DEFAULT_RUNS, DEFAULT_SYSTEMS)
    args = parser.parse_args()
    resolve_runs(args)
    began = time.perf_counter()
    settings = QUICK if args.quick else Settings()
    runs, info, hf_dir, paths = start(args)
    prompts = random_prompts(settings.prompt_lengths, vocab_range(hf_dir))
    seq_len = max(1024, max(settings.prompt_lengths) + settings.new_tokens)   # llama.cpp n_ctx

    kv_space = kv_cache_space_gib(hf_dir, [max(settings.prompt_lengths) + settings.new_tokens])   # plexus
    with Workers(args.systems, Runner, lambda name: (name, paths[name], seq_len, kv_space)) as workers:
        by_system = measure(workers, prompts, settings.new_tokens, runs)
    results: dict[str, dict] = {}
    for name in args.systems:
        if name in workers.errors and not by_system.get(name):
            results[name] = {"error": workers.errors[name]}
            continue
        results[name] = {"system_settings": workers.settings.get(name), "memory": workers.memory.get(name),
                         "by_prompt_length": {length: {"runs": found} for length, found in by_system[name].items()}}
        if name in workers.errors:
            results[name]["error"] = workers.errors[name]

    summary: dict[str, Any] = {}
    for length in map(str, settings.prompt_lengths):
        stats = summarize({name: found[length] for name, found in by_system.items() if found.get(length)})
        ratios = comparisons(stats, METRICS)
        summary[length] = {"stats": stats, "comparisons": ratios}
        for name, row in stats.items():    # the medians beside the runs, as before interleaving
            results[name]["by_prompt_length"][length].update(
                {key: found["median"] if found else None for key, found in row.items()}, stats=row)
        print(f"\n### Batch 1, {length}-token prompt, {settings.new_tokens} new tokens ({runs} interleaved run{'s' * (runs > 1)})\n")
        print(stats_table(stats, METRICS, runs))
        if ratios:
            print()
            print(ratio_table(ratios, METRICS))
    print("\n### Resident memory of each system's process\n")
    print(memory_table(workers.memory))
    print("\nWeights:\n" + legend(args.systems))
    for name, error in workers.errors.items():
        print(f"\n{name} FAILED:\n{error}")
    name = "latency_quick" if args.quick else "latency"
    path = write_results(name, {"benchmark": "latency", "machine": info, "settings": asdict(settings),
                                "runs": runs, "interleaved": True, "model_paths": paths, "summary": summary,
                                "results": results}, args.output_json)
    print(f"\nWrote {path} ({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
