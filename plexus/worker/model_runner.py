"""Turns a StepInput into tensors (flat input ids, positions, cache slots,
block tables), runs the model, and samples."""
from __future__ import annotations

import torch

from plexus.core.sampler import Sampler, SamplingMetadata
from plexus.core.step import SequenceStep, StepInput, StepOutput, TokenLogprobs, step_seed
from plexus.models.layers.attention import AttentionMetadata
from plexus.worker.compiled_decode import CompiledDecode


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
    def __init__(self, config, model, kv_caches: list[torch.Tensor], device: torch.device, scratch_block: int,
                 attn_backend: type, lora=None) -> None:
        """lora: the model's LoRA slots (plexus.models.lora.LoRAModel) when enable_lora=True."""
        self.lora = lora
        self.config = config
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = config.cache.block_size
        self.vocab_size = config.model.vocab_size
        self.use_decode_kernel = attn_backend.decode_reads_block_tables
        self.use_varlen_kernel = getattr(attn_backend, "prefill_reads_block_tables", False)
        self.sampler = Sampler(model.ops.greedy_sample) if model.ops.greedy_sample else Sampler()
        # The shared generator of unseeded sequences: this worker's own state, seeded from the engine's seed.
        self.generator = torch.Generator(device=device).manual_seed(config.model.seed)
        self.compiled: CompiledDecode | None = None
        if config.compilation.level >= 3:
            self.compiled = CompiledDecode(
                model, kv_caches, config.compilation.cudagraph_capture_sizes,
                max_blocks=-(-config.model.max_model_len // self.block_size), scratch_block=scratch_block,
                block_size=self.block_size, masked=not self.use_decode_kernel,
                max_seq_len=config.compilation.max_seq_len_to_capture)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        seqs = step.sequences
        if any(s.draft_token_ids for s in seqs):
            raise NotImplementedError("this runner does not verify draft tokens yet (speculative decoding)")
        input_ids: list[int] = []
        for s in seqs:
            input_ids.extend(s.token_ids)
        meta = AttentionMetadata.build(
            query_lens=[s.num_tokens for s in seqs], seq_lens=[s.start + s.num_tokens for s in seqs],
            block_ids=[s.block_ids for s in seqs], block_size=self.block_size, device=self.device,
            use_decode_kernel=self.use_decode_kernel, use_varlen_kernel=self.use_varlen_kernel)
        input_ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        if self.lora is not None:
            for slot, weights in step.lora_loads.items():
                self.lora.load(slot, weights)
            self.lora.set_tokens([s.lora_slot for s in seqs], [s.num_tokens for s in seqs])
        bucket = (self.compiled.bucket_for(meta) if self.compiled is not None
                  and not (self.lora is not None and self.lora.attached) else None)
        if bucket is not None:
            hidden = self.compiled(input_ids_t, meta, bucket)
        else:
            hidden = self.model(input_ids_t, meta.positions, self.kv_caches, meta)  # [T, hidden]

        result = StepOutput()
        sample_rows: list[int] = []
        sampling: list[SequenceStep] = []
        offset = 0
        for s in seqs:
            if s.params.prompt_logprobs is not None:
                self._prompt_logprobs(s, hidden[offset:offset + s.num_tokens], result)
            offset += s.num_tokens
            if s.sample:
                sample_rows.append(offset - 1)
                sampling.append(s)
        if sampling:
            if self.lora is not None and self.lora.attached:
                self.lora.set_rows([s.lora_slot for s in sampling])
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            result.sampled = sample_sequences(self.sampler, sampling, logits, self.generator)
        return result

    def _prompt_logprobs(self, s: SequenceStep, hidden: torch.Tensor, result: StepOutput) -> None:
        """Logprobs of prompt tokens start+1 .. start+len(hidden), those still inside the prompt."""
        first = max(s.start, s.prompt_logprobs_from - 1)
        last = min(s.start + hidden.shape[0], s.num_prompt_tokens - 1)       # exclusive
        if last <= first:
            return
        if self.lora is not None and self.lora.attached:
            self.lora.set_rows([s.lora_slot] * (last - first))
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[first - s.start:last - s.start]), dim=-1,
                                     dtype=torch.float32)
        targets = torch.tensor(s.prompt_token_ids[first + 1:last + 1], device=logprobs.device)
        k = s.params.prompt_logprobs
        result.prompt_logprobs[s.request_id] = _token_logprobs(logprobs, targets, self.vocab_size if k < 0 else k)


def sample_sequences(sampler: Sampler, seqs: list[SequenceStep], logits: torch.Tensor,
                     generator: torch.Generator) -> dict[str, list[TokenLogprobs]]:
    """The next token of each sequence from its row of logits [N, vocab]. Shared by every platform's
    runner: sampling is device-agnostic torch. Seeded sequences draw from a generator made for this step
    from (seed, seed_offset); the others from `generator`, the worker's own."""
    vocab_size = logits.shape[-1]
    metadata = SamplingMetadata.build(
        params=[s.params for s in seqs],
        prompt_token_ids=[s.prompt_token_ids or [] for s in seqs],
        output_token_ids=[s.output_token_ids or [] for s in seqs],
        generators=[None if s.seed is None else
                    torch.Generator(device=logits.device).manual_seed(step_seed(s.seed, s.seed_offset))
                    for s in seqs],
        banned_token_ids=[s.banned_token_ids for s in seqs], vocab_size=vocab_size, device=logits.device,
        bad_words_token_ids=[s.bad_words_token_ids for s in seqs],
        token_bitmasks=[s.token_bitmask for s in seqs])
    sampled = sampler(logits, metadata, generator)
    tokens = sampled.sampled_token_ids.tolist()
    lps = sampled.sampled_logprobs.tolist()
    ranks = sampled.sampled_ranks.tolist() if sampled.sampled_ranks is not None else [None] * len(tokens)
    out: dict[str, list[TokenLogprobs]] = {}
    for i, s in enumerate(seqs):
        k = s.params.logprobs or 0
        if k < 0:
            k = vocab_size
        entry = TokenLogprobs(tokens[i], lps[i], ranks[i])
        if k and sampled.topk_token_ids is not None:
            entry.top_ids = sampled.topk_token_ids[i, :k].tolist()
            entry.top_logprobs = sampled.topk_logprobs[i, :k].tolist()
        out[s.request_id] = [entry]
    return out
