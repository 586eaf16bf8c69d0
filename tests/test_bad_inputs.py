"""Bad input found by trying it, each refused at add_request / SamplingParams time with a message naming
the setting and what is allowed, while a healthy request in the same engine finishes with the same
tokens as alone; and a fault raised while running a step takes down only the request it belongs to."""
from __future__ import annotations

import re

import numpy as np
import pytest

from plexus import LLM, SamplingParams

HEALTHY = "Once upon a time, in a small village"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(llm_fp32):
    return llm_fp32.generate(HEALTHY, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def _with_a_healthy_neighbour(llm: LLM, add_bad) -> tuple[list[int], Exception | None]:
    """Start a healthy request, let it run, try the bad one mid-flight, and finish the healthy one: its
    tokens, and what the bad one raised."""
    engine = llm.llm_engine
    engine.add_request("healthy", HEALTHY, GREEDY)
    engine.step()
    engine.step()
    error = None
    try:
        add_bad(engine)
    except Exception as e:  # noqa: BLE001
        error = e
    tokens = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "healthy" and out.finished:
                tokens = out.outputs[0].token_ids
    return tokens, error


VOCAB = 49152
BAD_REQUESTS = [
    ("stop_token_ids out of vocabulary, with min_tokens",
     lambda e: e.add_request("bad", "Hi", SamplingParams(stop_token_ids=[VOCAB + 5], min_tokens=2)),
     ValueError, rf"stop_token_ids contains token id {VOCAB + 5}, which is out of vocabulary: token ids must be "
                 rf"in \[0, {VOCAB}\)"),
    ("logprobs=-1 over max_logprobs",
     lambda e: e.add_request("bad", "Hi", SamplingParams(logprobs=-1)),
     ValueError, rf"Requested logprobs=-1 \({VOCAB} per token\), which is greater than max allowed: max_logprobs=20"),
    ("prompt_logprobs=-1 over max_logprobs",
     lambda e: e.add_request("bad", "Hi", SamplingParams(prompt_logprobs=-1)),
     ValueError, r"Requested prompt_logprobs=-1 .*max_logprobs=20"),
    ("seed past 64 bits",
     lambda e: e.add_request("bad", "Hi", SamplingParams(seed=2 ** 64)),
     ValueError, r"seed must be a signed 64-bit integer, in \[-2\*\*63, 2\*\*63 - 1\], got 18446744073709551616"),
    ("stop=5",
     lambda e: e.add_request("bad", "Hi", SamplingParams(stop=5)),
     ValueError, r"stop must be a string or a list of strings, got 5"),
    ("a lone surrogate in the prompt",
     lambda e: e.add_request("bad", "x\ud800y", SamplingParams()),
     ValueError, r"prompt is not valid Unicode text: '\\ud800' at position 1 is a lone surrogate"),
    ("an empty prompt",
     lambda e: e.add_request("bad", "", SamplingParams()),
     ValueError, r"Prompt cannot be empty"),
    ("a token id out of vocabulary",
     lambda e: e.add_request("bad", {"prompt_token_ids": [1, VOCAB]}, SamplingParams()),
     ValueError, rf"Token id {VOCAB} is out of vocabulary"),
    ("a prompt longer than the context",
     lambda e: e.add_request("bad", {"prompt_token_ids": [1] * 2000}, SamplingParams()),
     ValueError, r"model's context length is only 1024 tokens \(max_model_len=1024\)"),
    ("allowed_token_ids out of vocabulary",
     lambda e: e.add_request("bad", "Hi", SamplingParams(allowed_token_ids=[5, VOCAB])),
     ValueError, rf"allowed_token_ids contains token id {VOCAB}, which is out of vocabulary"),
]


@pytest.mark.parametrize("what, add_bad, error, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_refused_and_the_healthy_one_is_unaffected(llm_fp32, alone, what, add_bad, error,
                                                                   message):
    tokens, raised = _with_a_healthy_neighbour(llm_fp32, add_bad)
    assert isinstance(raised, error) and re.search(message, str(raised)), repr(raised)
    assert tokens == alone


def test_numpy_integer_token_ids_are_taken_as_ints(llm_fp32, alone, smollm_tokenizer):
    ids = np.array(smollm_tokenizer.encode(HEALTHY), dtype=np.int64)
    out = llm_fp32.generate({"prompt_token_ids": list(ids)}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == alone and out.prompt_token_ids == ids.tolist()


def test_sampling_params_given_as_a_dict_is_refused_by_name(llm_fp32):
    with pytest.raises(TypeError, match=r"sampling_params must be a SamplingParams or a list of them, got dict "
                                        r"\(build it with SamplingParams\(\*\*d\)\)"):
        llm_fp32.generate("Hi", sampling_params={"temperature": 0})


def test_a_tokenizer_path_that_does_not_exist_says_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"tokenizer '/no/such/tokenizer': no such file or directory"):
        LLM(tokenizer="/no/such/tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer 'acme/missing': not a local path, and not in the Hugging "
                                         r"Face cache .*HF_HUB_OFFLINE=1 forbids downloading it"):
        LLM(tokenizer="acme/missing")


def test_a_fault_while_running_a_step_finishes_only_its_request(llm_fp32, alone):
    """A planted fault: one request's logits processor raises inside the model side's sampler. That request
    finishes with finish_reason "error" and the message; the one beside it in the same steps goes on."""
    def explode(output_ids, logits):
        if len(output_ids) == 3:
            raise RuntimeError("planted fault")
        return logits

    outs = llm_fp32.generate([HEALTHY, "Hi there", HEALTHY],
                             [GREEDY, SamplingParams(max_tokens=8, ignore_eos=True, logits_processors=[explode]), GREEDY],
                             use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone and outs[2].outputs[0].token_ids == alone
    failed = outs[1].outputs[0]
    assert failed.finish_reason == "error" and failed.stop_reason == "RuntimeError: planted fault"
    assert len(failed.token_ids) == 3
