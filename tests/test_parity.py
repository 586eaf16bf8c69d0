"""Greedy fp32 output equals HF transformers token for token, whatever the
batching, caching, chunking or preemption underneath."""
from __future__ import annotations

import pytest
import torch

from plexus import LLM, SamplingParams

MAX_TOKENS = 24
SYSTEM = ("<|im_start|>system\nYou are a careful assistant. Answer in one short paragraph, "
          "plainly, without lists or headings.<|im_end|>\n")
PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):",
    SYSTEM + "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    SYSTEM + "<|im_start|>user\nName three planets.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
    "List of prime numbers: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71,",
    ("The history of the printing press begins with Johannes Gutenberg, who around 1440 developed a "
     "movable-type system in Mainz. His invention spread rapidly across Europe, and by 1500 printing "
     "presses in Western Europe had produced more than twenty million volumes. The consequences for "
     "science, religion and politics were profound, because") * 2,
]


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm, smollm_tokenizer):
    """HF's greedy continuation of each prompt, one prompt at a time (no padding)."""
    eos = smollm_tokenizer.eos_token_id
    results = []
    for prompt in PROMPTS:
        ids = torch.tensor([smollm_tokenizer.encode(prompt)])
        with torch.no_grad():
            out = hf_smollm.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos)
        results.append(out[0, ids.shape[1]:].tolist())
    return results


def test_prompts_cover_short_long_and_shared_prefixes(smollm_tokenizer):
    lengths = sorted(len(smollm_tokenizer.encode(p)) for p in PROMPTS)
    assert lengths[0] <= 2 and lengths[-1] > 100 and len(set(lengths)) == len(PROMPTS)


def _generate(llm: LLM) -> list[list[int]]:
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("settings", [
    dict(enable_prefix_caching=True),
    dict(enable_prefix_caching=False),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=32),
    dict(enable_chunked_prefill=False),
], ids=["prefix-cache", "no-prefix-cache", "chunked-prefill-32", "no-chunked-prefill"])
def test_greedy_fp32_matches_hf_token_for_token(settings, hf_greedy):
    llm = LLM(dtype="float32", max_model_len=1024, kv_cache_space=0.1, **settings)
    assert _generate(llm) == hf_greedy
    if settings.get("enable_prefix_caching"):
        # A second pass finds every prompt's full blocks in the prefix cache and still matches.
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == hf_greedy
        assert sum(o.num_cached_tokens for o in outputs) >= 16 * 8


def test_greedy_fp32_matches_hf_with_compiled_decode_graphs(hf_greedy):
    """Decode steps through torch.compile'd graphs, padded to batch-size buckets."""
    llm = LLM(dtype="float32", max_model_len=1024, kv_cache_space=0.1, max_num_seqs=8,
              compilation_config={"level": 3, "cudagraph_capture_sizes": [2, 8]})
    assert _generate(llm) == hf_greedy
    compiled = llm.llm_engine.executor.worker.runner.compiled
    assert set(compiled.graphs) <= {2, 8} and compiled.bucket_steps.get(8, 0) >= MAX_TOKENS - 2


@pytest.mark.parametrize("switch", ["no-fused-decode", "no-cpu-kernels"])
def test_greedy_fp32_matches_hf_without_the_speed_kernels(switch, hf_greedy, monkeypatch):
    """The fallbacks compute the same thing: layer by layer, and pure torch (as without a compiler)."""
    monkeypatch.setenv("PLEXUS_FUSED_DECODE" if switch == "no-fused-decode" else "PLEXUS_CPU_KERNELS", "0")
    llm = LLM(dtype="float32", max_model_len=1024, kv_cache_space=0.1)
    ops = llm.llm_engine.executor.worker.model.ops
    assert (type(ops).__name__, getattr(ops, "fused_decode", None)) == (
        ("CpuModelOps", False) if switch == "no-fused-decode" else ("ModelOps", None))
    assert _generate(llm) == hf_greedy


def test_greedy_fp32_matches_hf_when_the_kv_cache_forces_preemption(hf_greedy):
    # 24 blocks of 16 tokens: the longest request alone needs 12, all eight together far more.
    llm = LLM(dtype="float32", max_model_len=1024, num_gpu_blocks_override=24, max_num_batched_tokens=64)
    assert _generate(llm) == hf_greedy
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_bf16_stays_within_measured_bounds_of_hf_fp32(hf_smollm, smollm_tokenizer):
    """bf16 (the CPU default) is held to bounds, not exact match. Measured on 170 teacher-forced
    positions: plexus bf16 mean |d logprob| 0.030, max 0.38, top-1 agreement 98.2%
    (HF's own bf16: 0.025, 0.21, 97.1%). The bounds leave about 2x room."""
    ids = smollm_tokenizer.encode(PROMPTS[7] + " " + PROMPTS[5] + " " + PROMPTS[2])
    llm = LLM(dtype="bfloat16", max_model_len=1024, kv_cache_space=0.05)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm(torch.tensor([ids])).logits[0].float(), dim=-1)
    errors, agree = [], 0
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        errors.append(abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()))
        top = max(entry.items(), key=lambda kv: kv[1].logprob)[0]
        agree += top == int(ref[pos - 1].argmax())
    assert sum(errors) / len(errors) < 0.06
    assert max(errors) < 0.75
    assert agree / len(errors) >= 0.95


DECODE_POSITIONS = 260


def test_bf16_decode_path_stays_within_measured_bounds_of_hf_fp32(hf_smollm, smollm_tokenizer, llm_fp32,
                                                                  monkeypatch):
    """The default bf16 decode path (the fused C++ decode step with the bf16 GEMV, then the lm_head GEMV),
    teacher-forced over 260 generated positions: one token per step (max_num_batched_tokens=1), so every
    position is computed by a decode step against the KV cache, scored by its logprob against HF fp32 on the
    same tokens. The forced tokens are the fp32 greedy continuation (EOS ignored, so it runs the whole length).
    Measured: mean |d logprob| 0.019, max 0.14, top-1 agreement 100%; the bounds leave about 2x room."""
    prompt = smollm_tokenizer.encode(PROMPTS[4])
    forced = llm_fp32.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0, max_tokens=DECODE_POSITIONS, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    ids = prompt + list(forced)
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm(torch.tensor([ids])).logits[0].float(), dim=-1)
    llm = LLM(dtype="bfloat16", max_model_len=1024, kv_cache_space=0.05, max_num_batched_tokens=1,
              enable_prefix_caching=False)
    ops = llm.llm_engine.executor.worker.model.ops
    fused_steps = []
    decode_layers = ops.decode_layers
    monkeypatch.setattr(ops, "decode_layers", lambda *a: fused_steps.append(decode_layers(*a)) or fused_steps[-1])
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(fused_steps) >= len(ids) - 1 and all(h is not None for h in fused_steps)

    errors, agree = [], 0
    for pos in range(len(prompt), len(ids)):
        entry = out.prompt_logprobs[pos]
        errors.append(abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()))
        top = next(tok for tok, lp in entry.items() if lp.rank == 1)
        agree += top == int(ref[pos - 1].argmax())
    mean, worst, agreement = sum(errors) / len(errors), max(errors), agree / len(errors)
    print(f"bf16 decode over {len(errors)} positions: mean |d logprob| {mean:.4f}, max {worst:.3f}, "
          f"top-1 agreement {agreement:.1%}")
    assert len(errors) >= 256
    assert mean < 0.04
    assert worst < 0.3
    assert agreement >= 0.97
