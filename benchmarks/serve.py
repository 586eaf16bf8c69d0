"""plexus's OpenAI server against llama.cpp's OpenAI-compatible server under the same load.

Both servers serve the same BF16 GGUF (the bundled SmolLM2-135M-Instruct requantized by
common.llamacpp_gguf, which plexus loads as is) with 2 threads, each in its own subprocess on
a loopback port, one at a time:

- plexus-bf16:   `python -m plexus.entrypoints.cli serve FILE.gguf --dtype bfloat16
                 --no-enable-prefix-caching ...` (OMP_NUM_THREADS=2);
- llamacpp-bf16: `python -m llama_cpp.server --model FILE.gguf --n_threads 2 --n_threads_batch 2
                 --logits_all False --interrupt_requests False ...` (llama-cpp-python's server;
                 it has no parallel slots and runs one request at a time).

The load generator (asyncio + httpx, in this process) sends a fixed seeded list of requests as
an open-loop Poisson process at each request rate of a sweep (the same arrival pattern scaled
to the rate; "inf" sends all at once). Prompts are text: seeded slices of
plexus/data/perplexity.txt, 32..512 tokens; outputs are 16..128 tokens, greedy, every request
streamed (SSE) and forced to its exact length (plexus: `ignore_eos`; llama.cpp: a -1e9
`logit_bias` on every end-of-generation token). Per request: TTFT (send to first non-empty
text chunk), inter-token latencies (gaps between text chunks), end-to-end latency. Per system
and rate: request throughput, output tok/s, TTFT and ITL p50/p90/p99, e2e p50.

By default the two systems are interleaved: for each rate one fresh server of each runs the
requests (the order alternates between rates), so slow drifts of the machine hit both.

    .venv/bin/python benchmarks/serve.py                         # results/serve.json
    .venv/bin/python benchmarks/serve.py --quick                 # smoke test (~1 minute)
    .venv/bin/python benchmarks/serve.py --rates 1,inf --num-requests 16 --systems plexus-bf16
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    LLAMACPP_BF16,
    NUM_THREADS,
    PLEXUS,
    REPO,
    SEED,
    Metric,
    ensure_peers,
    limit_threads,
    machine_info,
    prepare_models,
    print_machine,
    quiet_llama_cpp,
    run_isolated,
    write_results,
)

SERVE_SYSTEMS = (PLEXUS, LLAMACPP_BF16)
TEXT = REPO / "plexus" / "data" / "perplexity.txt"
HOST = "127.0.0.1"
MAX_MODEL_LEN = 1024          # both servers' context: the longest prompt + output is 640 tokens
STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Settings:
    num_requests: int = 20        # llama.cpp's server takes ~3 s a request: 5 rates x 20 ~ 5 minutes of it
    rates: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, float("inf"))     # requests per second
    prompt_range: tuple[int, int] = (32, 512)       # tokens, inclusive
    output_range: tuple[int, int] = (16, 128)       # tokens, inclusive
    warmup_tokens: int = 8


QUICK = Settings(num_requests=4, rates=(8.0, float("inf")), prompt_range=(16, 64), output_range=(4, 16),
                 warmup_tokens=4)

METRICS = (
    Metric("request_rate", "req/s", higher_is_better=True, fmt="{:.2f}"),
    Metric("output_tps", "out tok/s", higher_is_better=True),
    Metric("ttft_p50_ms", "TTFT p50 (ms)", higher_is_better=False, fmt="{:.0f}"),
    Metric("ttft_p90_ms", "TTFT p90 (ms)", higher_is_better=False, fmt="{:.0f}"),
    Metric("ttft_p99_ms", "TTFT p99 (ms)", higher_is_better=False, fmt="{:.0f}"),
    Metric("itl_p50_ms", "ITL p50 (ms)", higher_is_better=False),
    Metric("itl_p90_ms", "ITL p90 (ms)", higher_is_better=False),
    Metric("itl_p99_ms", "ITL p99 (ms)", higher_is_better=False),
    Metric("e2e_p50_s", "e2e p50 (s)", higher_is_better=False, fmt="{:.2f}"),
)


# ---------------------------------------------------------------- requests

@dataclass(frozen=True)
class TextRequest:
    prompt: str
    prompt_tokens: int           # by the model's tokenizer (each server's own count is checked too)
    max_tokens: int
    arrival: float               # unit-rate Poisson arrival time (s); divided by the request rate


def make_requests(settings: Settings, hf_dir: str, seed: int = SEED) -> list[TextRequest]:
    """Seeded text prompts: slices of plexus/data/perplexity.txt of 32..512 tokens, decoded to text."""
    import numpy as np
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(pathlib.Path(hf_dir) / "tokenizer.json"))
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False).ids
    rng = np.random.default_rng(seed)
    n = settings.num_requests
    prompt_lengths = rng.integers(settings.prompt_range[0], settings.prompt_range[1] + 1, n)
    output_lengths = rng.integers(settings.output_range[0], settings.output_range[1] + 1, n)
    gaps = rng.exponential(1.0, n)
    arrivals = np.cumsum(gaps) - gaps[0]              # the first request at t = 0
    requests = []
    for length, max_tokens, arrival in zip(prompt_lengths, output_lengths, arrivals):
        start = int(rng.integers(0, len(ids) - length + 1))
        text = tokenizer.decode(ids[start:start + int(length)])
        count = len(tokenizer.encode(text, add_special_tokens=False).ids)
        requests.append(TextRequest(text, count, int(max_tokens), float(arrival)))
    return requests


def warmup_requests(settings: Settings, requests: Sequence[TextRequest]) -> list[TextRequest]:
    """A long and a short prompt, then four at once. Never a measured prompt's prefix (llama.cpp keeps
    the previous prompt's KV and reuses a common prefix)."""
    longest = max(requests, key=lambda r: r.prompt_tokens)
    shortest = min(requests, key=lambda r: r.prompt_tokens)
    return [TextRequest(f"Warm-up {i}: " + r.prompt, r.prompt_tokens, settings.warmup_tokens, 0.0)
            for i, r in enumerate([longest, shortest, *requests[:4]])]


def end_of_generation_tokens(gguf: str) -> list[int]:
    """The token ids llama.cpp stops on (llama_vocab_is_eog); runs in a child process."""
    import llama_cpp

    quiet_llama_cpp()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    eog = [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    llama_cpp.llama_model_free(model)
    return eog


# ---------------------------------------------------------------- servers

@dataclass
class ServerSpec:
    system: str
    command: list[str]
    ready_path: str              # polled until 200
    tokenize: str                # how to count prompt tokens: "plexus" (/tokenize) or "llamacpp" (/extras/tokenize)
    extra_body: dict[str, Any]   # added to every completion request


def server_spec(system: str, gguf: str, port: int, eog: Sequence[int]) -> ServerSpec:
    if system == PLEXUS:
        return ServerSpec(system, [
            sys.executable, "-m", "plexus.entrypoints.cli", "serve", gguf, "--dtype", "bfloat16",
            "--host", HOST, "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
            "--no-enable-prefix-caching",       # the same prompts come back at every rate
            "--disable-log-stats", "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"],
            "/health", "plexus", {"ignore_eos": True, "stream_options": {"include_usage": True}})
    return ServerSpec(system, [
        sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", HOST, "--port", str(port),
        "--n_threads", str(NUM_THREADS), "--n_threads_batch", str(NUM_THREADS), "--n_ctx", str(MAX_MODEL_LEN),
        "--n_batch", "512", "--n_ubatch", "512",
        "--flash_attn", "False",                # its server's default; True (llama.cpp's auto) was slower here
        "--logits_all", "False",                # its server's default (True) computes logits for every prompt token
        "--interrupt_requests", "False",        # default True: a new request cuts the streaming one short
        "--verbose", "False"],
        "/v1/models", "llamacpp",               # llama-cpp-python's server has no /health
        {"repeat_penalty": 1.0,                 # its server's default is 1.1
         "logit_bias": {str(t): -1e9 for t in eog}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """One server subprocess: started, waited on, stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, spec: ServerSpec, port: int, log_dir: pathlib.Path) -> None:
        self.spec, self.port = spec, port
        self.base_url = f"http://{HOST}:{port}"
        self.log_path = log_dir / f"{spec.system}-{port}.log"
        self.process: subprocess.Popen | None = None
        self.startup_s = 0.0
        self.model = ""              # the id /v1/models gives: both servers check the request's "model"

    def start(self) -> None:
        import httpx

        env = dict(os.environ)
        env.update({var: str(NUM_THREADS) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.spec.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=REPO, start_new_session=True)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.system} server exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.base_url + self.spec.ready_path, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > STARTUP_TIMEOUT_S:
                self.stop()
                raise RuntimeError(f"{self.spec.system} server not ready after {STARTUP_TIMEOUT_S:.0f} s:\n"
                                   + self.log_tail())
            time.sleep(0.25)
        self.startup_s = time.perf_counter() - t0
        self.model = httpx.get(self.base_url + "/v1/models", timeout=10.0).json()["data"][0]["id"]

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ---------------------------------------------------------------- load generator

async def stream_one(client: Any, server: Server, request: TextRequest, send_at: float, t0: float) -> dict[str, Any]:
    """Send one streamed completion at t0 + send_at; time its chunks."""
    delay = t0 + send_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {"model": server.model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0.0,
            "stream": True, **server.spec.extra_body}
    sent = time.perf_counter()
    chunk_times: list[float] = []
    text: list[str] = []
    row: dict[str, Any] = {"max_tokens": request.max_tokens, "late_s": sent - (t0 + send_at), "status": None,
                           "finish_reason": None, "usage_tokens": None, "done": False, "error": None}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            row["status"] = response.status_code
            if response.status_code != 200:
                row["error"] = (await response.aread()).decode(errors="replace")[:500]
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue                        # blank separators, ": ping" comments
                    data = line[5:].strip()
                    if data == "[DONE]":
                        row["done"] = True
                        break
                    now = time.perf_counter()
                    event = json.loads(data)
                    if "error" in event:
                        row["error"] = json.dumps(event["error"])[:500]
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            chunk_times.append(now)
                            text.append(choice["text"])
                        if choice.get("finish_reason"):
                            row["finish_reason"] = choice["finish_reason"]
                    if event.get("usage"):
                        row["usage_tokens"] = event["usage"].get("completion_tokens")
    except Exception as exc:  # noqa: BLE001  (a broken request is recorded, not fatal)
        row["error"] = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    row.update(sent_s=sent - t0, end_s=end - t0, e2e_s=end - sent, chunks=len(chunk_times),
               ttft_s=chunk_times[0] - sent if chunk_times else None,
               itl_s=[b - a for a, b in itertools.pairwise(chunk_times)])
    # Exactly max_tokens tokens: plexus reports them (usage); llama.cpp's stream has no usage, but it
    # ends with finish_reason "length" only when it has generated max_tokens tokens (an end-of-generation
    # token gives "stop"), and it sends at most one text chunk per token.
    row["tokens_ok"] = (row["status"] == 200 and row["done"] and row["error"] is None
                        and row["finish_reason"] == "length" and 0 < row["chunks"] <= request.max_tokens
                        and row["usage_tokens"] == (request.max_tokens if "stream_options" in body else None))
    row["text"] = "".join(text)
    return row


async def run_load(server: Server, requests: Sequence[TextRequest], rate: float) -> tuple[list[dict], float]:
    """All requests at their Poisson arrival times for `rate`; returns the rows and the wall time
    (first send to last response end)."""
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(None), limits=limits) as client:
        t0 = time.perf_counter() + 0.05
        rows = await asyncio.gather(*(stream_one(client, server, r, 0.0 if rate == float("inf") else r.arrival / rate,
                                                 t0) for r in requests))
    wall = max(r["end_s"] for r in rows) - min(r["sent_s"] for r in rows)
    return list(rows), wall


def count_prompt_tokens(server: Server, requests: Sequence[TextRequest]) -> list[int | None]:
    """Each prompt's length as the server's own tokenizer counts it."""
    import httpx

    counts: list[int | None] = []
    for r in requests:
        try:
            if server.spec.tokenize == "plexus":
                reply = httpx.post(server.base_url + "/tokenize", json={"model": server.model, "prompt": r.prompt},
                                   timeout=30.0).json()
                counts.append(reply["count"])
            else:
                reply = httpx.post(server.base_url + "/extras/tokenize", json={"input": r.prompt}, timeout=30.0).json()
                counts.append(len(reply["tokens"]))
        except Exception:  # noqa: BLE001
            counts.append(None)
    return counts


# ---------------------------------------------------------------- statistics

def percentile(values: Sequence[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def summarize(rows: Sequence[dict], wall: float) -> dict[str, Any]:
    ok = [r for r in rows if r["tokens_ok"]]
    ttft = [r["ttft_s"] * 1e3 for r in ok]
    itl = [gap * 1e3 for r in ok for gap in r["itl_s"]]
    tpot = [(r["e2e_s"] - r["ttft_s"]) * 1e3 / (r["max_tokens"] - 1) for r in ok if r["max_tokens"] > 1]
    out = sum(r["max_tokens"] for r in ok)
    return {
        "completed": len(ok), "failed": len(rows) - len(ok), "wall_s": wall,
        "request_rate": len(ok) / wall, "output_tps": out / wall, "output_tokens": out,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90), "ttft_p99_ms": percentile(ttft, 99),
        "ttft_mean_ms": sum(ttft) / len(ttft) if ttft else None,
        "itl_p50_ms": percentile(itl, 50), "itl_p90_ms": percentile(itl, 90), "itl_p99_ms": percentile(itl, 99),
        "itl_max_ms": max(itl) if itl else None,
        "tpot_p50_ms": percentile(tpot, 50),
        "e2e_p50_s": percentile([r["e2e_s"] for r in ok], 50), "e2e_p90_s": percentile([r["e2e_s"] for r in ok], 90),
        "max_late_ms": max(r["late_s"] for r in rows) * 1e3,
        "chunks_equal_tokens": sum(r["chunks"] == r["max_tokens"] for r in ok),
    }


# ---------------------------------------------------------------- running

def rate_name(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


def run_block(system: str, gguf: str, eog: Sequence[int], requests: Sequence[TextRequest],
              warmup: Sequence[TextRequest], rates: Sequence[float], log_dir: pathlib.Path,
              check_tokens: bool) -> dict[str, Any]:
    """Start one server, warm it up, run the load at each rate, stop it."""
    port = free_port()
    server = Server(server_spec(system, gguf, port, eog), port, log_dir)
    block: dict[str, Any] = {"load_before": os.getloadavg()}
    print(f"  {system}: starting ...", end="", flush=True)
    server.start()
    block["startup_s"] = server.startup_s
    try:
        print(f" ready in {server.startup_s:.1f} s", end="", flush=True)
        if check_tokens:
            block["prompt_tokens"] = count_prompt_tokens(server, requests)
        for r in warmup[:2]:
            asyncio.run(run_load(server, [r], float("inf")))
        warm_rows, _ = asyncio.run(run_load(server, warmup[2:], float("inf")))
        block["warmup_ok"] = all(r["tokens_ok"] for r in warm_rows)
        block["by_rate"] = {}
        for rate in rates:
            rows, wall = asyncio.run(run_load(server, requests, rate))
            summary = summarize(rows, wall)
            block["by_rate"][rate_name(rate)] = {**summary, "requests": rows}
            print(f"; rate {rate_name(rate)}: {wall:.1f} s, {summary['output_tps']:.1f} out tok/s"
                  + (f", {summary['failed']} FAILED" if summary["failed"] else ""), end="", flush=True)
    finally:
        code = server.stop()
        print(flush=True)
    block["exit_code"] = code
    block["log_tail"] = server.log_tail(15)
    block["command"] = server.spec.command
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=parse_rates, help="comma-separated request rates (req/s), 'inf' = all at once"
                        " (default: 1,2,4,8,inf)")
    parser.add_argument("--num-requests", type=int, help="requests per rate (default: 20)")
    parser.add_argument("--systems", type=parse_serve_systems, default=list(SERVE_SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SERVE_SYSTEMS)} (default: both)")
    parser.add_argument("--no-interleave", action="store_true",
                        help="one server start per system for all rates instead of one per system and rate "
                        "(--quick always does this)")
    parser.add_argument("--quick", action="store_true", help="4 short requests at 2 rates: a smoke test")
    parser.add_argument("--output-json", help="where to write the results (default: benchmarks/results/serve.json)")
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings()
    if args.rates:
        settings = Settings(**{**asdict(settings), "rates": tuple(args.rates)})
    if args.num_requests:
        settings = Settings(**{**asdict(settings), "num_requests": args.num_requests})

    began = time.perf_counter()
    limit_threads()
    ensure_peers()
    info = machine_info()
    print_machine(info)
    hf_dir, paths = prepare_models([LLAMACPP_BF16])
    gguf = paths[LLAMACPP_BF16]
    eog = run_isolated(end_of_generation_tokens, gguf)
    requests = make_requests(settings, hf_dir)
    warmup = warmup_requests(settings, requests)
    print(f"{len(requests)} requests: {sum(r.prompt_tokens for r in requests)} prompt + "
          f"{sum(r.max_tokens for r in requests)} output tokens; rates {[rate_name(r) for r in settings.rates]}; "
          f"model {gguf}", flush=True)

    # Blocks: (system, rates) in run order.
    if args.no_interleave or args.quick:     # --quick: one start per system, to stay near a minute
        blocks = [(s, list(settings.rates)) for s in args.systems]
    else:
        blocks = []
        for i, rate in enumerate(settings.rates):
            order = args.systems if i % 2 == 0 else list(reversed(args.systems))
            blocks += [(s, [rate]) for s in order]
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="plexus-serve-bench-"))
    results: dict[str, dict[str, Any]] = {s: {"by_rate": {}, "blocks": []} for s in args.systems}
    checked: set[str] = set()
    for system, rates in blocks:
        try:
            block = run_block(system, gguf, eog, requests, warmup, rates, log_dir, check_tokens=system not in checked)
        except Exception as exc:  # noqa: BLE001  (one broken server must not lose the other's numbers)
            print(f"\n  {system} failed: {type(exc).__name__}: {exc}", flush=True)
            results[system]["blocks"].append({"rates": [rate_name(r) for r in rates],
                                              "error": f"{type(exc).__name__}: {exc}"})
            continue
        checked.add(system)
        if "prompt_tokens" in block:
            results[system]["prompt_tokens"] = block.pop("prompt_tokens")
        results[system]["by_rate"].update(block.pop("by_rate"))
        results[system]["blocks"].append({"rates": [rate_name(r) for r in rates], **block})
    wall = time.perf_counter() - began

    checks = check(results, requests, settings)
    report(results, settings, checks)
    # Texts are only for the agreement check and the gaps are in the percentiles: per request the JSON
    # keeps the timings, the median and the largest gap.
    for result in results.values():
        for by_rate in result["by_rate"].values():
            by_rate["requests"] = [compact(row) for row in by_rate["requests"]]
    payload = {"benchmark": "serve", "machine": info, "load_average_end": os.getloadavg(), "settings": asdict(settings),
               "rates": [rate_name(r) for r in settings.rates], "interleaved": not args.no_interleave,
               "wall_s": wall, "model_path": gguf, "end_of_generation_tokens": eog,
               "requests": [{"prompt_tokens": r.prompt_tokens, "max_tokens": r.max_tokens, "arrival_unit_s": r.arrival,
                             "prompt_chars": len(r.prompt)} for r in requests],
               "checks": checks, "results": results}
    print(f"\nFull run: {wall:.0f} s. Server logs in {log_dir}")
    print(f"Wrote {write_results('serve_quick' if args.quick else 'serve', payload, args.output_json)}")


def compact(row: dict[str, Any]) -> dict[str, Any]:
    gaps = row.pop("itl_s")
    row.pop("text", None)
    row["itl_p50_ms"] = percentile([g * 1e3 for g in gaps], 50)
    row["itl_max_ms"] = max(gaps) * 1e3 if gaps else None
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}


def check(results: dict[str, dict], requests: Sequence[TextRequest], settings: Settings) -> dict[str, Any]:
    """Token counts, failures, and whether the two servers generated the same text."""
    checks: dict[str, Any] = {}
    for system, result in results.items():
        counts = result.get("prompt_tokens")
        if counts:
            checks[f"{system}_prompt_tokens_differ"] = sum(c != r.prompt_tokens for c, r in zip(counts, requests))
        checks[f"{system}_failed"] = {rate: r["failed"] for rate, r in result["by_rate"].items()}
        checks[f"{system}_chunks_equal_tokens"] = {rate: r["chunks_equal_tokens"] for rate, r in result["by_rate"].items()}
    if all(s in results for s in SERVE_SYSTEMS):
        same = {}
        for rate, ours in results[PLEXUS]["by_rate"].items():
            theirs = results[LLAMACPP_BF16]["by_rate"].get(rate)
            if theirs:
                same[rate] = sum(a["text"] == b["text"] for a, b in zip(ours["requests"], theirs["requests"])
                                 if a["tokens_ok"] and b["tokens_ok"])
        checks["same_text"] = same
    return checks


def report(results: dict[str, dict], settings: Settings, checks: dict[str, Any]) -> None:
    n = settings.num_requests
    print(f"\n### {n} streamed requests per rate, Poisson arrivals (open loop)\n")
    header = "| rate (req/s) | system | " + " | ".join(m.title for m in METRICS) + " |"
    print(header)
    print("|---|---" + "|---" * len(METRICS) + "|")
    for rate in map(rate_name, settings.rates):
        rows = {s: r["by_rate"][rate] for s, r in results.items() if rate in r["by_rate"]}
        for system, row in rows.items():
            cells = ["n/a" if row.get(m.key) is None else m.fmt.format(row[m.key]) for m in METRICS]
            failed = f" ({row['failed']} failed)" if row["failed"] else ""
            print(f"| {rate} | {system}{failed} | " + " | ".join(cells) + " |")
        if PLEXUS in rows and LLAMACPP_BF16 in rows:
            cells = [ratio(m, rows[PLEXUS].get(m.key), rows[LLAMACPP_BF16].get(m.key)) for m in METRICS]
            print(f"| {rate} | plexus / {LLAMACPP_BF16} | " + " | ".join(cells) + " |")
    print("\n`plexus / llamacpp-bf16` rows: >1 = plexus better (for times and latencies: llama.cpp / plexus).")
    for system, result in results.items():
        for block in result["blocks"]:
            if "error" in block:
                print(f"- {system} at rate(s) {', '.join(block['rates'])}: {block['error'].splitlines()[0]}")
    print(f"- checks: {json.dumps(checks)}")


def ratio(metric: Metric, ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "n/a"
    return f"{(ours / theirs if metric.higher_is_better else theirs / ours):.2f}x"


def parse_rates(value: str) -> list[float]:
    return [float("inf") if v.strip() == "inf" else float(v) for v in value.split(",") if v.strip()]


def parse_serve_systems(value: str) -> list[str]:
    chosen = {s.strip() for s in value.split(",") if s.strip()}
    unknown = sorted(chosen - set(SERVE_SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {', '.join(SERVE_SYSTEMS)}")
    return [s for s in SERVE_SYSTEMS if s in chosen]


if __name__ == "__main__":
    main()
