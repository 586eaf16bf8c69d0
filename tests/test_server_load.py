"""The server under load and under fuzzing, over loopback HTTP.

Load: 1,000 requests at 64 concurrency with mixed prompt and output lengths, a fifth streaming, a tenth
leaving early (mid-stream, or before reading anything). Every request that stays gets a complete answer
equal to offline LLM.generate (greedy) or of the asked length (seeded sampling); afterwards the KV cache is
empty and /metrics adds up to what was sent.

Fuzz: schemathesis generates bodies from the server's own OpenAPI schema for every operation (bounded in
examples and time); no answer is a 5xx and the server keeps answering."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from plexus import SamplingParams

NUM_REQUESTS = 1000
CONCURRENCY = 64
MAX_TOKENS = (1, 4, 8, 16, 24)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(["--served-model-name", "smol"])


def _prompts(tokenizer) -> list[str]:
    """16 prompts from 4 to ~200 tokens."""
    from importlib.resources import files

    text = files("plexus").joinpath("data/perplexity.txt").read_text(encoding="utf-8")
    words = text.split()
    rng = random.Random(1)
    prompts = []
    for i in range(16):
        length = [3, 10, 30, 80, 160][i % 5]
        start = rng.randrange(0, len(words) - length)
        prompts.append(" ".join(words[start:start + length]))
    return prompts


def test_a_thousand_mixed_requests_all_complete_correctly_and_metrics_add_up(server, llm_fp32):
    tokenizer = llm_fp32.get_tokenizer()
    prompts = _prompts(tokenizer)
    reference = {}
    combos = [(p, k) for p in prompts for k in MAX_TOKENS]
    outputs = llm_fp32.generate([p for p, _ in combos], [SamplingParams(temperature=0, max_tokens=k)
                                                          for _, k in combos], use_tqdm=False)
    for (p, k), out in zip(combos, outputs):
        reference[(p, k)] = out.outputs[0]

    rng = random.Random(0)
    plan = []
    for i in range(NUM_REQUESTS):
        prompt, max_tokens = rng.choice(prompts), rng.choice(MAX_TOKENS)
        sampled = rng.random() < 0.25
        plan.append(dict(prompt=prompt, max_tokens=max_tokens, stream=i % 5 == 0,
                         leave=("mid-stream" if i % 20 == 0 else "early") if i % 10 == 0 else None,
                         sampled=sampled, seed=i))

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, item: dict) -> dict:
        body = {"model": "smol", "prompt": item["prompt"], "max_tokens": item["max_tokens"]}
        body.update({"temperature": 0.8, "seed": item["seed"]} if item["sampled"] else {"temperature": 0})
        if item["leave"] == "mid-stream":
            body.update(max_tokens=200, ignore_eos=True, stream=True)
        elif item["stream"]:
            body.update(stream=True, stream_options={"include_usage": True})
        async with gate:
            if item["leave"] == "early":
                # Leave once the response has started (so the request was surely admitted), reading nothing.
                async with client.stream("POST", "/v1/completions",
                                         json={**body, "max_tokens": 200, "ignore_eos": True, "stream": True}):
                    pass
                return {"left": True}
            if body.get("stream"):
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    text, finish, usage, events = "", None, None, 0
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if item["leave"] == "mid-stream" and events == 2:
                            return {"left": True}          # leaving the block closes the connection
                        events += 1
                        data = line[6:]
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        for choice in chunk["choices"]:
                            text += choice["text"]
                            finish = choice["finish_reason"] or finish
                        usage = chunk.get("usage") or usage
                    return {"text": text, "finish_reason": finish, "usage": usage}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            data = response.json()
            return {"text": data["choices"][0]["text"], "finish_reason": data["choices"][0]["finish_reason"],
                    "usage": data["usage"]}

    async def run() -> list[dict]:
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, gate, item) for item in plan))

    results = asyncio.run(run())
    server.wait_idle()

    completed_prompt = all_prompt = completed_generated = 0
    for item, result in zip(plan, results):
        prompt_len = len(tokenizer.encode(item["prompt"]))
        all_prompt += prompt_len
        if result.get("left"):
            continue
        usage = result["usage"]
        assert usage["prompt_tokens"] == prompt_len
        completed_prompt += prompt_len
        completed_generated += usage["completion_tokens"]
        want = reference[(item["prompt"], item["max_tokens"])]
        if item["sampled"]:
            assert result["finish_reason"] in ("stop", "length")
            assert usage["completion_tokens"] == item["max_tokens"] or result["finish_reason"] == "stop"
        else:
            assert result["text"] == want.text, item
            assert result["finish_reason"] == want.finish_reason
            assert usage["completion_tokens"] == len(want.token_ids)

    assert server.engine.engine.kv_cache.usage() == 0.0
    metrics = server.metrics()
    assert metrics["vllm:kv_cache_usage_perc"] == 0.0
    assert metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0
    finished = {reason: metrics.get(f"vllm:request_success_total{{finished_reason={reason}}}", 0)
                for reason in ("stop", "length", "abort", "error")}
    left = sum(1 for r in results if r.get("left"))
    assert sum(finished.values()) == NUM_REQUESTS, finished
    assert finished["error"] == 0 and finished["abort"] <= left
    assert finished["stop"] + finished["length"] >= NUM_REQUESTS - left
    assert completed_prompt <= metrics["vllm:prompt_tokens_total"] <= all_prompt
    assert completed_generated <= metrics["vllm:generation_tokens_total"] <= completed_generated + left * 200
    assert metrics["vllm:e2e_request_latency_seconds_count"] == NUM_REQUESTS
    assert metrics["vllm:time_to_first_token_seconds_count"] >= NUM_REQUESTS - left
    assert metrics["vllm:prefix_cache_hits_total"] > 0


@pytest.fixture(scope="module")
def fuzzed(start_server):
    return start_server(["--max-model-len", "256", "--max-num-seqs", "8", "--enable-lora", "--max-lora-rank", "8"],
                        environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})


def test_fuzzing_the_openapi_schema_finds_no_5xx(fuzzed):
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize",
                                               "/detokenize", "/v1/load_lora_adapter", "/health", "/metrics"}
    statuses: dict[str, set[int]] = {}
    for op in operations:
        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def call(case):
            try:
                response = case.call(base_url=fuzzed.url, timeout=3)
            except requests.exceptions.Timeout:      # a long generation: leaving aborts it
                return
            statuses.setdefault(op.path, set()).add(response.status_code)
            assert response.status_code < 500, (op.path, case.body, response.text)

        call()
    assert any(400 <= s < 500 for s in statuses["/v1/completions"])
    fuzzed.wait_idle(timeout=120)
    assert fuzzed.engine.engine.kv_cache.usage() == 0.0
    assert httpx.get(fuzzed.url + "/health").status_code == 200
    good = httpx.post(fuzzed.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3


def test_valid_random_bodies_all_get_complete_answers(fuzzed):
    """Bodies drawn from the valid ranges (any printable unicode prompt, sampling settings, stop strings, logprobs, n,
    streaming or not) all get a 200 with a complete, consistent answer."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    printable = st.characters(blacklist_categories=("Cc", "Cs"))   # a lone control character tokenizes to nothing
    body = st.fixed_dictionaries({"prompt": st.text(printable, min_size=1, max_size=60),
                                  "max_tokens": st.integers(1, 8)}, optional={
        "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.05, 1.0), "top_k": st.sampled_from([-1, 1, 5, 50]),
        "min_p": st.floats(0.0, 0.5), "seed": st.integers(0, 2 ** 31), "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2.0),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "logprobs": st.integers(0, 5),
        "echo": st.booleans(), "ignore_eos": st.booleans(), "stream": st.booleans(),
        "skip_special_tokens": st.booleans(), "min_tokens": st.integers(0, 1)})

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=body, n=st.integers(1, 3))
    def call(body, n):
        if body.get("temperature", 1.0) > 1e-5:
            body["n"] = n
        with httpx.Client(base_url=fuzzed.url, timeout=60) as client:
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, (body, response.text)
            if body.get("stream"):
                events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]
                            if c["finish_reason"]]
                assert len(finishes) == body.get("n", 1)
            else:
                data = response.json()
                assert len(data["choices"]) == body.get("n", 1)
                assert all(c["finish_reason"] in ("stop", "length") for c in data["choices"])
                assert data["usage"]["completion_tokens"] <= body["max_tokens"] * body.get("n", 1)

    call()
    fuzzed.wait_idle()
