"""Offline throughput of plexus (bf16 and quantized) against HF transformers and llama.cpp on SmolLM2-135M-Instruct.

64 requests, all offered at once: prompt lengths uniform in 32..512 tokens,
output lengths uniform in 32..256 tokens (seeded, seed 0), greedy, EOS
ignored, so every system generates exactly the same tokens counts. Reported:

- output tok/s: requested output tokens / wall time;
- total tok/s: (prompt + requested output tokens) / wall time.

How each system is driven:

- plexus: one LLM.generate call with all requests (max_num_seqs = number of requests).
- HF transformers: static left-padded batches of 8, 16, 32 and 64 requests in
  the given order; the best batch size (by median) is reported. generate() runs a batch
  until its longest request finishes, so each batch generates its largest
  max_tokens and only the tokens each request asked for count as output.
- llama.cpp: parallel sequences in one context with continuous batching
  (systems.LlamaCppSystem); if that cannot run, one request at a time.

Interleaved: every selected system is loaded once, each in its own spawned
process (common.Workers), and each run index runs every system once (A, B, C,
A, B, C, ...; HF: each batch size once), so that the machine's drift hits all of
them alike; only one process works at a time and each settles before the next.
Reported: median (min-max) over the runs, ratios of medians against the
references of common.COMPARISONS with their spread, each worker's memory.

A sweep over the number of concurrent requests (1, 4, 16, 64: the first N of
the same requests; HF runs them as one batch of N; interleaved the same way,
one run per point by default) gives results/throughput.png, for a subset of
the systems (--sweep-systems).

With --device cuda the systems are plexus bf16 on one NVIDIA GPU with CUDA graphs
(plexus-cuda-bf16) and without (plexus-cuda-bf16-eager, enforce_eager=True), and
HF transformers bf16 on the same GPU (hf-cuda-bf16, static batches as above), run
and reported the same way (the sweep: all three by default); plexus-cuda-bf16 is
compared with both. Results: results/throughput_cuda.json and throughput_cuda.png.

    .venv/bin/python benchmarks/throughput.py [--runs 3] [--systems ...] [--quick] [--no-sweep]
    .venv/bin/python benchmarks/throughput.py --device cuda [--gpu-memory-utilization 0.6]
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    CUDA_SYSTEMS,
    HF,
    LLAMACPP_BF16,
    LLAMACPP_Q4_1,
    LLAMACPP_Q8_0,
    PLEXUS,
    PLEXUS_GGUF_Q4_1,
    PLEXUS_INT8,
    PLEXUS_W8A8,
    RESULTS_DIR,
    SEED,
    SPECS,
    SYSTEMS,
    Metric,
    Request,
    Workers,
    add_common_args,
    comparisons,
    kv_cache_space_gib,
    legend,
    median,
    memory_table,
    parse_systems,
    random_prompts,
    ratio_table,
    resolve_device,
    resolve_runs,
    run_stats,
    start,
    stats_table,
    vocab_range,
    write_results,
)

DEFAULT_RUNS = 3
# HF takes about 25 minutes alone (4 batch sizes x 3 runs of ~2 minutes): only with --systems.
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s != HF)
# The sweep's default systems (those of them that --systems selects): one line per kind of weights.
DEFAULT_SWEEP_SYSTEMS = (PLEXUS, PLEXUS_INT8, PLEXUS_W8A8, PLEXUS_GGUF_Q4_1, LLAMACPP_BF16, LLAMACPP_Q8_0,
                         LLAMACPP_Q4_1)
# --device cuda: all three systems, HF included (a GPU runs its batches quickly), in the runs and the sweep.
DEFAULT_CUDA_SYSTEMS = CUDA_SYSTEMS
DEFAULT_CUDA_SWEEP_SYSTEMS = CUDA_SYSTEMS


def is_hf(name: str) -> bool:
    """HF transformers (hf-bf16, hf-cuda-bf16): static batches, one configuration per batch size."""
    return SPECS[name].engine == "hf"


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


class Runner:
    """Lives in a system's worker process: the system, loaded for all the requests and warmed up."""

    def __init__(self, name: str, model_path: str, requests: list[Request], kv_unified: bool,
                 kv_cache_space: float | None, gpu_memory_utilization: float | None = None) -> None:
        from systems import load_system

        self.requests = requests
        seq_len = max(len(r.prompt) + r.max_tokens for r in requests)
        if SPECS[name].engine == "llamacpp":
            try:
                self.system = load_system(name, model_path, max_concurrency=len(requests), seq_len=seq_len,
                                          kv_unified=kv_unified)
                self.mode = f"continuous batching, up to {len(requests)} parallel sequences"
            except Exception as exc:  # noqa: BLE001
                print(f"  parallel sequences failed ({exc}); falling back to one request at a time", flush=True)
                self.system = load_system(name, model_path, max_concurrency=1, seq_len=seq_len)
                self.mode = "sequential, one request at a time (fallback)"
        else:
            self.system = load_system(name, model_path, max_concurrency=len(requests), seq_len=seq_len,
                                      kv_cache_space=kv_cache_space, gpu_memory_utilization=gpu_memory_utilization)
            self.mode = ("static left-padded batches" if SPECS[name].engine == "hf"
                         else "one LLM.generate() call with all requests")

    @property
    def settings(self) -> dict[str, Any]:
        return {**self.system.settings, "mode": self.mode}

    def run(self, n: int, batch_size: int | None = None) -> dict[str, float]:
        """One run of the first n requests (HF: in static batches of batch_size)."""
        if batch_size is not None:
            self.system.batch_size = batch_size
        result = self.system.run(self.requests[:n])
        return {"output_tps": result.output_tps, "total_tps": result.total_tps, "wall_s": result.wall_s,
                "computed_tokens": result.computed_tokens}

    def close(self) -> None:
        self.system.close()


def batch_sizes(name: str, settings: Settings) -> tuple[int | None, ...]:
    """The configurations a system runs in each round: HF every batch size, the others one (None)."""
    return settings.hf_batch_sizes if is_hf(name) else (None,)


def measure(workers: Workers, settings: Settings, runs: int) -> dict[str, dict[str, list[dict]]]:
    """system -> batch size ("all" but for HF) -> runs of all the requests; round r runs every system once."""
    found: dict[str, dict[str, list[dict]]] = {name: {} for name in workers.alive}
    for r in range(runs):
        print(f"Run {r + 1}/{runs}:", flush=True)
        start = time.perf_counter()
        for name in workers.alive:
            for size in batch_sizes(name, settings):
                run = workers.call(name, "run", settings.num_requests, size)
                if run is None:
                    break
                found[name].setdefault("all" if size is None else str(size), []).append(run)
                print(f"  {name}{'' if size is None else f' (batches of {size})'}: {run['output_tps']:.1f} "
                      f"output tok/s, {run['wall_s']:.1f} s", flush=True)
        print(f"  (run {r + 1} took {time.perf_counter() - start:.0f} s)", flush=True)
    return found


def best_runs(name: str, by_size: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    """The configuration reported: HF's batch size with the best median output tok/s."""
    if not is_hf(name):
        return "all", by_size["all"]
    best = max(by_size, key=lambda size: median([run["output_tps"] for run in by_size[size]]))
    return best, by_size[best]


def sweep(workers: Workers, systems: Sequence[str], settings: Settings, runs: int,
          main: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, list[float]]]:
    """system -> N -> output tok/s of its runs for the first N requests, interleaved like measure().

    N = all the requests reuses the main measurement (HF: its batch of N when it ran one)."""
    found: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
    full = str(settings.num_requests)
    reused = set()
    for name in systems:
        key = full if is_hf(name) else "all"
        if settings.num_requests in settings.sweep and key in main.get(name, {}):
            found[name][full] = [run["output_tps"] for run in main[name][key]]
            reused.add(name)
    for n in settings.sweep:
        todo = [name for name in systems if not (str(n) == full and name in reused)]
        for r in range(runs if todo else 0):
            print(f"Sweep, {n} concurrent requests, run {r + 1}/{runs}:", flush=True)
            for name in todo:
                if name not in workers.alive:
                    continue
                run = workers.call(name, "run", n, n if is_hf(name) else None)
                if run is not None:
                    found[name].setdefault(str(n), []).append(run["output_tps"])
                    print(f"  {name}: {run['output_tps']:.1f} output tok/s", flush=True)
    return found


def report(stats: dict[str, dict], ratios: dict, modes: dict[str, str], settings: Settings,
           requests: Sequence[Request], runs: int, hf_computed: float | None) -> None:
    prompt = sum(len(r.prompt) for r in requests)
    output = sum(r.max_tokens for r in requests)
    print(f"\n### {len(requests)} requests at once: {prompt} prompt + {output} output tokens "
          f"({runs} interleaved run{'s' * (runs > 1)})\n")
    print(stats_table(stats, METRICS, runs))
    if ratios:
        print()
        print(ratio_table(ratios, METRICS))
    print()
    for system, mode in modes.items():
        print(f"- {system}: {mode}")
    if hf_computed is not None:
        print(f"  (HF output counts only the tokens each request asked for; its batches generate "
              f"{hf_computed:.0f} tokens.)")


def sweep_table(sweeps: dict[str, dict[str, list[float]]], settings: Settings) -> str:
    def cell(values: list[float] | None) -> str:
        if not values:
            return "n/a"
        return f"{median(values):.1f}" if len(values) == 1 else \
            f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    lines = ["| system | " + " | ".join(str(n) for n in settings.sweep) + " |", "|---" * (len(settings.sweep) + 1) + "|"]
    for system, sweep_ in sweeps.items():
        lines.append(f"| {system} | " + " | ".join(cell(sweep_.get(str(n))) for n in settings.sweep) + " |")
    return "\n".join(lines)


def plot_sweep(sweeps: dict[str, dict[str, list[float]]], settings: Settings, path: str,
               where: str = "2 threads") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"plexus": "-", "llamacpp": "--", "hf": ":"}
    tab20 = plt.get_cmap("tab20").colors
    colors = list(plt.get_cmap("tab10").colors) + [tab20[i] for i in range(1, 20, 2)]   # distinct ones first
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (system, sweep_) in enumerate(sweeps.items()):
        points = [n for n in settings.sweep if sweep_.get(str(n))]
        if points:
            ax.plot(points, [median(sweep_[str(n)]) for n in points], marker="o", label=system,
                    linestyle=styles[SPECS[system].engine], color=colors[i % len(colors)])
    ax.set_xscale("log")
    ax.set_xticks(settings.sweep, [str(n) for n in settings.sweep])
    ax.minorticks_off()
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"SmolLM2-135M-Instruct, {where}: output throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, DEFAULT_RUNS, DEFAULT_SYSTEMS, DEFAULT_CUDA_SYSTEMS)
    parser.add_argument("--no-sweep", action="store_true", help="skip the concurrency sweep and its plot")
    parser.add_argument("--sweep-systems", default=None,
                        help="the systems of the sweep, among those of --systems; 'all': every one of them "
                             f"(default: {', '.join(DEFAULT_SWEEP_SYSTEMS)}; with --device cuda: "
                             f"{', '.join(DEFAULT_CUDA_SWEEP_SYSTEMS)})")
    parser.add_argument("--sweep-runs", type=int, default=1, help="interleaved runs per sweep point (default 1)")
    parser.add_argument("--kv-unified", action="store_true",
                        help="llama.cpp: one KV buffer shared by all sequences instead of one per sequence")
    args = parser.parse_args()
    resolve_runs(args)
    resolve_device(args)
    cuda = args.device == "cuda"
    if args.sweep_systems is None:
        args.sweep_systems = list(DEFAULT_CUDA_SWEEP_SYSTEMS if cuda else DEFAULT_SWEEP_SYSTEMS)
    else:
        args.sweep_systems = parse_systems(args.sweep_systems, args.device)
    began = time.perf_counter()
    settings = QUICK if args.quick else Settings()
    sweep_systems = [] if args.no_sweep else [s for s in args.sweep_systems if s in args.systems]
    runs, info, hf_dir, paths = start(args)
    requests = make_requests(settings, vocab_range(hf_dir))

    # plexus's KV cache: on the CPU sized to the work; on CUDA from gpu_memory_utilization (kv_cache_space is CPU-only)
    kv_space = None if cuda else kv_cache_space_gib(hf_dir, [len(r.prompt) + r.max_tokens for r in requests])
    with Workers(args.systems, Runner, lambda name: (name, paths[name], requests, args.kv_unified, kv_space,
                                                     args.gpu_memory_utilization_by_system.get(name))) as workers:
        main_runs = measure(workers, settings, runs)
        sweeps = sweep(workers, sweep_systems, settings, args.sweep_runs, main_runs) if sweep_systems else {}

    results: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    for name in args.systems:
        found = main_runs.get(name)
        if not found or (not is_hf(name) and "all" not in found):
            results[name] = {"error": workers.errors.get(name, "no runs")}
            continue
        size, best = best_runs(name, found)
        stats[name] = {m.key: run_stats(run[m.key] for run in best) for m in METRICS}
        results[name] = {**{key: value["median"] for key, value in stats[name].items()}, "stats": stats[name],
                         "runs": best, "mode": workers.settings[name]["mode"],
                         "system_settings": workers.settings[name], "memory": workers.memory.get(name)}
        if is_hf(name):
            results[name].update(mode=f"static batches of {size} (best median of {list(found)})",
                                 batch_size=int(size), by_batch_size={
                                     k: {"stats": {m.key: run_stats(r[m.key] for r in v) for m in METRICS},
                                         "runs": v} for k, v in found.items()})
        if name in sweeps:
            results[name]["sweep"] = {n: median(v) for n, v in sweeps[name].items()}
            results[name]["sweep_runs"] = sweeps[name]
        if name in workers.errors:
            results[name]["error"] = workers.errors[name]

    ratios = comparisons(stats, METRICS)
    hf = next((s for s in stats if is_hf(s)), None)
    hf_computed = median([r["computed_tokens"] for r in results[hf]["runs"]]) if hf else None
    if cuda:
        print(f"\nGPU: {info['gpu']['name']}")
    report(stats, ratios, {s: results[s]["mode"] for s in stats}, settings, requests, runs, hf_computed)
    name = "throughput" + ("_cuda" if cuda else "") + ("_quick" if args.quick else "")
    if sweeps:
        print(f"\n### Output tok/s by concurrent requests ({args.sweep_runs} interleaved run(s) per point; "
              f"N = {settings.num_requests} is the main measurement)\n")
        print(sweep_table(sweeps, settings))
        plot = pathlib.Path(args.output_json).with_suffix(".png") if args.output_json else RESULTS_DIR / f"{name}.png"
        if importlib.util.find_spec("matplotlib") is None:     # --device cuda installs nothing (common.start)
            print("\nmatplotlib is not installed: no plot (the sweep is in the JSON)")
        else:
            plot_sweep(sweeps, settings, str(plot), where=info["gpu"]["name"] if cuda else "2 threads")
            print(f"\nWrote {plot}")
    print(f"\n### Resident memory{' and GPU memory' if cuda else ''} of each system's process\n")
    print(memory_table(workers.memory, gpu=cuda))
    print("\nWeights:\n" + legend(args.systems))
    for system, error in workers.errors.items():
        print(f"\n{system} FAILED:\n{error}")
    payload = {"benchmark": "throughput", "machine": info, "settings": asdict(settings), "runs": runs,
               "sweep_runs": args.sweep_runs, "interleaved": True, "llamacpp_kv_unified": args.kv_unified,
               **({"device": "cuda", "gpu_memory_utilization": args.gpu_memory_utilization,
                   "gpu_memory_utilization_by_system": args.gpu_memory_utilization_by_system} if cuda else {}),
               "model_paths": paths, "comparisons": ratios,
               "requests": [{"prompt_tokens": len(r.prompt), "max_tokens": r.max_tokens} for r in requests],
               "results": results}
    print(f"Wrote {write_results(name, payload, args.output_json)} ({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
