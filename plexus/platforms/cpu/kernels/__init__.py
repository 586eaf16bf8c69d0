"""Building and loading the CPU platform's hand-written kernels (ops.cpp), registered as torch.ops.plexus.*.

The C++ source is compiled once per machine with -march=native by torch's
extension tooling: at install time by `python -m plexus.platforms.cpu.kernels`
(which `make setup` runs), else on first use. The build lands in
$PLEXUS_CACHE_DIR/kernels/<key>, keyed by the source, torch's version and the
CPU's flags. Where it cannot be built (no compiler) or is switched off with
PLEXUS_CPU_KERNELS=0, the CPU platform hands the model plain ModelOps, which
compute the same thing in torch; tests hold the two together
(plexus/platforms/cpu/ops.py uses the kernels)."""
from __future__ import annotations

import bisect
import enum
import hashlib
import logging
import pathlib

import torch

from plexus.models.quantization import packed as packed_int

logger = logging.getLogger("plexus")

_DIR = pathlib.Path(__file__).parent
_SOURCES = [_DIR / name for name in ("ops.cpp", "linear.cpp", "quant_linear.cpp", "amx_linear.cpp", "elementwise.cpp",
                                   "attention.cpp", "moe.cpp")]
_HEADERS = [_DIR / "common.h"]


def _build_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    h = hashlib.sha256()
    for path in _SOURCES + _HEADERS:
        h.update(path.read_bytes())
    h.update(torch.__version__.encode())
    h.update(flags.encode())
    return h.hexdigest()[:16]


_loaded: bool | None = None        # plain globals, not functools.cache: torch.compile reads them as constants
_fast_linear: bool | None = None
_fast_quant_linear: bool | None = None
_amx_int8: bool | None = None


def load(cache_dir: pathlib.Path, verbose: bool = False) -> bool:
    """Build (if needed) into cache_dir/kernels and load the kernels, once per process; False where they
    cannot be had."""
    global _loaded
    if _loaded is None:
        _loaded = _build_and_load(cache_dir, verbose)
    return _loaded


def loaded() -> bool:
    return bool(_loaded)


def _build_and_load(cache_dir: pathlib.Path, verbose: bool) -> bool:
    from torch.utils import cpp_extension

    key = _build_key()
    build_dir = cache_dir / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"plexus_cpu_{key}.so"
    try:
        if library.exists():
            # The key already covers the source, torch and the CPU: load what was built, without
            # cpp_extension's build lock (a process killed while holding it would leave every later start
            # waiting on it).
            torch.ops.load_library(str(library))
            _register_fake_impls()
            return True
    except OSError as e:
        logger.warning("could not load %s (%s); rebuilding it", library, e)
    logger.info("Building plexus CPU kernels into %s (once per machine, about a minute)", build_dir)
    try:
        cpp_extension.load(
            name=f"plexus_cpu_{key}", sources=[str(p) for p in _SOURCES], build_directory=str(build_dir),
            extra_include_paths=[str(_DIR)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=verbose)
    except Exception as e:  # no compiler, unsupported flags, ...: the torch path serves
        logger.warning("plexus CPU kernels unavailable (%s); using the pure-torch path", str(e).splitlines()[0])
        return False
    _register_fake_impls()
    return True


def fast_linear_available() -> bool:
    global _fast_linear
    if _fast_linear is None:
        _fast_linear = loaded() and bool(torch.ops.plexus.has_fast_linear())
    return _fast_linear


def fast_quant_linear_available() -> bool:
    """Whether linear_quant has its VNNI path here (its scalar path serves anywhere, but slowly)."""
    global _fast_quant_linear
    if _fast_quant_linear is None:
        _fast_quant_linear = loaded() and bool(torch.ops.plexus.has_fast_quant_linear())
    return _fast_quant_linear


def amx_int8_available() -> bool:
    """Whether linear_w8a8_amx runs here: built with AMX-INT8 and the OS hands this process the tile state."""
    global _amx_int8
    if _amx_int8 is None:
        _amx_int8 = loaded() and bool(torch.ops.plexus.has_amx_int8())
    return _amx_int8


class Kernel(enum.IntEnum):
    """The matmul kernels a CPU linear layer can run. The first six run inside the fused decode step too, which
    numbers them alike (ops.cpp's LinearKernel)."""
    ATEN = 0            # F.linear on the plain weight
    BF16_GEMV = 1       # linear_bf16: the hand-written GEMV for few rows
    ONEDNN = 2          # oneDNN on the weight prepacked by pack_weight
    INT_GEMV = 3        # linear_quant on a PackedInt: the VNNI GEMV, activations rounded per block of 32
    W8A8_AMX = 4        # linear_w8a8_amx on the weight's AMX tiles, activations rounded per token
    W8A8_AMX_GLU = 5    # linear_w8a8_amx_glu: the same with silu(gate) * up in its epilogue (a gate/up layer)
    W8A8_ONEDNN = 6     # quantize_rows, oneDNN's int8 matmul, scale_rows (layer by layer only)
    METHOD = 7          # the layer's LinearMethod's own torch path


FUSED_KERNELS = frozenset(Kernel(k) for k in range(6))

# The row counts (tokens in a step) at which choose_linear's answer may change, all measured on this machine's
# kind (docs/performance.md):
# the hand-written bf16 GEMV serves up to FAST_LINEAR_MAX_ROWS; above, oneDNN with prepacked weights is faster,
# and without prepacked weights the GEMV still beats F.linear up to FAST_LINEAR_MAX_ROWS_UNPACKED.
FAST_LINEAR_MAX_ROWS = 4
FAST_LINEAR_MAX_ROWS_UNPACKED = 16
# The quantized GEMV (linear_quant) serves steps of up to this many tokens: above, it reads each weight
# block once per 4 rows and the methods' own paths (torch's int4/int8 kernels, dequantize-and-matmul, W8A8's
# int8 matmuls) win.
QUANT_LINEAR_MAX_ROWS = 8
# Where a layer's alternative is dequantizing its weight (GGUF, odd-shaped groups), the kernel serves up to
# this many: its cost grows with the rows (SmolLM2's 4-bit layers: 45 ms at 32 rows, 180 at 128), the
# dequantization's does not (about 230 ms for a 512-token prefill).
QUANT_LINEAR_MAX_ROWS_VS_DEQUANT = 128
ROW_LIMITS = sorted({FAST_LINEAR_MAX_ROWS, FAST_LINEAR_MAX_ROWS_UNPACKED, QUANT_LINEAR_MAX_ROWS,
                     QUANT_LINEAR_MAX_ROWS_VS_DEQUANT})
PACK_BATCH_HINT = 64


def choose_linear(rows: int, dtype: torch.dtype | None, packed: bool = False, form=None, glu: bool = False
                  ) -> Kernel:
    """The kernel for a linear layer on a step of `rows` tokens in `dtype` (None: activations this platform's
    kernels do not take): the one place the CPU platform makes that choice, for the op-by-op path and the fused
    decode step alike. Unquantized layers: packed says a prepacked oneDNN copy is kept. Integer layers: form is
    their PackedInt; glu asks for silu(gate) * up of a gate/up layer's output."""
    compiling = torch.compiler.is_compiling()
    if form is None:
        gemv_rows = FAST_LINEAR_MAX_ROWS if packed else FAST_LINEAR_MAX_ROWS_UNPACKED
        if dtype == torch.bfloat16 and 0 < rows <= gemv_rows and fast_linear_available():
            return Kernel.BF16_GEMV
        # (oneDNN's opaque packed tensors cannot be inputs of a compiled graph; inductor lowers F.linear itself)
        return Kernel.ONEDNN if packed and rows > 0 and not compiling else Kernel.ATEN
    if compiling or dtype not in (torch.bfloat16, torch.float32):
        return Kernel.METHOD
    # fp32 models keep their exact paths: the GEMV rounds activations to int8, which only W8A8 layers ask for
    gemv_rows = QUANT_LINEAR_MAX_ROWS_VS_DEQUANT if form.dequantizes else QUANT_LINEAR_MAX_ROWS
    if dtype == torch.bfloat16 and 0 < rows <= gemv_rows and fast_quant_linear_available() and _gemv_fits(form):
        return Kernel.INT_GEMV
    if form.w8a8:
        if amx_int8_available():
            return Kernel.W8A8_AMX_GLU if glu and form.shape[0] % 32 == 0 else Kernel.W8A8_AMX
        if hasattr(torch.ops.onednn, "qlinear_prepack"):
            return Kernel.W8A8_ONEDNN
    return Kernel.METHOD


def row_class(rows: int) -> int:
    """Steps of the same class get the same choose_linear answers (every limit is 'rows <= limit')."""
    return bisect.bisect_left(ROW_LIMITS, rows)


def _gemv_fits(form) -> bool:
    fits = form.layouts.get("gemv_fits")
    if fits is None:
        fits = form.layouts["gemv_fits"] = packed_int.supports(form.shape[1], form.group_size, form.bits)
    return fits


def layout(form, kernel: Kernel):
    """form's weight as `kernel` reads it, made on its first use and kept with the form: AMX tiles
    (pack_int8_amx; for the GLU kernel gate and up rows interleaved 16 by 16, pack_int8_amx_glu), or oneDNN's
    prepacked int8 weight."""
    if kernel not in form.layouts:
        if kernel == Kernel.W8A8_AMX:
            form.layouts[kernel] = torch.ops.plexus.pack_int8_amx(form.qweight)
        elif kernel == Kernel.W8A8_AMX_GLU:
            form.layouts[kernel] = torch.ops.plexus.pack_int8_amx_glu(form.qweight)
        elif kernel == Kernel.W8A8_ONEDNN:
            form.layouts[kernel] = pack_int8_onednn(form.qweight)
        else:
            raise ValueError(f"{kernel!r} reads the form as it is")
    return form.layouts[kernel]


def pack_int8_onednn(weight: torch.Tensor, rows_hint: int = PACK_BATCH_HINT):
    """int8 weight [N, K] prepacked for onednn::qlinear_pointwise, or None where torch has no such op."""
    if not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return None
    return torch.ops.onednn.qlinear_prepack(weight, [rows_hint, weight.shape[1]])


def is_amx_packed(packed) -> bool:
    """Whether a layout is AMX tiles (pack_int8_amx) rather than oneDNN's opaque prepacked tensor."""
    return isinstance(packed, torch.Tensor) and packed.dtype == torch.int8 and packed.dim() == 4


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] in oneDNN's blocked layout, for linear() on more rows than the GEMV serves."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)


def _register_fake_impls() -> None:
    """Shapes of the ops' outputs, so torch.compile can trace through them."""
    lib = torch.library

    @lib.register_fake("plexus::linear_bf16")
    def _(x, w, bias, out_fp32):
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32 if out_fp32 else x.dtype)

    @lib.register_fake("plexus::linear_quant")
    def _(x, qweight, scales, offsets, bias, bits, scalar):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @lib.register_fake("plexus::quantize_rows")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(x.shape[0], 1, dtype=torch.float32)

    @lib.register_fake("plexus::scale_rows")
    def _(y, scale, bias, out_dtype):
        return y.new_empty(y.shape, dtype=out_dtype)

    @lib.register_fake("plexus::pack_int8_amx")
    def _(w):
        n, k = w.shape
        return w.new_empty((n + 31) // 32 * 2, (k + 63) // 64, 16, 64)

    @lib.register_fake("plexus::linear_w8a8_amx")
    def _(x, packed, weight_scale, bias):
        return x.new_empty(x.shape[0], weight_scale.numel())

    @lib.register_fake("plexus::pack_int8_amx_glu")
    def _(w):
        n, k = w.shape
        return w.new_empty(n // 16, (k + 63) // 64, 16, 64)

    @lib.register_fake("plexus::linear_w8a8_amx_glu")
    def _(x, packed, weight_scale, bias):
        return x.new_empty(x.shape[0], weight_scale.numel() // 2)

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
    def _(q, kv_cache, block_tables, seq_lens, scale, window=0):
        return torch.empty_like(q)
