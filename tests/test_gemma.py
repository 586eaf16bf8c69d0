"""Gemma 2 and Gemma 3 against HF transformers on the same random weights (tests/family_parity.py): (1 + w)
norms around attention and the MLP, scaled embeddings, GeGLU, query_pre_attn_scalar, soft-capped attention
and logits (Gemma 2, with caps small enough to change the output), sliding windows shorter than the prompts
interleaved with full layers, Gemma 3's q/k norms and its RoPE base per layer type; and a Gemma 3 multimodal
checkpoint run as its text model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM

from family_parity import PATHS, SCHEDULES, build, check_family, family_fixture, hf_reference, prompts

COMMON = dict(intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
              hidden_activation="gelu_pytorch_tanh")

MODELS = {
    "gemma2-gqa2to1-hd64-softcap-window16": (Gemma2Config, Gemma2ForCausalLM, dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=2,
        query_pre_attn_scalar=48, sliding_window=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma2-mha-hd24-window20": (Gemma2Config, Gemma2ForCausalLM, dict(
        hidden_size=96, num_attention_heads=2, num_key_value_heads=2, head_dim=24, num_hidden_layers=2,
        query_pre_attn_scalar=24, sliding_window=20, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3-gqa4to1-hd128-window16": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=128, num_hidden_layers=3,
        query_pre_attn_scalar=128, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})),
    "gemma3-gqa2to1-hd64-window12": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=2,
        query_pre_attn_scalar=64, sliding_window=12)),
}


family = family_fixture(MODELS, COMMON)


@pytest.mark.parametrize("speed_path", list(PATHS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_gemma_matches_hf_token_for_token(family, speed_path, schedule, monkeypatch):
    path, ids, expected = family
    llm = check_family(path, expected, ids, PATHS[speed_path], SCHEDULES[schedule], monkeypatch)
    assert llm.llm_engine.config.model.max_model_len == 256     # the windows cap nothing


def test_the_soft_caps_change_the_output(tmp_path):
    """The caps of the first Gemma 2 model are small enough that HF's output differs without them, so the
    parity above checks plexus applies them."""
    config_cls, model_cls, extra = MODELS["gemma2-gqa2to1-hd64-softcap-window16"]
    ids = prompts()
    capped = build(config_cls, model_cls, tmp_path / "a", **COMMON, **extra)
    uncapped = build(config_cls, model_cls, tmp_path / "b", **COMMON,
                     **{**extra, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    with torch.no_grad():
        a = capped(torch.tensor([ids[0]])).logits
        b = uncapped(torch.tensor([ids[0]])).logits
    assert (a - b).abs().max() > 0.5


def _as_transformers5_module_names(path) -> None:
    """Rewrite a saved multimodal checkpoint with the module names transformers 5 gives its tensors in memory
    (model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*) instead of the original
    export's (language_model.model.*, vision_tower.*, ...: what save_pretrained and google/gemma-3-*-it
    write), and with a config.json naming no architectures, so its model_type must say what it is."""
    from safetensors.torch import load_file, save_file

    renames = (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."))
    file = path / "model.safetensors"
    tensors = {}
    for name, tensor in load_file(file).items():
        old, new = next(pair for pair in renames if name.startswith(pair[0]))
        tensors[new + name[len(old):]] = tensor
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout", ["original-export", "transformers5-names-no-architectures"])
def test_a_gemma3_multimodal_checkpoint_runs_as_its_text_model(layout, tmp_path, monkeypatch):
    """Gemma3ForConditionalGeneration (vision tower and projector included in the checkpoint): plexus reads
    its text_config, takes the language model's tensors under either naming and equals HF's multimodal model
    on text input."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, num_hidden_layers=2, query_pre_attn_scalar=32, sliding_window=12,
                            **COMMON)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=255, boi_token_index=253, eoi_token_index=254)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    if layout != "original-export":
        _as_transformers5_module_names(tmp_path)
    ids = prompts(count=2)
    expected = hf_reference(hf, ids)
    check_family(tmp_path, expected, ids, {}, SCHEDULES["prefix-cache-chunked-16"], monkeypatch)


def test_compiled_decode_graphs_run_soft_capped_windowed_layers(tmp_path, monkeypatch):
    """Decode steps through torch.compile'd graphs (padded to a batch bucket): the torch attention that
    soft-capped and windowed layers take is traced too (its mask spans the block tables, no host sync)."""
    config_cls, model_cls, extra = MODELS["gemma2-gqa2to1-hd64-softcap-window16"]
    hf = build(config_cls, model_cls, tmp_path, **COMMON, **extra)
    ids = prompts()
    llm = check_family(tmp_path, hf_reference(hf, ids), ids, {}, {}, monkeypatch, max_num_seqs=4,
                       compilation_config={"level": 3, "cudagraph_capture_sizes": [4]})
    assert llm.llm_engine.executor.worker.runner.compiled.bucket_steps.get(4, 0) >= 3
