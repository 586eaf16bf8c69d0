"""Offline throughput of plexus against HF transformers and llama.cpp on SmolLM2-135M-Instruct.

64 requests, all offered at once: prompt lengths uniform in 32..512 tokens,
output lengths uniform in 32..256 tokens (seeded, seed 0), greedy, EOS
ignored, so every system generates exactly the same tokens counts. Reported:

- output tok/s: requested output tokens / wall time;
- total tok/s: (prompt + requested output tokens) / wall time.

How each system is driven:

- plexus: one LLM.generate call with all requests (max_num_seqs = number of requests).
- HF transformers: static left-padded batches of 8, 16, 32 and 64 requests in
  the given order; the best batch size is reported. generate() runs a batch
  until its longest request finishes, so each batch generates its largest
  max_tokens and only the tokens each request asked for count as output.
- llama.cpp: parallel sequences in one context with continuous batching
  (systems.LlamaCppSystem); if that cannot run, one request at a time.

A sweep over the number of concurrent requests (1, 4, 16, 64: the first N of
the same requests; HF runs them as one batch of N) gives results/throughput.png.

    .venv/bin/python benchmarks/throughput.py [--runs 3] [--systems ...] [--quick] [--no-sweep]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common import (HF, LLAMACPP_BF16, LLAMACPP_Q8_0, RESULTS_DIR, SEED, add_common_args,
                    limit_threads, markdown_table, median, Metric, random_prompts, Request,
                    run_systems, start, vocab_range, write_results)


@dataclass(frozen=True)
class Settings:
    num_requests: int = 64
    prompt_range: tuple[int, int] = (32, 512)      # inclusive
    output_range: tuple[int, int] = (32, 256)      # inclusive
    hf_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    sweep: tuple[int, ...] = (1, 4, 16, 64)        # concurrent requests


QUICK = Settings(num_requests=4, prompt_range=(8, 32), output_range=(4, 16), hf_batch_sizes=(2, 4), sweep=(1, 2, 4))

METRICS = (
    Metric("output_tps", "output tok/s", higher_is_better=True),
    Metric("total_tps", "total tok/s", higher_is_better=True),
    Metric("wall_s", "wall (s)", higher_is_better=False, fmt="{:.2f}"),
)


def make_requests(settings: Settings, vocab: tuple[int, int], seed: int = SEED) -> list[Request]:
    """The seeded request mix: prompt and output lengths uniform in their ranges."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(settings.prompt_range[0], settings.prompt_range[1] + 1, settings.num_requests)
    output_lengths = rng.integers(settings.output_range[0], settings.output_range[1] + 1, settings.num_requests)
    prompts = random_prompts([int(n) for n in prompt_lengths], vocab, seed=seed + 1)
    return [Request(p, int(n)) for p, n in zip(prompts, output_lengths)]


def measure(system: Any, requests: Sequence[Request], runs: int) -> dict[str, Any]:
    """Median throughput of `runs` runs of the whole request list."""
    samples = []
    for _ in range(runs):
        result = system.run(requests)
        samples.append({"output_tps": result.output_tps, "total_tps": result.total_tps, "wall_s": result.wall_s,
                        "computed_tokens": result.computed_tokens})
    summary = {m.key: median([s[m.key] for s in samples]) for m in METRICS}
    return {**summary, "runs": samples}


def worker(name: str, model_paths: dict[str, str], requests: list[Request], runs: int, settings: Settings,
           sweep: bool, kv_unified: bool) -> dict[str, Any]:
    """Runs in a fresh process: load one system, measure the full mix, then the concurrency sweep."""
    limit_threads()
    from systems import load_system

    path, seq_len = model_paths[name], max(len(r.prompt) + r.max_tokens for r in requests)
    if name == HF:
        system = load_system(name, path, max_concurrency=len(requests), seq_len=seq_len)
        result = _measure_hf(system, requests, runs, settings.hf_batch_sizes)
    elif name in (LLAMACPP_BF16, LLAMACPP_Q8_0):
        system, result = _measure_llamacpp(name, path, requests, runs, seq_len, kv_unified)
    else:
        system = load_system(name, path, max_concurrency=len(requests), seq_len=seq_len)
        result = {**measure(system, requests, runs), "mode": "one LLM.generate() call with all requests"}
    result["system_settings"] = system.settings
    if sweep:
        result["sweep"] = _sweep(name, system, requests, settings.sweep, result)
    system.close()
    return result


def _measure_hf(system: Any, requests: Sequence[Request], runs: int, batch_sizes: Sequence[int]) -> dict[str, Any]:
    """Every static batch size; the result is the best one's, with all of them attached."""
    by_batch = {}
    for size in batch_sizes:
        system.batch_size = size
        by_batch[size] = measure(system, requests, runs)
    best = max(by_batch, key=lambda size: by_batch[size]["output_tps"])
    system.batch_size = best
    return {**by_batch[best], "mode": f"static batches of {best} (best of {list(by_batch)})", "batch_size": best,
            "by_batch_size": {str(k): v for k, v in by_batch.items()}}


def _measure_llamacpp(name: str, path: str, requests: Sequence[Request], runs: int, seq_len: int,
                      kv_unified: bool) -> tuple[Any, dict[str, Any]]:
    """Parallel sequences with continuous batching; one request at a time if that fails."""
    from systems import load_system

    try:
        system = load_system(name, path, max_concurrency=len(requests), seq_len=seq_len, kv_unified=kv_unified)
        return system, {**measure(system, requests, runs),
                        "mode": f"continuous batching, up to {len(requests)} parallel sequences"}
    except Exception as exc:  # noqa: BLE001
        print(f"  parallel sequences failed ({exc}); falling back to one request at a time", flush=True)
    system = load_system(name, path, max_concurrency=1, seq_len=seq_len)
    return system, {**measure(system, requests, runs), "mode": "sequential, one request at a time (fallback)"}


def _sweep(name: str, system: Any, requests: Sequence[Request], points: Sequence[int],
           full: dict[str, Any]) -> dict[str, float]:
    """Output tok/s for the first N requests, one run per point; N = all requests reuses the full result."""
    sweep = {}
    for n in points:
        if n == len(requests) and (name != HF or str(n) in full.get("by_batch_size", {})):
            sweep[str(n)] = full["by_batch_size"][str(n)]["output_tps"] if name == HF else full["output_tps"]
            continue
        if name == HF:
            system.batch_size = n          # all N requests in one batch
        sweep[str(n)] = system.run(requests[:n]).output_tps
    return sweep


def report(results: dict[str, dict], settings: Settings, requests: Sequence[Request]) -> None:
    prompt = sum(len(r.prompt) for r in requests)
    output = sum(r.max_tokens for r in requests)
    print(f"\n### {len(requests)} requests at once: {prompt} prompt + {output} output tokens (median)\n")
    rows = {s: r for s, r in results.items() if "error" not in r}
    print(markdown_table(rows, METRICS))
    for system, row in rows.items():
        print(f"- {system}: {row['mode']}")
    if HF in rows:
        print("  (HF output counts only the tokens each request asked for; its batches generate "
              f"{median([s['computed_tokens'] for s in rows[HF]['runs']])} tokens.)")
    sweeps = {s: r["sweep"] for s, r in rows.items() if "sweep" in r}
    if sweeps:
        print("\n### Output tok/s by concurrent requests (1 run per point)\n")
        print("| system | " + " | ".join(str(n) for n in settings.sweep) + " |")
        print("|---" * (len(settings.sweep) + 1) + "|")
        for system, sweep in sweeps.items():
            print(f"| {system} | " + " | ".join(f"{sweep[str(n)]:.1f}" for n in settings.sweep) + " |")


def plot_sweep(results: dict[str, dict], settings: Settings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, result in results.items():
        if "sweep" in result:
            ax.plot(settings.sweep, [result["sweep"][str(n)] for n in settings.sweep], marker="o", label=system)
    ax.set_xscale("log")
    ax.set_xticks(settings.sweep, [str(n) for n in settings.sweep])
    ax.minorticks_off()
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title("SmolLM2-135M-Instruct, 2 threads: output throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--no-sweep", action="store_true", help="skip the concurrency sweep and its plot")
    parser.add_argument("--kv-unified", action="store_true",
                        help="llama.cpp: one KV buffer shared by all sequences instead of one per sequence")
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings()
    runs, info, hf_dir, paths = start(args)
    requests = make_requests(settings, vocab_range(hf_dir))

    results = run_systems(args.systems, worker, paths, requests, runs, settings, not args.no_sweep,
                          args.kv_unified)
    report(results, settings, requests)
    name = "throughput_quick" if args.quick else "throughput"
    if not args.no_sweep:
        plot = RESULTS_DIR / f"{name}.png"
        plot_sweep(results, settings, str(plot))
        print(f"\nWrote {plot}")
    payload = {"benchmark": "throughput", "machine": info, "settings": asdict(settings), "runs": runs,
               "llamacpp_kv_unified": args.kv_unified, "model_paths": paths,
               "requests": [{"prompt_tokens": len(r.prompt), "max_tokens": r.max_tokens} for r in requests],
               "results": results}
    print(f"Wrote {write_results(name, payload, args.output_json)}")


if __name__ == "__main__":
    main()
