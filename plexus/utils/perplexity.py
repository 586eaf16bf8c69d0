"""Perplexity of a text under an engine: how quantization methods are compared (benchmarks/quantized.py,
tests/test_quantized_checkpoints.py), on the fixed text plexus ships (plexus/data/perplexity.txt)."""
from __future__ import annotations

import math
import pathlib

TEXT = pathlib.Path(__file__).resolve().parent.parent / "data" / "perplexity.txt"


def default_text() -> str:
    return TEXT.read_text(encoding="utf-8")


def perplexity(llm, text: str | None = None, window: int = 512, max_windows: int | None = None) -> float:
    """exp of the mean negative log-likelihood of `text`'s tokens (the shipped text by default), scored in
    consecutive windows of `window` tokens that each start afresh (the first token of a window is context
    only), all windows in one batch. max_windows: score only the first ones (for quick checks)."""
    from plexus.sampling_params import SamplingParams

    ids = llm.get_tokenizer()(text if text is not None else default_text(), add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1][:max_windows]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, output in zip(windows, outputs):
        for token, entry in zip(w[1:], output.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            count += 1
    return math.exp(nll / count)
