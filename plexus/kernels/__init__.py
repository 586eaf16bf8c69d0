"""Hand-written CPU kernels for the hot path, each with a pure-torch fallback.

The C++ source (cpu/ops.cpp) is compiled once per machine with -march=native
by torch's extension tooling: at install time by `python -m plexus.kernels`
(which `make setup` runs), else on first use. The build lands in
$PLEXUS_CACHE_DIR/kernels/<key>, keyed by the source, torch's version and the
CPU's flags. Where it cannot be built (no compiler) or is switched off with
PLEXUS_CPU_KERNELS=0, every function here computes the same thing in torch
ops, so results never depend on the build; tests hold the two together.

Tensors on any device other than the CPU always take the torch path."""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib

import torch
import torch.nn.functional as F

from plexus.utils import cache_dir

logger = logging.getLogger("plexus")

_SOURCE = pathlib.Path(__file__).parent / "cpu" / "ops.cpp"


def _build_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(flags.encode())
    return h.hexdigest()[:16]


def enabled() -> bool:
    return os.environ.get("PLEXUS_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


_loaded: bool | None = None        # plain globals, not functools.cache: torch.compile reads them as constants
_fast_linear: bool | None = None


def load(verbose: bool = False) -> bool:
    """Build (if needed) and load the kernels, once; False where they cannot be had."""
    global _loaded
    if _loaded is None:
        _loaded = _build_and_load(verbose)
    return _loaded


def _build_and_load(verbose: bool) -> bool:
    if not enabled():
        return False
    from torch.utils import cpp_extension

    key = _build_key()
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"plexus_cpu_{key}.so").exists():
        logger.info("Building plexus CPU kernels into %s (once per machine, about a minute)", build_dir)
    try:
        cpp_extension.load(
            name=f"plexus_cpu_{key}", sources=[str(_SOURCE)], build_directory=str(build_dir),
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=verbose)
    except Exception as e:  # no compiler, unsupported flags, ...: the torch path serves
        logger.warning("plexus CPU kernels unavailable (%s); using the pure-torch path", str(e).splitlines()[0])
        return False
    _register_fake_impls()
    return True


def available(where: torch.Tensor | torch.device | str) -> bool:
    """Whether the C++ kernels serve tensors on this device (or this tensor's)."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return device.type == "cpu" and load()


def fast_linear_available() -> bool:
    global _fast_linear
    if _fast_linear is None:
        _fast_linear = load() and bool(torch.ops.plexus.has_fast_linear())
    return _fast_linear


# The hand-written GEMV serves up to this many rows; above, oneDNN with prepacked weights is faster, and
# without prepacked weights the GEMV still beats F.linear up to FAST_LINEAR_MAX_ROWS_UNPACKED
# (both measured in docs/performance.md).
FAST_LINEAR_MAX_ROWS = 4
FAST_LINEAR_MAX_ROWS_UNPACKED = 16
PACK_BATCH_HINT = 64


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] in oneDNN's blocked layout, for linear() on more rows than the GEMV serves."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias over the last dim of x. packed: pack_weight(weight), where kept."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    max_rows = FAST_LINEAR_MAX_ROWS if packed is not None else FAST_LINEAR_MAX_ROWS_UNPACKED
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and 0 < rows <= max_rows
            and x.device.type == "cpu" and fast_linear_available()):
        out = torch.ops.plexus.linear_bf16(x.reshape(rows, x.shape[-1]), weight, bias, False)
        return out.view(*x.shape[:-1], weight.shape[0])
    # (oneDNN's opaque packed tensors cannot be inputs of a compiled graph; inductor lowers F.linear itself)
    if packed is not None and rows > 0 and not torch.compiler.is_compiling():
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear_module(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(layer, torch.nn.Linear):   # a quantized layer (plexus.models.quantization) computes itself
        return layer(x)
    return linear(x, layer.weight, layer.bias, getattr(layer, "packed_weight", None))


def fused_decode_available(hidden: torch.Tensor, kv_caches: list[torch.Tensor]) -> bool:
    """Whether a decode-only step can run all layers in one C++ call (switch off: PLEXUS_FUSED_DECODE=0)."""
    return (available(hidden) and os.environ.get("PLEXUS_FUSED_DECODE", "1") != "0"
            and all(c.dtype == hidden.dtype and c.is_contiguous() for c in kv_caches))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if available(x) and x.is_contiguous() and x.dtype == weight.dtype:
        return torch.ops.plexus.rms_norm(x, weight, eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x); the sum is rounded to the model dtype as in HF."""
    if available(x) and x.is_contiguous() and residual.is_contiguous() and x.dtype == weight.dtype:
        return torch.ops.plexus.add_rms_norm(x, residual, weight, eps), residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:]."""
    if available(x) and x.is_contiguous() and x.dim() == 2:
        return torch.ops.plexus.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [N, V] logits: the argmax (int64) and its log-probability (fp32)."""
    if available(logits) and logits.dim() == 2 and logits.stride(1) == 1 and logits.dtype in (
            torch.float32, torch.bfloat16):
        return torch.ops.plexus.greedy_sample(logits)
    ids = logits.argmax(dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, ids[:, None])[:, 0]
    return ids, logprobs


def _register_fake_impls() -> None:
    """Shapes of the ops' outputs, so torch.compile can trace through them."""
    lib = torch.library

    @lib.register_fake("plexus::linear_bf16")
    def _(x, w, bias, out_fp32):
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32 if out_fp32 else x.dtype)

    @lib.register_fake("plexus::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @lib.register_fake("plexus::add_rms_norm")
    def _(x, residual, w, eps):
        return torch.empty_like(x)

    @lib.register_fake("plexus::silu_and_mul")
    def _(x):
        return x.new_empty(x.shape[0], x.shape[1] // 2)

    @lib.register_fake("plexus::rope_and_cache")
    def _(qkv, positions, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
        return qkv.new_empty(qkv.shape[0], num_heads, head_dim)

    @lib.register_fake("plexus::greedy_sample")
    def _(logits):
        n = logits.shape[0]
        return logits.new_empty(n, dtype=torch.int64), logits.new_empty(n, dtype=torch.float32)

    @lib.register_fake("plexus::llama_decode_layers")
    def _(hidden, *args):
        return torch.empty_like(hidden)

    @lib.register_fake("plexus::paged_attention_decode")
    def _(q, kv_cache, block_tables, seq_lens, scale):
        return torch.empty_like(q)
