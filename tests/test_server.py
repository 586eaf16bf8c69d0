"""`plexus serve` driven over loopback HTTP by the official `openai` client and by raw httpx: vLLM's endpoints
and JSON, greedy output equal to offline LLM.generate / LLM.chat token for token, LoRA models, tokenize,
auth, every error status, disconnects that free their blocks, and overload that answers 503 without losing
an admitted request."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from plexus import SamplingParams
from plexus.lora.request import LoRARequest

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colours: red,"]


@pytest.fixture(scope="module")
def adapter(smollm_dir, tmp_path_factory):
    from test_lora import make_adapter

    return make_adapter(smollm_dir, tmp_path_factory.mktemp("server-lora") / "smol-qv", 3, r=8, lora_alpha=32,
                        target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def server(start_server, adapter):
    return start_server(["--api-key", KEY, "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
                         "--lora-modules", f"smol-qv={adapter}", "--served-model-name", "smol", "smol-alias"],
                        environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})


@pytest.fixture(scope="module")
def client(server):
    return server.openai(api_key=KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def offline(llm, prompts, **params):
    outputs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
    return [o.outputs[0] for o in outputs]


def sse_events(response: httpx.Response) -> list:
    """The data of each server-sent event; the last must be [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---------------------------------------------------------------------------- completions and chat

def test_greedy_completions_equal_offline_generate_token_for_token(client, server, llm_fp32):
    expected = offline(llm_fp32, PROMPTS, temperature=0, max_tokens=20)
    got = client.completions.create(model="smol", prompt=PROMPTS, max_tokens=20, temperature=0, logprobs=0)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for choice, want in zip(got.choices, expected):
        assert choice.text == want.text
        assert choice.finish_reason == want.finish_reason
        assert len(choice.logprobs.tokens) == len(want.token_ids)
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in expected)
    assert got.usage.prompt_tokens == sum(len(llm_fp32.get_tokenizer().encode(p)) for p in PROMPTS)
    assert got.model == "smol" and got.object == "text_completion" and got.id.startswith("cmpl-")


def test_token_id_prompts_and_logprobs_match_offline(client, llm_fp32):
    ids = llm_fp32.get_tokenizer().encode("Water boils at")
    want = llm_fp32.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8, logprobs=2),
                             use_tqdm=False)[0].outputs[0]
    got = client.completions.create(model="smol", prompt=ids, max_tokens=8, temperature=0, logprobs=2).choices[0]
    assert got.text == want.text
    for position, (token_id, lp) in enumerate(zip(want.token_ids, got.logprobs.token_logprobs)):
        assert lp == pytest.approx(want.logprobs[position][token_id].logprob, abs=1e-4)
    assert all(1 <= len(top) <= 3 for top in got.logprobs.top_logprobs)
    offsets = got.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_streamed_completion_is_the_same_text_and_ends_with_usage_and_done(server, http, llm_fp32):
    [want] = offline(llm_fp32, [PROMPTS[2]], temperature=0, max_tokens=24)
    with http.stream("POST", "/v1/completions", json={
            "model": "smol", "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    pieces = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert len(pieces) > 3 and "".join(pieces) == want.text
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 24


def test_chat_equals_offline_chat_streamed_or_not(client, llm_fp32):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    want = llm_fp32.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(model="smol", messages=messages, max_completion_tokens=16, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # Text content parts are joined as vLLM does.
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]
    assert client.chat.completions.create(model="smol", messages=parts, max_tokens=4, temperature=0).choices[0]


def test_chat_logprobs_have_openais_shape_and_offline_values(client, llm_fp32):
    messages = [{"role": "user", "content": "Say hello."}]
    want = llm_fp32.chat(messages, SamplingParams(temperature=0, max_tokens=6, logprobs=3),
                         use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(model="smol", messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3).choices[0]
    content = got.logprobs.content
    assert len(content) == len(want.token_ids)
    for entry, token_id, offline_lp in zip(content, want.token_ids, want.logprobs):
        assert entry.logprob == pytest.approx(offline_lp[token_id].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert bytes(entry.bytes).decode() == entry.token


def test_sampling_fields_n_seed_stop_penalties_and_vllm_extras(client, llm_fp32):
    params = dict(n=2, temperature=0.9, top_p=0.9, seed=11, max_tokens=12)
    want = llm_fp32.generate(PROMPTS[0], SamplingParams(**params), use_tqdm=False)[0].outputs
    got = client.completions.create(model="smol", prompt=PROMPTS[0], **params)
    assert [c.text for c in got.choices] == [w.text for w in want]
    # vLLM's extra fields ride in extra_body.
    extra = dict(top_k=5, min_p=0.05, repetition_penalty=1.3, min_tokens=4, ignore_eos=True)
    want = llm_fp32.generate(PROMPTS[3], SamplingParams(temperature=0.7, seed=3, max_tokens=10, **extra),
                             use_tqdm=False)[0].outputs[0]
    got = client.completions.create(model="smol", prompt=PROMPTS[3], temperature=0.7, seed=3, max_tokens=10,
                                    extra_body=extra).choices[0]
    assert got.text == want.text
    # stop strings end the text, and stop_reason names the string
    [full] = offline(llm_fp32, [PROMPTS[1]], temperature=0, max_tokens=20)
    stop = full.text.strip()[3:6]
    got = client.completions.create(model="smol", prompt=PROMPTS[1], temperature=0, max_tokens=20, stop=[stop])
    assert stop not in got.choices[0].text and got.choices[0].finish_reason == "stop"
    assert got.choices[0].model_extra["stop_reason"] == stop
    # echo puts the prompt in front; logit_bias can force a token
    got = client.completions.create(model="smol", prompt=PROMPTS[0], temperature=0, max_tokens=3, echo=True)
    assert got.choices[0].text.startswith(PROMPTS[0])
    forced = llm_fp32.get_tokenizer().encode(" banana")[0]
    got = client.completions.create(model="smol", prompt=PROMPTS[0], temperature=0, max_tokens=2,
                                    logit_bias={str(forced): 100})
    assert got.choices[0].text.startswith(" banana")
    # best_of: n of the candidates come back
    got = client.completions.create(model="smol", prompt=PROMPTS[0], temperature=1.0, max_tokens=4, n=1, best_of=3,
                                    seed=1)
    assert len(got.choices) == 1


# ---------------------------------------------------------------------------- models, LoRA, tokenize

def test_models_lists_every_name_and_each_lora_module(client, adapter):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"smol", "smol-alias", "smol-qv"}
    assert cards["smol-qv"].model_extra["root"] == adapter
    assert cards["smol-qv"].model_extra["parent"] == "smol"


def test_a_lora_module_is_selected_by_model_and_equals_offline(client, smollm_dir, adapter):
    from plexus import LLM

    llm = LLM(model=str(smollm_dir), dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_space=0.1,
              max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=12)
    want = llm.generate(PROMPTS[:2], params, lora_request=LoRARequest("smol-qv", 7, adapter), use_tqdm=False)
    base = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    got = client.completions.create(model="smol-qv", prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.text for c in got.choices] == [w.outputs[0].text for w in want]
    assert [c.text for c in got.choices] != [b.outputs[0].text for b in base]
    got = client.completions.create(model="smol-alias", prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.text for c in got.choices] == [b.outputs[0].text for b in base]


def test_lora_adapters_load_and_unload_at_runtime(client, http, adapter):
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime", "lora_path": adapter})
    assert response.status_code == 200, response.text
    assert "runtime" in {m.id for m in client.models.list().data}
    assert client.completions.create(model="runtime", prompt="Hi", max_tokens=2, temperature=0).choices
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime", "lora_path": adapter})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": "/nonexistent/adapter"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime"}).status_code == 200
    assert "runtime" not in {m.id for m in client.models.list().data}
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime"})
    assert gone.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="runtime", prompt="Hi", max_tokens=2)


def test_tokenize_and_detokenize_agree_with_the_tokenizer(http, smollm_tokenizer):
    text = "Hello, plexus! ünïcode"
    got = http.post("/tokenize", json={"prompt": text}).json()
    assert got["tokens"] == smollm_tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": got["tokens"]}).json()["prompt"] == smollm_tokenizer.decode(
        got["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    rendered = smollm_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == smollm_tokenizer.encode(rendered, add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400


def test_health_ping_version_and_metrics_names(server, client, http):
    assert http.get("/health").status_code == 200
    assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200
    assert http.get("/version").json()["version"]
    client.completions.create(model="smol-qv", prompt="Hi", max_tokens=3, temperature=0)
    metrics = server.metrics()
    names = {key.split("{")[0] for key in metrics}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:lora_requests_info"):
        assert name in names, name
    assert metrics["vllm:request_success_total{finished_reason=length}"] >= 1
    text = http.get("/metrics").text
    assert 'model_name="smol"' in text and 'engine="0"' in text and "max_lora=\"2\"" in text


# ---------------------------------------------------------------------------- errors

def test_api_key_is_required_on_v1_only(server):
    with httpx.Client(base_url=server.url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = anonymous.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == 401
        assert anonymous.get("/health").status_code == 200
        assert anonymous.post("/tokenize", json={"prompt": "a"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").models.list()


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 2, "temperature": 0}, 400, "n"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": "word " * 1100}, 400, "prompt"),
    ({"prompt": [10 ** 8]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "guided_decoding_backend": "outlines"}, 400, "guided_decoding_backend"),
    ({"prompt": "x", "seed": 2 ** 70}, 400, "seed"),
])
def test_bad_completion_requests_get_openais_error_shape_naming_the_field(http, body, status, param):
    response = http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] and error["message"]
    assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize("content, status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400), (b"", 400),
    (json.dumps({"messages": "hi"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10 ** 6}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 5}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}).encode(), 400),
])
def test_malformed_chat_bodies_are_4xx_and_the_server_keeps_answering(http, client, content, status):
    response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == status
    assert client.completions.create(model="smol", prompt="a", max_tokens=1).choices


def test_a_huge_body_is_413_before_it_is_read(http):
    response = http.post("/v1/completions", content=b"{" + b" " * (33 * 1024 * 1024) + b"}",
                         headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------------------- disconnects and overload

def _engine_idle(server) -> None:
    server.wait_idle()
    assert server.engine.engine.kv_cache.usage() == 0.0


def test_a_stream_closed_mid_way_aborts_its_request_and_frees_its_blocks(server, http):
    before = server.metrics().get("vllm:request_success_total{finished_reason=abort}", 0)
    with http.stream("POST", "/v1/completions", json={"model": "smol", "prompt": PROMPTS[0], "max_tokens": 900,
                                                       "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    _engine_idle(server)
    assert server.metrics()["vllm:request_success_total{finished_reason=abort}"] == before + 1
    assert server.metrics()["vllm:kv_cache_usage_perc"] == 0.0


def test_a_client_gone_before_its_first_token_aborts_its_request(server):
    import socket
    import time

    before = server.metrics().get("vllm:request_success_total{finished_reason=abort}", 0)
    prompt = " ".join(["word"] * 900)          # a long prefill: the client leaves before the first token
    for stream in (False, True):
        server.wait_idle()
        body = json.dumps({"model": "smol", "prompt": prompt, "max_tokens": 100, "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.time() + 10
            while not server.engine.engine.has_unfinished_requests() and time.time() < deadline:
                time.sleep(0.005)
        # closed: no output was read
    _engine_idle(server)
    assert server.metrics()["vllm:request_success_total{finished_reason=abort}"] == before + 2


def test_a_burst_over_max_num_queued_requests_gets_503s_and_every_admitted_request_completes(start_server,
                                                                                           llm_fp32):
    small = start_server(["--max-num-queued-requests", "2", "--max-num-seqs", "2"])

    async def burst():
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as c:
            bodies = [{"prompt": PROMPTS[i % 4], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
                      for i in range(16)]
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= 4
    want = {p: o.text for p, o in zip(PROMPTS, offline(llm_fp32, PROMPTS, temperature=0, max_tokens=24,
                                                          ignore_eos=True))}
    for i, response in enumerate(responses):
        if response.status_code == 503:
            assert response.json()["error"]["type"] == "ServiceUnavailableError"
        else:
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] == "length" and choice["text"] == want[PROMPTS[i % 4]]
    small.wait_idle()
    metrics = small.metrics()
    assert metrics["vllm:request_success_total{finished_reason=length}"] == statuses.count(200)


# ---------------------------------------------------------------------------- structured outputs

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_json_schema_output_parses_and_validates(client):
    import jsonschema

    for stream in (False, True):
        kwargs = dict(model="smol", messages=[{"role": "user", "content": "Describe a person as JSON."}],
                      max_tokens=60, temperature=0,
                      response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                stream=True, **kwargs) if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
    choice = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        max_tokens=100, temperature=0, response_format={"type": "json_object"}).choices[0]
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


def test_guided_regex_choice_and_structured_outputs_fields_on_completions(client):
    import re

    got = client.completions.create(model="smol", prompt="An email address: ", max_tokens=30, temperature=0,
                                    extra_body={"guided_regex": r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"})
    assert re.fullmatch(r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)", got.choices[0].text)
    assert got.choices[0].finish_reason == "stop"
    choices = ["sunny", "rainy", "cloudy"]
    got = client.completions.create(model="smol", prompt="The weather today is", max_tokens=10, n=3,
                                    temperature=1.0, seed=5, extra_body={"guided_choice": choices})
    assert all(c.text in choices for c in got.choices)
    got = client.completions.create(model="smol", prompt="Pick a digit:", max_tokens=5, temperature=0,
                                    extra_body={"structured_outputs": {"regex": "[0-9]"}})
    assert re.fullmatch("[0-9]", got.choices[0].text)


def test_structured_output_equals_offline_structured_output(client, llm_fp32):
    from plexus.sampling_params import StructuredOutputsParams

    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=PERSON))
    want = llm_fp32.generate("A person as JSON:", params, use_tqdm=False)[0].outputs[0].text
    got = client.completions.create(model="smol", prompt="A person as JSON:", max_tokens=60, temperature=0,
                                    extra_body={"guided_json": PERSON}).choices[0].text
    assert got == want


@pytest.mark.parametrize("extra, param", [
    ({"guided_json": "{not a schema"}, "structured_outputs"),
    ({"guided_regex": "(unclosed"}, "structured_outputs"),
    ({"guided_choice": []}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
])
def test_bad_structured_output_requests_are_400(http, extra, param):
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


# ---------------------------------------------------------------------------- vLLM's client examples

@pytest.mark.parametrize("example, argv", [
    ("openai_completion_client.py", []), ("openai_completion_client.py", ["--stream"]),
    ("openai_chat_completion_client.py", []), ("openai_chat_completion_client.py", ["--stream"]),
    ("structured_outputs.py", []),
])
def test_vllms_client_examples_run_against_the_server(server, monkeypatch, capsys, example, argv):
    import runpy
    import sys
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "online_serving" / example
    monkeypatch.setattr(sys, "argv", [str(path), "--base-url", server.url + "/v1", "--api-key", KEY, *argv])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "results" in out or "json:" in out
    if example == "structured_outputs.py":
        lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        assert lines["choice"] in ("positive", "negative")
        assert lines["grammar"].startswith("SELECT col_")


# ---------------------------------------------------------------------------- the engine loop on its own

def test_async_llm_engine_generate_is_vllms_async_iterator(server, llm_fp32):
    from plexus import AsyncLLMEngine

    engine = server.engine
    assert isinstance(engine, AsyncLLMEngine)
    want = offline(llm_fp32, PROMPTS, temperature=0, max_tokens=10)

    async def one(i: int, prompt: str) -> list:
        outputs = []
        async for output in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10), f"async-{i}"):
            outputs.append(output)
        return outputs

    async def leave_early() -> int:
        seen = 0
        async for _ in engine.generate(PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True), "async-leave"):
            seen += 1
            if seen == 3:
                break
        return seen

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)), leave_early())

    *results, seen = asyncio.run(main())
    for outputs, expected in zip(results, want):
        assert outputs[-1].finished and outputs[-1].outputs[0].text == expected.text
        # CUMULATIVE (the default): each output holds everything so far
        assert [len(o.outputs[0].token_ids) for o in outputs] == list(range(1, len(outputs) + 1))
    assert seen == 3
    server.wait_idle()
    assert engine.engine.kv_cache.usage() == 0.0

    async def duplicate():
        first = engine.generate("a", SamplingParams(max_tokens=50, ignore_eos=True), "dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate("b", SamplingParams(max_tokens=1), "dup").__anext__()
        await first.aclose()

    asyncio.run(duplicate())
    server.wait_idle()


# ---------------------------------------------------------------------------- the command line

def test_serve_flags_are_vllms_and_bad_ones_fail_before_the_model_loads(tmp_path, capsys):
    from plexus.entrypoints.cli import build_parser, main
    from plexus.entrypoints.openai.api_server import engine_args_from, settings_from_args

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    args = build_parser().parse_args([
        "serve", "some/model", "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "a", "b",
        "--enable-lora", "--lora-modules", "x=/adapters/x", '{"name": "y", "path": "/adapters/y"}',
        "--max-loras", "2", "--max-lora-rank", "32", "--chat-template", str(template), "--seed", "3",
        "--max_num_seqs", "8", "--max-num-queued-requests", "5", "--uvicorn-log-level", "warning",
        "--disable-log-requests", "--override-neuron-config", '{"cast_logits_dtype": "bfloat16"}',
        "--tensor-parallel-size", "1", "--quantization", "int8", "--max-model-len", "512"])
    settings = settings_from_args(args, {"VLLM_API_KEY": "from-env"})
    engine_args = engine_args_from(args)
    assert engine_args.model == "some/model" and engine_args.served_model_name == ["a", "b"]
    assert engine_args.max_num_seqs == 8 and engine_args.max_loras == 2 and engine_args.max_lora_rank == 32
    assert engine_args.override_neuron_config == {"cast_logits_dtype": "bfloat16"}
    assert settings.api_key == "from-env" and settings.port == 8123 and settings.max_num_queued_requests == 5
    assert settings.chat_template.startswith("{% for") and settings.lora_modules[1].startswith("{")
    assert settings_from_args(args, {"PLEXUS_API_KEY": "p"}).api_key == "p"

    for argv, message in ((["--lora-modules", "x=/a"], "--lora-modules needs --enable-lora"),
                          (["--enable-lora", "--lora-modules", "no-equals-sign"], "expected name=path"),
                          (["--chat-template", str(tmp_path / "missing.jinja")], "--chat-template"),
                          (["--max-num-queued-requests", "-1"], "--max-num-queued-requests"),
                          (["--max-num-seqs", "0"], "max_num_seqs")):
        assert main(["serve", *argv]) == 2
        assert message in capsys.readouterr().err


def test_the_server_runs_the_neuron_platform_through_its_cpu_reference_backend(start_server, llm_fp32):
    """The same server over the Neuron engine (its runner over the CPU implementation of the compiled graphs):
    greedy output equals the CPU platform's."""
    neuron = start_server(["--device", "neuron", "--max-model-len", "256", "--max-num-seqs", "4",
                           "--override-neuron-config", '{"backend": "cpu-reference"}'])
    want = offline(llm_fp32, PROMPTS, temperature=0, max_tokens=12)
    client = neuron.openai()
    got = client.completions.create(model=neuron.model, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in got.choices] == [w.text for w in want]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=neuron.model, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == want[0].text
