"""Shapes SmolLM2 does not have (GQA ratios, MHA, untied embeddings, head
dims, attention bias, llama3 RoPE scaling): random models built here, saved
as HF checkpoints, and scored by plexus and HF on the same prompt."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from plexus import LLM, SamplingParams

VOCAB = 512
BASE = dict(vocab_size=VOCAB, intermediate_size=384, num_hidden_layers=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, initializer_range=0.2)

SHAPES = {
    "gqa-4to1-hd32-untied": (LlamaConfig, LlamaForCausalLM,
                             dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                  tie_word_embeddings=False)),
    "mha-hd64-tied": (LlamaConfig, LlamaForCausalLM,
                      dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "gqa-3to1-odd-heads-hd64-untied": (LlamaConfig, LlamaForCausalLM,
                                       dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                                            tie_word_embeddings=False)),
    "llama3-rope-scaling": (LlamaConfig, LlamaForCausalLM,
                            dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False, rope_theta=500000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2-attention-bias": (Qwen2Config, Qwen2ForCausalLM,
                             dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def tiny_model(request, tmp_path_factory):
    config_cls, model_cls, extra = SHAPES[request.param]
    torch.manual_seed(0)
    config = config_cls(**BASE, **extra)
    model = model_cls(config).eval()
    if request.param.startswith("qwen2"):
        with torch.no_grad():   # random biases, so a model that ignored them would fail
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def _prompt(length: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g).tolist()


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 16], ids=["one-pass", "chunked-16"])
def test_prompt_logprobs_match_hf_log_softmax(tiny_model, max_num_batched_tokens):
    path, hf = tiny_model
    prompt = _prompt(100)
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.05,
              max_num_batched_tokens=max_num_batched_tokens)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=5, ignore_eos=True),
                       use_tqdm=False)[0]
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [L, V]

    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    errors = []
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        token = prompt[pos]
        errors.append(abs(entry[token].logprob - expected[pos - 1, token].item()))
        top = torch.topk(expected[pos - 1], 5)
        assert set(top.indices.tolist()) <= set(entry), f"position {pos}: top-5 differs"
        assert entry[token].rank == int((expected[pos - 1] > expected[pos - 1, token]).sum()) + 1
    assert max(errors) < 1e-4
    # Greedy continuation matches HF too.
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert out.outputs[0].token_ids == hf_out[0, len(prompt):].tolist()
