"""Shared helpers for the plexus benchmarks (latency.py, throughput.py).

Everything that is not specific to one benchmark lives here: the systems under
test by name (SPECS) and which column is compared with which (COMPARISONS),
installing the peer systems, preparing the model files, machine information,
prompts made of token ids, running a function in a fresh process, long-lived
worker processes for interleaved measurements (Worker, Workers), statistics
over runs (min / median / max, ratios with their spread), result files and
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
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from plexus.envs import cache_dir

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
CACHE_DIR = cache_dir() / "bench"

NUM_THREADS = 2          # every system runs with this many threads
SEED = 0

# ---------------------------------------------------------------- the systems

# System names. Ratios are "plexus column / reference" (see COMPARISONS).
PLEXUS = "plexus-bf16"
PLEXUS_INT8 = "plexus-int8"
PLEXUS_W8A8 = "plexus-w8a8"
PLEXUS_GGUF_Q8_0 = "plexus-gguf-q8_0"
PLEXUS_AWQ = "plexus-awq-w4g64"
PLEXUS_GPTQ = "plexus-gptq-w4g64"
PLEXUS_GGUF_Q4_0 = "plexus-gguf-q4_0"
PLEXUS_GGUF_Q4_1 = "plexus-gguf-q4_1"
HF = "hf-bf16"
LLAMACPP_BF16 = "llamacpp-bf16"
LLAMACPP_Q8_0 = "llamacpp-q8_0"
LLAMACPP_Q4_0 = "llamacpp-q4_0"
LLAMACPP_Q4_1 = "llamacpp-q4_1"

# Model sources (SystemSpec.model): the bundled Q4_1 GGUF converted to an HF directory (dequantized),
# the bundled Q4_1 GGUF file itself, or a llama.cpp system's name: the GGUF file that system runs.
HF_DIR, BUNDLED_GGUF = "hf-dir", "bundled-gguf"


@dataclass(frozen=True)
class SystemSpec:
    engine: str                      # "plexus", "hf" or "llamacpp" (systems.load_system)
    model: str                       # HF_DIR, BUNDLED_GGUF, a llama.cpp system (its file) or "quantized:<variant>"
    engine_args: dict = field(default_factory=dict)     # more LLM() arguments (plexus)
    weights: str = ""                # what the linear layers' weights are, for the tables' legend


# Table order: plexus columns, then the peers.
SPECS: dict[str, SystemSpec] = {
    PLEXUS: SystemSpec("plexus", HF_DIR, weights="bf16"),
    PLEXUS_INT8: SystemSpec("plexus", HF_DIR, {"quantization": "int8"}, "int8 per channel, quantized on load (W8A16)"),
    PLEXUS_W8A8: SystemSpec("plexus", HF_DIR, {"quantization": "w8a8"},
                            "int8 per channel, activations int8 per token, quantized on load"),
    PLEXUS_GGUF_Q8_0: SystemSpec("plexus", LLAMACPP_Q8_0, {"quantization": "gguf"},
                                 "GGUF Q8_0 blocks (llamacpp-q8_0's file)"),
    PLEXUS_AWQ: SystemSpec("plexus", "quantized:awq-w4g64", {}, "AWQ 4-bit group 64 (plexus quantize)"),
    PLEXUS_GPTQ: SystemSpec("plexus", "quantized:gptq-w4g64", {}, "GPTQ 4-bit group 64 (plexus quantize)"),
    PLEXUS_GGUF_Q4_0: SystemSpec("plexus", LLAMACPP_Q4_0, {"quantization": "gguf"},
                                 "GGUF Q4_0 blocks (llamacpp-q4_0's file)"),
    PLEXUS_GGUF_Q4_1: SystemSpec("plexus", BUNDLED_GGUF, {"quantization": "gguf"},
                                 "GGUF Q4_1 blocks (the bundled file)"),
    HF: SystemSpec("hf", HF_DIR, weights="bf16"),
    LLAMACPP_BF16: SystemSpec("llamacpp", LLAMACPP_BF16, weights="GGUF BF16"),
    LLAMACPP_Q8_0: SystemSpec("llamacpp", LLAMACPP_Q8_0, weights="GGUF Q8_0"),
    LLAMACPP_Q4_0: SystemSpec("llamacpp", LLAMACPP_Q4_0, weights="GGUF Q4_0"),
    LLAMACPP_Q4_1: SystemSpec("llamacpp", BUNDLED_GGUF, weights="GGUF Q4_1 (the bundled file)"),
}
SYSTEMS = tuple(SPECS)

# For each plexus column, the columns its ratios are taken against, in this order: llama.cpp on the same file /
# bit width first, then plexus-bf16 (plexus-bf16 itself: llama.cpp BF16 and HF). AWQ and GPTQ have no llama.cpp
# twin: the nearest 4-bit llama.cpp format (Q4_1: asymmetric with a minimum like AWQ's zero points; Q4_0:
# symmetric like GPTQ; both group 32).
COMPARISONS: dict[str, tuple[str, ...]] = {
    PLEXUS: (LLAMACPP_BF16, HF),
    PLEXUS_INT8: (LLAMACPP_Q8_0, PLEXUS),
    PLEXUS_W8A8: (LLAMACPP_Q8_0, PLEXUS),
    PLEXUS_GGUF_Q8_0: (LLAMACPP_Q8_0, PLEXUS),
    PLEXUS_AWQ: (LLAMACPP_Q4_1, PLEXUS),
    PLEXUS_GPTQ: (LLAMACPP_Q4_0, PLEXUS),
    PLEXUS_GGUF_Q4_0: (LLAMACPP_Q4_0, PLEXUS),
    PLEXUS_GGUF_Q4_1: (LLAMACPP_Q4_1, PLEXUS),
}

# llama.cpp file types the bundled Q4_1 GGUF is re-quantized to (llama_ftype values by name).
GGUF_FTYPES = {LLAMACPP_BF16: "LLAMA_FTYPE_MOSTLY_BF16", LLAMACPP_Q8_0: "LLAMA_FTYPE_MOSTLY_Q8_0",
               LLAMACPP_Q4_0: "LLAMA_FTYPE_MOSTLY_Q4_0"}


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


# ---------------------------------------------------------------- long-lived workers (interleaving)

SETTLE_S = 0.2        # a worker's pause after each call, before it answers (see settle)


def settle(min_s: float = SETTLE_S, window_s: float = 0.05, idle_cpu_s: float = 0.005, max_s: float = 2.0) -> float:
    """Sleep until this process's threads are idle; returns the seconds it took.

    After a parallel region, OpenMP workers (torch's, llama.cpp's) spin-wait for a while before they
    sleep. Before the next system runs, this process must be quiet: sleep min_s, then wait until a
    window_s window passes with less than idle_cpu_s of CPU time used by the whole process (max_s at most).
    """
    start = time.perf_counter()
    time.sleep(min_s)
    while time.perf_counter() - start < max_s:
        cpu = time.process_time()
        time.sleep(window_s)
        if time.process_time() - cpu < idle_cpu_s:
            break
    return time.perf_counter() - start


def process_memory() -> dict[str, float]:
    """This process's resident memory in MiB: rss (VmRSS), its anonymous and file-backed parts (RssAnon,
    RssFile: mmapped model files count there), and peak (VmHWM, the high-water mark of VmRSS;
    getrusage's ru_maxrss where /proc is missing)."""
    fields = {"VmRSS": "rss_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib", "VmHWM": "peak_rss_mib"}
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in fields:
                    found[fields[key]] = int(value.split()[0]) / 1024
    except OSError:
        pass
    found.setdefault("peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return found


MIN_AVAILABLE_GIB = 2.0      # Workers loads no further system when less memory than this is available


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo, GiB (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _serve(conn: Any, factory: Callable[..., Any], args: tuple) -> None:
    """A worker process: build the object (factory(*args): it loads and warms up a system), then answer
    calls (method name, args) one at a time until "stop". Every answer comes after settle()."""
    try:
        target = factory(*args)
        settle()
        conn.send(("ok", {"settings": target.settings, "memory": process_memory()}))
    except BaseException:  # noqa: BLE001  (the parent reports it and goes on with the other systems)
        conn.send(("error", traceback.format_exc()))
        return
    while (message := conn.recv()) != "stop":
        method, method_args = message
        try:
            result = process_memory() if method == "memory" else getattr(target, method)(*method_args)
            settle()
            conn.send(("ok", result))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    close = getattr(target, "close", None)
    if close:
        close()


class Worker:
    """factory(*args) built in its own spawned process and kept there; call() runs one of its methods.

    One process per system: thread pools (torch's OpenMP, llama.cpp's) never share a process, and
    systems that wait for their turn sit blocked in a pipe read, using no CPU.
    """

    def __init__(self, name: str, factory: Callable[..., Any], *args: Any) -> None:
        limit_threads()     # the child inherits the environment: its OpenMP reads it when torch loads
        context = multiprocessing.get_context("spawn")
        self.name, (self.conn, child) = name, context.Pipe()
        self.process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
        self.process.start()
        child.close()
        ready = self._answer()
        self.settings, self.memory_after_load = ready["settings"], ready["memory"]

    def _answer(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"{self.name}: the worker process died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"{self.name}:\n{payload}")
        return payload

    def call(self, method: str, *args: Any) -> Any:
        self.conn.send((method, args))
        return self._answer()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class Workers:
    """One Worker per system, loaded one after the other; a system that fails to load or dies is
    recorded in `errors` and left out from then on, the others go on.

    Use as a context manager: on exit the workers report their memory after the runs and stop.
    """

    def __init__(self, systems: Sequence[str], factory: Callable[..., Any],
                 args_for: Callable[[str], tuple]) -> None:
        self.workers: dict[str, Worker] = {}
        self.errors: dict[str, str] = {}
        self.settings: dict[str, dict] = {}
        self.memory: dict[str, dict[str, dict[str, float]]] = {}
        try:
            for name in systems:
                print(f"Loading {name} ...", flush=True)
                start = time.perf_counter()
                available = available_memory_gib()
                if available is not None and available < MIN_AVAILABLE_GIB:
                    self._failed(name, MemoryError(f"not loaded: only {available:.1f} GiB of memory available "
                                                   f"(at least {MIN_AVAILABLE_GIB} GiB wanted); select fewer "
                                                   "systems with --systems"))
                    continue
                try:
                    worker = Worker(name, factory, *args_for(name))
                except Exception as exc:  # noqa: BLE001  (one broken system must not lose the others' numbers)
                    self._failed(name, exc)
                    continue
                self.workers[name] = worker
                self.settings[name] = worker.settings
                self.memory[name] = {"after_load": worker.memory_after_load}
                print(f"  ready in {time.perf_counter() - start:.0f} s, RSS "
                      f"{worker.memory_after_load.get('rss_mib', float('nan')):.0f} MiB", flush=True)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:       # interrupted: a worker may be in the middle of a call
            self.stop()
            return
        for name, worker in list(self.workers.items()):
            try:
                self.memory[name]["after_runs"] = worker.call("memory")
            except Exception as exc:  # noqa: BLE001
                self._failed(name, exc)
        self.stop()

    @property
    def alive(self) -> list[str]:
        return list(self.workers)

    def call(self, name: str, method: str, *args: Any) -> Any | None:
        """worker.method(*args) in the worker; None (and the error recorded, the worker stopped) if it fails."""
        worker = self.workers.get(name)
        if worker is None:
            return None
        try:
            return worker.call(method, *args)
        except Exception as exc:  # noqa: BLE001
            self._failed(name, exc)
            return None

    def _failed(self, name: str, exc: Exception) -> None:
        print(f"  {name} FAILED: {exc}", flush=True)
        self.errors[name] = f"{type(exc).__name__}: {exc}"
        worker = self.workers.pop(name, None)
        if worker is not None:
            worker.stop()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()


# ---------------------------------------------------------------- model files

def hf_model_dir() -> pathlib.Path:
    """The bundled SmolLM2-135M-Instruct GGUF, converted to an HF directory (cached by plexus)."""
    from plexus.model_files.gguf import bundled_gguf_path, convert_gguf

    return pathlib.Path(convert_gguf(bundled_gguf_path()))


KV_MARGIN = 1.25       # plexus's KV cache: what the requests need at once, plus 25%


def kv_cache_space_gib(model_dir: str | pathlib.Path, tokens: Iterable[int], block_size: int = 16) -> float:
    """plexus's kv_cache_space (GiB) for requests of these token counts (prompt + output) all at once,
    KV_MARGIN more, in bf16.

    Without it plexus takes 4 GiB, or less when free memory is short: then the last of a dozen workers
    would get a smaller cache than the first. Its blocks are mapped lazily but handed out least recently
    freed first, so over repeated runs the whole budget ends up resident: sizing it to the work keeps
    each worker's memory to what it uses.
    """
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * 2 * kv_heads * head_dim * 2        # K and V, 2 bytes each
    blocks = sum(-(-n // block_size) for n in tokens)
    mib = -(-int(blocks * block_size * per_token * KV_MARGIN) // 2**20)      # rounded up to MiB
    return max(mib, 64) / 1024                                                # at least 64 MiB (the warm-up)


def llamacpp_gguf(system: str) -> pathlib.Path:
    """The GGUF file for a llama.cpp system: the bundled file itself (llamacpp-q4_1), or the bundled
    file requantized once with llama.cpp's own quantizer (GGUF_FTYPES) and cached.

    The bundled file is Q4_1 (Q8_0 embeddings); requantizing it to BF16 keeps
    exactly the dequantized values plexus and HF run with, Q8_0 and Q4_0 round them again.
    """
    from plexus.model_files.gguf import bundled_gguf_path

    source = bundled_gguf_path()
    if system not in GGUF_FTYPES:
        if SPECS[system].model != BUNDLED_GGUF:
            raise ValueError(f"{system} has no GGUF file")
        return source
    ftype_name = GGUF_FTYPES[system]
    target = CACHE_DIR / f"{source.stem}.{ftype_name.removeprefix('LLAMA_FTYPE_MOSTLY_')}.gguf"
    if not target.exists():
        _quantize(source, target, ftype_name)
    return target


def model_path(system: str, hf_dir: str | None = None) -> str:
    """What `system` loads (SPECS[system].model); makes it the first time (call it in a child process)."""
    from plexus.model_files.gguf import bundled_gguf_path

    source = SPECS[system].model
    if source == HF_DIR:
        return hf_dir or str(hf_model_dir())
    if source == BUNDLED_GGUF:
        return str(bundled_gguf_path())
    if source.startswith("quantized:"):
        import quantized  # benchmarks/quantized.py makes (once) and caches the `plexus quantize` checkpoints

        return quantized.model_path(source.removeprefix("quantized:"))
    return str(llamacpp_gguf(source))


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
    return hf_dir, {s: model_path(s, hf_dir) for s in systems}


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
          f"{'yes' if info['avx512_bf16'] else 'no'}, amx: {'yes' if info['amx_bf16'] else 'no'}, "
          f"{info['threads']} threads per system; {versions}")
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
    key: str              # key in each run's result
    title: str            # column header
    higher_is_better: bool
    fmt: str = "{:.1f}"


def run_stats(values: Iterable[float | None]) -> dict[str, float] | None:
    """min / median / max (and n) of the runs' values; None values (a run without this metric) are left out."""
    found = [v for v in values if v is not None]
    if not found:
        return None
    return {"median": median(found), "min": min(found), "max": max(found), "n": len(found)}


def half_range(stats: Mapping[str, float]) -> float:
    """Half the min-max range relative to the median: how far the runs are from the median, at most."""
    return (stats["max"] - stats["min"]) / 2 / stats["median"] if stats["median"] else 0.0


def compare(metric: Metric, ours: Mapping[str, float] | None, theirs: Mapping[str, float] | None) -> dict | None:
    """The ratio of medians, oriented so that above 1 means `ours` is better (for lower-is-better metrics,
    times: theirs / ours), with its spread: the two columns' relative half-ranges added (each median is
    within its half-range of every run, so this bounds how much the ratio moves with run-to-run noise).
    parity: the ratio is within its spread of 1, i.e. the lead is not larger than the noise."""
    if not ours or not theirs or not ours["median"] or not theirs["median"]:
        return None
    ratio = ours["median"] / theirs["median"] if metric.higher_is_better else theirs["median"] / ours["median"]
    spread = half_range(ours) + half_range(theirs)
    runs = min(ours["n"], theirs["n"])
    return {"ratio": ratio, "spread": spread, "parity": runs > 1 and abs(ratio - 1) <= spread, "runs": runs}


def format_stats(metric: Metric, stats: Mapping[str, float] | None) -> str:
    """'median (min-max)', the value alone for one run."""
    if not stats:
        return "n/a"
    if stats["n"] == 1:
        return metric.fmt.format(stats["median"])
    return f"{metric.fmt.format(stats['median'])} ({metric.fmt.format(stats['min'])}-{metric.fmt.format(stats['max'])})"


def format_ratio(found: Mapping[str, Any] | None) -> str:
    """'1.12x ±9%', or 'parity (1.03x ±9%)' when the lead is within the spread; one run: '1.05x (1 run)'."""
    if not found:
        return "n/a"
    if found["runs"] < 2:
        return f"{found['ratio']:.2f}x (1 run)"
    text = f"{found['ratio']:.2f}x ±{found['spread'] * 100:.0f}%"
    return f"parity ({text})" if found["parity"] else text


RATIO_LEGEND = ("Ratios: the plexus column's median over the reference's, >1 = plexus better (for times: "
                "reference / plexus). ±: the two columns' min-max half-ranges relative to their medians, added; "
                "'parity' when the ratio is within that spread of 1.")


def stats_table(stats: Mapping[str, Mapping[str, Any]], metrics: Sequence[Metric], runs: int) -> str:
    """One row per system: each metric's median (min-max) over the runs."""
    head = "median (min-max)" if runs > 1 else "one run"
    lines = ["| system | " + " | ".join(f"{m.title}, {head}" for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for system, row in stats.items():
        lines.append(f"| {system} | " + " | ".join(format_stats(m, row.get(m.key)) for m in metrics) + " |")
    return "\n".join(lines)


def comparisons(stats: Mapping[str, Mapping[str, Any]], metrics: Sequence[Metric]) -> dict[str, dict[str, dict]]:
    """column -> reference -> metric -> compare(), for every COMPARISONS pair with both columns present."""
    found: dict[str, dict[str, dict]] = {}
    for column, references in COMPARISONS.items():
        for reference in references:
            if column in stats and reference in stats:
                found.setdefault(column, {})[reference] = {
                    m.key: compare(m, stats[column].get(m.key), stats[reference].get(m.key)) for m in metrics}
    return found


def ratio_table(found: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[Metric]) -> str:
    """One row per (plexus column, reference) pair of comparisons()."""
    if not found:
        return ""
    lines = ["| plexus column | against | " + " | ".join(m.title for m in metrics) + " |",
             "|---" * (len(metrics) + 2) + "|"]
    for column, references in found.items():
        for reference, by_metric in references.items():
            lines.append(f"| {column} | {reference} | " + " | ".join(format_ratio(by_metric[m.key]) for m in metrics)
                         + " |")
    return "\n".join(lines) + "\n\n" + RATIO_LEGEND


def memory_table(memory: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Each system's worker process: resident memory after load (and warm-up), after the runs, and its peak."""
    def cell(found: Mapping[str, float] | None, key: str) -> str:
        return f"{found[key]:.0f}" if found and key in found else "n/a"

    lines = ["| system | RSS after load (MiB) | RSS after runs (MiB) | of which file-backed | peak RSS (MiB) |",
             "|---|---|---|---|---|"]
    for system, found in memory.items():
        after = found.get("after_runs")
        lines.append(f"| {system} | {cell(found.get('after_load'), 'rss_mib')} | {cell(after, 'rss_mib')} | "
                     f"{cell(after, 'rss_file_mib')} | {cell(after or found.get('after_load'), 'peak_rss_mib')} |")
    return "\n".join(lines)


def legend(systems: Iterable[str]) -> str:
    """What each system's linear weights are."""
    return "\n".join(f"- {s}: {SPECS[s].weights}" for s in systems if SPECS[s].weights)


# ---------------------------------------------------------------- running and command line

def start(args: argparse.Namespace, systems: Iterable[str] | None = None) -> tuple[int, dict[str, Any], str,
                                                                                   dict[str, str]]:
    """What both benchmarks do first: peers installed, machine recorded, models made (for `systems`,
    default args.systems). Returns (runs, machine info, HF model dir, model path by system)."""
    ensure_peers()
    info = machine_info()
    print_machine(info)
    hf_dir, paths = prepare_models(args.systems if systems is None else systems)
    return args.runs, info, hf_dir, paths


def add_common_args(parser: argparse.ArgumentParser, default_runs: int, default_systems: Sequence[str]) -> None:
    parser.add_argument("--runs", type=int, default=None,
                        help=f"interleaved runs per measurement (default {default_runs}; 1 with --quick)")
    parser.add_argument("--systems", type=parse_systems, default=list(default_systems),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)}, or 'all' "
                             f"(default: {', '.join(default_systems)})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings and 1 run: a smoke test, not a measurement")
    parser.add_argument("--output-json", help="where to write the results (default: benchmarks/results/)")
    parser.set_defaults(default_runs=default_runs)


def resolve_runs(args: argparse.Namespace) -> None:
    """--runs default: 1 with --quick, else the script's default."""
    if args.runs is None:
        args.runs = 1 if args.quick else args.default_runs
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")


def parse_systems(value: str) -> list[str]:
    """'plexus-bf16,hf-bf16' -> list; 'all' -> every system."""
    if value == "all":
        return list(SYSTEMS)
    chosen = {s.strip() for s in value.split(",") if s.strip()}
    unknown = sorted(chosen - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)} or 'all'")
    return [s for s in SYSTEMS if s in chosen]   # always in table order
