"""The CUDA platform.

On any machine: its registration and errors, the KV budget arithmetic, the CUDA-graph input buffers, and a
whole engine running the platform's attention backend and ops (the Triton kernels, under Triton's
interpreter on CPU) against HF token for token, through mixed prefill/decode steps, prefix caching and
preemption. On a machine with an NVIDIA GPU (skipped elsewhere, with the reason): SmolLM2 on the GPU in fp32
and bf16 against the CPU platform and HF, with CUDA graphs on and off, prefix caching, and a KV cache small
enough to force preemption."""
from __future__ import annotations

import os

import pytest
import torch

from plexus import LLM, SamplingParams
from plexus.platforms import registry
from plexus.platforms.cpu import CpuPlatform
from plexus.platforms.cuda import CudaPlatform
from plexus.worker.compiled_decode import DecodeBuffers
from plexus.platforms.cuda.worker import check_free_at_startup, kv_budget_from_profile, profile_batch

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")


# ----------------------------------------------------------------------------------------------------------
# The platform itself
# ----------------------------------------------------------------------------------------------------------

def test_cuda_registers_through_the_entry_point_group_with_nccl():
    platform = registry.registered_platforms()["cuda"]
    assert isinstance(platform, CudaPlatform)
    assert platform.device_type == "cuda" and platform.distributed_backend() == "nccl"
    assert platform.worker_cls == "plexus.platforms.cuda.worker.CudaWorker"


def test_pyproject_declares_the_cuda_entry_point():
    import pathlib
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["plexus.platforms"]["cuda"] == "plexus.platforms.cuda"


def test_auto_prefers_cuda_over_cpu_when_a_gpu_is_there(monkeypatch):
    monkeypatch.setattr(CudaPlatform, "is_available", lambda self: True)
    assert registry.resolve_platform("auto").name in ("cuda", "neuron")
    monkeypatch.setattr(CudaPlatform, "is_available", lambda self: False)
    assert registry.resolve_platform("auto").name != "cuda"


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: device='cuda' works here")
def test_device_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device='cuda': .*(no CUDA support|no CUDA GPU is visible)"):
        LLM(device="cuda", dtype="float32")


def test_is_available_creates_no_cuda_context():
    """Asking is cheap: torch.cuda.is_available() counts devices without initializing CUDA."""
    if HAS_CUDA and torch.cuda.is_initialized():
        pytest.skip("CUDA was initialized by an earlier test in this process")
    CudaPlatform().is_available()
    assert not torch.cuda.is_initialized()


def test_unsupported_quantization_on_cuda_names_what_is(monkeypatch):
    """Refused while the engine's settings are checked, before anything touches a GPU."""
    monkeypatch.setattr(CudaPlatform, "is_available", lambda self: True)
    with pytest.raises(ValueError, match=r"quantization='bitsandbytes' is not supported on the cuda platform; it "
                                         r"runs: neuron_quant, int8, w8a8, fp8, awq, gptq, compressed-tensors, gguf"):
        LLM(device="cuda", quantization="bitsandbytes")


# ----------------------------------------------------------------------------------------------------------
# The KV budget
# ----------------------------------------------------------------------------------------------------------

def test_profile_batch_spreads_the_longest_step_over_the_sequences():
    assert profile_batch(2048, 256, 4096) == [8] * 256
    assert profile_batch(100, 3, 4096) == [34, 33, 33]
    assert profile_batch(8192, 1, 2048) == [2048] * 4          # no sequence longer than max_model_len
    assert profile_batch(10, 256, 4096) == [1] * 10            # never more sequences than tokens
    assert sum(profile_batch(5000, 7, 1024)) == 5000


def test_kv_budget_is_the_engines_share_less_its_weights_and_the_peak():
    gib = 1 << 30
    assert kv_budget_from_profile(80 * gib, 0.9, 10 * gib, 2 * gib) == int(72 * gib) - 12 * gib
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.1 .* raise gpu_memory_utilization, or "
                                         r"lower max_num_batched_tokens or max_num_seqs"):
        kv_budget_from_profile(80 * gib, 0.1, 10 * gib, 2 * gib)
    check_free_at_startup(40 * gib, 80 * gib, 0.5)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.6 asks for 48\.00 GiB .* only 40\.00 GiB are "
                                         r"free .* lower gpu_memory_utilization"):
        check_free_at_startup(40 * gib, 80 * gib, 0.6)


# ----------------------------------------------------------------------------------------------------------
# CUDA-graph inputs
# ----------------------------------------------------------------------------------------------------------

def test_decode_buffers_copy_the_step_and_pad_the_bucket_with_scratch_rows():
    from plexus.models.layers.attention import AttentionMetadata

    buffers = DecodeBuffers(max_batch=8, max_blocks=6, scratch_block=99, block_size=4, device=torch.device("cpu"))
    meta = AttentionMetadata.build([1, 1, 1], [5, 9, 2], [[3, 7], [1, 2, 4], [8]], 4, torch.device("cpu"),
                                   use_decode_kernel=True)
    buffers.fill(torch.tensor([11, 12, 13]), meta, bucket=4)
    view = buffers.metadata(4)
    assert buffers.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert view.positions.tolist() == [4, 8, 1, 0]
    assert view.slot_mapping.tolist() == [7 * 4 + 0, 4 * 4 + 0, 8 * 4 + 1, 99 * 4]
    assert view.decode.seq_lens.tolist() == [5, 9, 2, 1]
    assert view.decode.block_tables.tolist() == [[3, 7, 0, 99, 99, 99], [1, 2, 4, 99, 99, 99],
                                                 [8, 0, 0, 99, 99, 99], [99] * 6]
    # A smaller step later leaves no row of the earlier one behind in its bucket.
    meta = AttentionMetadata.build([1], [3], [[5]], 4, torch.device("cpu"), use_decode_kernel=True)
    buffers.fill(torch.tensor([21]), meta, bucket=2)
    assert buffers.metadata(2).decode.block_tables.tolist() == [[5, 99, 99, 99, 99, 99], [99] * 6]
    assert buffers.metadata(2).slot_mapping.tolist() == [5 * 4 + 2, 99 * 4]


def test_varlen_metadata_describes_every_sequence_of_a_mixed_step():
    from plexus.models.layers.attention import AttentionMetadata

    meta = AttentionMetadata.build([3, 1, 2], [3, 6, 10], [[4], [2, 9], [1, 5, 6]], 4, torch.device("cpu"),
                                   use_decode_kernel=True, use_varlen_kernel=True)
    assert meta.decode is None and meta.prefills == []
    v = meta.varlen
    assert v.query_start_loc.tolist() == [0, 3, 4, 6] and v.seq_lens.tolist() == [3, 6, 10]
    assert v.max_query_len == 3 and v.block_tables.dtype == torch.int32
    assert v.block_tables.tolist() == [[4, 0, 0], [2, 9, 0], [1, 5, 6]]
    assert meta.positions.tolist() == [0, 1, 2, 5, 8, 9]
    assert meta.slot_mapping.tolist() == [16, 17, 18, 9 * 4 + 1, 6 * 4 + 0, 6 * 4 + 1]
    # A step of decodes only keeps the decode kernel's metadata (what the CUDA graphs replay).
    meta = AttentionMetadata.build([1, 1], [3, 6], [[4], [2, 9]], 4, torch.device("cpu"),
                                   use_decode_kernel=True, use_varlen_kernel=True)
    assert meta.varlen is None and meta.decode is not None


# ----------------------------------------------------------------------------------------------------------
# On an NVIDIA GPU
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parity_prompts():
    from test_parity import MAX_TOKENS, PROMPTS

    return PROMPTS, MAX_TOKENS


def _greedy(llm: LLM, prompts: list[str], max_tokens: int) -> list[list[int]]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def cpu_greedy(llm_fp32, parity_prompts):
    prompts, max_tokens = parity_prompts
    return _greedy(llm_fp32, prompts, max_tokens)


@needs_gpu
@pytest.mark.parametrize("settings", [
    dict(),                                                        # CUDA graphs, prefix caching
    dict(enforce_eager=True),
    dict(enable_prefix_caching=False, max_num_batched_tokens=32),   # chunked prefill: mixed steps
    dict(num_gpu_blocks_override=24, max_num_seqs=8),               # 384 tokens for 8 prompts: preemption
], ids=["graphs", "eager", "chunked-32", "preemption"])
def test_gpu_greedy_fp32_matches_the_cpu_platform_and_hf(settings, cpu_greedy, parity_prompts, hf_smollm,
                                                         smollm_tokenizer):
    prompts, max_tokens = parity_prompts
    llm = LLM(device="cuda", dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, **settings)
    got = _greedy(llm, prompts, max_tokens)
    assert got == cpu_greedy
    hf = hf_smollm
    eos = smollm_tokenizer.eos_token_id
    for prompt, tokens in zip(prompts[:2], got[:2]):
        ids = torch.tensor([smollm_tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        assert tokens == ref[0, ids.shape[1]:].tolist()
    if "enforce_eager" not in settings:
        assert sum(llm.llm_engine.executor.worker.runner.compiled.bucket_steps.values()) > 0
    del llm
    torch.cuda.empty_cache()


@needs_gpu
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_greedy_bf16_matches_hf_bf16_on_the_gpu(eager, parity_prompts, smollm_dir, smollm_tokenizer):
    from transformers import AutoModelForCausalLM

    prompts, max_tokens = parity_prompts
    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.bfloat16).cuda().eval()
    eos = smollm_tokenizer.eos_token_id
    expected = []
    for prompt in prompts:
        ids = torch.tensor([smollm_tokenizer.encode(prompt)], device="cuda")
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        expected.append(out[0, ids.shape[1]:].tolist())
    del hf
    llm = LLM(device="cuda", dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=eager)
    assert _greedy(llm, prompts, max_tokens) == expected
    del llm
    torch.cuda.empty_cache()


@needs_gpu
def test_gpu_kv_cache_comes_from_the_memory_budget(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="plexus"):
        llm = LLM(device="cuda", dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.2)
    blocks = llm.llm_engine.kv_cache.num_blocks
    assert "KV cache budget" in caplog.text and f"({blocks} blocks)" in caplog.text
    _, total = torch.cuda.mem_get_info()
    assert torch.cuda.memory_reserved() <= 0.2 * total * 1.05
    del llm
    torch.cuda.empty_cache()
    assert os.environ.get("TRITON_INTERPRET") != "1"


# ----------------------------------------------------------------------------------------------------------
# A whole engine on the CUDA platform's kernels, under Triton's interpreter on CPU
# ----------------------------------------------------------------------------------------------------------

class CudaKernelsOnCpu(CpuPlatform):
    """The CPU platform's worker with the CUDA platform's attention backend and model ops: every attention and
    rope/cache-write call of a real engine goes through the Triton kernels (interpreted, on CPU tensors)."""
    name = "cuda-kernels-on-cpu"

    def attention_backend(self, config) -> str:
        return CudaPlatform().attention_backend(config)

    def model_ops(self, config) -> str:
        return CudaPlatform().model_ops(config)


TINY_VOCAB = 512


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    """A random Llama with 6 query heads over 2 kv heads of dim 32, two layers, and HF's greedy continuations."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-gqa")
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, TINY_VOCAB, (40,), generator=g).tolist()       # a prefix several prompts share
    prompts = [torch.randint(0, TINY_VOCAB, (n,), generator=g).tolist() for n in (1, 7, 23)]
    prompts += [shared + torch.randint(0, TINY_VOCAB, (n,), generator=g).tolist() for n in (0, 5, 37, 50)]
    expected = []
    for prompt in prompts:      # HF's argmax, step by step (generate() would stop at, or mask, the EOS id)
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        expected.append(ids[len(prompt):])
    return path, prompts, expected


@pytest.fixture
def cuda_kernels_on_cpu(monkeypatch):
    from triton_interpret import interpreting

    platforms = {**registry.registered_platforms(), CudaKernelsOnCpu.name: CudaKernelsOnCpu()}
    monkeypatch.setattr(registry, "registered_platforms", lambda: platforms)
    with interpreting():
        yield CudaKernelsOnCpu.name


@pytest.mark.parametrize("settings", [
    dict(enable_prefix_caching=True),                                             # whole prompts, cached prefixes
    dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=16),   # mixed steps
    dict(enable_prefix_caching=False, num_gpu_blocks_override=9),                 # 144 slots for 7 prompts
], ids=["prefix-cache", "chunked-16-mixed", "preemption"])
def test_engine_on_the_cuda_kernels_matches_hf_token_for_token(settings, tiny_gqa, cuda_kernels_on_cpu):
    path, prompts, expected = tiny_gqa
    llm = LLM(model=str(path), device=cuda_kernels_on_cpu, skip_tokenizer_init=True, dtype="float32",
              max_model_len=256, kv_cache_space=0.01, **settings)
    engine = llm.llm_engine
    assert type(engine.executor.worker.model.layers[0].self_attn.attn).__name__ == "TritonPagedAttention"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # The shared-prefix prompts twice: the second time their prefix comes from the cache.
    requests = [{"prompt_token_ids": p} for p in prompts + prompts[3:]]
    outputs = llm.generate(requests, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected + expected[3:]
    if settings.get("num_gpu_blocks_override"):
        assert engine.scheduler.num_preemptions > 0
