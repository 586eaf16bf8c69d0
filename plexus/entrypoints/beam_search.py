"""LLM.beam_search, as vLLM runs it: one engine step of one token for every live beam, expanded by the
2 x beam_width most likely next tokens (and the sampled one), the beam_width best kept by their
length-penalized cumulative logprob. A beam that reaches EOS is complete; the prefix cache keeps every
step's shared prompt work cheap. The result's sequences hold prompt and generated tokens, as vLLM's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plexus.core.outputs import Logprob
from plexus.core.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    tokens: list[int]                          # prompt + generated
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)   # one dict per generated token
    lora_request: Any = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The best beam_width sequences of one prompt, best first."""
    sequences: list[BeamSearchSequence]


def beam_search_score(tokens: list[int], cumulative_logprob: float, eos_token_id: int | None,
                      length_penalty: float = 1.0) -> float:
    """vLLM's (and transformers') score: the cumulative logprob over the length, EOS not counted, raised to
    length_penalty."""
    seq_len = len(tokens)
    if eos_token_id is not None and tokens and tokens[-1] == eos_token_id:
        seq_len -= 1
    return cumulative_logprob / (max(seq_len, 1) ** length_penalty)


def run_beam_search(llm, prompts: Any, params: BeamSearchParams, use_tqdm: bool = False,
                    lora_request: Any = None) -> list[BeamSearchOutput]:
    """lora_request: one LoRARequest (or None) for every prompt, or a list with one per prompt."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    engine = llm.llm_engine
    tokenizer = engine.get_tokenizer()
    eos = tokenizer.eos_token_id if tokenizer is not None else min(engine.eos_token_ids, default=None)
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]

    def key(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    width = params.beam_width
    step_params = SamplingParams(logprobs=2 * width, max_tokens=1, temperature=params.temperature,
                                 ignore_eos=params.ignore_eos, detokenize=False)
    loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
    if len(loras) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(loras)} lora_requests; pass one or one per prompt")
    instances = []
    for prompt, lora in zip(prompts, loras):
        _, ids = engine.inputs.tokenize(prompt)      # validated as any prompt is
        instances.append(([BeamSearchSequence(tokens=ids, lora_request=lora)], []))   # (live beams, completed)
    for _ in range(params.max_tokens):
        live = [beam for beams, _ in instances for beam in beams]
        if not live:
            break
        outputs = llm.generate([{"prompt_token_ids": beam.tokens} for beam in live], step_params,
                               use_tqdm=use_tqdm, lora_request=[beam.lora_request for beam in live])
        results = iter(outputs)
        for index, (beams, completed) in enumerate(instances):
            candidates = []
            for beam in beams:
                logprobs = next(results).outputs[0].logprobs[0]
                for token, logprob in logprobs.items():
                    new = BeamSearchSequence(tokens=beam.tokens + [token], logprobs=beam.logprobs + [logprobs],
                                             cum_logprob=beam.cum_logprob + logprob.logprob,
                                             lora_request=beam.lora_request)
                    if token == eos and not params.ignore_eos:
                        new.finish_reason, new.stop_reason = "stop", None
                        completed.append(new)
                    else:
                        candidates.append(new)
            instances[index] = (sorted(candidates, key=key, reverse=True)[:width], completed)
    results = []
    for beams, completed in instances:
        for beam in beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(completed + beams, key=key, reverse=True)[:width]
        if tokenizer is not None:
            for beam in best:
                beam.text = tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results
