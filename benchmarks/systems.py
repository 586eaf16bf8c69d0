"""The systems under test, behind one interface: ``run(requests) -> RunResult``.

Every system takes token ids (no text), decodes greedily and produces exactly
``max_tokens`` tokens per request (EOS ignored), with NUM_THREADS threads:

- PlexusSystem: ``plexus.LLM`` in bf16, one ``generate`` call for all requests.
- HFSystem: transformers ``generate`` in bf16, static left-padded batches.
- LlamaCppSystem: llama.cpp through llama-cpp-python's low-level API, with a
  small continuous-batching loop (parallel sequences, chunked prefill).

Import this module in the process that runs the system (see
common.run_isolated): the heavy libraries are imported inside the classes.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common import NUM_THREADS, SEED, Request


@dataclass
class RequestTiming:
    output_tokens: int
    ttft_s: float | None = None      # from submission to the first generated token
    decode_s: float | None = None    # from the first generated token to the last


@dataclass
class RunResult:
    wall_s: float
    prompt_tokens: int
    output_tokens: int               # tokens the requests asked for (the useful output)
    computed_tokens: int             # tokens actually generated (more for padded static batches)
    requests: list[RequestTiming] = field(default_factory=list)
    output_ids: list[list[int]] = field(default_factory=list)   # the generated tokens, for spot checks

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s


def _check_lengths(requests: Sequence[Request], produced: Sequence[int], system: str) -> None:
    for i, (request, n) in enumerate(zip(requests, produced)):
        if n != request.max_tokens:
            raise RuntimeError(f"{system}: request {i} produced {n} tokens, expected {request.max_tokens}")


WARMUP = [Request(tuple(range(1000, 1032)), 4)]


# ---------------------------------------------------------------- plexus

class PlexusSystem:
    """plexus.LLM in bf16. Prefix caching is off so repeated runs recompute every prompt."""

    per_request_timing = True

    def __init__(self, model_dir: str, max_num_seqs: int, dtype: str = "bfloat16", **engine_args: Any) -> None:
        """engine_args: more LLM() arguments (quantization=..., for benchmarks/quantized.py)."""
        import torch

        from plexus import LLM

        torch.set_num_threads(NUM_THREADS)
        self.llm = LLM(model=model_dir, dtype=dtype, max_num_seqs=max_num_seqs,
                       enable_prefix_caching=False, seed=SEED, **engine_args)
        self.settings = {"dtype": dtype, "max_num_seqs": max_num_seqs, "enable_prefix_caching": False,
                         "detokenize": False, "torch_threads": torch.get_num_threads(), **engine_args}

    def run(self, requests: Sequence[Request]) -> RunResult:
        from plexus import SamplingParams

        prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True, detokenize=False)
                  for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        _check_lengths(requests, [len(o.outputs[0].token_ids) for o in outputs], "plexus")
        # The engine stamps arrival, first and last token with time.time().
        timings = [RequestTiming(len(o.outputs[0].token_ids),
                                 o.metrics.first_token_time - o.metrics.arrival_time,
                                 o.metrics.last_token_time - o.metrics.first_token_time) for o in outputs]
        return _result(requests, wall, timings, [list(o.outputs[0].token_ids) for o in outputs])

    def close(self) -> None:
        del self.llm


# ---------------------------------------------------------------- HF transformers

class HFSystem:
    """transformers generate() in bf16 on static, left-padded batches of ``batch_size`` requests.

    generate() runs a batch until its longest request is done, so each batch
    is generated to its largest max_tokens; only the tokens each request asked
    for count as output. No per-token timestamps (per_request_timing = False).
    """

    per_request_timing = False

    def __init__(self, model_dir: str, batch_size: int | None = None) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(NUM_THREADS)
        transformers.utils.logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        config = self.model.config
        self.eos_id = config.eos_token_id
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else self.eos_id
        self.batch_size = batch_size       # None: all requests in one batch

    @property
    def settings(self) -> dict:
        import torch

        return {"dtype": "bfloat16", "attn_implementation": self.model.config._attn_implementation,
                "batch_size": self.batch_size, "torch_threads": torch.get_num_threads()}

    def run(self, requests: Sequence[Request]) -> RunResult:
        size = self.batch_size or len(requests)
        start = time.perf_counter()
        computed, output_ids = 0, []
        for i in range(0, len(requests), size):
            batch = requests[i:i + size]
            new_tokens = max(r.max_tokens for r in batch)
            generated = self._generate([r.prompt for r in batch], new_tokens)
            output_ids += [row[:r.max_tokens] for row, r in zip(generated.tolist(), batch)]
            computed += new_tokens * len(batch)
        wall = time.perf_counter() - start
        result = _result(requests, wall, [RequestTiming(r.max_tokens) for r in requests], output_ids)
        result.computed_tokens = computed
        return result

    def _generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> Any:
        """Greedy, exactly new_tokens per row; returns the generated ids (rows x new_tokens)."""
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        # min_new_tokens == max_new_tokens masks EOS: exactly new_tokens tokens, greedy.
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         generation_config=config)
        if output.shape[1] != width + new_tokens:
            raise RuntimeError(f"hf: generated {output.shape[1] - width} tokens, expected {new_tokens}")
        return output[:, width:]

    def close(self) -> None:
        del self.model


# ---------------------------------------------------------------- llama.cpp

@dataclass
class _Sequence:
    """A request inside LlamaCppSystem's loop."""
    index: int                             # position in the run's request list
    request: Request
    slot: int                              # llama.cpp sequence id
    pending: list[int]                     # tokens not yet in the KV cache
    n_past: int = 0                        # tokens in the KV cache
    output: list[int] = field(default_factory=list)
    first_token_t: float | None = None
    last_token_t: float | None = None


class LlamaCppSystem:
    """llama.cpp via llama-cpp-python's low-level API, with continuous batching.

    Up to ``n_seq_max`` requests run at once, each in its own sequence id,
    with ``seq_len`` KV cells per sequence: a separate KV stream per sequence
    (llama.cpp's default), or with ``kv_unified`` one buffer shared by all
    (every token then attends over all of it, masked). Each llama_decode
    call takes one token from every decoding sequence, then fills the rest of
    the ``n_batch`` budget with prompt chunks of waiting sequences; a finished
    sequence frees its slot for the next request. Greedy = numpy argmax of
    llama_get_logits_ith.
    """

    per_request_timing = True

    def __init__(self, gguf_path: str, n_seq_max: int, seq_len: int, n_batch: int = 512,
                 kv_unified: bool = False) -> None:
        import llama_cpp

        from common import quiet_llama_cpp

        quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        self.lib = llama_cpp
        self.n_seq_max, self.n_batch = n_seq_max, n_batch
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

        params = llama_cpp.llama_context_default_params()
        # llama.cpp pads each sequence's share of n_ctx to a multiple of 256 (and warns if we don't).
        params.n_ctx = n_seq_max * -(-seq_len // 256) * 256
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = NUM_THREADS
        params.kv_unified = kv_unified
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.settings = {"n_ctx": llama_cpp.llama_n_ctx(self.ctx), "n_batch": n_batch, "n_ubatch": n_batch,
                         "n_seq_max": n_seq_max, "kv_unified": kv_unified, "flash_attn_type": params.flash_attn_type}

    def run(self, requests: Sequence[Request]) -> RunResult:
        self.lib.llama_memory_clear(self.memory, True)
        waiting = deque(enumerate(requests))
        free_slots = list(range(self.n_seq_max))
        active: list[_Sequence] = []
        done: dict[int, _Sequence] = {}
        start = time.perf_counter()
        while waiting or active:
            while waiting and free_slots:
                index, request = waiting.popleft()
                active.append(_Sequence(index, request, free_slots.pop(0), list(request.prompt)))
            outputs = self._fill_batch(active)
            status = self.lib.llama_decode(self.ctx, self.batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")
            now = time.perf_counter()
            for seq, row in outputs:
                self._append(seq, self._argmax(row), now)
                if len(seq.output) == seq.request.max_tokens:
                    active.remove(seq)
                    self.lib.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
                    free_slots.append(seq.slot)
                    done[seq.index] = seq
        wall = time.perf_counter() - start
        finished = [done[i] for i in range(len(requests))]
        _check_lengths(requests, [len(s.output) for s in finished], "llama.cpp")
        timings = [RequestTiming(len(s.output), s.first_token_t - start, s.last_token_t - s.first_token_t)
                   for s in finished]
        return _result(requests, wall, timings, [s.output for s in finished])

    def _fill_batch(self, active: list[_Sequence]) -> list[tuple[_Sequence, int]]:
        """Load the next llama_batch; return the sequences that get logits, with their batch index."""
        batch, n = self.batch, 0
        outputs = []
        decoding_first = sorted(active, key=lambda s: not s.output)   # stable: decode tokens, then prompts
        for seq in decoding_first:
            take = min(len(seq.pending), self.n_batch - n)
            if take == 0:
                break
            for token in seq.pending[:take]:
                batch.token[n] = token
                batch.pos[n] = seq.n_past
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                batch.logits[n] = False
                seq.n_past += 1
                n += 1
            del seq.pending[:take]
            if not seq.pending:                     # the last known token: sample the next one
                batch.logits[n - 1] = True
                outputs.append((seq, n - 1))
        batch.n_tokens = n
        return outputs

    def _argmax(self, index: int) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return int(logits.argmax())

    @staticmethod
    def _append(seq: _Sequence, token: int, now: float) -> None:
        seq.output.append(token)
        seq.pending.append(token)
        if seq.first_token_t is None:
            seq.first_token_t = now
        seq.last_token_t = now

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


# ---------------------------------------------------------------- helpers

def _result(requests: Sequence[Request], wall: float, timings: list[RequestTiming],
            output_ids: list[list[int]]) -> RunResult:
    output = sum(r.max_tokens for r in requests)
    return RunResult(wall_s=wall, prompt_tokens=sum(len(r.prompt) for r in requests), output_tokens=output,
                     computed_tokens=output, requests=timings, output_ids=output_ids)


System = PlexusSystem | HFSystem | LlamaCppSystem


def load_system(name: str, model_path: str, max_concurrency: int, seq_len: int,
                kv_unified: bool = False) -> System:
    """Build a system and warm it up (one short request: first-call allocations, kernel selection).

    kv_unified only concerns llama.cpp (see LlamaCppSystem).
    """
    from common import HF, LLAMACPP_BF16, LLAMACPP_Q8_0, PLEXUS

    if name == PLEXUS:
        system: System = PlexusSystem(model_path, max_num_seqs=max_concurrency)
    elif name == HF:
        system = HFSystem(model_path)
    elif name in (LLAMACPP_BF16, LLAMACPP_Q8_0):
        system = LlamaCppSystem(model_path, n_seq_max=max_concurrency, seq_len=seq_len, kv_unified=kv_unified)
    else:
        raise ValueError(f"unknown system {name!r}")
    system.run(WARMUP)
    return system
