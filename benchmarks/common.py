"""Shared helpers for the plexus benchmarks (latency.py, throughput.py).

Everything that is not specific to one benchmark lives here: the systems under
test by name (SPECS) and which column is compared with which (COMPARISONS),
installing the peer systems, preparing the model files, machine information,
prompts made of token ids, running a function in a fresh process, long-lived
worker processes for interleaved measurements (Worker, Workers), statistics
over runs (min / median / max, ratios with their spread), result files and
markdown tables; for --device cuda the GPU systems (CUDA_SYSTEMS), the GPU check,
its description and copy bandwidth (run in spawned processes: the parent never
initializes CUDA) and the bytes one decode step reads. The systems themselves
are in systems.py.
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
# --device cuda (latency.py, throughput.py): the same bf16 model on one NVIDIA GPU.
PLEXUS_CUDA = "plexus-cuda-bf16"               # CUDA graphs for decode steps (plexus's default, as vLLM's)
PLEXUS_CUDA_EAGER = "plexus-cuda-bf16-eager"   # enforce_eager=True: no CUDA graphs
HF_CUDA = "hf-cuda-bf16"
DEVICES = ("cpu", "cuda")

# Model sources (SystemSpec.model): the bundled Q4_1 GGUF converted to an HF directory (dequantized),
# the bundled Q4_1 GGUF file itself, or a llama.cpp system's name: the GGUF file that system runs.
HF_DIR, BUNDLED_GGUF = "hf-dir", "bundled-gguf"


@dataclass(frozen=True)
class SystemSpec:
    engine: str                      # "plexus", "hf" or "llamacpp" (systems.load_system)
    model: str                       # HF_DIR, BUNDLED_GGUF, a llama.cpp system (its file) or "quantized:<variant>"
    engine_args: dict = field(default_factory=dict)     # more LLM() arguments (plexus)
    weights: str = ""                # what the linear layers' weights are, for the tables' legend
    device: str = "cpu"              # "cpu" or "cuda": the --device it belongs to


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
    PLEXUS_CUDA: SystemSpec("plexus", HF_DIR, {"device": "cuda"}, "bf16; CUDA graphs for decode steps (the default)",
                            device="cuda"),
    PLEXUS_CUDA_EAGER: SystemSpec("plexus", HF_DIR, {"device": "cuda", "enforce_eager": True},
                                  "bf16; eager, no CUDA graphs (enforce_eager=True)", device="cuda"),
    HF_CUDA: SystemSpec("hf", HF_DIR, weights="bf16; model.to(\"cuda\")", device="cuda"),
}
SYSTEMS = tuple(s for s, spec in SPECS.items() if spec.device == "cpu")           # --device cpu
CUDA_SYSTEMS = tuple(s for s, spec in SPECS.items() if spec.device == "cuda")     # --device cuda

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
    PLEXUS_CUDA: (HF_CUDA, PLEXUS_CUDA_EAGER),       # against HF, and with against without CUDA graphs
    PLEXUS_CUDA_EAGER: (HF_CUDA,),
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
    found.update(cuda_memory())
    return found


def cuda_memory() -> dict[str, float]:
    """This process's GPU memory in MiB, from torch's caching allocator (what torch allocated now and at its
    peak, and what it reserved from the driver, CUDA graph pools included; the CUDA context and what other
    libraries take outside torch's allocator are not counted). Empty where this process has not
    initialized CUDA (every CPU system): it never initializes it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    mib = 2**20
    return {"cuda_allocated_mib": torch.cuda.memory_allocated() / mib,
            "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / mib,
            "cuda_reserved_mib": torch.cuda.memory_reserved() / mib,
            "cuda_max_reserved_mib": torch.cuda.max_memory_reserved() / mib}


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
                gpu = worker.memory_after_load.get("cuda_reserved_mib")
                print(f"  ready in {time.perf_counter() - start:.0f} s, RSS "
                      f"{worker.memory_after_load.get('rss_mib', float('nan')):.0f} MiB"
                      + ("" if gpu is None else f", GPU {gpu:.0f} MiB reserved by torch"), flush=True)
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


def decode_step_bytes(model_dir: str | pathlib.Path) -> dict[str, Any]:
    """What one batch-1 decode step must read from memory, in bf16, from the checkpoint's safetensors headers
    (the tensors' shapes; the file may store them in another dtype: the converted SmolLM2 is F32) and
    config.json.

    Assumption: every weight is read once per step, at 2 bytes a parameter. Tied embeddings are one tensor
    in the checkpoint and are counted once: the lm_head reads all of it, the embedding lookup only one row.
    The KV cache is not in weight_bytes: kv_bytes_per_token is what each token of context adds.
    """
    model_dir = pathlib.Path(model_dir)
    parameters = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                numel = 1
                for dim in tensor["shape"]:
                    numel *= dim
                parameters += numel
    if not parameters:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return {"parameters": parameters, "weight_bytes": 2 * parameters,
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
            "kv_bytes_per_token": config["num_hidden_layers"] * 2 * kv_heads * head_dim * 2,
            "assumption": "every weight read once per step in bf16 (tied embeddings once: the lm_head reads "
                          "them whole, the embedding lookup one row); KV cache reads counted apart"}


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
    if "gpu" in info:
        gpu = info["gpu"]
        print(f"GPU: {gpu['name']} (compute capability {gpu['capability']}, {gpu['memory_gib']:.1f} GiB, "
              f"{gpu['multiprocessors']} SMs), CUDA {gpu['cuda']}, driver {gpu.get('driver', 'unknown')}")
    load = info["load_average"][0]
    if load > 0.5:
        print(f"WARNING: 1-minute load average is {load:.2f}; other processes will distort these timings.")


# ---------------------------------------------------------------- GPU (--device cuda)
#
# CUDA is initialized only in spawned processes (the workers, run_isolated): never in the parent, which
# spawns them. torch.cuda.is_available() creates no context.

NO_CUDA = "--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)"


def require_cuda() -> None:
    """Exit with one line when no CUDA GPU is visible (checked without initializing CUDA here)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)


def gpu_info() -> dict[str, Any]:
    """The GPU the workers run on (device 0); call it in a spawned process (run_isolated)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": props.total_memory / 2**30,
                            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                            "visible_devices": torch.cuda.device_count(),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    query = "driver_version,clocks.max.sm,clocks.max.memory,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        info.update(zip(("driver", "max_sm_clock", "max_memory_clock", "power_limit"),
                        (v.strip() for v in out.split(","))))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def cuda_copy_bandwidth(gib: float = 1.0, reps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """The GPU's achievable memory bandwidth: device-to-device copies of a `gib` GiB tensor (torch's copy_,
    a cudaMemcpy on the device), each timed with CUDA events; bytes read + written / time. Call it in a
    spawned process (run_isolated). best_gbs (the fastest copy) is what a kernel can reach;
    median_gbs beside it."""
    import torch

    n = int(gib * 2**30)
    src = torch.ones(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    rates = [2 * n / t / 1e9 for t in times]
    return {"method": f"torch copy_ of a {gib:g} GiB uint8 tensor on the GPU, {reps} reps after {warmup} "
                      "warm-up, CUDA events; (read + written bytes) / time",
            "bytes_copied": n, "times_s": times, "best_gbs": max(rates), "median_gbs": median(rates),
            "device": torch.cuda.get_device_name(0)}


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


def memory_table(memory: Mapping[str, Mapping[str, Mapping[str, float]]], gpu: bool = False) -> str:
    """Each system's worker process: resident memory after load (and warm-up), after the runs, and its peak;
    with gpu, also torch's GPU memory after load and its peaks (process_memory, cuda_memory)."""
    def cell(found: Mapping[str, float] | None, key: str) -> str:
        return f"{found[key]:.0f}" if found and key in found else "n/a"

    gpu_columns = (("GPU allocated after load (MiB)", "after_load", "cuda_allocated_mib"),
                   ("GPU peak allocated (MiB)", "last", "cuda_max_allocated_mib"),
                   ("GPU peak reserved (MiB)", "last", "cuda_max_reserved_mib")) if gpu else ()
    lines = ["| system | RSS after load (MiB) | RSS after runs (MiB) | of which file-backed | peak RSS (MiB) |"
             + "".join(f" {title} |" for title, _, _ in gpu_columns),
             "|---|---|---|---|---|" + "---|" * len(gpu_columns)]
    for system, found in memory.items():
        after = found.get("after_runs")
        last = after or found.get("after_load")
        lines.append(f"| {system} | {cell(found.get('after_load'), 'rss_mib')} | {cell(after, 'rss_mib')} | "
                     f"{cell(after, 'rss_file_mib')} | {cell(last, 'peak_rss_mib')} |"
                     + "".join(f" {cell(last if when == 'last' else found.get(when), key)} |"
                               for _, when, key in gpu_columns))
    return "\n".join(lines)


def legend(systems: Iterable[str]) -> str:
    """What each system's linear weights are."""
    return "\n".join(f"- {s}: {SPECS[s].weights}" for s in systems if SPECS[s].weights)


# ---------------------------------------------------------------- running and command line

def start(args: argparse.Namespace, systems: Iterable[str] | None = None) -> tuple[int, dict[str, Any], str,
                                                                                   dict[str, str]]:
    """What both benchmarks do first: peers installed, machine recorded, models made (for `systems`,
    default args.systems). Returns (runs, machine info, HF model dir, model path by system).

    --device cuda: nothing is installed (llama.cpp is not run; the bench extra's llama-cpp-python is a CPU
    build, and a GPU machine may have no network), and the GPU is recorded (info["gpu"], from a spawned
    process: CUDA is never initialized here)."""
    cuda = getattr(args, "device", "cpu") == "cuda"
    if not cuda:
        ensure_peers()
    info = machine_info()
    if cuda:
        info["device"] = "cuda"
        info["gpu"] = run_isolated(gpu_info)
    print_machine(info)
    hf_dir, paths = prepare_models(args.systems if systems is None else systems)
    return args.runs, info, hf_dir, paths


GPU_MEMORY_UTILIZATION = 0.5    # --device cuda: the share of the GPU the plexus workers may fill, all together


def add_common_args(parser: argparse.ArgumentParser, default_runs: int, default_systems: Sequence[str],
                    cuda_default_systems: Sequence[str] = CUDA_SYSTEMS) -> None:
    parser.add_argument("--runs", type=int, default=None,
                        help=f"interleaved runs per measurement (default {default_runs}; 1 with --quick)")
    parser.add_argument("--systems", default=None,
                        help=f"comma-separated subset of {', '.join(SYSTEMS)}, or 'all' "
                             f"(default: {', '.join(default_systems)}); with --device cuda: of "
                             f"{', '.join(CUDA_SYSTEMS)} (default: {', '.join(cuda_default_systems)})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings and 1 run: a smoke test, not a measurement")
    parser.add_argument("--output-json", help="where to write the results (default: benchmarks/results/)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="cpu (default): the CPU systems, 2 threads each; cuda: plexus bf16 with CUDA graphs "
                             "and eager, and HF transformers bf16, on one NVIDIA GPU (results/*_cuda.json)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="--device cuda: the share of the GPU's memory the plexus workers, all loaded at "
                             f"once, may fill together (default {GPU_MEMORY_UTILIZATION}: the rest is HF's). "
                             "With n plexus systems each gets 1/n of it (see gpu_memory_shares)")
    parser.set_defaults(default_runs=default_runs, default_systems=list(default_systems),
                        cuda_default_systems=list(cuda_default_systems))


def resolve_runs(args: argparse.Namespace) -> None:
    """--runs default: 1 with --quick, else the script's default."""
    if args.runs is None:
        args.runs = 1 if args.quick else args.default_runs
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")


def gpu_memory_shares(systems: Sequence[str], total: float) -> dict[str, float]:
    """Each plexus CUDA system's gpu_memory_utilization, so that the plexus workers, all loaded at once, fill
    `total` of the GPU together with KV caches of the same size: total / n each (plexus's setting is per
    engine, as vLLM V1's: the engine's share of the GPU, which must be free when it starts)."""
    plexus = [s for s in systems if SPECS[s].engine == "plexus" and SPECS[s].device == "cuda"]
    return {name: round(total / len(plexus), 4) for name in plexus}


def resolve_device(args: argparse.Namespace) -> None:
    """After parsing: --device cuda needs a visible GPU (one line and exit, else); --systems parsed among
    the device's systems (default: the script's default for it); --gpu-memory-utilization checked
    (default GPU_MEMORY_UTILIZATION on cuda) and args.gpu_memory_utilization_by_system set from it
    (gpu_memory_shares; empty on the CPU)."""
    cuda = args.device == "cuda"
    if cuda:
        require_cuda()
    if args.systems is None:
        args.systems = list(args.cuda_default_systems if cuda else args.default_systems)
    else:
        args.systems = parse_systems(args.systems, args.device)
    if args.gpu_memory_utilization is not None:
        if not cuda:
            raise SystemExit("--gpu-memory-utilization applies to --device cuda only")
        if not 0 < args.gpu_memory_utilization <= 1:
            raise SystemExit("--gpu-memory-utilization must be in (0, 1]")
    elif cuda:
        args.gpu_memory_utilization = GPU_MEMORY_UTILIZATION
    args.gpu_memory_utilization_by_system = gpu_memory_shares(args.systems, args.gpu_memory_utilization) if cuda else {}


def parse_systems(value: str, device: str = "cpu") -> list[str]:
    """'plexus-bf16,hf-bf16' -> list; 'all' -> every system (of that --device)."""
    choices = SYSTEMS if device == "cpu" else CUDA_SYSTEMS
    if value == "all":
        return list(choices)
    chosen = {s.strip() for s in value.split(",") if s.strip()}
    unknown = sorted(chosen - set(choices))
    if unknown:
        other = [s for s in unknown if s in SPECS]
        hint = f" ({', '.join(other)}: --device {SPECS[other[0]].device})" if other else ""
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(choices)} or 'all'{hint}")
    return [s for s in choices if s in chosen]   # always in table order
