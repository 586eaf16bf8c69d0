"""Routed experts (plexus.models.layers.moe) and the MoE families, Mixtral and Qwen3-MoE.

The CPU kernel (torch.ops.plexus.fused_moe) and the pure-torch ModelOps.fused_moe are each held to the
per-expert loop written out here (HF's routing: softmax in fp32, torch.topk, renormalized where asked; or
gpt-oss's top-k of the logits, then their softmax), with tied router logits and experts that get no tokens,
with and without expert biases and gpt-oss's clamped SwiGLU, and to HF's own MoE blocks (gpt-oss's router bit
for bit, and its block through FusedMoE loading transformers' interleaved, transposed layout); the families
(gpt-oss's in tests/test_gpt_oss.py) are held to HF
token for token on every speed path and schedule (tests/family_parity.py), from the checkpoint layouts plexus
reads: the hub's per expert (as save_pretrained writes it, and as written here by hand) and transformers'
stacked one."""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import GptOssConfig, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP, GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from family_parity import PATHS, SCHEDULES, check_family, lazy_families
from plexus.envs import cache_dir
from plexus.models.layers.linear import LinearBuilder
from plexus.models.layers.moe import FusedMoE
from plexus.models.layers.ops import ModelOps, select_experts
from plexus.platforms.cpu import kernels

kernels.load(cache_dir())
from plexus.platforms.cpu.ops import CpuModelOps  # noqa: E402  (needs the loaded ops)

# The kernel in bf16 against the loop in bf16: the two round the same ops' outputs to bf16, but their matmuls
# sum in another order, so a rounding may land one bf16 ulp apart and carry on. Bound: one bf16 ulp (2^-8) of
# the largest output; measured worst 6.3e-4 of it (0.16 ulp) over these shapes.
BF16_BOUND = 2.0 ** -8
FP32_BOUND = 1e-5

# Router logits [T, 4] whose top picks tie: rows 0-2 tie at the top-1 / top-2 boundary, where torch.topk (HF's
# router) keeps neither the lowest index nor the highest (it picks expert 3 of row 0 for top-1, say).
TIED_LOGITS = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]]


def experts_loop(x, router_logits, w13, w2, top_k, renormalize, b13=None, b2=None, activation="silu",
                 alpha=1.702, limit=7.0, routing="softmax_topk"):
    """HF's MoE blocks written out: route each token (Mixtral's and Qwen3-MoE's softmax, then top-k; gpt-oss's
    top-k of the logits, then their softmax), then for each expert the tokens that picked it (an expert none
    picked is skipped), down(act(gate, up)) plus the biases where given, in the model dtype, weighted and
    summed in fp32; act: silu(gate) * up, or gpt-oss's clamped SwiGLU."""
    if routing == "topk_softmax":
        top_logits, ids = torch.topk(router_logits, top_k, dim=-1)
        weights = torch.softmax(top_logits.float(), dim=-1)
    else:
        weights, ids = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(w13.shape[0]):
        tokens, slots = torch.where(ids == e)
        if len(tokens):
            h = x[tokens]
            gate, up = F.linear(h, w13[e, :inter]), F.linear(h, w13[e, inter:])
            if b13 is not None:
                gate, up = gate + b13[e, :inter], up + b13[e, inter:]
            if activation == "swigluoai":
                gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
                act = (up + 1) * (gate * torch.sigmoid(gate * alpha))
            else:
                act = F.silu(gate) * up
            y = F.linear(act, w2[e])
            if b2 is not None:
                y = y + b2[e]
            out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
    return out.to(x.dtype)


def moe_inputs(tokens, num_experts, dtype, seed, hidden=96, inter=80, tied=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * 0.1).to(dtype)
    logits = torch.randn(tokens, num_experts, generator=g)
    if tied:
        ties = torch.tensor(TIED_LOGITS).repeat(1, num_experts // 4)
        logits[:len(ties)] = ties[:tokens]
    return x, logits.to(dtype), w13, w2


def expert_biases(num_experts, dtype, seed, hidden=96, inter=80):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(num_experts, 2 * inter, generator=g) * 0.5).to(dtype),
            (torch.randn(num_experts, hidden, generator=g) * 0.1).to(dtype))


# gpt-oss's alpha, and a limit the gate and up projections of moe_inputs' weights (about unit scale) cross often.
# With biases and either activation the bounds above hold with room: measured worst 0.26 of BF16_BOUND (kernel,
# bf16) and 0.03 of FP32_BOUND over these shapes.
SWIGLU = dict(alpha=1.702, limit=1.0)
# (activation, routing): gpt-oss's own, and each changed alone
ACTIVATION_ROUTING = [("swigluoai", "topk_softmax"), ("silu", "topk_softmax"), ("swigluoai", "softmax_topk")]


def assert_close_to(got, expected, bound):
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= bound * scale


CASES = [(1, 4, 1), (3, 8, 2), (4, 4, 2), (17, 8, 4), (64, 8, 2), (40, 16, 4)]   # tokens, experts, top_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("tokens,num_experts,top_k", CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_kernel_equals_the_experts_loop(dtype, threads, tokens, num_experts, top_k, renormalize):
    """threads 1: experts one after another; 3: shared among threads wherever 3 or more have tokens. Few tokens
    leave experts with none; the first rows' top picks tie."""
    x, logits, w13, w2 = moe_inputs(tokens, num_experts, dtype, seed=tokens + num_experts, tied=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.plexus.fused_moe(x, logits, w13, w2, top_k, renormalize)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close_to(got, experts_loop(x, logits, w13, w2, top_k, renormalize),
                    FP32_BOUND if dtype == torch.float32 else BF16_BOUND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,top_k", CASES)
def test_torch_ops_equal_the_experts_loop(dtype, tokens, num_experts, top_k):
    x, logits, w13, w2 = moe_inputs(tokens, num_experts, dtype, seed=tokens * num_experts, tied=True)
    got = ModelOps().fused_moe(x, logits, w13, w2, top_k, True)
    assert_close_to(got, experts_loop(x, logits, w13, w2, top_k, True), FP32_BOUND if dtype == torch.float32
                    else BF16_BOUND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("tokens,num_experts,top_k", CASES)
@pytest.mark.parametrize("activation,routing", ACTIVATION_ROUTING)
def test_kernel_with_biases_and_swigluoai_equals_the_experts_loop(dtype, threads, tokens, num_experts, top_k,
                                                                  activation, routing):
    """inter 88: the kernel's vector loop over the activation (16 lanes) and its scalar tail."""
    x, logits, w13, w2 = moe_inputs(tokens, num_experts, dtype, seed=tokens + num_experts, inter=88, tied=True)
    b13, b2 = expert_biases(num_experts, dtype, seed=tokens, inter=88)
    gate_up = torch.einsum("th,eih->tei", x.float(), w13.float()) + b13.float()
    assert (gate_up > SWIGLU["limit"]).any() and (gate_up < -SWIGLU["limit"]).any()    # the clamp bites
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.plexus.fused_moe(x, logits, w13, w2, top_k, True, b13, b2, activation, SWIGLU["alpha"],
                                         SWIGLU["limit"], routing)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == dtype and got.shape == x.shape
    expected = experts_loop(x, logits, w13, w2, top_k, True, b13, b2, activation, routing=routing, **SWIGLU)
    assert_close_to(got, expected, FP32_BOUND if dtype == torch.float32 else BF16_BOUND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,top_k", CASES)
@pytest.mark.parametrize("activation,routing", ACTIVATION_ROUTING)
def test_torch_ops_with_biases_and_swigluoai_equal_the_experts_loop(dtype, tokens, num_experts, top_k, activation,
                                                                    routing):
    x, logits, w13, w2 = moe_inputs(tokens, num_experts, dtype, seed=tokens * num_experts, tied=True)
    b13, b2 = expert_biases(num_experts, dtype, seed=tokens)
    got = ModelOps().fused_moe(x, logits, w13, w2, top_k, False, b13, b2, activation, routing=routing, **SWIGLU)
    expected = experts_loop(x, logits, w13, w2, top_k, False, b13, b2, activation, routing=routing, **SWIGLU)
    assert_close_to(got, expected, FP32_BOUND if dtype == torch.float32 else BF16_BOUND)


def test_the_biases_the_clamp_and_the_routing_order_each_change_the_loop():
    """So the equalities above could fail: the loop's output moves with each new argument."""
    x, logits, w13, w2 = moe_inputs(17, 8, torch.float32, seed=5)
    b13, b2 = expert_biases(8, torch.float32, seed=5)
    base = experts_loop(x, logits, w13, w2, 2, False, b13, b2, "swigluoai", routing="topk_softmax", **SWIGLU)
    for changed in (experts_loop(x, logits, w13, w2, 2, False, None, b2, "swigluoai", routing="topk_softmax",
                                 **SWIGLU),
                    experts_loop(x, logits, w13, w2, 2, False, b13, None, "swigluoai", routing="topk_softmax",
                                 **SWIGLU),
                    experts_loop(x, logits, w13, w2, 2, False, b13, b2, "swigluoai", routing="topk_softmax",
                                 alpha=1.702, limit=7.0),
                    experts_loop(x, logits, w13, w2, 2, False, b13, b2, "swigluoai", routing="softmax_topk",
                                 **SWIGLU)):
        assert (changed - base).abs().max() > 1e-3 * base.abs().max()


@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (8, 4), (32, 4)])
def test_gpt_oss_routing_is_hf_routers_bit_for_bit(num_experts, top_k):
    """gpt-oss's router (top-k of the logits, softmax of those) as plexus routes it: select_experts, and the
    kernel and the torch ops read through experts that each output one basis vector (zero weights, down bias
    e_e), so out[:, e] is token's weight for expert e, exactly. The other order (softmax over all, top-k,
    renormalized) picks the same experts but differs from HF in the last bit on some rows."""
    torch.manual_seed(num_experts)
    router = GptOssTopKRouter(GptOssConfig(hidden_size=64, num_local_experts=num_experts, num_experts_per_tok=top_k))
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.bias.normal_(0, 0.5)
        x = torch.randn(300, 64)
        logits, scores, ids = router(x)
    expected = torch.zeros(300, num_experts).scatter(1, ids, scores)      # [T, E]: each token's expert weights
    weights, chosen = select_experts(logits, top_k, True, "topk_softmax")
    assert torch.equal(chosen, ids) and torch.equal(weights, scores)
    other, other_ids = select_experts(logits, top_k, True, "softmax_topk")
    assert torch.equal(other_ids, ids) and not torch.equal(other, scores)
    w13, w2 = torch.zeros(num_experts, 2 * 32, 64), torch.zeros(num_experts, 64, 32)
    b13, b2 = torch.zeros(num_experts, 2 * 32), torch.eye(num_experts, 64)
    for ops in (ModelOps(), CpuModelOps()):
        out = ops.fused_moe(x, logits, w13, w2, top_k, True, b13, b2, "swigluoai", routing="topk_softmax")
        assert torch.equal(out[:, :num_experts], expected)


@pytest.mark.parametrize("ops_class", [ModelOps, CpuModelOps])
def test_fused_moe_equals_hf_gpt_oss_block_from_its_stacked_layout(ops_class):
    """HF's gpt-oss MLP (its router, and its experts: [E, H, 2I] with gate and up interleaved, [E, I, H], random
    biases, a limit that clamps) loaded into FusedMoE by transformers' own names. H = 2I makes the gate/up
    tensor square, so only the declared layout (transposed, interleaved) reads it right."""
    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                          swiglu_limit=1.0)
    block = GptOssMLP(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        expected = block(x)[0][0]
    moe = FusedMoE(64, 32, 8, 2, renormalize=True, linear=LinearBuilder(ops_class(), None, {}), prefix="mlp",
                   hidden_act="swigluoai", router_bias=True, expert_bias=True, routing="topk_softmax",
                   swiglu_limit=1.0, gate_up_interleaved=True, stacked_transposed=True)
    filled = []
    for name, tensor in block.state_dict().items():
        if name.startswith("router."):
            moe.gate.load_weight(name.removeprefix("router."), tensor)
        else:
            filled += moe.load_checkpoint_tensor(name, tensor)
    assert sorted(filled) == ["b13", "b2", "w13", "w2"] and not moe.gate.missing_weights()
    with torch.no_grad():
        assert_close_to(moe(x[0]), expected, FP32_BOUND)


def test_kernel_with_biases_traces_under_torch_compile():
    x, logits, w13, w2 = moe_inputs(5, 8, torch.float32, seed=6)
    b13, b2 = expert_biases(8, torch.float32, seed=6)
    ops = CpuModelOps()
    compiled = torch.compile(lambda x, logits: ops.fused_moe(x, logits, w13, w2, 2, True, b13, b2, "swigluoai",
                                                             routing="topk_softmax", **SWIGLU),
                             fullgraph=True, dynamic=False)
    assert_close_to(compiled(x, logits), experts_loop(x, logits, w13, w2, 2, True, b13, b2, "swigluoai",
                                                      routing="topk_softmax", **SWIGLU), FP32_BOUND)


def test_torch_ops_with_biases_under_compile_run_every_expert_with_static_shapes(monkeypatch):
    x, logits, w13, w2 = moe_inputs(5, 8, torch.float32, seed=7, tied=True)
    b13, b2 = expert_biases(8, torch.float32, seed=7)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_close_to(ModelOps().fused_moe(x, logits, w13, w2, 2, False, b13, b2, "swigluoai", routing="topk_softmax",
                                         **SWIGLU),
                    experts_loop(x, logits, w13, w2, 2, False, b13, b2, "swigluoai", routing="topk_softmax",
                                 **SWIGLU), FP32_BOUND)


def test_torch_ops_under_compile_run_every_expert_with_static_shapes(monkeypatch):
    """What a compiled decode graph traces (no data-dependent shapes) computes the same."""
    x, logits, w13, w2 = moe_inputs(5, 8, torch.float32, seed=3, tied=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_close_to(ModelOps().fused_moe(x, logits, w13, w2, 2, False), experts_loop(x, logits, w13, w2, 2, False),
                    FP32_BOUND)


def test_kernel_traces_under_torch_compile():
    """The op has a shape function (moe.cpp's Meta kernel), so a compiled decode graph can hold it."""
    x, logits, w13, w2 = moe_inputs(5, 8, torch.float32, seed=4)
    ops = CpuModelOps()
    compiled = torch.compile(lambda x, logits: ops.fused_moe(x, logits, w13, w2, 2, True), fullgraph=True,
                             dynamic=False)
    assert_close_to(compiled(x, logits), experts_loop(x, logits, w13, w2, 2, True), FP32_BOUND)


def test_tied_logits_pick_what_torch_topk_picks_not_the_lowest_index():
    """The case the tie rows are for: a kernel breaking ties by index would disagree with HF here."""
    probs = torch.tensor(TIED_LOGITS[:1]).softmax(dim=-1)
    assert torch.topk(probs, 1).indices.item() != 0


def test_ops_match_hf_moe_blocks_with_ties_and_idle_experts():
    """HF's own sparse blocks (router + experts) where three experts' router rows are one vector that every
    token leans towards: their logits tie at the top for every token (top-1 and top-2 each keep some of the
    three), and the other five experts get no token."""
    torch.manual_seed(0)
    blocks = [
        (MixtralSparseMoeBlock(MixtralConfig(hidden_size=48, intermediate_size=40, num_local_experts=8,
                                             num_experts_per_tok=1)), 1, True),
        (Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=48, moe_intermediate_size=40, num_experts=8,
                                               num_experts_per_tok=2, norm_topk_prob=False)), 2, False),
    ]
    lean = F.normalize(torch.randn(48), dim=0)
    x = torch.randn(1, 5, 48) + 3 * lean
    for block, top_k, renormalize in blocks:
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.2)
            block.gate.weight[[2, 5, 6]] = 5 * lean
            expected = block(x)[0]
        logits = F.linear(x[0], block.gate.weight)
        assert torch.equal(logits[:, 2], logits[:, 5]) and torch.equal(logits[:, 2], logits[:, 6])
        assert set(torch.topk(logits, top_k).indices.flatten().tolist()) <= {2, 5, 6}
        w13, w2 = block.experts.gate_up_proj.data, block.experts.down_proj.data
        for ops in (ModelOps(), CpuModelOps()):
            assert_close_to(ops.fused_moe(x[0], logits, w13, w2, top_k, renormalize), expected, FP32_BOUND)


# ---------------------------------------------------------------------------------------------------- families

COMMON = dict(intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              initializer_range=0.1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)

MODELS = {
    "mixtral-4x-top1-sliding-16": (MixtralConfig, MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=1, sliding_window=16, head_dim=32)),
    "mixtral-8x-top2": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen3moe-8x-top4-norm-sparse-step-2": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2,
        head_dim=32)),
    "qwen3moe-4x-top2-mlp-only-1-tied": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
        tie_word_embeddings=True, attention_bias=True)),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (checkpoint dir, HF model, prompts, HF's answers), each built once."""
    return lazy_families(MODELS, COMMON, tmp_path_factory)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("speed_path", list(PATHS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_family_matches_hf_token_for_token(family, name, speed_path, schedule, monkeypatch):
    path, _, ids, expected = family(name)
    check_family(path, expected, ids, PATHS[speed_path], SCHEDULES[schedule], monkeypatch)


def test_save_pretrained_writes_the_hub_layout(family):
    """What the family test reads is the hub's per-expert layout (transformers 5 converts back on save)."""
    for name, marker in [("mixtral-8x-top2", "model.layers.0.block_sparse_moe.experts.7.w3.weight"),
                         ("qwen3moe-8x-top4-norm-sparse-step-2", "model.layers.1.mlp.experts.7.up_proj.weight")]:
        path = family(name)[0]
        assert marker in safetensors.torch.load_file(path / "model.safetensors")


def hub_layout(hf_model, mixtral: bool) -> dict[str, torch.Tensor]:
    """The HF model's state dict (experts stacked) renamed to the hub's per-expert checkpoint names."""
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = {}
    for name, tensor in hf_model.state_dict().items():
        block = name.replace(".mlp.", ".block_sparse_moe.") if mixtral else name
        if name.endswith("mlp.experts.gate_up_proj"):
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[block.replace("gate_up_proj", f"{e}.{gate}.weight")] = tensor[e, :inter].clone()
                out[block.replace("gate_up_proj", f"{e}.{up}.weight")] = tensor[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[block.replace("down_proj", f"{e}.{down}.weight")] = tensor[e].clone()
        elif name.endswith("mlp.gate.weight"):
            out[block] = tensor.clone()
        elif not (name == "lm_head.weight" and hf_model.config.tie_word_embeddings):
            out[name] = tensor.clone()
    return out


@pytest.mark.parametrize("name", ["mixtral-8x-top2", "qwen3moe-4x-top2-mlp-only-1-tied"])
@pytest.mark.parametrize("layout", ["hub-by-hand", "transformers-stacked"])
def test_checkpoint_layouts_load_and_match_hf(family, name, layout, tmp_path, monkeypatch):
    path, hf, ids, expected = family(name)
    if layout == "hub-by-hand":
        safetensors.torch.save_file(hub_layout(hf, name.startswith("mixtral")), tmp_path / "model.safetensors")
        shutil.copy(path / "config.json", tmp_path / "config.json")
    else:
        hf.save_pretrained(tmp_path, save_original_format=False)
        assert "model.layers.0.mlp.experts.gate_up_proj" in safetensors.torch.load_file(tmp_path / "model.safetensors")
    check_family(tmp_path, expected, ids, PATHS["fused"], SCHEDULES["preemption"], monkeypatch)


def test_missing_expert_is_named(family, tmp_path):
    from plexus import LLM

    path, hf, _, _ = family("mixtral-8x-top2")
    tensors = hub_layout(hf, mixtral=True)
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"missing 1 tensors, e.g. \['layers.1.mlp.w13'\]"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, kv_cache_space=0.02)


def test_config_json_names_the_families_without_architectures(family, tmp_path, monkeypatch):
    """model_type alone (no "architectures") picks the class, as for the dense families."""
    path, _, ids, expected = family("mixtral-8x-top2")
    for item in path.iterdir():
        shutil.copy(item, tmp_path / item.name)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_family(tmp_path, expected, ids, PATHS["layer-by-layer"], SCHEDULES["prefix-cache-chunked-16"], monkeypatch)


def test_fused_decode_step_runs_the_moe_layers(family, monkeypatch):
    """The family tests' "fused" path: every decode step of a MoE model is one llama_decode_layers call, told
    each layer's routing (Qwen3-MoE's dense mlp_only layer as a dense MLP), and still matches HF."""
    calls = []
    step = torch.ops.plexus.llama_decode_layers
    monkeypatch.setattr(torch.ops.plexus, "llama_decode_layers", lambda *a, **k: calls.append(list(a[-1])) or step(*a))
    path, _, ids, expected = family("qwen3moe-4x-top2-mlp-only-1-tied")
    check_family(path, expected, ids, PATHS["fused"], SCHEDULES["preemption"], monkeypatch)
    assert calls and all(args == [2, 0, 0, 0, 0, 0, 0, 0] for args in calls)
