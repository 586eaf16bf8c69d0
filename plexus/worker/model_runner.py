"""Turns a scheduled step into tensors (flat input ids, positions, cache
slots, block tables), runs the model, and samples."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plexus.core.config import EngineConfig
from plexus.core.request import Request
from plexus.core.sampler import Sampler, SamplingMetadata, uses_penalties
from plexus.core.scheduler import SchedulerOutput
from plexus.models.layers.attention import AttentionMetadata
from plexus.worker.compiled_decode import CompiledDecode


@dataclass
class TokenLogprobs:
    """The chosen token's logprob and rank, and the top-k alternatives, for one position."""
    token_id: int
    logprob: float
    rank: int | None      # None when the request asked for no logprobs
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    sampled: dict[Request, TokenLogprobs] = field(default_factory=dict)          # the new token of each request
    prompt_logprobs: dict[Request, list[TokenLogprobs]] = field(default_factory=dict)


def _token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """logprobs: [N, V] log-softmax rows; token_ids: [N] the tokens actually there."""
    chosen = logprobs.gather(1, token_ids[:, None])                     # [N, 1]
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top_lp, top_ids = logprobs.topk(k, dim=1) if k > 0 else (None, None)
    out = []
    for i, (tok, lp, rank) in enumerate(zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist())):
        out.append(TokenLogprobs(tok, lp, rank, top_ids[i].tolist() if k else [], top_lp[i].tolist() if k else []))
    return out


class ModelRunner:
    def __init__(self, config: EngineConfig, model, kv_caches: list[torch.Tensor], device: torch.device,
                 scratch_block: int) -> None:
        self.config = config
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = config.cache.block_size
        self.vocab_size = config.model.vocab_size
        self.sampler = Sampler()
        self.compiled: CompiledDecode | None = None
        if config.compilation.level >= 3:
            self.compiled = CompiledDecode(
                model, kv_caches, config.compilation.cudagraph_capture_sizes,
                max_blocks=-(-config.model.max_model_len // self.block_size), scratch_block=scratch_block,
                block_size=self.block_size)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, default_generator: torch.Generator | None) -> ModelRunnerOutput:
        input_ids: list[int] = []
        for s in out.scheduled:
            input_ids.extend(s.request.token_ids[s.start:s.start + s.num_tokens])
        meta = AttentionMetadata.build(
            query_lens=[s.num_tokens for s in out.scheduled],
            seq_lens=[s.start + s.num_tokens for s in out.scheduled],
            block_ids=[s.request.block_ids for s in out.scheduled],
            block_size=self.block_size, device=self.device)
        input_ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        bucket = self.compiled.bucket_for(meta) if self.compiled is not None else None
        if bucket is not None:
            hidden = self.compiled(input_ids_t, meta, bucket)
        else:
            hidden = self.model(input_ids_t, meta.positions, self.kv_caches, meta)  # [T, hidden]

        result = ModelRunnerOutput()
        sample_rows: list[int] = []
        sampling: list[Request] = []
        offset = 0
        for s in out.scheduled:
            request = s.request
            if request.wants_prompt_logprobs:
                self._prompt_logprobs(request, s.start, hidden[offset:offset + s.num_tokens], result)
            offset += s.num_tokens
            if s.samples:
                sample_rows.append(offset - 1)
                sampling.append(request)
        if sampling:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            sample_requests(self.sampler, sampling, logits, default_generator, result)
        return result

    def _prompt_logprobs(self, request: Request, start: int, hidden: torch.Tensor, result) -> None:
        """Logprobs of prompt tokens start+1 .. start+len(hidden), those still inside the prompt."""
        num_done = len(request.prompt_logprobs) if request.prompt_logprobs else 1   # position 0 has none
        first = max(start, num_done - 1)
        last = min(start + hidden.shape[0], request.num_prompt_tokens - 1)       # exclusive
        if last <= first:
            return
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[first - start:last - start]), dim=-1,
                                     dtype=torch.float32)
        targets = torch.tensor(request.token_ids[first + 1:last + 1], device=logprobs.device)
        k = request.sampling_params.prompt_logprobs
        result.prompt_logprobs[request] = _token_logprobs(
            logprobs, targets, self.vocab_size if k < 0 else k)


def sample_requests(sampler: Sampler, requests: list[Request], logits: torch.Tensor, default_generator,
                    result: ModelRunnerOutput) -> None:
    """Sample the next token of each request from its row of logits [N, vocab] into result.sampled.
    Shared by every platform's runner: sampling is device-agnostic torch."""
    vocab_size = logits.shape[-1]
    params = [r.sampling_params for r in requests]
    banned = []
    for r in requests:
        p = r.sampling_params
        if r.num_output_tokens < p.min_tokens:
            banned.append(sorted(set(p.stop_token_ids or ()) | (set() if p.ignore_eos else r.eos_token_ids)))
        else:
            banned.append([])
    # Token histories only matter to penalties; copying them every step would cost O(length) per token.
    penalized = uses_penalties(params)
    metadata = SamplingMetadata.build(
        params=params,
        prompt_token_ids=[r.prompt_token_ids if penalized else [] for r in requests],
        output_token_ids=[r.output_token_ids if penalized else [] for r in requests],
        generators=[r.generator for r in requests],
        banned_token_ids=banned, vocab_size=vocab_size, device=logits.device)
    sampled = sampler(logits, metadata, default_generator)
    tokens = sampled.sampled_token_ids.tolist()
    lps = sampled.sampled_logprobs.tolist()
    ranks = sampled.sampled_ranks.tolist() if sampled.sampled_ranks is not None else [None] * len(tokens)
    for i, r in enumerate(requests):
        k = r.sampling_params.logprobs or 0
        if k < 0:
            k = vocab_size
        entry = TokenLogprobs(tokens[i], lps[i], ranks[i])
        if k and sampled.topk_token_ids is not None:
            entry.top_ids = sampled.topk_token_ids[i, :k].tolist()
            entry.top_logprobs = sampled.topk_logprobs[i, :k].tolist()
        result.sampled[r] = entry
