"""Smaller corners of vLLM's API that its own tests and examples use: one priority for every prompt, the legacy
prompt_token_ids keyword, LLM.reset_prefix_cache, vLLM 0.6's beam-search sampling settings, bad_words on
SmolLM2, a truncated GGUF file, and `plexus quantize` with every default on the bundled model."""
from __future__ import annotations

import json
import logging

import pytest

from plexus import SamplingParams
from plexus.model_files.gguf import bundled_gguf_path

PROMPT = "Hello my name is Robert and I"     # vLLM's tests/v1/sample/test_sampling_params_e2e.py


def test_one_priority_applies_to_every_prompt(llm_fp32, monkeypatch):
    engine = llm_fp32.llm_engine
    seen = []
    add_request = engine.add_request

    def recording(*args, priority=0, **kwargs):
        seen.append(priority)
        return add_request(*args, priority=priority, **kwargs)

    monkeypatch.setattr(engine, "add_request", recording)
    outputs = llm_fp32.generate(["a", "b", "c"], SamplingParams(max_tokens=2), priority=1, use_tqdm=False)
    assert len(outputs) == 3 and seen == [1, 1, 1]
    llm_fp32.generate(["a", "b"], SamplingParams(max_tokens=2), priority=[3, 4], use_tqdm=False)
    assert seen[3:] == [3, 4]


@pytest.mark.parametrize("priority, message", [
    ([], "got 2 prompts but 0 priorities"),
    ([1, 2, 3], "got 2 prompts but 3 priorities"),
    ("high", "got 2 prompts but priority='high'"),
])
def test_a_priority_list_that_does_not_fit_is_refused(llm_fp32, priority, message):
    with pytest.raises(ValueError, match=message):
        llm_fp32.generate(["a", "b"], SamplingParams(max_tokens=2), priority=priority, use_tqdm=False)


def test_the_legacy_prompt_token_ids_keyword_warns_and_still_runs(llm_fp32):
    ids = llm_fp32.get_tokenizer().encode("The capital of France is")
    with pytest.warns(DeprecationWarning, match="prompt_token_ids= is deprecated"):
        legacy = llm_fp32.generate(prompt_token_ids=ids, sampling_params=SamplingParams(temperature=0, max_tokens=4),
                                   use_tqdm=False)
    modern = llm_fp32.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4),
                               use_tqdm=False)
    assert legacy[0].outputs[0].token_ids == modern[0].outputs[0].token_ids


def test_reset_prefix_cache_forgets_cached_prefixes(llm_fp32):
    prompt = "Prefix caching keeps the blocks of a prompt it has seen before, " * 3
    params = SamplingParams(temperature=0, max_tokens=1)
    llm_fp32.generate(prompt, params, use_tqdm=False)
    assert llm_fp32.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens >= 16
    assert llm_fp32.reset_prefix_cache() is True
    assert llm_fp32.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == 0


def test_vllm_06_beam_search_settings_point_to_llm_beam_search():
    # vLLM's old llm_engine_example.py
    with pytest.raises(ValueError, match=r"use_beam_search=True.*LLM\.beam_search\(prompts, BeamSearchParams\("
                                         r"beam_width=5, max_tokens=16, length_penalty=1.0\)\)"):
        SamplingParams(n=2, best_of=5, temperature=0.0, use_beam_search=True)
    with pytest.raises(ValueError, match="length_penalty and early_stopping apply to beam search only"):
        SamplingParams(length_penalty=0.8)
    with pytest.raises(ValueError, match="length_penalty and early_stopping apply to beam search only"):
        SamplingParams(early_stopping=True)
    params = SamplingParams(use_beam_search=False, length_penalty=1.0, early_stopping=False)
    assert (params.use_beam_search, params.length_penalty, params.early_stopping) == (False, 1.0, False)


def test_bad_words_follow_vllms_rule_on_smollm2(llm_fp32):
    """vLLM's test_bad_words bans the first two words of the greedy output, here "'m a", and asserts the text
    no longer contains them. vLLM's rule (SamplingParams.bad_words) is about tokens: a word's last token is
    banned right after its other tokens. SmolLM2 then writes "'m an", which has "'m a" as a substring though
    the tokens "'m", " a" never follow each other: vLLM 0.32's own bad-words code, run on this model, gives
    the same text token for token (checked once, with its functions read from the wheel)."""
    tokenizer = llm_fp32.get_tokenizer()
    greedy = SamplingParams(temperature=0)
    plain = llm_fp32.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0]
    banned = " ".join(plain.text.split()[:2])
    assert banned == "'m a" and plain.text.startswith("'m a 25")
    word = tokenizer.encode(banned, add_special_tokens=False)
    assert len(word) == 2
    out = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, bad_words=[banned]), use_tqdm=False)[0].outputs[0]
    pairs = list(zip(out.token_ids, out.token_ids[1:]))
    assert tuple(word) not in pairs
    assert out.text.startswith("'m an ")
    # The second half of vLLM's test: both words banned.
    last = out.text.split()[-1]
    both = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, bad_words=[banned, last]),
                             use_tqdm=False)[0].outputs[0]
    assert last not in both.text and tuple(word) not in list(zip(both.token_ids, both.token_ids[1:]))


@pytest.mark.parametrize("settings", [{}, {"dtype": "float32"}])
def test_a_truncated_gguf_file_is_named_in_the_error(tmp_path, monkeypatch, settings):
    from plexus import LLM

    monkeypatch.setenv("PLEXUS_CACHE_DIR", str(tmp_path / "cache"))
    data = bundled_gguf_path().read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ValueError, match=f"cannot read GGUF file {path}: it is truncated or damaged"):
        LLM(model=str(path), **settings)


def test_quantize_group_size_defaults_fit_the_model():
    from plexus.quantize import QuantizeConfig

    smollm = {"q_proj": (576, 576), "down_proj": (576, 1536)}
    assert QuantizeConfig(method="rtn").with_group_size(smollm).group_size == 64
    assert QuantizeConfig(method="rtn", bits=8).with_group_size(smollm).group_size == -1
    assert QuantizeConfig(method="rtn").with_group_size({"a": (8, 1024)}).group_size == 128
    assert QuantizeConfig(method="rtn", group_size=32).with_group_size(smollm).group_size == 32
    with pytest.raises(ValueError, match="none of 128, 64, 32 divides .* \\[576, 1000\\]"):
        QuantizeConfig(method="rtn").with_group_size({"a": (8, 576), "b": (8, 1000)})


def test_plexus_quantize_with_default_group_size_runs_on_the_bundled_model(tmp_path, caplog):
    from plexus.entrypoints.cli import main

    out = tmp_path / "w4"
    with caplog.at_level(logging.INFO, logger="plexus"):
        assert main(["quantize", "--method", "rtn", "--out", str(out)]) == 0
    assert "--group-size not given: 64 for 4-bit weights" in caplog.text
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (4, 64)
