"""Structured outputs (vLLM's StructuredOutputsParams / GuidedDecodingParams) on xgrammar: the output of the
real model follows the JSON schema, regex, choice, grammar or JSON object it was given, greedy and sampled;
the sampler's mask is checked against a hand-made expectation; bad constraints are refused up front, naming
the field, and never take a batch down."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from plexus import LLM, EngineArgs, SamplingParams
from plexus.core.sampler import Sampler, SamplingMetadata, apply_token_bitmask
from plexus.sampling_params import GuidedDecodingParams, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
}
PERSON_PROMPT = "Describe a person as JSON with their name, age and pets."
SQL_GRAMMAR = """
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""
SQL_REGEX = r"SELECT col_[12]  from table_[12]  where col_[12] = [12] "
EMAIL = r"[a-z]{2,12}@[a-z]{2,10}\.com"


def conforms_to_person(value) -> bool:
    """PERSON's rules, checked by hand (independently of xgrammar)."""
    return (isinstance(value, dict) and set(value) == {"name", "age", "pets"}
            and isinstance(value["name"], str) and len(value["name"]) <= 16
            and isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 120
            and isinstance(value["pets"], list) and len(value["pets"]) <= 3
            and all(p in ("cat", "dog", "fish") for p in value["pets"]))


def generate(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def eos(llm) -> int:
    return llm.get_tokenizer().eos_token_id


# ------------------------------------------------------------------ the real model follows each constraint


def test_json_schema_greedy_output_parses_and_conforms(llm_fp32):
    out = generate(llm_fp32, PERSON_PROMPT, temperature=0, max_tokens=200,
                   structured_outputs=StructuredOutputsParams(json=PERSON)).outputs[0]
    assert conforms_to_person(json.loads(out.text))
    # The grammar ends at the closing brace, where only EOS may follow: a normal stop.
    assert (out.finish_reason, out.stop_reason, out.token_ids[-1]) == ("stop", None, eos(llm_fp32))


def test_json_schema_as_text_sampled_n2_without_whitespace(llm_fp32):
    outputs = generate(llm_fp32, PERSON_PROMPT, n=2, temperature=1.0, seed=7, max_tokens=200,
                       structured_outputs=StructuredOutputsParams(json=json.dumps(PERSON),
                                                                  disable_any_whitespace=True)).outputs
    assert len(outputs) == 2
    for out in outputs:
        value = json.loads(out.text)
        assert conforms_to_person(value) and out.finish_reason == "stop"
        assert out.text == json.dumps(value)       # compact: json.dumps's separators, no other whitespace


def test_regex_output_matches_in_full(llm_fp32):
    prompt = "Generate an email address for Alan Turing, who works in Enigma. Example result: alan@enigma.com"
    for params in (dict(temperature=0), dict(temperature=1.0, seed=3, n=2)):
        for out in generate(llm_fp32, prompt, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(regex=EMAIL), **params).outputs:
            assert re.fullmatch(EMAIL, out.text) and out.finish_reason == "stop"


def test_choice_output_is_one_of_the_choices(llm_fp32):
    choices = ["Positive", "Negative", 'Mixed "both"\n']
    for params in (dict(temperature=0), dict(temperature=1.5, seed=1, n=2)):
        for out in generate(llm_fp32, "Classify this sentiment: plexus is wonderful!", max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=choices), **params).outputs:
            assert out.text in choices and out.finish_reason == "stop"


def test_ebnf_grammar_output_is_in_the_language(llm_fp32):
    prompt = "Generate an SQL query to show the 'username' and 'email' from the 'users' table."
    for params in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        out = generate(llm_fp32, prompt, max_tokens=40, structured_outputs=StructuredOutputsParams(grammar=SQL_GRAMMAR),
                       **params).outputs[0]
        assert re.fullmatch(SQL_REGEX, out.text) and out.finish_reason == "stop"


def test_json_object_output_is_a_json_object(llm_fp32):
    out = generate(llm_fp32, "Describe a cat as a JSON object.", temperature=0, max_tokens=100,
                   structured_outputs=StructuredOutputsParams(json_object=True)).outputs[0]
    assert isinstance(json.loads(out.text), dict) and out.finish_reason == "stop"


def test_structural_tag_in_vllms_older_form(llm_fp32):
    """Free text until a trigger; after <answer> the schema's JSON and </answer> must follow."""
    tag = {"type": "structural_tag", "triggers": ["<answer>"],
           "structures": [{"begin": "<answer>", "schema": {"type": "object", "properties": {
               "sum": {"type": "integer"}}, "required": ["sum"]}, "end": "</answer>"}]}
    prompt = '<answer>{"sum": 4}</answer> is the answer to 2+2. Now 2 + 3: <answer>'
    free = generate(llm_fp32, prompt, temperature=0, max_tokens=40).outputs[0]
    out = generate(llm_fp32, prompt, temperature=0, max_tokens=40,
                   structured_outputs=StructuredOutputsParams(structural_tag=json.dumps(tag))).outputs[0]
    tagged = r'<answer>\{\s*"sum"\s*:\s*-?\d+\s*\}</answer>'
    assert "<answer>" in free.text and not re.search(tagged, free.text)     # the model alone writes no JSON
    assert re.search(tagged, out.text) and out.text.count("<answer>") == len(re.findall(tagged, out.text))


def test_guided_decoding_is_vllms_older_name_for_the_same_thing(llm_fp32):
    prompt = "Classify this sentiment: plexus is wonderful!"
    new = generate(llm_fp32, prompt, temperature=0, max_tokens=60,
                   structured_outputs=StructuredOutputsParams(json=PERSON))
    old = generate(llm_fp32, prompt, temperature=0, max_tokens=60,
                   guided_decoding=GuidedDecodingParams(json=PERSON, backend="xgrammar"))
    as_dict = generate(llm_fp32, prompt, temperature=0, max_tokens=60, guided_decoding={"json": PERSON})
    assert old.outputs[0].token_ids == new.outputs[0].token_ids == as_dict.outputs[0].token_ids


def test_constrained_and_free_requests_share_a_batch(llm_fp32):
    free_prompt = "The capital of France is"
    alone = generate(llm_fp32, free_prompt, temperature=0, max_tokens=24).outputs[0]
    constrained = SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(regex=EMAIL))
    outputs = llm_fp32.generate([free_prompt, "An email address for Alan:", free_prompt, "Email of Ada:"],
                                [SamplingParams(temperature=0, max_tokens=24), constrained,
                                 SamplingParams(temperature=0, max_tokens=24), constrained], use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == outputs[2].outputs[0].token_ids == alone.token_ids
    assert not re.fullmatch(EMAIL, alone.text)
    assert re.fullmatch(EMAIL, outputs[1].outputs[0].text) and re.fullmatch(EMAIL, outputs[3].outputs[0].text)


def test_logprobs_are_those_of_the_constrained_distribution_as_in_vllm(llm_fp32):
    """vLLM applies the grammar's bitmask to the logits before its sampler, so a constrained request's
    logprobs renormalize over the tokens the grammar allows: here the tokens that begin a choice."""
    tokenizer = llm_fp32.get_tokenizer()
    prompt, choices = "Classify this sentiment: plexus is wonderful!", ["Positive", "Negative"]
    free = generate(llm_fp32, prompt, temperature=0, max_tokens=1, logprobs=20).outputs[0].logprobs[0]
    out = generate(llm_fp32, prompt, temperature=0, max_tokens=5, logprobs=5,
                   structured_outputs=StructuredOutputsParams(choice=choices)).outputs[0]
    first = out.logprobs[0]
    finite = {t: lp.logprob for t, lp in first.items() if math.isfinite(lp.logprob)}
    assert finite and all(any(c.startswith(tokenizer.decode([t])) for c in choices) for t in finite)
    assert sum(math.exp(v) for v in finite.values()) <= 1.0 + 1e-5
    token = out.token_ids[0]
    if token in free:       # renormalized over fewer tokens, its logprob rises
        assert finite[token] > free[token].logprob


# ------------------------------------------------------------------ how the grammar's end meets EOS settings


def test_ignore_eos_still_ends_where_the_grammar_ends(llm_fp32):
    """Only EOS may follow a complete grammar; with ignore_eos the EOS does not stop the request, but the
    grammar has terminated, so the request stops there all the same (finish_reason "stop")."""
    out = generate(llm_fp32, "Classify this sentiment: plexus is wonderful!", temperature=0, max_tokens=20,
                   ignore_eos=True, structured_outputs=StructuredOutputsParams(choice=["Positive", "Negative"]))
    out = out.outputs[0]
    assert out.text in ("Positive", "Negative")
    assert (out.finish_reason, out.stop_reason, out.token_ids[-1]) == ("stop", None, eos(llm_fp32))


def test_min_tokens_yields_to_a_grammar_that_can_only_end(llm_fp32):
    """min_tokens bans EOS, but a complete choice allows nothing else: the grammar's end wins."""
    out = generate(llm_fp32, "Classify this sentiment: plexus is wonderful!", temperature=0, max_tokens=20,
                   min_tokens=15, structured_outputs=StructuredOutputsParams(choice=["Positive", "Negative"]))
    out = out.outputs[0]
    assert out.text in ("Positive", "Negative") and len(out.token_ids) < 15
    assert (out.finish_reason, out.token_ids[-1]) == ("stop", eos(llm_fp32))


def test_min_tokens_lengthens_a_grammar_that_may_go_on(llm_fp32):
    """While the grammar allows more than EOS, min_tokens holds EOS back, as it does without a grammar."""
    digits = r"[0-9]{1,30}"
    out = generate(llm_fp32, "Pick a number:", temperature=0, max_tokens=40, min_tokens=12,
                   structured_outputs=StructuredOutputsParams(regex=digits)).outputs[0]
    assert re.fullmatch(digits, out.text) and len(out.token_ids) >= 12


def test_max_tokens_cuts_a_constrained_output_as_any_other(llm_fp32):
    out = generate(llm_fp32, PERSON_PROMPT, temperature=0, max_tokens=5,
                   structured_outputs=StructuredOutputsParams(json=PERSON)).outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.text.startswith("{")


def test_preemption_and_chunked_prefill_keep_the_grammar(llm_fp32):
    """A tiny KV cache preempts (recompute) and chunked prefill splits prompts; each sequence's matcher keeps
    its place, so the greedy outputs are those of the roomy engine."""
    prompts = [f"Person number {i} from a long list of people: " + "and so on, " * 12 + PERSON_PROMPT
               for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=PERSON))
    small = LLM(dtype="float32", max_model_len=1024, num_gpu_blocks_override=24, max_num_batched_tokens=32)
    tight = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    roomy = llm_fp32.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    for out in tight:
        assert out.outputs[0].finish_reason == "length" or conforms_to_person(json.loads(out.outputs[0].text))


# ------------------------------------------------------------------ the sampler's mask


def bitmask_for(allowed: set[int], vocab_size: int) -> np.ndarray:
    """xgrammar's layout, written out: bit t % 32 of int32 word t // 32 set for each allowed token t."""
    words = [0] * math.ceil(vocab_size / 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return np.array([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=np.int32)


def test_bitmask_puts_every_token_it_does_not_allow_at_minus_infinity():
    vocab = 70                               # three words, the last one partly past the vocabulary
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    allowed = {0: {2, 31, 32, 63, 69}, 2: {5}}     # row 1 has no constraint
    masks = {row: bitmask_for(ids, vocab) for row, ids in allowed.items()}
    out = apply_token_bitmask(logits, torch.from_numpy(np.stack([masks[0], masks[2]])), torch.tensor([0, 2]))
    for row in range(3):
        for t in range(vocab):
            keep = row not in allowed or t in allowed[row]
            assert out[row, t].item() == (logits[row, t].item() if keep else -math.inf)
    assert logits.isfinite().all()           # the caller's logits are left alone
    import xgrammar                          # its own CPU kernel agrees
    theirs = logits.clone()
    full = np.stack([masks[0], np.full_like(masks[0], -1), masks[2]])      # row 1: every bit set
    xgrammar.apply_token_bitmask_inplace(theirs, torch.from_numpy(full), vocab_size=vocab)
    assert torch.equal(theirs, out)


def test_tokens_past_the_bitmask_are_never_allowed():
    logits = torch.zeros(1, 40)
    logits[0, 39] = 5.0                       # the best token lies past the one 32-bit word given
    out = apply_token_bitmask(logits, torch.from_numpy(bitmask_for({3}, 32)[None]), torch.tensor([0]))
    assert out[0].isfinite().nonzero().flatten().tolist() == [3]


def test_sampler_draws_from_the_allowed_tokens_in_proportion_and_reports_their_logprobs():
    from scipy.stats import chisquare

    vocab, rows = 50, 4000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1))
    logits[3] = 10.0                          # the model's favourite, which the grammar forbids
    allowed = [7, 13, 40]
    logits[allowed] = torch.tensor([1.0, 0.2, 0.7])
    params = [SamplingParams(temperature=1.0, logprobs=1)] * rows + [SamplingParams(temperature=0, logprobs=1)] * 2
    mask = bitmask_for(set(allowed), vocab)
    meta = SamplingMetadata.build(params, [[]] * (rows + 2), [[]] * (rows + 2), [None] * (rows + 2),
                                  [[]] * (rows + 2), vocab, "cpu", token_bitmasks=[mask] * (rows + 1) + [None])
    out = Sampler()(logits.expand(rows + 2, -1).contiguous(), meta, torch.Generator().manual_seed(0))
    tokens = out.sampled_token_ids.tolist()
    # numpy's expectation: softmax over the allowed tokens only.
    p = np.exp(np.array([1.0, 0.2, 0.7]) - 1.0)
    p /= p.sum()
    counts = [tokens[:rows].count(t) for t in allowed]
    assert sum(counts) == rows and chisquare(counts, p * rows).pvalue > 1e-3
    assert tokens[rows:] == [7, 3]            # greedy: the best allowed token; the free row keeps its favourite
    for row, token in ((0, tokens[0]), (rows, 7)):
        assert math.isclose(out.sampled_logprobs[row].item(), math.log(p[allowed.index(token)]), rel_tol=1e-5)
        assert out.topk_token_ids[row, 0].item() == 7
    assert math.isclose(out.sampled_logprobs[rows + 1].item(), torch.log_softmax(logits, 0)[3].item(), rel_tol=1e-5)


# ------------------------------------------------------------------ bad input, refused up front


@pytest.mark.parametrize("make, message", [
    (lambda: StructuredOutputsParams(json=PERSON, regex="a"),
     r"^You can only use one kind of structured outputs constraint but multiple are specified: json, regex"),
    (lambda: StructuredOutputsParams(),
     r"^You must use one kind of structured outputs constraint but none are specified"),
    (lambda: StructuredOutputsParams(choice=[]), r"^structured_outputs\.choice must not be empty"),
    (lambda: StructuredOutputsParams(choice="yes"), r"^structured_outputs\.choice must be a list of strings"),
    (lambda: StructuredOutputsParams(json="{not json"), r"^structured_outputs\.json: invalid JSON schema"),
    (lambda: StructuredOutputsParams(json=42), r"^structured_outputs\.json must be a JSON schema"),
    (lambda: StructuredOutputsParams(json_object=False), r"^structured_outputs\.json_object must be True"),
    (lambda: StructuredOutputsParams(regex="a+", whitespace_pattern=r"\s*"),
     r"^structured_outputs\.whitespace_pattern is not supported"),
    (lambda: GuidedDecodingParams(regex="a", backend="outlines"),
     r"^guided_decoding\.backend='outlines' is not supported.*allowed: None, auto, xgrammar"),
    (lambda: GuidedDecodingParams(regex="a", json="{}"), r"multiple are specified: json, regex \(guided_decoding\)"),
    (lambda: SamplingParams(structured_outputs=object()), r"^structured_outputs must be a StructuredOutputsParams"),
    (lambda: SamplingParams(guided_decoding={"regex": "a", "schema": 1}),
     r"^guided_decoding: unknown fields \['schema'\]"),
    (lambda: SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"),
                            guided_decoding=GuidedDecodingParams(regex="b")),
     r"^guided_decoding and structured_outputs are both set and differ"),
], ids=["two-kinds", "no-kind", "empty-choice", "choice-str", "json-text", "json-type", "json-object-false",
        "whitespace-pattern", "backend", "guided-two-kinds", "not-params", "unknown-key", "both-differ"])
def test_bad_constraints_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("constraint, message", [
    (dict(json={"type": "frobnicate"}), r"^structured_outputs\.json: invalid JSON schema: Unsupported type"),
    (dict(json={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
     r"^structured_outputs\.json: invalid JSON schema"),
    (dict(regex="(abc"), r"^structured_outputs\.regex: invalid regular expression: .*parenthesis is not closed"),
    (dict(grammar='root ::= item\n'), r"^structured_outputs\.grammar: invalid EBNF grammar: .*\"item\" is not defined"),
    (dict(grammar='root ::= "a'), r"^structured_outputs\.grammar: invalid EBNF grammar"),
    (dict(structural_tag="{}"), r"^structured_outputs\.structural_tag: invalid structural tag"),
    (dict(structural_tag='{"structures": [{"begin": "<a>"}], "triggers": ["<a"]}'),
     r"^structured_outputs\.structural_tag: invalid structural tag: missing key 'schema'"),
], ids=["schema-type", "schema-ref", "regex", "grammar-rule", "grammar-literal", "tag", "tag-key"])
def test_invalid_constraints_are_refused_by_add_request_without_a_trace(llm_fp32, constraint, message):
    engine = llm_fp32.llm_engine
    with pytest.raises(ValueError, match=message) as info:
        engine.add_request("bad", "Hi", SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)))
    assert "/project/cpp" not in str(info.value) and info.value.__cause__ is None
    assert not engine.has_unfinished_requests()


def test_a_bad_request_does_not_take_down_the_good_ones(llm_fp32):
    engine = llm_fp32.llm_engine
    engine.add_request("choice", "Classify this sentiment: plexus is wonderful!",
                       SamplingParams(temperature=0, max_tokens=8,
                                      structured_outputs=StructuredOutputsParams(choice=["Positive", "Negative"])))
    with pytest.raises(ValueError, match=r"structured_outputs\.regex"):
        engine.add_request("bad", "Hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-")))

    # A logits processor that forces a token the grammar forbids (it runs after the mask): the grammar
    # refuses the token and that request alone fails.
    def force_x(output_ids, logits):
        logits[55] = 1e4
        return logits
    engine.add_request("forced", "Hi", SamplingParams(temperature=0, max_tokens=8, logits_processors=[force_x],
                                                      structured_outputs=StructuredOutputsParams(regex="[0-9]+")))
    engine.add_request("free", "The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0]
    assert set(finished) == {"choice", "forced", "free"}
    assert finished["choice"].text in ("Positive", "Negative") and finished["choice"].finish_reason == "stop"
    assert finished["forced"].finish_reason == "error" and "grammar does not accept" in finished["forced"].stop_reason
    assert finished["free"].finish_reason == "length"


def test_engine_backends_other_than_xgrammar_are_refused_by_name():
    for kwargs, message in [
        (dict(structured_outputs_config={"backend": "guidance"}),
         r"structured_outputs_config\.backend='guidance' is not supported.*allowed: auto, xgrammar"),
        (dict(guided_decoding_backend="lm-format-enforcer"),
         r"guided_decoding_backend='lm-format-enforcer' is not supported"),
        (dict(structured_outputs_config={"reasoning_parser": "deepseek_r1"}), r"reasoning parsers"),
        (dict(structured_outputs_config={"whitespace": 1}),
         r"structured_outputs_config: unknown keys \['whitespace'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            EngineArgs(**kwargs).create_engine_config()


def test_engine_wide_disable_any_whitespace_compacts_every_requests_json(smollm_tokenizer):
    from plexus.core.config import StructuredOutputsConfig
    from plexus.core.structured_output import StructuredOutputManager

    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=PERSON))
    for config, spaced_ok in [(StructuredOutputsConfig(), True),
                              (StructuredOutputsConfig(disable_any_whitespace=True), False)]:
        manager = StructuredOutputManager(config, smollm_tokenizer, 49152, frozenset({2}))
        grammar = manager.compile(params)
        compact, spaced = manager.matcher(grammar), manager.matcher(grammar)
        assert compact.accept_string('{"name": "Al", "age": 3, "pets": []}') and compact.is_completed()
        assert spaced.accept_string('{ "name": "Al",\n  "age": 3, "pets": []}') == spaced_ok


def test_an_engine_without_a_tokenizer_refuses_structured_outputs():
    from plexus.core.config import StructuredOutputsConfig
    from plexus.core.structured_output import StructuredOutputManager

    manager = StructuredOutputManager(StructuredOutputsConfig(), None, 49152, frozenset({2}))
    assert manager.compile(SamplingParams()) is None
    with pytest.raises(ValueError, match="^structured_outputs needs the tokenizer.*skip_tokenizer_init=True"):
        manager.compile(SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"])))


def test_structured_outputs_config_from_the_command_line():
    from plexus.utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--structured-outputs-config.backend", "xgrammar",
                              "--structured_outputs_config.disable_any_whitespace",
                              "--guided-decoding-backend", "auto"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.structured_outputs_config == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert "structured_outputs_config.backend" not in vars(args)          # LLM(**vars(args)) keeps working
    args = parser.parse_args(["--structured-outputs-config", '{"backend": "auto"}'])
    assert EngineArgs.from_cli_args(args).structured_outputs_config == {"backend": "auto"}
