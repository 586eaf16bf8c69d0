"""The Neuron worker and runner: one KV slot per sequence, steps padded to buckets.

The core's KV cache manager runs with block_size == max_model_len and one
block per slot, so a request's single block id is its slot id (transformers-
neuronx's start_ids). A step becomes calls to the compiled model:

- token generation for every decoding sequence at once: the batch is padded
  to the compiled batch size with row i = slot i (what transformers-neuronx's
  continuous batching does itself); padding rows feed token 0 at position 0
  of their idle slot;
- one context encoding per new prompt, right-padded to the smallest context
  bucket that holds it.

Token generation runs first: its padding rows write position 0 of every slot
that is not decoding, including the ones whose prompts are encoded in this
same step, and the context encodings then overwrite those positions."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from plexus.core import buckets
from plexus.core.sampler import Sampler
from plexus.core.step import SequenceStep, StepInput, StepOutput
from plexus.platforms.neuron.settings import REFERENCE_BACKEND, NeuronSettings
from plexus.worker.model_runner import sample_sequences

logger = logging.getLogger("plexus")


@dataclass(frozen=True)
class BucketCall:
    kind: str          # "context" | "token_gen"
    bucket: int        # the padded prompt length, or the token-gen bucket (n_positions) the step runs in
    num_seqs: int      # real sequences in the call (the rest of the compiled batch is padding)


class NeuronModelRunner:
    def __init__(self, settings: NeuronSettings, model, seed: int = 0) -> None:
        self.settings = settings
        self.model = model           # the compiled-model contract: forward(input_ids, cache_ids, start_ids)
        self.sampler = Sampler()
        self.generator = torch.Generator().manual_seed(seed)   # unseeded sequences' shared generator
        self.logits_dtype = getattr(torch, settings.cast_logits_dtype)
        self.last_step: list[BucketCall] = []        # the calls of the latest step (tests, debugging)
        self.bucket_counts: Counter[tuple[str, int]] = Counter()   # calls per (kind, bucket) since start

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        decodes, prefills = [], []
        for s in step.sequences:
            if s.start == 0 and s.sample:
                prefills.append(s)
            elif s.num_tokens == 1 and s.sample:
                decodes.append(s)
            else:
                raise RuntimeError(f"the Neuron runner needs whole prompts and single decode tokens; request "
                                   f"{s.request_id!r} was scheduled for tokens "
                                   f"[{s.start}, {s.start + s.num_tokens}) (is chunked prefill on?)")
        self.last_step = []
        logits: dict[int, torch.Tensor] = {}          # id(scheduled) -> [vocab]
        if decodes:
            logits.update(self._token_generation(decodes))
        for s in prefills:
            logits[id(s)] = self._context_encoding(s)
        order = [s for s in step.sequences if s.sample]
        rows = torch.stack([logits[id(s)] for s in order]).to(self.logits_dtype)
        return StepOutput(sampled=sample_sequences(self.sampler, order, rows, self.generator))

    def _token_generation(self, decodes: list[SequenceStep]) -> dict[int, torch.Tensor]:
        size = self.settings.batch_size
        input_ids = torch.zeros(size, 1, dtype=torch.long)
        cache_ids = torch.zeros(size, 1, dtype=torch.long)
        slots = []
        for s in decodes:
            slot = _slot(s)
            input_ids[slot, 0] = s.token_ids[0]
            cache_ids[slot, 0] = s.start
            slots.append(slot)
        bucket = buckets.pick_bucket(int(cache_ids.max()) + 1, self.settings.token_gen_buckets)
        if bucket is None:   # add_request refuses such sequences; reaching here is a bug
            raise RuntimeError(f"position {int(cache_ids.max())} is past the largest token-gen bucket "
                               f"{self.settings.token_gen_buckets[-1]}")
        logits = self.model(input_ids, cache_ids, torch.arange(size, dtype=torch.long))
        self._record(BucketCall("token_gen", bucket, len(decodes)))
        return {id(s): logits[slot] for s, slot in zip(decodes, slots)}

    def _context_encoding(self, s: SequenceStep) -> torch.Tensor:
        tokens = s.token_ids
        bucket = buckets.pick_bucket(len(tokens), self.settings.context_buckets)
        if bucket is None:
            raise RuntimeError(f"a prompt of {len(tokens)} tokens is past the largest context bucket "
                               f"{self.settings.context_buckets[-1]}")
        input_ids = torch.zeros(1, bucket, dtype=torch.long)
        input_ids[0, :len(tokens)] = torch.tensor(tokens)
        cache_ids = torch.zeros(1, bucket, dtype=torch.long)
        cache_ids[0, :len(tokens)] = torch.arange(len(tokens))
        logits = self.model(input_ids, cache_ids, torch.tensor([_slot(s)]))
        self._record(BucketCall("context", bucket, 1))
        return logits[0]

    def _record(self, call: BucketCall) -> None:
        self.last_step.append(call)
        self.bucket_counts[call.kind, call.bucket] += 1


def _slot(s: SequenceStep) -> int:
    return s.block_ids[0]


class NeuronWorker:
    def __init__(self, config, platform, rank: int = 0) -> None:
        settings: NeuronSettings = config.extra["neuron_settings"]
        self.config = config
        self.device = torch.device("cpu")      # the SDK takes and returns host tensors; sampling runs here
        # One KV slot per sequence, the compiled batch: the block manager hands out slot ids.
        self.num_blocks = settings.batch_size
        if settings.backend == REFERENCE_BACKEND:
            from plexus.platforms.neuron.reference import ReferenceCompiledModel

            self.model = ReferenceCompiledModel(config, settings, platform)
        else:
            from plexus.platforms.neuron import sdk

            spec = sdk.model_spec(config, settings, sdk.sdk_version())
            self.model = sdk.TransformersNeuronxModel(sdk.load_sdk_model(spec))
        self.runner = NeuronModelRunner(settings, self.model, config.model.seed)
        logger.info("Neuron (%s): batch %d, context buckets %s, token-gen buckets %s, tp %d", settings.backend,
                    settings.batch_size, settings.context_buckets, settings.token_gen_buckets, settings.tp_degree)

    def determine_num_available_blocks(self) -> int:
        return self.num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        """The compiled model holds its own KV cache, one slot per sequence of the batch."""
        if num_blocks != self.num_blocks:
            raise ValueError(f"the Neuron worker serves {self.num_blocks} KV slots (its compiled batch), "
                             f"not {num_blocks}")

    def check_health(self) -> None:
        pass

    def execute_model(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)
