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

With --device cuda the systems are plexus bf16 on one NVIDIA GPU with CUDA graphs
(plexus-cuda-bf16) and without (plexus-cuda-bf16-eager, enforce_eager=True), and
HF transformers bf16 on the same GPU (hf-cuda-bf16), the same way; plexus-cuda-bf16
is compared with both. Then the memory-bandwidth bound of batch-1 decode: the GPU's
device-to-device copy bandwidth (measured in a spawned process after the runs) over
the bytes one decode step reads (every bf16 weight once), and each system's decode
tok/s as a fraction of it. Results: results/latency_cuda.json.

    .venv/bin/python benchmarks/latency.py [--runs 5] [--systems plexus-bf16,llamacpp-bf16] [--quick]
    .venv/bin/python benchmarks/latency.py --device cuda [--gpu-memory-utilization 0.6]
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
    cuda_copy_bandwidth,
    decode_step_bytes,
    kv_cache_space_gib,
    legend,
    memory_table,
    random_prompts,
    ratio_table,
    resolve_device,
    resolve_runs,
    run_isolated,
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

    def __init__(self, name: str, model_path: str, seq_len: int, kv_cache_space: float | None,
                 gpu_memory_utilization: float | None = None) -> None:
        from systems import load_system

        self.system = load_system(name, model_path, max_concurrency=1, seq_len=seq_len, kv_cache_space=kv_cache_space,
                                  gpu_memory_utilization=gpu_memory_utilization)

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


def bandwidth_floor(bandwidth: dict[str, Any], step: dict[str, Any], summary: dict[str, Any],
                    new_tokens: int) -> dict[str, Any]:
    """--device cuda: the memory-bandwidth bound of batch-1 decode, floor_tps = copy bandwidth / bytes one step
    reads (common.decode_step_bytes: every bf16 weight once), and each system's median decode tok/s as a
    fraction of it; also the bound with the KV cache read at the mean context of the decode steps."""
    rate = bandwidth["best_gbs"] * 1e9
    floor = rate / step["weight_bytes"]
    by_length: dict[str, Any] = {}
    for length, found in summary.items():
        context = int(length) + new_tokens / 2
        floor_kv = rate / (step["weight_bytes"] + step["kv_bytes_per_token"] * context)
        systems = {}
        for name, row in found["stats"].items():
            decode = row.get("decode_tps")
            if decode:
                systems[name] = {"decode_tps": decode["median"], "of_floor": decode["median"] / floor,
                                 "of_floor_with_kv": decode["median"] / floor_kv}
        by_length[length] = {"mean_context_tokens": context, "floor_with_kv_tps": floor_kv, "systems": systems}
    return {"bandwidth": bandwidth, "decode_step": step, "bandwidth_gbs": bandwidth["best_gbs"],
            "floor_tps": floor, "by_prompt_length": by_length}


def print_floor(floor: dict[str, Any], systems: Sequence[str]) -> None:
    bandwidth, step = floor["bandwidth"], floor["decode_step"]
    lengths = list(floor["by_prompt_length"])
    with_kv = ", ".join(f"{found['floor_with_kv_tps']:.0f} ({length}-token prompt)"
                        for length, found in floor["by_prompt_length"].items())
    print("\n### Memory-bandwidth bound of batch-1 decode\n")
    print(f"GPU copy bandwidth {bandwidth['best_gbs']:.0f} GB/s (best of {len(bandwidth['times_s'])} device-to-device "
          f"copies of {bandwidth['bytes_copied'] / 2**30:g} GiB, read + written bytes; median "
          f"{bandwidth['median_gbs']:.0f} GB/s). One decode step reads {step['weight_bytes'] / 1e6:.1f} MB: "
          f"{step['parameters'] / 1e6:.1f}M parameters in bf16, every weight once"
          f"{' (tied embeddings once)' if step['tie_word_embeddings'] else ''}. Bound: "
          f"**{floor['floor_tps']:.0f} tok/s**; with the KV cache ({step['kv_bytes_per_token'] / 1024:.1f} KiB a "
          f"token) read at the decode steps' mean context too: {with_kv} tok/s.\n")
    print("| system | " + " | ".join(f"decode tok/s, {n}-token prompt (of the bound)" for n in lengths) + " |")
    print("|---" * (len(lengths) + 1) + "|")
    for name in systems:
        cells = []
        for length in lengths:
            found = floor["by_prompt_length"][length]["systems"].get(name)
            cells.append(f"{found['decode_tps']:.1f} ({found['of_floor'] * 100:.1f}%)" if found else "n/a")
        if any(c != "n/a" for c in cells):
            print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, DEFAULT_RUNS, DEFAULT_SYSTEMS)
    args = parser.parse_args()
    resolve_runs(args)
    resolve_device(args)
    cuda = args.device == "cuda"
    began = time.perf_counter()
    settings = QUICK if args.quick else Settings()
    runs, info, hf_dir, paths = start(args)
    prompts = random_prompts(settings.prompt_lengths, vocab_range(hf_dir))
    seq_len = max(1024, max(settings.prompt_lengths) + settings.new_tokens)   # llama.cpp n_ctx

    # plexus's KV cache: on the CPU sized to the work; on CUDA from gpu_memory_utilization (kv_cache_space is CPU-only)
    kv_space = None if cuda else kv_cache_space_gib(hf_dir, [max(settings.prompt_lengths) + settings.new_tokens])
    with Workers(args.systems, Runner,
                 lambda name: (name, paths[name], seq_len, kv_space,
                                 args.gpu_memory_utilization_by_system.get(name))) as workers:
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
        on = f" on {info['gpu']['name']}" if cuda else ""
        print(f"\n### Batch 1, {length}-token prompt, {settings.new_tokens} new tokens{on} ({runs} interleaved run{'s' * (runs > 1)})\n")
        print(stats_table(stats, METRICS, runs))
        if ratios:
            print()
            print(ratio_table(ratios, METRICS))
    extra: dict[str, Any] = {}
    if cuda:       # after the workers have stopped: a spawned process alone on the GPU
        try:
            bandwidth = run_isolated(cuda_copy_bandwidth)
            floor = bandwidth_floor(bandwidth, decode_step_bytes(hf_dir), summary, settings.new_tokens)
            print_floor(floor, args.systems)
        except Exception as exc:  # noqa: BLE001  (the runs' numbers are kept)
            floor = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"\nMemory-bandwidth bound FAILED: {floor['error']}")
        extra = {"device": "cuda", "gpu_memory_utilization": args.gpu_memory_utilization,
                 "gpu_memory_utilization_by_system": args.gpu_memory_utilization_by_system, "bandwidth_floor": floor}
    print(f"\n### Resident memory{' and GPU memory' if cuda else ''} of each system's process\n")
    print(memory_table(workers.memory, gpu=cuda))
    print("\nWeights:\n" + legend(args.systems))
    for name, error in workers.errors.items():
        print(f"\n{name} FAILED:\n{error}")
    name = "latency" + ("_cuda" if cuda else "") + ("_quick" if args.quick else "")
    path = write_results(name, {"benchmark": "latency", "machine": info, "settings": asdict(settings),
                                "runs": runs, "interleaved": True, **extra, "model_paths": paths, "summary": summary,
                                "results": results}, args.output_json)
    print(f"\nWrote {path} ({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
