"""The executor backends: "mp" (the worker in its own process) gives the same tokens as "uni" (the worker in
this process), refuses what cannot cross to its worker before the request joins a batch, and turns a worker
that dies or hangs into an error naming its rank within a bounded time, never a hang; the server answers 503."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from plexus import LLM, SamplingParams
from plexus.core.executor import WorkerDiedError

SETTINGS = dict(dtype="float32", max_model_len=512, kv_cache_space=0.1, max_num_batched_tokens=24,
                enable_prefix_caching=True, enable_chunked_prefill=True)
SYSTEM = "You are a careful assistant who answers in one short sentence, without any preamble. "
PROMPTS = [SYSTEM + q for q in ("The capital of France is", "Water boils at", "def fibonacci(n):",
                                "The largest planet is", "Once upon a time", "The speed of light is",
                                "import numpy as np", "My favourite colour is")]


@pytest.fixture(scope="module")
def uni():
    return LLM(**SETTINGS, distributed_executor_backend="uni")


@pytest.fixture(scope="module")
def mp():
    llm = LLM(**SETTINGS, distributed_executor_backend="mp")
    yield llm
    llm.llm_engine.shutdown()


def _tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_mp_worker_runs_in_another_process(mp):
    (pid,) = mp.collective_rpc(lambda worker: os.getpid())      # vLLM's LLM.collective_rpc
    assert pid != os.getpid() and pid == mp.llm_engine.executor.workers[0].process.pid


def test_mp_greedy_fp32_is_token_identical_to_uni_with_prefix_caching_and_chunked_prefill(uni, mp):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = _tokens(uni, PROMPTS, params)
    assert _tokens(mp, PROMPTS, params) == expected
    # Again: the shared system prompt now comes from the prefix cache (24-token chunks cover it in 2+ steps).
    again = mp.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens >= 16 for o in again)


def test_mp_seeded_sampling_and_logprobs_equal_uni(uni, mp):
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=6, logprobs=2) for i in range(3)]
    a, b = uni.generate(PROMPTS[:3], params, use_tqdm=False), mp.generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    for x, y in zip(a, b):
        assert [sorted(d) for d in x.outputs[0].logprobs] == [sorted(d) for d in y.outputs[0].logprobs]


def _ban_token_13(output_ids, logits):
    logits[13] = -float("inf")
    return logits


def test_mp_logits_processors_cross_by_cloudpickle_and_unpicklable_ones_are_refused_at_add_request(uni, mp):
    ban = SamplingParams(temperature=0, max_tokens=8, logits_processors=[lambda ids, logits: _ban_token_13(ids, logits)])
    assert _tokens(mp, PROMPTS[:2], ban) == _tokens(uni, PROMPTS[:2], ban)

    lock = threading.Lock()

    def holds_a_lock(ids, logits):
        with lock:
            return logits

    with pytest.raises(ValueError, match="logits processor .* cannot be sent to the worker processes.*'mp'"):
        mp.generate(PROMPTS[:1], SamplingParams(max_tokens=2, logits_processors=[holds_a_lock]), use_tqdm=False)
    assert not mp.llm_engine.has_unfinished_requests()
    # The in-process backend takes it as it is.
    assert len(_tokens(uni, PROMPTS[:1], SamplingParams(max_tokens=2, logits_processors=[holds_a_lock]))[0]) == 2


def test_mp_a_request_that_raises_in_the_worker_fails_alone(mp):
    def broken(ids, logits):
        raise ArithmeticError("broken processor")

    outputs = mp.generate(PROMPTS[:2], [SamplingParams(max_tokens=4, logits_processors=[broken]),
                                        SamplingParams(temperature=0, max_tokens=4)], use_tqdm=False)
    assert outputs[0].outputs[0].finish_reason == "error" and "broken processor" in outputs[0].outputs[0].stop_reason
    assert outputs[1].outputs[0].finish_reason == "length" and len(outputs[1].outputs[0].token_ids) == 4


def test_a_hung_worker_is_an_error_naming_its_rank_within_the_timeout():
    llm = LLM(**SETTINGS, distributed_executor_backend="mp")
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match="worker rank 0 did not answer .* within 1 s"):
        llm.llm_engine.collective_rpc(lambda worker: time.sleep(60), timeout=1)
    assert time.monotonic() - start < 15                 # 1 s, then up to 5 s for it to be ended
    assert llm.llm_engine.executor.workers[0].process.poll() is not None
    with pytest.raises(WorkerDiedError, match="rank 0"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)


def test_killing_the_worker_makes_generate_raise_naming_the_rank_within_30_s(mp):
    """Last in this module: it ends the shared mp engine."""
    pid = mp.llm_engine.executor.workers[0].process.pid
    results = {}

    def generate():
        try:
            mp.generate(PROMPTS, SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False)
        except Exception as error:  # noqa: BLE001
            results["error"] = error

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=30)
    assert not thread.is_alive(), "generate hung after its worker died"
    assert time.monotonic() - killed < 30
    assert isinstance(results.get("error"), WorkerDiedError)
    assert "worker rank 0" in str(results["error"]) and "exited with code -9" in str(results["error"])
    with pytest.raises(WorkerDiedError):
        mp.llm_engine.check_health()


def test_server_on_mp_answers_then_503_once_its_worker_is_gone(start_server):
    server = start_server(["--distributed-executor-backend", "mp"])
    client = server.openai()
    done = client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=4,
                                     temperature=0)
    assert done.choices[0].text
    assert httpx.get(server.url + "/health").status_code == 200
    os.kill(server.engine.engine.executor.workers[0].process.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 503
    response = httpx.post(server.url + "/v1/completions", json={"model": server.model, "prompt": "Hi",
                                                                 "max_tokens": 4}, timeout=30)
    assert response.status_code in (500, 503), response.text
    assert "rank 0" in response.text


def test_executor_backends_example_prints_identical_outputs(capsys):
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).parent.parent / "examples" / "offline_inference" / "executor_backends.py"),
                   run_name="__main__")
    assert "identical: True" in capsys.readouterr().out


def test_mp_lora_adapters_cross_to_the_worker_and_equal_uni(tmp_path):
    """Adapter weights travel with the step (StepInput.lora_loads) to the worker process: a batch mixing two
    adapters and the base gives the same tokens on mp as on uni."""
    import torch
    from test_lora import make_adapter
    from transformers import LlamaConfig, LlamaForCausalLM

    from plexus.lora.request import LoRARequest

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 initializer_range=0.2, tie_word_embeddings=False)).save_pretrained(tmp_path / "base")
    adapters = [LoRARequest(f"a{i}", i + 1, make_adapter(tmp_path / "base", tmp_path / f"a{i}", 20 + i, r=8,
                                                         lora_alpha=128, target_modules=targets))
                for i, targets in enumerate([["q_proj", "v_proj", "lm_head"], ["o_proj", "down_proj", "lm_head"]])]
    prompts = [{"prompt_token_ids": [5, 17, 33, 80, 9]}] * 3
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for backend in ("uni", "mp"):
        llm = LLM(model=str(tmp_path / "base"), skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.05,
                  enable_lora=True, max_loras=2, max_lora_rank=8, distributed_executor_backend=backend)
        outputs = llm.generate(prompts, params, lora_request=[adapters[0], adapters[1], None], use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outputs]
        llm.llm_engine.shutdown()
    assert tokens["mp"] == tokens["uni"]
    assert len({tuple(t) for t in tokens["uni"]}) == 3      # one prompt: each adapter changes its output
