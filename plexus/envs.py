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
}


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
        )

    def variables(self) -> dict[str, str]:
        """The NEURON_* variables that are set, by name (what the Neuron platform validates)."""
        values = {name: getattr(self, name.lower()) for name in VARIABLES if name.startswith("NEURON_")}
        return {name: value for name, value in values.items() if value is not None}


def cache_dir() -> pathlib.Path:
    """$PLEXUS_CACHE_DIR, else ~/.cache/plexus (for tools that run without an engine)."""
    return Environment.read().cache_dir
