"""The offline API behaves as vLLM's: outputs, sampling parameters, seeds,
stop conditions, logprobs, chat, and the LLMEngine loop."""
from __future__ import annotations

import math

import pytest

from plexus import LLM, EngineArgs, LLMEngine, RequestOutput, SamplingParams
from plexus.core.outputs import CompletionOutput, Logprob


def test_generate_returns_request_outputs_in_input_order(llm_fp32):
    prompts = ["One, two, three,", "A", "The quick brown fox jumps over the lazy dog. " * 5]
    outputs = llm_fp32.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    tokenizer = llm_fp32.get_tokenizer()
    for output, prompt in zip(outputs, prompts):
        assert isinstance(output, RequestOutput) and output.finished
        assert output.prompt_token_ids == tokenizer.encode(prompt)
        completion = output.outputs[0]
        assert isinstance(completion, CompletionOutput) and completion.index == 0
        assert completion.finish_reason in ("stop", "length")
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert output.metrics.first_token_time >= output.metrics.arrival_time


def test_default_sampling_params_generate_sixteen_tokens(llm_fp32):
    out = llm_fp32.generate("Count: 1, 2, 3,", SamplingParams(ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 16 and out.outputs[0].finish_reason == "length"


def test_token_id_prompts_equal_text_prompts(llm_fp32):
    ids = llm_fp32.get_tokenizer().encode("The capital of France is")
    params = SamplingParams(temperature=0, max_tokens=8)
    by_text = llm_fp32.generate("The capital of France is", params, use_tqdm=False)[0]
    by_ids = llm_fp32.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids
    assert by_ids.prompt_token_ids == ids


def test_one_sampling_params_per_prompt(llm_fp32):
    outputs = llm_fp32.generate(["a", "b"], [SamplingParams(max_tokens=3, ignore_eos=True),
                                             SamplingParams(max_tokens=7, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 7]
    with pytest.raises(ValueError, match="2 prompts but 1 sampling_params"):
        llm_fp32.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_seeded_request_gives_the_same_text_alone_and_in_a_batch_of_sixteen(llm_fp32):
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm_fp32.generate("Tell me about the ocean.", target, use_tqdm=False)[0].outputs[0]
    others = [SamplingParams(temperature=t, top_k=k, seed=s, max_tokens=m, ignore_eos=True)
              for t, k, s, m in zip([0.5, 1.0, 1.3, 0.7] * 4, [-1, 5, 50, -1] * 4,
                                    [None, 7, None, 99] * 4, [5, 30, 12, 24] * 4)]
    prompts = [f"Prompt number {i} is about" for i in range(16)]
    batch = llm_fp32.generate(prompts[:8] + ["Tell me about the ocean."] + prompts[8:],
                              others[:8] + [target] + others[8:], use_tqdm=False)
    assert batch[8].outputs[0].token_ids == alone.token_ids
    assert batch[8].outputs[0].text == alone.text
    # A different seed gives a different continuation.
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=24, ignore_eos=True)
    assert llm_fp32.generate("Tell me about the ocean.", other_seed, use_tqdm=False)[0].outputs[0].token_ids \
        != alone.token_ids


def test_n_returns_n_independent_completions(llm_fp32):
    out = llm_fp32.generate("My favourite colour is", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8,
                                                                       ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_max_tokens_none_runs_to_max_model_len():
    llm = LLM(dtype="float32", max_model_len=48, kv_cache_space=0.05)
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 48
    assert out.outputs[0].finish_reason == "length"


def test_stop_string_spanning_tokens_is_cut_from_the_text(llm_fp32):
    params = SamplingParams(temperature=0, max_tokens=40)
    full = llm_fp32.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
    stop = full.text[6:14]          # a piece from inside the greedy text, usually spanning tokens
    cut = llm_fp32.generate("The capital of France is",
                            SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm_fp32.generate("The capital of France is",
                             SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True),
                             use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_eos(llm_fp32):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm_fp32.generate("1, 2, 3, 4,", params, use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[3]
    out = llm_fp32.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens holds a stop token back.
    held = llm_fp32.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                                                            min_tokens=10), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 10 and stop_id not in held.token_ids[:10]


def test_greedy_chat_reply_ends_at_eos(llm_fp32):
    out = llm_fp32.chat([{"role": "user", "content": "What is 2 + 2?"}],
                        SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    tokenizer = llm_fp32.get_tokenizer()
    expected_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                                    tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected_prompt
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None
    assert out.outputs[0].token_ids[-1] == tokenizer.eos_token_id
    assert "4" in out.outputs[0].text and "<|im_end|>" not in out.outputs[0].text


def test_logprobs_are_vllm_shaped_and_sum_to_the_cumulative_logprob(llm_fp32):
    out = llm_fp32.generate("The sky is", SamplingParams(temperature=0, max_tokens=6, logprobs=3),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert 3 <= len(entry) <= 4 and all(isinstance(v, Logprob) for v in entry.values())
        assert entry[token].rank == 1                      # greedy: the chosen token is the most likely
        assert entry[token].logprob == max(v.logprob for v in entry.values())
        assert sorted(v.rank for v in entry.values())[:3] == [1, 2, 3]
        assert isinstance(entry[token].decoded_token, str)
        total += entry[token].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_llm_engine_loop_adds_requests_while_stepping():
    """The loop of vLLM's llm_engine_example.py, unchanged."""
    engine = LLMEngine.from_engine_args(EngineArgs(dtype="float32", max_model_len=512, kv_cache_space=0.05))
    test_prompts = [
        ("A robot may not injure a human being", SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1)),
        ("To be or not to be,", SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2)),
        ("What is the meaning of life?", SamplingParams(n=2, temperature=0.8, top_p=0.95, frequency_penalty=0.1)),
    ]
    finished = {}
    request_id = 0
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params)
            request_id += 1
        for request_output in engine.step():
            if request_output.finished:
                assert request_output.request_id not in finished     # a finished request is reported once
                finished[request_output.request_id] = request_output
    assert sorted(finished) == ["0", "1", "2"]
    assert len(finished["2"].outputs) == 2
    prompt_logprobs = finished["0"].prompt_logprobs
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(finished["0"].prompt_token_ids)


def test_abort_removes_a_request_and_others_finish(llm_fp32):
    engine = llm_fp32.llm_engine
    engine.add_request("abort-me", "Hello", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("keep-me", "Hello", SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.abort_request("abort-me")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"keep-me"}
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_engine_args_cli_round_trip():
    from plexus.utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--max-model-len", "128", "--dtype", "float32", "--no-enable-prefix-caching",
                              "--max_num_seqs", "4"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.max_model_len, engine_args.dtype, engine_args.enable_prefix_caching,
            engine_args.max_num_seqs) == (128, "float32", False, 4)
