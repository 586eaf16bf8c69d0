"""vLLM's generation features, each checked against something computed another way: best_of against the
n=best_of candidates themselves, beam search against a brute-force search over HF logits on a tiny
model, logit_bias / allowed_token_ids / bad_words / logits processors on the tokens they let through,
output kinds against the cumulative output, and priority scheduling on the order requests run in."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from plexus import LLM, BeamSearchParams, RequestOutputKind, SamplingParams

PROMPT = "The capital of France is"


def _first_logprobs(llm: LLM, prompt, k: int = 5):
    """The unconstrained model's top-k at the first generated position: {token: logprob}."""
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=k), use_tqdm=False)[0]
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}


def test_best_of_returns_the_n_candidates_with_the_highest_cumulative_logprob(llm_fp32):
    params = dict(temperature=1.0, seed=11, max_tokens=8, logprobs=0)
    candidates = llm_fp32.generate(PROMPT, SamplingParams(n=5, **params), use_tqdm=False)[0].outputs
    best = llm_fp32.generate(PROMPT, SamplingParams(n=2, best_of=5, **params), use_tqdm=False)[0].outputs
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in best] == [0, 1]
    assert len({tuple(c.token_ids) for c in candidates}) > 2      # the choice was not trivial


def test_logit_bias_moves_the_choice_to_the_runner_up(llm_fp32):
    top = sorted(_first_logprobs(llm_fp32, PROMPT).items(), key=lambda kv: -kv[1])
    out = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, logit_bias={top[0][0]: -100}),
                            use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [top[1][0]]
    forced = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3, logit_bias={"42": 100}),
                               use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [42, 42, 42]       # JSON-style string keys, as the OpenAI API sends


def test_allowed_token_ids_restrict_sampling(llm_fp32):
    top = sorted(_first_logprobs(llm_fp32, PROMPT).items(), key=lambda kv: -kv[1])
    allowed = [top[3][0], top[2][0], 7]
    greedy = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=allowed),
                               use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == [top[2][0]]        # the best of the allowed ones
    sampled = llm_fp32.generate(PROMPT, SamplingParams(temperature=1.5, seed=3, max_tokens=12,
                                                       allowed_token_ids=allowed), use_tqdm=False)[0]
    assert set(sampled.outputs[0].token_ids) <= set(allowed)


def test_bad_words_are_never_generated(llm_fp32, smollm_tokenizer):
    plain = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert "Paris" in plain.outputs[0].text
    banned = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, bad_words=["Paris"]),
                               use_tqdm=False)[0]
    assert "Paris" not in banned.outputs[0].text
    paris = smollm_tokenizer.encode(" Paris", add_special_tokens=False)
    ids = banned.outputs[0].token_ids
    assert not any(ids[i:i + len(paris)] == paris for i in range(len(ids)))


def test_logits_processors_with_both_vllm_signatures(llm_fp32, smollm_tokenizer):
    seen_prompts = []

    def only(token):
        def processor(output_ids, logits):
            mask = torch.full_like(logits, float("-inf"))
            mask[token] = 0
            return logits + mask
        return processor

    def counts_prompt(prompt_ids, output_ids, logits):
        seen_prompts.append(list(prompt_ids))
        return logits

    out = llm_fp32.generate(PROMPT, SamplingParams(temperature=0.8, seed=1, max_tokens=4,
                                                   logits_processors=[counts_prompt, only(1234)]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [1234] * 4
    assert seen_prompts and all(p == smollm_tokenizer.encode(PROMPT) for p in seen_prompts)


def test_output_kinds_delta_and_final_only(llm_fp32):
    engine = llm_fp32.llm_engine
    results = {}
    for kind in RequestOutputKind:
        engine.add_request(kind.name, PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=1,
                                                             output_kind=kind))
    while engine.has_unfinished_requests():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    cumulative = results["CUMULATIVE"][-1].outputs[0]
    deltas = [o.outputs[0] for o in results["DELTA"]]
    assert "".join(d.text for d in deltas) == cumulative.text and len(deltas) == 6
    assert sum((d.token_ids for d in deltas), []) == cumulative.token_ids
    assert sum((d.logprobs for d in deltas), []) == cumulative.logprobs
    assert len(results["FINAL_ONLY"]) == 1 and results["FINAL_ONLY"][0].outputs[0].text == cumulative.text


def test_cumulative_logprob_and_decoded_tokens_follow_vllm(llm_fp32):
    plain = llm_fp32.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert plain.cumulative_logprob is None
    raw = llm_fp32.generate(PROMPT, SamplingParams(max_tokens=2, logprobs=1, detokenize=False),
                            use_tqdm=False)[0].outputs[0]
    assert raw.text == "" and raw.cumulative_logprob is not None
    assert all(lp.decoded_token is None for entry in raw.logprobs for lp in entry.values())


def test_priority_policy_runs_lower_values_first():
    llm = LLM(dtype="float32", max_model_len=256, kv_cache_space=0.05, max_num_seqs=1,
              scheduling_policy="priority")
    outs = llm.generate(["a", "b", "c"], SamplingParams(temperature=0, max_tokens=2), priority=[2, 0, 1],
                        use_tqdm=False)
    order = sorted(range(3), key=lambda i: outs[i].metrics.first_scheduled_time)
    assert order == [1, 2, 0]
    fcfs = LLM(dtype="float32", max_model_len=256, kv_cache_space=0.05, max_num_seqs=1)
    outs = fcfs.generate(["a", "b", "c"], SamplingParams(temperature=0, max_tokens=2), priority=[2, 0, 1],
                         use_tqdm=False)
    assert sorted(range(3), key=lambda i: outs[i].metrics.first_scheduled_time) == [0, 1, 2]


def test_legacy_prompt_token_ids_keyword(llm_fp32):
    params = SamplingParams(temperature=0, max_tokens=3)
    one = llm_fp32.generate(prompt_token_ids=[1, 2, 3], sampling_params=params, use_tqdm=False)
    many = llm_fp32.generate(prompt_token_ids=[[1, 2, 3], [4, 5]], sampling_params=params, use_tqdm=False)
    assert len(one) == 1 and one[0].prompt_token_ids == [1, 2, 3] and many[0].outputs == one[0].outputs


# ---------------------------------------------------------------------------------------------- beam search

VOCAB, EOS = 16, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, eos_token_id=EOS, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-beam")
    model.save_pretrained(path)
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", max_logprobs=-1, kv_cache_space=0.02)
    return model, llm


def _hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)


def _score(tokens, cum, length_penalty):
    n = len(tokens) - (tokens[-1] == EOS)
    return cum / n ** length_penalty


def _reference_beam_search(model, prompt, width, max_tokens, length_penalty):
    """vLLM's beam search written out over HF's full-sequence logits: every beam is expanded by its
    2 x width best next tokens, EOS completes a beam, the width best by score survive each step."""
    beams, completed = [(prompt, 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            lp = _hf_logprobs(model, tokens)
            for t in lp.topk(min(2 * width, VOCAB)).indices.tolist():
                (completed if t == EOS else candidates).append((tokens + [t], cum + lp[t].item()))
        beams = sorted(candidates, key=lambda b: _score(*b, length_penalty), reverse=True)[:width]
    return sorted(completed + beams, key=lambda b: _score(*b, length_penalty), reverse=True)[:width]


@pytest.mark.parametrize("width, max_tokens, length_penalty", [(2, 5, 1.0), (3, 4, 0.5)])
def test_beam_search_matches_a_reference_search_over_hf_logits(tiny, width, max_tokens, length_penalty):
    model, llm = tiny
    prompt = [1, 5, 9, 2]
    ours = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(
        beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty))[0].sequences
    ref = _reference_beam_search(model, prompt, width, max_tokens, length_penalty)
    assert [s.tokens for s in ours] == [tokens for tokens, _ in ref]
    for seq, (_, cum) in zip(ours, ref):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
        assert len(seq.logprobs) == len(seq.tokens) - len(prompt)


def test_beam_search_as_wide_as_the_vocabulary_is_exhaustive(tiny):
    """With beam_width = vocabulary and two steps, nothing is pruned: the result is the best 16 of every
    possible continuation (an EOS first token ends its sequence), enumerated by brute force."""
    model, llm = tiny
    prompt = [1, 7, 4]
    ours = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=VOCAB, max_tokens=2))
    first = _hf_logprobs(model, prompt)
    everything = [([EOS], first[EOS].item())]
    for t1, t2 in itertools.product(range(VOCAB), repeat=2):
        if t1 != EOS:
            everything.append(([t1, t2], first[t1].item() + _hf_logprobs(model, prompt + [t1])[t2].item()))
    best = sorted(everything, key=lambda s: _score(prompt + s[0], s[1], 1.0), reverse=True)[:VOCAB]
    assert [s.tokens[len(prompt):] for s in ours[0].sequences] == [tokens for tokens, _ in best]
    assert all(math.isfinite(s.cum_logprob) for s in ours[0].sequences)


def test_beam_search_text_and_finish_reasons_on_smollm(llm_fp32):
    out = llm_fp32.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=4))[0]
    assert len(out.sequences) == 2 and out.sequences[0].text.startswith(PROMPT)
    assert all(s.finish_reason in ("stop", "length") for s in out.sequences)
