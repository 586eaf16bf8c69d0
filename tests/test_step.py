"""The step boundary is plain data: a real step's input and output survive pickling, a second worker fed
the unpickled inputs computes the same tokens, and the core appends several tokens per step when the model
side returns them (stopping where a stop condition falls inside them)."""
from __future__ import annotations

import pickle

import pytest

from plexus import LLM, SamplingParams
from plexus.core.step import SamplingSettings, SequenceStep, StepInput, StepOutput, TokenLogprobs

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village"]


def _record_steps(engine) -> list[tuple[bytes, StepOutput]]:
    """Wrap the engine's executor so every step's input is pickled on its way to the model side."""
    recorded = []
    execute = engine.executor.execute_model

    def recording(step: StepInput) -> StepOutput:
        data = pickle.dumps(step)
        output = execute(step)
        recorded.append((data, output))
        return output

    engine.executor.execute_model = recording
    return recorded


@pytest.fixture(scope="module")
def two_engines():
    kwargs = dict(dtype="float32", max_model_len=256, kv_cache_space=0.05, max_num_batched_tokens=16)
    return LLM(**kwargs), LLM(**kwargs)


def test_a_second_worker_fed_unpickled_steps_computes_identical_tokens(two_engines):
    first, second = two_engines
    recorded = _record_steps(first.llm_engine)
    params = [SamplingParams(temperature=0, max_tokens=6, logprobs=2),
              SamplingParams(temperature=1.0, seed=7, max_tokens=6),        # seeded: (seed, offset) integers
              SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, min_tokens=3)]
    outputs = first.generate(PROMPTS, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outputs)
    # Chunked prefill (16 tokens a step), decodes, prompt logprobs and a seeded request all crossed the boundary.
    steps = [pickle.loads(data) for data, _ in recorded]
    assert any(s.start > 0 and s.num_tokens > 1 for step in steps for s in step.sequences)
    assert any(s.seed is not None and s.seed_offset > 0 for step in steps for s in step.sequences)
    assert any(s.banned_token_ids for step in steps for s in step.sequences)

    worker = second.llm_engine.executor.worker
    for (data, expected), step in zip(recorded, steps):
        replayed = worker.execute_model(pickle.loads(data))
        assert pickle.loads(pickle.dumps(replayed)) == replayed
        assert replayed.sampled == expected.sampled
        assert replayed.prompt_logprobs.keys() == expected.prompt_logprobs.keys()
        for rid, entries in expected.prompt_logprobs.items():
            assert [e.token_id for e in replayed.prompt_logprobs[rid]] == [e.token_id for e in entries]


def test_step_input_holds_no_live_objects(two_engines):
    first, _ = two_engines
    recorded = _record_steps(first.llm_engine)
    first.generate(PROMPTS[:1], SamplingParams(temperature=0.8, seed=1, max_tokens=2), use_tqdm=False)
    step = pickle.loads(recorded[0][0])
    assert isinstance(step.sequences[0], SequenceStep)
    for value in vars(step.sequences[0]).values():
        assert isinstance(value, (str, int, bool, list, SamplingSettings, type(None))), type(value)
    # The sampling settings are plain fields too: no SamplingParams (with its callables) crosses.
    for value in vars(step.sequences[0].params).values():
        assert isinstance(value, (str, int, float, bool, list, dict, type(None))), type(value)


class _MultiTokenWorker:
    """A model side that accepts k tokens per sampled sequence per step, from a fixed rule: the next token
    after t is rule(t). It checks that the core sends back exactly the tokens it returned, as the next
    step's new tokens (k of them), with the right start position."""

    def __init__(self, k: int, device) -> None:
        self.k, self.device = k, device
        self.pending: dict[str, list[int]] = {}
        self.chunk_sizes: list[int] = []

    @staticmethod
    def rule(token: int) -> int:
        return 200 + (token * 7 + 3) % 97

    def execute_model(self, step: StepInput) -> StepOutput:
        out = StepOutput()
        for s in step.sequences:
            if s.request_id in self.pending and s.start >= s.num_prompt_tokens:
                assert s.token_ids == self.pending[s.request_id]
                self.chunk_sizes.append(len(s.token_ids))
            if s.sample:
                tokens, last = [], s.token_ids[-1]
                for _ in range(self.k):
                    last = self.rule(last)
                    tokens.append(last)
                self.pending[s.request_id] = tokens
                out.sampled[s.request_id] = [TokenLogprobs(t, -0.5, None) for t in tokens]
        return out


def _expected(prompt_ids: list[int], n: int) -> list[int]:
    tokens, last = [], prompt_ids[-1]
    for _ in range(n):
        last = _MultiTokenWorker.rule(last)
        tokens.append(last)
    return tokens


@pytest.mark.parametrize("k", [1, 3])
def test_several_tokens_per_step_are_appended_and_stop_where_a_condition_falls(llm_fp32, monkeypatch, k):
    engine = llm_fp32.llm_engine
    worker = _MultiTokenWorker(k, engine.device)
    monkeypatch.setattr(engine.executor, "worker", worker)
    prompt = [1, 2, 3, 4, 5]
    expected = _expected(prompt, 12)
    stop_id = expected[7]
    assert stop_id not in expected[:7]
    outputs = llm_fp32.generate(
        [{"prompt_token_ids": prompt}] * 3,
        [SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0),   # max_tokens inside a chunk: cut at 10
         SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]),
         SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=9)],
        use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == expected[:10]
    assert outputs[0].outputs[0].finish_reason == "length"
    assert outputs[1].outputs[0].token_ids == expected[:8]        # the stop token ends it, later ones dropped
    assert outputs[1].outputs[0].finish_reason == "stop" and outputs[1].outputs[0].stop_reason == stop_id
    assert outputs[2].outputs[0].token_ids == expected[:12]       # min_tokens: the stop id does not stop it
    assert outputs[0].outputs[0].cumulative_logprob == pytest.approx(-0.5 * 10)
    # After the first sample, each step computes the k tokens the previous one accepted.
    assert worker.chunk_sizes and set(worker.chunk_sizes) == {k}
