"""The HF config of a GGUF file: transformers' own GGUF parser, then the settings llama.cpp reads that the
parser drops or gets wrong for these families (head_dim, RoPE scaling, expert sizes, Phi-3's partial rotary,
window and LongRoPE factors, Gemma's query scale, soft-caps and layer pattern), with llama.cpp's defaults where
the file is silent. Used by plexus.model_files.gguf."""
from __future__ import annotations

import pathlib

import gguf
import numpy as np
import transformers


def read_field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def hf_config(gguf_path: pathlib.Path, reader, architecture: str, mixtral: bool):
    """The HF config of the file: transformers' GGUF parser's, with what llama.cpp reads that the parser drops
    (mixtral: a llama file with experts, which llama.cpp writes for Mixtral)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from plexus.models.registry import MODEL_TYPE_TO_ARCHITECTURE

    config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    def field(key: str, default=None):
        value = read_field(reader, f"{architecture}.{key}")
        return default if value is None else value

    if mixtral:
        config = _mixtral_config(config, field)
    config.rms_norm_eps = decimal(config.rms_norm_eps)
    if (key_length := field("attention.key_length")) is not None:
        config.head_dim = key_length     # transformers reads it for some families only (qwen3: never)
    _rope_scaling(config, field, gguf_path)
    hparams = {"qwen3moe": _qwen3moe_hparams, "phi3": _phi3_hparams, "gemma2": _gemma_hparams,
               "gemma3": _gemma_hparams}.get(architecture)
    if hparams is not None:
        hparams(config, field, reader)
    # plexus's name for the model type, else transformers' (a family not registered yet is refused by name)
    config.architectures = [MODEL_TYPE_TO_ARCHITECTURE.get(config.model_type)
                            or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def _mixtral_config(llama, field) -> transformers.MixtralConfig:
    """llama.cpp writes Mixtral as a llama file with expert_count experts of feed_forward_length each."""
    return transformers.MixtralConfig(
        vocab_size=llama.vocab_size, hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers, num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads, head_dim=llama.head_dim,
        max_position_embeddings=llama.max_position_embeddings, rms_norm_eps=llama.rms_norm_eps,
        rope_parameters=dict(llama.rope_parameters), tie_word_embeddings=llama.tie_word_embeddings,
        bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id,
        num_local_experts=field("expert_count"), num_experts_per_tok=field("expert_used_count"))


def decimal(value) -> float:
    """A float32 from the file as the shortest decimal that rounds to it: what the HF config most likely held
    (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(value)))


def _full_attention_rope(config) -> dict:
    """The RoPE parameters of the full-attention layers (config.rope_parameters, or its "full_attention"
    entry where they are keyed by layer type): where llama.cpp's rope.* keys apply."""
    params = config.rope_parameters
    return params["full_attention"] if isinstance(params.get("full_attention"), dict) else params


def _rope_scaling(config, field, gguf_path: pathlib.Path) -> None:
    """rope.scaling.{type, factor, ...} (llama.cpp's generic keys) -> the full-attention layers' rope_parameters."""
    kind = field("rope.scaling.type")
    factor = field("rope.scaling.factor") or 0.0
    if kind in (None, "none") or (kind == "linear" and factor in (0.0, 1.0)):
        return
    params = _full_attention_rope(config)
    if kind == "linear":
        params.update(rope_type="linear", factor=float(factor))
    elif kind == "yarn":
        params.update(rope_type="yarn", factor=float(factor),
                      original_max_position_embeddings=int(field("rope.scaling.original_context_length")))
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if (value := field(f"rope.scaling.{key}")) is not None:
                params[name] = float(value)
    else:
        raise ValueError(f"GGUF file {gguf_path} has RoPE scaling {kind!r}; plexus converts linear and yarn")


def _qwen3moe_hparams(config, field, reader) -> None:
    # transformers reads feed_forward_length (the dense size) but not the experts' own.
    if (size := field("expert_feed_forward_length")) is not None:
        config.moe_intermediate_size = size


def _phi3_hparams(config, field, reader) -> None:
    """Partial rotary (rope.dimension_count of a head), the window, and LongRoPE from its factor tensors."""
    params = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    params["partial_rotary_factor"] = field("rope.dimension_count", head_dim) / head_dim
    config.sliding_window = field("attention.sliding_window") or None    # 0: none (Phi-4)
    if (original := field("rope.scaling.original_context_length")) is not None:
        config.original_max_position_embeddings = original
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if factors:
        params.update(rope_type="longrope", original_max_position_embeddings=config.original_max_position_embeddings,
                      long_factor=[decimal(v) for v in factors["rope_factors_long.weight"].data],
                      short_factor=[decimal(v) for v in factors["rope_factors_short.weight"].data])
        # rope.scaling.attn_factor is the converter's sqrt(1 + ln(scale) / ln(original)): HF's own default.


def _gemma_hparams(config, field, reader) -> None:
    """What llama.cpp's gemma2 / gemma3 loaders read or assume (src/models/gemma2.cpp, gemma3.cpp)."""
    gemma2 = config.model_type == "gemma2"
    # No query_pre_attn_scalar in the file: queries are scaled by head_dim ** -0.5, except for the 27B models
    # (46 / 62 layers), scaled by (hidden / heads) ** -0.5.
    big = config.num_hidden_layers == (46 if gemma2 else 62)
    config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if big else config.head_dim
    if gemma2:
        config.attn_logit_softcapping = field("attn_logit_softcapping", 50.0)
        config.final_logit_softcapping = field("final_logit_softcapping", 30.0)
        return
    config.final_logit_softcapping = field("final_logit_softcapping") or None
    window = field("attention.sliding_window") or 0
    pattern = field("attention.sliding_window_pattern", 6)
    if window <= 0:
        sliding = [False] * config.num_hidden_layers
    elif isinstance(pattern, list):
        sliding = [bool(s) for s in pattern[:config.num_hidden_layers]]
    else:   # llama_hparams::set_swa_pattern: every n-th layer full, 0 all sliding
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(config.num_hidden_layers)]
    config.layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    config.sliding_window = window or None
    # Sliding layers rotate at their own base (10000 unless the file says), unscaled.
    config.rope_parameters = {"full_attention": dict(_full_attention_rope(config)), "sliding_attention": {
        "rope_type": "default", "rope_theta": float(field("rope.freq_base_swa", 10000.0))}}
