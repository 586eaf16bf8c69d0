"""Every environment variable plexus reads, read in one place.

`Environment.read()` is called once when an engine is built
(EngineArgs.create_engine_config) and the result travels as typed config
(EngineConfig.env); nothing else in plexus looks at os.environ. Tools that run
without an engine (`python -m plexus.platforms.cpu.kernels`, the GGUF
converter called on its own) read it the same way, once per call.

Values that only make sense against other settings (the NEURON_* bucket lists
against max_model_len) are kept as text here and validated by the part that
owns them, with errors that name the variable."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")

# name -> what it does (the README's table of variables is this list)
VARIABLES = {
    "PLEXUS_CACHE_DIR": "where plexus keeps what it builds once (converted GGUFs, CPU kernels); ~/.cache/plexus",
    "PLEXUS_CPU_KERNELS": "0 switches the C++ CPU kernels off (pure torch); default 1",
    "PLEXUS_FUSED_DECODE": "0 runs CPU decode steps layer by layer instead of one fused C++ call; default 1",
    "NEURON_CONTEXT_LENGTH_BUCKETS": "Neuron context-encoding buckets, comma-separated ints",
    "NEURON_TOKEN_GEN_BUCKETS": "Neuron token-generation buckets, comma-separated ints",
    "NEURON_QUANT_DTYPE": "neuron_quant weight dtype: s8 (default) or f8e4m3fn",
    "NEURON_RT_VISIBLE_CORES": "NeuronCores this process may use, e.g. 0-7 or 0,1",
    "NEURON_RT_NUM_CORES": "how many NeuronCores this process may use",
    "PLEXUS_LOGGING_LEVEL": "the plexus logger's level (DEBUG, INFO, WARNING, ERROR); default INFO",
    "VLLM_LOGGING_LEVEL": "the same, vLLM's name (PLEXUS_LOGGING_LEVEL wins when both are set)",
    "VLLM_CPU_KVCACHE_SPACE": "CPU KV cache size in GiB when kv_cache_space is not given (vLLM's variable)",
    "VLLM_CPU_OMP_THREADS_BIND": "CPU cores for plexus's threads, e.g. 0-3 or 0,2; 'auto' or 'nobind': leave as is",
    "VLLM_API_KEY": "the server's API key when --api-key is not given (vLLM's variable)",
    "PLEXUS_API_KEY": "the same, plexus's name (VLLM_API_KEY wins when both are set)",
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "how long the \"mp\" executor waits for a worker's step before it is an error; default 300",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1 enables the server's /v1/load_lora_adapter and /v1/unload_lora_adapter",
    "HF_HUB_OFFLINE": "1: resolve hub model ids from the local Hugging Face cache only, never download",
    "HF_HOME": "the Hugging Face home; hub downloads go to $HF_HOME/hub",
    "HF_HUB_CACHE": "the Hugging Face hub cache directory (wins over HF_HOME)",
}

LOGGING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a switch; allowed: 1, 0 (or true/false, yes/no, on/off)")


@dataclass(frozen=True)
class Environment:
    cache_dir: pathlib.Path
    cpu_kernels: bool
    fused_decode: bool
    neuron_context_length_buckets: str | None
    neuron_token_gen_buckets: str | None
    neuron_quant_dtype: str | None
    neuron_rt_visible_cores: str | None
    neuron_rt_num_cores: str | None
    hub_cache_dir: pathlib.Path
    hub_offline: bool
    cpu_kvcache_space_gib: float | None
    cpu_threads_bind: list[int] | None    # None: leave the threads and their placement as they are
    execute_model_timeout_s: float = 300.0

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if environ is None else environ
        cache = env.get("PLEXUS_CACHE_DIR")
        return cls(
            cache_dir=pathlib.Path(cache).expanduser() if cache else pathlib.Path.home() / ".cache" / "plexus",
            cpu_kernels=_flag(env, "PLEXUS_CPU_KERNELS", True),
            fused_decode=_flag(env, "PLEXUS_FUSED_DECODE", True),
            neuron_context_length_buckets=env.get("NEURON_CONTEXT_LENGTH_BUCKETS"),
            neuron_token_gen_buckets=env.get("NEURON_TOKEN_GEN_BUCKETS"),
            neuron_quant_dtype=env.get("NEURON_QUANT_DTYPE"),
            neuron_rt_visible_cores=env.get("NEURON_RT_VISIBLE_CORES"),
            neuron_rt_num_cores=env.get("NEURON_RT_NUM_CORES"),
            hub_cache_dir=_hub_cache_dir(env),
            hub_offline=_flag(env, "HF_HUB_OFFLINE", False),
            cpu_kvcache_space_gib=_positive_float(env, "VLLM_CPU_KVCACHE_SPACE"),
            cpu_threads_bind=_cores(env, "VLLM_CPU_OMP_THREADS_BIND"),
            execute_model_timeout_s=_positive_float(env, "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "seconds") or 300.0,
        )

    def variables(self) -> dict[str, str]:
        """The NEURON_* variables that are set, by name (what the Neuron platform validates)."""
        values = {name: getattr(self, name.lower()) for name in VARIABLES if name.startswith("NEURON_")}
        return {name: value for name, value in values.items() if value is not None}


def _hub_cache_dir(env: Mapping[str, str]) -> pathlib.Path:
    """Where huggingface_hub keeps its cache, by its own rules."""
    if env.get("HF_HUB_CACHE"):
        return pathlib.Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return pathlib.Path(home).expanduser() / "hub"


def _positive_float(env: Mapping[str, str], name: str, unit: str = "GiB") -> float | None:
    value = env.get(name)
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise ValueError(f"{name}={value!r} is not a positive number of {unit}")
    return number


def _cores(env: Mapping[str, str], name: str) -> list[int] | None:
    value = (env.get(name) or "").strip()
    if not value or value in ("auto", "nobind", "all"):
        return None
    cores: list[int] = []
    for part in value.replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"{name}={value!r}: expected core ids and ranges such as '0-3' or '0,2', or 'auto'")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cores))


@dataclass(frozen=True)
class ServerEnvironment:
    api_key: str | None
    allow_runtime_lora_updating: bool


def server_environment(environ: Mapping[str, str] | None = None) -> ServerEnvironment:
    """What `plexus serve` reads from the environment, read once when the server starts."""
    env = os.environ if environ is None else environ
    return ServerEnvironment(api_key=env.get("VLLM_API_KEY") or env.get("PLEXUS_API_KEY") or None,
                             allow_runtime_lora_updating=_flag(env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING", False))


def logging_level(environ: Mapping[str, str] | None = None) -> str:
    """PLEXUS_LOGGING_LEVEL, else VLLM_LOGGING_LEVEL, else INFO (read once, when plexus.logger is imported)."""
    env = os.environ if environ is None else environ
    name = "PLEXUS_LOGGING_LEVEL" if env.get("PLEXUS_LOGGING_LEVEL") else "VLLM_LOGGING_LEVEL"
    value = (env.get(name) or "INFO").upper()
    if value not in LOGGING_LEVELS:
        raise ValueError(f"{name}={env.get(name)!r} is not a logging level; allowed: {', '.join(LOGGING_LEVELS)}")
    return value


def cache_dir() -> pathlib.Path:
    """$PLEXUS_CACHE_DIR, else ~/.cache/plexus (for tools that run without an engine)."""
    return Environment.read().cache_dir
