"""SamplingParams takes vLLM's keywords, defaults and validation unchanged."""

import logging

import pytest

from plexus.core.sampling_params import SamplingParams, SamplingType


def test_defaults_are_vllms():
    p = SamplingParams()
    assert p.n == 1
    assert p.best_of is None
    assert p.max_tokens == 16
    assert p.min_tokens == 0
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.min_p == 0.0
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.sampling_type is SamplingType.RANDOM


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(n=1.5), "n"),
        (dict(best_of=2, n=3), "best_of"),
        (dict(best_of=1, n=2), "best_of"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=-2.1), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(seed=1.5), "seed"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens"),
        (dict(logprobs=-2), "logprobs"),
        (dict(prompt_logprobs=-5), "prompt_logprobs"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=[3]), "stop"),
        (dict(stop="x", detokenize=False), "stop"),
        (dict(stop_token_ids=["2"]), "stop_token_ids"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(temperature=0.0, n=2), "n"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be non-negative, got -1.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-3), r"top_k must be -1 \(disable\) or at least 1, got -3"),
        (dict(top_k=0), r"top_k must be -1 \(disable\) or at least 1, got 0"),
        (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
        (dict(best_of=4, n=2, temperature=0), "best_of must be 1 when using greedy sampling, got 4"),
        (dict(logit_bias={1: float("nan")}), "logit_bias values must be finite numbers"),
        (dict(allowed_token_ids=[]), "allowed_token_ids must not be empty"),
        (dict(bad_words=[""]), "bad_words must be a list of non-empty strings"),
        (dict(logits_processors=["not callable"]), "logits_processors must be a list of callables"),
    ],
)
def test_error_messages_state_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(truncate_prompt_tokens=128), "truncate_prompt_tokens"),
        (dict(structured_outputs={"regex": "a+", "whitespace_pattern": " "}), "structured_outputs.whitespace_pattern"),
        (dict(guided_decoding={"regex": "a+", "backend": "outlines"}), "guided_decoding.backend"),
    ],
)
def test_unsupported_features_are_refused_not_ignored(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_structured_outputs_are_accepted_and_guided_decoding_is_their_older_name():
    from plexus.sampling_params import GuidedDecodingParams, StructuredOutputsParams

    p = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    assert p.structured_outputs.kind == "choice" and "choice=['yes', 'no']" in repr(p)
    old = SamplingParams(guided_decoding=GuidedDecodingParams(json={"type": "object"}, backend="auto"))
    assert old.structured_outputs is old.guided_decoding and old.structured_outputs.kind == "json"
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(regex="a+")
    with pytest.raises(ValueError, match="^structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs=object())


def test_vllm_sampling_features_are_accepted():
    p = SamplingParams(n=2, best_of=4, bad_words="darn", logits_processors=[lambda ids, logits: logits],
                       logit_bias={"7": -1.5}, allowed_token_ids=[1, 2])
    assert (p.best_of, p.bad_words, p.logit_bias, p.allowed_token_ids) == (4, ["darn"], {7: -1.5}, [1, 2])


def test_unsupported_features_left_at_their_defaults_are_accepted():
    p = SamplingParams(
        bad_words=[], logits_processors=[], truncate_prompt_tokens=None, guided_decoding=None,
        structured_outputs=None, output_kind=None, extra_args={"plugin": 1},
    )
    assert p.bad_words == []


def test_unknown_keywords_are_type_errors():
    # (use_beam_search, vLLM 0.6's name, is known: refused naming LLM.beam_search, test_vllm_api_holes.py)
    with pytest.raises(TypeError):
        SamplingParams(use_beam_searching=True)


def test_n_may_be_passed_positionally_like_vllm():
    assert SamplingParams(3, temperature=0.8).n == 3


def test_valid_edge_values_are_accepted():
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(top_k=1).top_k == 1
    assert SamplingParams(top_p=1.0, min_p=1.0).min_p == 1.0
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5
    assert SamplingParams(logprobs=-1, prompt_logprobs=-1).logprobs == -1
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(n=2, best_of=2).best_of == 2
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2).presence_penalty == -2.0


def test_zero_temperature_is_greedy_and_resets_truncation():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=10, min_p=0.3, seed=7)
    assert p.sampling_type is SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)


def test_tiny_positive_temperature_is_raised_like_vllm(caplog):
    with caplog.at_level(logging.WARNING):
        p = SamplingParams(temperature=1e-4)
    assert p.temperature == pytest.approx(1e-2)
    assert p.sampling_type is SamplingType.RANDOM
    assert "temperature" in caplog.text


def test_seed_makes_sampling_seeded_and_minus_one_means_no_seed():
    assert SamplingParams(seed=0).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-1).sampling_type is SamplingType.RANDOM


def test_stop_and_stop_token_ids_are_normalized_to_lists():
    p = SamplingParams(stop="###", stop_token_ids=(5, 9, 5))
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 9]
    assert p.all_stop_token_ids == {5, 9}
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]


def test_stop_strings_set_the_detokenizer_hold_back():
    assert SamplingParams(stop=["a", "abcd"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams().output_text_buffer_length == 0


def test_logprobs_true_means_one():
    assert SamplingParams(logprobs=True).logprobs == 1


def test_clone_is_independent():
    p = SamplingParams(stop=["x"], stop_token_ids=[3], temperature=0.5)
    q = p.clone()
    assert q == p
    q.stop.append("y")
    q.stop_token_ids.append(4)
    assert p.stop == ["x"] and p.stop_token_ids == [3]


def test_repr_names_the_parameters():
    text = repr(SamplingParams(temperature=0.25, top_k=7, max_tokens=99))
    assert text.startswith("SamplingParams(")
    assert "temperature=0.25" in text and "top_k=7" in text and "max_tokens=99" in text
