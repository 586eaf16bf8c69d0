"""Model families beyond Llama, each against HF transformers on the same random weights (tests/family_parity.py):
Qwen3 (per-head q/k norms), and the sliding windows of Mistral and Qwen2/3, shorter than the prompts, which
keep the whole context (the window is per layer, never a cap on max_model_len)."""
from __future__ import annotations

import pytest
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
    Qwen3ForCausalLM

from family_parity import PATHS, SCHEDULES, build, check_family, family_fixture, hf_reference, prompts

COMMON = dict(intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              initializer_range=0.1)

MODELS = {
    "qwen3-gqa4to1-hd64-tied": (Qwen3Config, Qwen3ForCausalLM, dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True)),
    "qwen3-mha-hd128-untied-bias": (Qwen3Config, Qwen3ForCausalLM, dict(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=128, attention_bias=True,
        tie_word_embeddings=False)),
    "qwen3-gqa2to1-hd24-sliding-20": (Qwen3Config, Qwen3ForCausalLM, dict(
        hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=20, max_window_layers=1)),
    "qwen2-sliding-24": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=24, max_window_layers=1)),
    "mistral-sliding-16": (MistralConfig, MistralForCausalLM, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        sliding_window=16)),
}


family = family_fixture(MODELS, COMMON)


@pytest.mark.parametrize("speed_path", list(PATHS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_family_matches_hf_token_for_token(family, speed_path, schedule, monkeypatch):
    path, ids, expected = family
    llm = check_family(path, expected, ids, PATHS[speed_path], SCHEDULES[schedule], monkeypatch)
    assert llm.llm_engine.config.model.max_model_len == 256     # the window caps nothing
    if speed_path == "fused":   # these recipes (q/k norms, windows) are the CPU fused decode step's own
        model = llm.llm_engine.executor.worker.model
        assert any(plan is not None for plan in model.ops._decode_weights_of.values())


def test_disable_sliding_window_caps_the_context_at_the_window(tmp_path):
    """vLLM's disable_sliding_window=True: full attention over a context capped at the window."""
    from plexus import LLM

    build(MistralConfig, MistralForCausalLM, tmp_path, **COMMON, hidden_size=64, num_attention_heads=4,
          num_key_value_heads=2, sliding_window=128)
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.01,
              disable_sliding_window=True)
    assert llm.llm_engine.config.model.max_model_len == 128
    with pytest.raises(ValueError, match=r"max_model_len=200 is larger .*\(128, sliding_window in config.json"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=200, disable_sliding_window=True)


def _byte_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_plexus_quantize_on_qwen3_runs_as_hf_does_on_the_dequantized_weights(fmt, tmp_path):
    """`plexus quantize` (GPTQ, 4 bits) on a Qwen3 checkpoint, then plexus on what it wrote, against HF's Qwen3
    with every quantized linear replaced by its dequantization, read back from the file by the test's own
    unpacker (tests/test_quantize.py)."""
    import torch
    from safetensors.torch import load_file
    from test_quantize import dequant_compressed_tensors, dequant_gptq

    from plexus import LLM, SamplingParams
    from plexus.entrypoints.cli import main

    src, out = tmp_path / "qwen3", tmp_path / "out"
    hf = build(Qwen3Config, Qwen3ForCausalLM, src, **COMMON, hidden_size=128, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    _byte_tokenizer(src)
    assert main(["quantize", str(src), "--method", "gptq", "--format", fmt, "--group-size", "32", "--out", str(out),
                 "--num-samples", "4", "--seq-len", "64"]) == 0
    tensors = load_file(out / "model.safetensors")
    with torch.no_grad():
        for name, param in hf.named_parameters():    # norms and embeddings as written (GPTQ's are fp16)
            if name in tensors:
                param.copy_(tensors[name].float())
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = (dequant_compressed_tensors(tensors, name, 4, 32) if fmt == "compressed-tensors"
                     else dequant_gptq(tensors, name, 4))
                module.weight.copy_(w)
    ids = prompts()
    expected = hf_reference(hf, ids)
    llm = LLM(model=str(out), dtype="float32", kv_cache_space=0.02)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids],
                           SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, ignore_eos=True),
                           use_tqdm=False)
    for p, o, (greedy, logprobs) in zip(ids, outputs, expected):
        assert o.outputs[0].token_ids == greedy
        assert max(abs(o.prompt_logprobs[i][p[i]].logprob - logprobs[i - 1, p[i]].item())
                   for i in range(1, len(p))) < 1e-4
