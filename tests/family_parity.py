"""What every model family is held to: a tiny random model built from the architecture's own transformers
config class, saved as an HF checkpoint, gives plexus's greedy fp32 output token for token equal to HF's and
prompt logprobs within 1e-4 of HF's log-softmax, on every speed path (the CPU platform's fused decode step,
layer by layer, pure torch) and under every schedule (prefix caching with chunked prefill, forced
preemption). The test files of the families call `check_family`."""
from __future__ import annotations

import pathlib

import pytest
import torch

from plexus import LLM, SamplingParams

VOCAB = 256
MAX_TOKENS = 6
PROMPT_LOGPROB_BOUND = 1e-4     # measured worst case 2e-6 on these models (fp32), with margin

# env settings of each speed path
PATHS = {
    "fused": {},
    "layer-by-layer": {"PLEXUS_FUSED_DECODE": "0"},
    "pure-torch": {"PLEXUS_CPU_KERNELS": "0"},
}
# engine settings of each schedule; the prompts share a 32-token prefix (two blocks of 16)
SCHEDULES = {
    "prefix-cache-chunked-16": dict(enable_prefix_caching=True, enable_chunked_prefill=True,
                                    max_num_batched_tokens=16),
    "preemption": dict(enable_prefix_caching=False, num_gpu_blocks_override=9, max_num_seqs=4),
}


def build(config_cls, model_cls, path: pathlib.Path, seed: int = 0, perturb=None, **config):
    """A random HF model of `config`, saved to `path` (fp32); perturb(model) may randomize what init leaves
    constant (biases, norms)."""
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=VOCAB, **config)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name.endswith("sinks"):
                p.add_(torch.randn_like(p) * 0.1)
        if perturb is not None:
            perturb(model)
    model.save_pretrained(path)
    return model


def prompts(count: int = 4, shared: int = 32, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, VOCAB, (shared,), generator=g).tolist()
    return [prefix + torch.randint(0, VOCAB, (5 + 13 * i,), generator=g).tolist() for i in range(count)]


def hf_reference(hf_model, prompt_ids: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """(greedy continuation, log-softmax of the prompt's logits [L, V]) per prompt, one prompt at a time."""
    out = []
    for ids in prompt_ids:
        with torch.no_grad():
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(hf_model(x).logits[0].float(), dim=-1)
            gen = hf_model.generate(x, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        out.append((gen[0, len(ids):].tolist(), logprobs))
    return out


def check_family(path, expected, prompt_ids, path_env: dict, schedule: dict, monkeypatch, **llm_kwargs) -> LLM:
    """plexus on `path` against HF's `expected` (hf_reference), on one speed path and schedule."""
    for name, value in path_env.items():
        monkeypatch.setenv(name, value)
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.02, **schedule,
              **llm_kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    for ids, out, (greedy, logprobs) in zip(prompt_ids, outputs, expected):
        assert out.outputs[0].token_ids == greedy
        errors = [abs(out.prompt_logprobs[pos][ids[pos]].logprob - logprobs[pos - 1, ids[pos]].item())
                  for pos in range(1, len(ids))]
        assert max(errors) < PROMPT_LOGPROB_BOUND, max(errors)
    return llm


def lazy_families(models: dict, common: dict, tmp_path_factory, prepare=None):
    """name -> (checkpoint dir, HF model, prompts, HF's answers), each model of `models` (name -> (config class,
    HF model class, config)) built with `common` settings on first use and kept; prepare(hf), where given, changes
    the HF model after its checkpoint is saved (HF's answers are then the prepared model's)."""
    built = {}

    def get(name):
        if name not in built:
            config_cls, model_cls, extra = models[name]
            path = tmp_path_factory.mktemp(name)
            hf = build(config_cls, model_cls, path, **{**common, **extra})
            if prepare is not None:
                prepare(hf)
            ids = prompts()
            built[name] = path, hf, ids, hf_reference(hf, ids)
        return built[name]
    return get


def family_fixture(models: dict, common: dict):
    """A module-scoped fixture over `models` (name -> (config class, HF model class, config)): each model built
    with `common` settings, saved, and scored by HF: (path, prompts, hf_reference)."""
    @pytest.fixture(scope="module", params=list(models))
    def family(request, tmp_path_factory):
        config_cls, model_cls, extra = models[request.param]
        path = tmp_path_factory.mktemp(request.param)
        hf = build(config_cls, model_cls, path, **common, **extra)
        ids = prompts()
        return path, ids, hf_reference(hf, ids)
    return family
