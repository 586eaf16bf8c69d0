"""Shared, expensive fixtures: the bundled model is converted, loaded by HF
(the outside truth) and by plexus once per test session."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm_dir():
    from plexus.model_files import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def hf_smollm():
    """SmolLM2 as transformers loads it from the GGUF file itself, in fp32."""
    from transformers import AutoModelForCausalLM

    from plexus.model_files.gguf import bundled_gguf_path

    path = bundled_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def llm_fp32():
    """One fp32 plexus engine on the bundled model, shared by tests that don't need special settings."""
    from plexus import LLM

    return LLM(dtype="float32", max_model_len=1024, kv_cache_space=0.25)


class RunningServer:
    """`plexus serve` on a loopback port, in this process (uvicorn in a thread): the real HTTP server, with the
    app, the engine loop and the Prometheus registry reachable for checks."""

    def __init__(self, argv: list[str], environ: dict | None = None) -> None:
        import socket
        import threading
        import time

        import uvicorn

        from plexus.entrypoints.openai.api_server import (
            build_server, engine_args_from, make_arg_parser, settings_from_args, uvicorn_config)

        args = make_arg_parser().parse_args(argv)
        self.server = build_server(engine_args_from(args), settings_from_args(args, environ or {}))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.uvicorn = uvicorn.Server(uvicorn_config(self.server, host="127.0.0.1", port=self.port,
                                                     log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.uvicorn.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = self.server.engine
        self.model = self.server.serving.model_name

    def openai(self, api_key: str = "unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        """/metrics as {name{labels}: value}, fetched over HTTP."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics").text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                                  if k not in ("model_name", "engine"))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def wait_idle(self, timeout: float = 60.0) -> None:
        import time

        engine = self.engine.engine
        deadline = time.time() + timeout
        while engine.has_unfinished_requests() or self.engine.get_num_unfinished_requests():
            if time.time() > deadline:
                raise AssertionError(f"the engine still has {engine.get_num_unfinished_requests()} requests")
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown()


SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-space", "0.25", "--disable-log-stats",
               "--seed", "0"]


@pytest.fixture(scope="session")
def start_server():
    """start_server(extra argv, environ) -> a RunningServer on the bundled model in fp32 (the settings of
    llm_fp32, so greedy output can be compared with it); every server is stopped at the end of the session."""
    servers = []

    def start(argv: list[str] = (), environ: dict | None = None) -> RunningServer:
        server = RunningServer([*SERVER_ARGS, *argv], environ)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
