"""The systems under test, behind one interface: ``run(requests) -> RunResult``.

Every system takes token ids (no text), decodes greedily and produces exactly
``max_tokens`` tokens per request (EOS ignored), with NUM_THREADS threads:

- PlexusSystem: ``plexus.LLM`` with bf16 activations (weights bf16 or quantized,
  common.SPECS), one ``generate`` call for all requests; on CUDA (--device cuda)
  with ``device="cuda"`` and the KV cache from ``gpu_memory_utilization``.
- HFSystem: transformers ``generate`` in bf16, static left-padded batches; on
  CUDA the model moved to the GPU, the clock stopped after torch.cuda.synchronize().
- LlamaCppSystem: llama.cpp through llama-cpp-python's low-level API, with a
  small continuous-batching loop (parallel sequences, chunked prefill). Its AMX
  kernels are kept out (see llamacpp_extra_buffer_types): they crash here.

Import this module in the process that runs the system (see
common.Worker): the heavy libraries are imported inside the classes.
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
    """plexus.LLM, computing in bf16. Prefix caching is off so repeated runs recompute every prompt.

    model_dir: an HF directory or a .gguf file (with quantization="gguf": its quantized blocks are kept).
    """

    per_request_timing = True

    def __init__(self, model_dir: str, max_num_seqs: int, dtype: str = "bfloat16", **engine_args: Any) -> None:
        """engine_args: more LLM() arguments (quantization=...)."""
        import torch

        from plexus import LLM

        torch.set_num_threads(NUM_THREADS)
        self.llm = LLM(model=model_dir, dtype=dtype, max_num_seqs=max_num_seqs,
                       enable_prefix_caching=False, seed=SEED, **engine_args)
        self.settings = {"dtype": dtype, "max_num_seqs": max_num_seqs, "enable_prefix_caching": False,
                         "detokenize": False, "torch_threads": torch.get_num_threads(), **engine_args}
        if engine_args.get("device") == "cuda":
            self.settings.update(self._engine_facts())

    def _engine_facts(self) -> dict[str, Any]:
        """Where the engine runs and its KV cache (GPU runs: a check that device="cuda" took, and what
        gpu_memory_utilization gave). Raises if the engine says it runs on another device."""
        engine = self.llm.llm_engine
        device = getattr(engine, "device", None)
        if device is not None and not str(device).startswith("cuda"):
            raise RuntimeError(f"plexus was asked for device='cuda' but its engine runs on {str(device)!r}")
        facts: dict[str, Any] = {"engine_device": None if device is None else str(device)}
        cache = getattr(getattr(engine, "config", None), "cache", None)
        if cache is not None:
            facts.update(kv_cache_blocks=getattr(cache, "num_blocks", None),
                         kv_cache_block_size=getattr(cache, "block_size", None))
        return facts

    def touch_kv_cache(self) -> float | None:
        """Write the (all-zero) KV cache once, so that all of it is resident now and no timed run pays
        for first-touch page faults (llama.cpp clears its KV buffer when it makes a context). Returns the
        MiB written, None if the engine's internals are not where this looks for them."""
        try:
            caches = self.llm.llm_engine.executor.worker.kv_caches
        except AttributeError:
            return None
        for cache in caches:
            cache.zero_()
        return sum(c.numel() * c.element_size() for c in caches) / 2**20

    def run(self, requests: Sequence[Request]) -> RunResult:
        from plexus import SamplingParams

        prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True, detokenize=False)
                  for r in requests]
        start = time.perf_counter()
        # Blocks until every token is on the host (it returns Python objects): on a GPU too, nothing of the
        # run is still in flight when the clock stops.
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

    device="cuda": the model is moved to the GPU (model.to("cuda")), the inputs too, and every
    generate() is followed by torch.cuda.synchronize(), so a run's clock stops when the GPU is done.
    """

    per_request_timing = False

    def __init__(self, model_dir: str, batch_size: int | None = None, device: str = "cpu") -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(NUM_THREADS)
        transformers.utils.logging.disable_progress_bar()
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        if device != "cpu":
            self.model.to(device)
        config = self.model.config
        self.eos_id = config.eos_token_id
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else self.eos_id
        self.batch_size = batch_size       # None: all requests in one batch

    @property
    def settings(self) -> dict:
        import torch

        found = {"dtype": "bfloat16", "attn_implementation": self.model.config._attn_implementation,
                 "batch_size": self.batch_size, "torch_threads": torch.get_num_threads()}
        if self.device != "cpu":
            found.update(device=self.device, model_device=str(next(self.model.parameters()).device))
        return found

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
        if self.device != "cpu":
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         generation_config=config)
        if self.device != "cpu":
            torch.cuda.synchronize()       # generate() returns tensors on the GPU, maybe still being computed
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
        extra_bufts = llamacpp_extra_buffer_types()
        if extra_bufts is None:                  # could not take AMX out: no extra buffer types at all
            model_params.use_extra_bufts = False
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
                         "n_seq_max": n_seq_max, "kv_unified": kv_unified, "flash_attn_type": params.flash_attn_type,
                         "n_threads": NUM_THREADS, "use_extra_bufts": bool(model_params.use_extra_bufts),
                         "extra_buffer_types": extra_bufts, "amx_removed": _AMX_REMOVED}

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


_AMX_REMOVED: list[str] = []      # what llamacpp_extra_buffer_types took out of the list, in this process


def llamacpp_extra_buffer_types() -> list[str] | None:
    """The CPU backend's extra buffer types llama.cpp will use, with AMX taken out; None if that failed.

    llama-cpp-python 0.3.36 (built from source with GGML_NATIVE) compiles ggml's AMX backend on a CPU with
    AMX, and then puts every Q4_0 / Q4_1 / Q8_0 weight of a model in the AMX buffer type; its matmul
    crashes (SIGSEGV at `ldtilecfg` in ggml_backend_amx_mul_mat) at the first llama_decode, on this
    virtual machine's Xeon. BF16 weights do not go to AMX and run. The known bug: llama.cpp issues
    #20824, PR #26954 (the tile config is built on the stack and optimized away, and worker threads do
    not ask the kernel for AMX tile data). llama_model_params.use_extra_bufts=False (llama-server's
    --no-repack) avoids it, but also turns off the CPU_REPACK buffer type, which llama.cpp uses for Q4_0
    (interleaved 8x8 blocks: about 20% faster prefill here). So, once per process before any model is
    loaded, this removes AMX from the list of extra buffer types the CPU backend hands to llama.cpp
    (a static, NULL-terminated array: the entries after AMX move up one place); CPU_REPACK stays.
    Set PLEXUS_BENCH_LLAMACPP_AMX=1 to keep AMX (a llama.cpp build with the fix).
    """
    import ctypes
    import os

    import llama_cpp

    try:
        lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        ggml = ctypes.CDLL(os.path.join(lib_dir, "libggml.so"))
        base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        base.ggml_backend_buft_name.restype = ctypes.c_char_p
        base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        device = ggml.ggml_backend_dev_by_type(0)                  # GGML_BACKEND_DEVICE_TYPE_CPU
        get = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(device),
                                                     b"ggml_backend_dev_get_extra_bufts")
        if not device or not get:
            return None
        bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(get)(device)
        entries = []
        while bufts and bufts[len(entries)]:
            entries.append(bufts[len(entries)])
        names = [base.ggml_backend_buft_name(b).decode() for b in entries]
        if os.environ.get("PLEXUS_BENCH_LLAMACPP_AMX") != "1" and "AMX" in names:
            kept = [b for b, name in zip(entries, names) if name != "AMX"]
            for i in range(len(entries)):
                bufts[i] = kept[i] if i < len(kept) else None
            _AMX_REMOVED.append("AMX")
            names = [n for n in names if n != "AMX"]
        return names
    except (OSError, AttributeError, ValueError):
        return None


# ---------------------------------------------------------------- helpers

def _result(requests: Sequence[Request], wall: float, timings: list[RequestTiming],
            output_ids: list[list[int]]) -> RunResult:
    output = sum(r.max_tokens for r in requests)
    return RunResult(wall_s=wall, prompt_tokens=sum(len(r.prompt) for r in requests), output_tokens=output,
                     computed_tokens=output, requests=timings, output_ids=output_ids)


System = PlexusSystem | HFSystem | LlamaCppSystem


def load_system(name: str, model_path: str, max_concurrency: int, seq_len: int,
                kv_unified: bool = False, kv_cache_space: float | None = None,
                gpu_memory_utilization: float | None = None) -> System:
    """Build a system (common.SPECS[name]) and warm it up (one short request: first-call allocations,
    kernel selection).

    kv_unified only concerns llama.cpp (see LlamaCppSystem), kv_cache_space (GiB) only plexus on the CPU
    (common.kv_cache_space_gib; its cache is then written once, PlexusSystem.touch_kv_cache; None:
    plexus's default, left lazily mapped), gpu_memory_utilization only plexus on CUDA (its KV cache
    budget there; kv_cache_space is CPU-only and not passed; None: plexus's default, 0.9).
    """
    from common import SPECS

    spec = SPECS[name]
    if spec.engine == "plexus" and spec.device == "cuda":
        extra = {} if gpu_memory_utilization is None else {"gpu_memory_utilization": gpu_memory_utilization}
        system: System = PlexusSystem(model_path, max_num_seqs=max_concurrency, **spec.engine_args, **extra)
    elif spec.engine == "plexus":
        extra = {} if kv_cache_space is None else {"kv_cache_space": kv_cache_space}
        system = PlexusSystem(model_path, max_num_seqs=max_concurrency, **spec.engine_args, **extra)
        if kv_cache_space is not None:      # a cache sized to the work: make it resident (4 GiB would not be)
            system.settings["kv_cache_touched_mib"] = system.touch_kv_cache()
    elif spec.engine == "hf":
        system = HFSystem(model_path, device=spec.device)
    elif spec.engine == "llamacpp":
        system = LlamaCppSystem(model_path, n_seq_max=max_concurrency, seq_len=seq_len, kv_unified=kv_unified)
    else:
        raise ValueError(f"unknown system {name!r}")
    system.run(WARMUP)
    return system
