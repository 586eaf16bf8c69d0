"""Shared helpers for the plexus benchmarks (latency.py, throughput.py).

Everything that is not specific to one benchmark lives here: installing the
peer systems, preparing the model files, machine information, prompts made of
token ids, running a system in a fresh process, medians, result files and
markdown tables. The systems themselves are in systems.py.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import pathlib
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from plexus.envs import cache_dir

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
CACHE_DIR = cache_dir() / "bench"

NUM_THREADS = 2          # every system runs with this many threads
SEED = 0

# System names, in table order. The first is the one the ratios are taken for.
PLEXUS = "plexus-bf16"
HF = "hf-bf16"
LLAMACPP_BF16 = "llamacpp-bf16"
LLAMACPP_Q8_0 = "llamacpp-q8_0"
SYSTEMS = (PLEXUS, HF, LLAMACPP_BF16, LLAMACPP_Q8_0)

# llama.cpp file types the bundled Q4_1 GGUF is re-quantized to (llama_ftype values by name).
GGUF_FTYPES = {LLAMACPP_BF16: "LLAMA_FTYPE_MOSTLY_BF16", LLAMACPP_Q8_0: "LLAMA_FTYPE_MOSTLY_Q8_0"}


# ---------------------------------------------------------------- environment

def ensure_peers() -> None:
    """Install the `bench` extra (llama-cpp-python, matplotlib, accelerate) if missing."""
    missing = [m for m in ("llama_cpp", "matplotlib", "accelerate") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    print(f"Missing {', '.join(missing)}: installing plexus-llm[bench] into {sys.prefix}. "
          "This builds llama-cpp-python from source (about 6 minutes on 2 cores).", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-e", f"{REPO}[bench]"], check=True)
    importlib.invalidate_caches()


def limit_threads(n: int = NUM_THREADS) -> None:
    """Pin OpenMP/BLAS pools to n threads; call in a fresh process before torch or llama.cpp load."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in a fresh (spawned) process and return its result.

    Each system gets its own process so that no two thread pools (torch's
    OpenMP, llama.cpp's) coexist or spin against each other, and every system
    starts from the same clean state.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------- model files

def hf_model_dir() -> pathlib.Path:
    """The bundled SmolLM2-135M-Instruct GGUF, converted to an HF directory (cached by plexus)."""
    from plexus.model_files.gguf import bundled_gguf_path, convert_gguf

    return pathlib.Path(convert_gguf(bundled_gguf_path()))


def llamacpp_gguf(system: str) -> pathlib.Path:
    """The GGUF file for a llama.cpp system, made once with llama.cpp's own quantizer.

    The bundled file is Q4_1 (Q8_0 embeddings); requantizing it to BF16 keeps
    exactly the dequantized values plexus and HF run with, Q8_0 rounds them again.
    """
    from plexus.model_files.gguf import bundled_gguf_path

    source = bundled_gguf_path()
    ftype_name = GGUF_FTYPES[system]
    target = CACHE_DIR / f"{source.stem}.{ftype_name.removeprefix('LLAMA_FTYPE_MOSTLY_')}.gguf"
    if not target.exists():
        _quantize(source, target, ftype_name)
    return target


def _quantize(source: pathlib.Path, target: pathlib.Path, ftype_name: str) -> None:
    import llama_cpp

    quiet_llama_cpp()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.allow_requantize = True          # the source is already quantized (Q4_1)
    params.nthread = NUM_THREADS
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if status != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({source} -> {ftype_name}) failed with status {status}")
    partial.replace(target)
    print(f"Wrote {target}", flush=True)


def quiet_llama_cpp() -> None:
    """Only errors from llama.cpp's C logging (llama-cpp-python routes it through this logger)."""
    import logging

    import llama_cpp._logger  # noqa: F401  (installs the log callback)

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def prepare_models(systems: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Convert/quantize what the systems need (in a child process).

    Returns the HF directory (its tokenizer defines the prompts) and system -> model path.
    """
    return run_isolated(_prepare_models, list(systems))


def _prepare_models(systems: list[str]) -> tuple[str, dict[str, str]]:
    hf_dir = str(hf_model_dir())
    return hf_dir, {s: str(llamacpp_gguf(s)) if s in GGUF_FTYPES else hf_dir for s in systems}


# ---------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids and exactly how many tokens to generate."""
    prompt: tuple[int, ...]
    max_tokens: int


def vocab_range(model_dir: str | pathlib.Path) -> tuple[int, int]:
    """[low, high) of ordinary token ids: the vocabulary without the special tokens at its start."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
    special = tokenizer.get_added_tokens_decoder()
    low = max(special) + 1 if special else 0
    return low, tokenizer.get_vocab_size()


def random_prompts(lengths: Sequence[int], vocab: tuple[int, int], seed: int = SEED) -> list[tuple[int, ...]]:
    """Seeded random token-id prompts of the given lengths (no special tokens).

    Every system gets these same ids: no text, no tokenizer differences.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(vocab[0], vocab[1], size=n)) for n in lengths]


# ---------------------------------------------------------------- machine info

def machine_info() -> dict[str, Any]:
    flags = _cpu_field("flags").split()
    return {
        "cpu": _cpu_field("model name") or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "threads": NUM_THREADS,
        "python": platform.python_version(),
        "versions": {pkg: _version(pkg) for pkg in ("plexus-llm", "torch", "transformers", "llama_cpp_python",
                                                       "numpy")},
        "load_average": os.getloadavg(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _cpu_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def print_machine(info: dict[str, Any]) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, avx512_bf16: "
          f"{'yes' if info['avx512_bf16'] else 'no'}, {info['threads']} threads per system; {versions}")
    load = info["load_average"][0]
    if load > 0.5:
        print(f"WARNING: 1-minute load average is {load:.2f}; other processes will distort these timings.")


# ---------------------------------------------------------------- statistics and reporting

def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def write_results(name: str, payload: dict[str, Any], path: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write the results JSON (default benchmarks/results/<name>.json) and return its path."""
    target = pathlib.Path(path) if path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n")
    return target


@dataclass(frozen=True)
class Metric:
    key: str              # key in each system's result row
    title: str            # column header
    higher_is_better: bool
    fmt: str = "{:.1f}"


def markdown_table(rows: dict[str, dict[str, float]], metrics: Sequence[Metric],
                   baseline: str = PLEXUS) -> str:
    """One row per system with each metric; then one row per peer with plexus/peer ratios.

    A ratio above 1 always means plexus is better: for lower-is-better metrics
    (times) the ratio is peer / plexus.
    """
    header = "| system | " + " | ".join(m.title for m in metrics) + " |"
    lines = [header, "|---" * (len(metrics) + 1) + "|"]
    for system, row in rows.items():
        lines.append(f"| {system} | " + " | ".join(_fmt(m, row.get(m.key)) for m in metrics) + " |")
    peers = [p for p in rows if p != baseline] if baseline in rows else []
    for peer in peers:
        ratios = [_ratio(m, rows[baseline].get(m.key), rows[peer].get(m.key)) for m in metrics]
        lines.append(f"| plexus / {peer} | " + " | ".join(ratios) + " |")
    if peers:
        lines.append("\n`plexus / <peer>` rows: plexus's speed relative to the peer, >1 = plexus faster "
                     "(for times: peer / plexus).")
    return "\n".join(lines)


def _fmt(metric: Metric, value: float | None) -> str:
    return "n/a" if value is None else metric.fmt.format(value)


def _ratio(metric: Metric, ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "n/a"
    ratio = ours / theirs if metric.higher_is_better else theirs / ours
    return f"{ratio:.2f}x"


# ---------------------------------------------------------------- running and command line

def run_systems(systems: Sequence[str], worker: Callable[..., dict[str, Any]], *args: Any) -> dict[str, dict]:
    """worker(system, *args) for each system, each in a fresh process.

    A system that fails is reported and recorded as {"error": ...}; the others still run.
    """
    results = {}
    for system in systems:
        print(f"Running {system} ...", flush=True)
        try:
            results[system] = run_isolated(worker, system, *args)
        except Exception as exc:  # noqa: BLE001  (one broken peer must not lose the others' numbers)
            print(f"  {system} failed: {type(exc).__name__}: {exc}", flush=True)
            results[system] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def start(args: argparse.Namespace) -> tuple[int, dict[str, Any], str, dict[str, str]]:
    """What both benchmarks do first: peers installed, machine recorded, models made.
    Returns (runs, machine info, HF model dir, GGUF paths by system)."""
    ensure_peers()
    info = machine_info()
    print_machine(info)
    hf_dir, paths = prepare_models(args.systems)
    return (1 if args.quick else args.runs), info, hf_dir, paths


def add_common_args(parser: argparse.ArgumentParser, default_runs: int = 3) -> None:
    parser.add_argument("--runs", type=int, default=default_runs, help="timed runs per measurement (median)")
    parser.add_argument("--systems", type=parse_systems, default=list(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings and 1 run: a smoke test, not a measurement")
    parser.add_argument("--output-json", help="where to write the results (default: benchmarks/results/)")


def parse_systems(value: str) -> list[str]:
    """'plexus-bf16,hf-bf16' -> list; 'all' -> every system."""
    if value == "all":
        return list(SYSTEMS)
    chosen = {s.strip() for s in value.split(",") if s.strip()}
    unknown = sorted(chosen - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)} or 'all'")
    return [s for s in SYSTEMS if s in chosen]   # always in table order
