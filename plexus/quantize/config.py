"""What `plexus quantize` is asked to do, checked before any work starts.

Errors name the command-line flag and the values allowed, so a bad combination fails in a second rather
than after a calibration run."""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from dataclasses import dataclass

logger = logging.getLogger("plexus")

METHODS = ("rtn", "gptq", "awq")
FORMATS = ("compressed-tensors", "gptq", "awq")
DTYPES = ("auto", "float16", "bfloat16", "float32")
# Bits each checkpoint format can store (AutoAWQ's GEMM layout is 4-bit only).
FORMAT_BITS = {"compressed-tensors": (4, 8), "gptq": (4, 8), "awq": (4,)}
DATA_DIR = pathlib.Path(__file__).resolve().parent.parent / "data"
DEFAULT_CALIBRATION = DATA_DIR / "calibration.txt"
# 4-bit group sizes tried when --group-size is not given, largest first (compressed-tensors' W4A16 is 128).
DEFAULT_4BIT_GROUPS = (128, 64, 32)


@dataclass(frozen=True)
class QuantizeConfig:
    """method: rtn | gptq | awq; bits: 4 | 8; group_size: input columns sharing a scale (-1: one group per
    output row; None: per channel for 8 bits, as compressed-tensors' W8A16 preset, and for 4 bits the largest
    of 128, 64, 32 that divides every linear's inputs; see with_group_size); sym: symmetric (no zero point);
    act_order: GPTQ's descending-Hessian column order;
    format: the checkpoint layout written; dtype: of the unquantized tensors (auto: the model's, but
    float16 for the gptq and awq formats, whose loaders expect it)."""
    method: str = "gptq"
    bits: int = 4
    group_size: int | None = None
    sym: bool = True
    act_order: bool = False
    format: str = "compressed-tensors"
    dtype: str = "auto"
    calibration: pathlib.Path = DEFAULT_CALIBRATION
    num_samples: int = 24
    seq_len: int = 512
    damp_percent: float = 0.01      # GPTQ: dampening, a fraction of the mean Hessian diagonal
    awq_clip: bool = True           # AWQ: search a clipping range per group after the scales

    def __post_init__(self):
        def refuse(flag, value, allowed):
            raise ValueError(f"{flag} {value}: {allowed}")

        if self.method not in METHODS:
            refuse("--method", self.method, f"choose one of {', '.join(METHODS)}")
        if self.format not in FORMATS:
            refuse("--format", self.format, f"choose one of {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            refuse("--dtype", self.dtype, f"choose one of {', '.join(DTYPES)}")
        if self.bits not in FORMAT_BITS[self.format]:
            refuse("--bits", self.bits, f"the {self.format} format stores "
                   f"{' or '.join(map(str, FORMAT_BITS[self.format]))} bits")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            refuse("--group-size", self.group_size, "a positive number of input columns, or -1 (one group per row)")
        if self.format == "awq":
            if self.sym:
                refuse("--sym", "", "the awq format (AutoAWQ GEMM) stores zero points; use --asym")
            if self.group_size == -1:
                refuse("--group-size", -1, "the awq format needs groups (e.g. 128)")
        if self.act_order and self.method != "gptq":
            refuse("--act-order", "", f"reorders columns for GPTQ only, not --method {self.method}")
        if self.act_order and self.format == "awq":
            refuse("--act-order", "", "the awq format has no g_idx to record the column order; "
                                      "use --format gptq or compressed-tensors")
        if self.method != "rtn":
            if self.num_samples <= 0:
                refuse("--num-samples", self.num_samples, "a positive number of calibration sequences")
            if self.seq_len <= 0:
                refuse("--seq-len", self.seq_len, "a positive number of tokens per calibration sequence")
            if not pathlib.Path(self.calibration).is_file():
                refuse("--calibration", self.calibration, "no such file; pass a plain text file")
        if not 0 <= self.damp_percent < 1:
            refuse("damp_percent", self.damp_percent, "a fraction in [0, 1)")

    def with_group_size(self, linears: dict[str, tuple[int, int]]) -> QuantizeConfig:
        """This config with group_size settled for these linears (name -> (out_features, in_features)) when it
        was left unset, said in the log."""
        if self.group_size is not None:
            return self
        if self.bits == 8:
            group_size, why = -1, "per channel (one scale per output row), as compressed-tensors' W8A16 preset"
        else:
            inputs = sorted({in_features for _, in_features in linears.values()})
            fits = [g for g in DEFAULT_4BIT_GROUPS if all(n % g == 0 for n in inputs)]
            if not fits:
                raise ValueError(f"--group-size: none of {', '.join(map(str, DEFAULT_4BIT_GROUPS))} divides the "
                                 f"linears' input dimensions {inputs}; pass --group-size (a divisor of all, or -1 "
                                 "for one group per row)")
            group_size, why = fits[0], (f"the largest of {', '.join(map(str, DEFAULT_4BIT_GROUPS))} that divides "
                                        f"every linear's inputs ({', '.join(map(str, inputs))})")
        logger.info("--group-size not given: %s for %d-bit weights, %s", group_size, self.bits, why)
        return dataclasses.replace(self, group_size=group_size)

    def check_shapes(self, linears: dict[str, tuple[int, int]]) -> None:
        """Refuse a group size that does not divide every quantized linear's input dimension, and output
        dimensions the packed formats cannot hold. linears: name -> (out_features, in_features)."""
        if self.group_size is None:
            raise ValueError("group_size is unset; settle it with with_group_size(linears) first")
        pack = 32 // self.bits
        for name, (out_features, in_features) in linears.items():
            if self.group_size != -1 and in_features % self.group_size:
                raise ValueError(f"--group-size {self.group_size}: must divide the input dimension of every "
                                 f"quantized linear; {name} has {in_features} inputs")
            if self.format == "gptq" and in_features % pack:
                raise ValueError(f"--format gptq: packs {pack} inputs per int32; {name} has {in_features} inputs")
            if self.format in ("gptq", "awq") and out_features % pack:
                raise ValueError(f"--format {self.format}: packs {pack} outputs per int32; {name} has "
                                 f"{out_features} outputs")

    def storage_dtype(self, model_dtype: str) -> str:
        """The dtype of the unquantized tensors and of compressed-tensors' scales."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.format in ("gptq", "awq") else model_dtype

    def scale_dtype(self, model_dtype: str) -> str:
        return "float16" if self.format in ("gptq", "awq") else self.storage_dtype(model_dtype)
