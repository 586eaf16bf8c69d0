"""Speed of the model families on their real shapes: plexus against llama.cpp and HF transformers.

Real weights of these sizes cannot be downloaded here, and speed does not depend on the values, so each model
is built with random weights of the real shape (transformers' own config class, the published sizes), saved as
an HF directory in bf16, and converted to GGUF by llama.cpp's own converter (convert_hf_to_gguf.py from the
llama.cpp sources in llama-cpp-python's sdist), so that llama.cpp runs the same weights:

- qwen3-0.6b: Qwen3-0.6B (28 layers, hidden 1024, 16/8 heads of 128, vocabulary 151936, tied), bf16;
- gemma3-1b: Gemma-3-1B (26 layers, hidden 1152, 4/1 heads of 256, five sliding layers of 512 per global one,
  vocabulary 262144, tied), bf16;
- qwen3-30b-a3b-3l: Qwen3-30B-A3B cut to 3 of its 48 layers to fit 24 GiB beside its peers (hidden 2048, 32/4
  heads of 128, all 128 experts of 768, top-8), bf16 and Q8_0 (llama.cpp's quantizer on the BF16 file).

For each model: batch-1 decode (a 32-token prompt, 128 new tokens: TTFT, decode tok/s) and a 64-request mix
(prompts 32-256 tokens, outputs 16-64), greedy with EOS ignored, every system in its own process with 2 threads,
interleaved run by run (benchmarks/latency.py's and throughput.py's runners and measurements). Ratios:
plexus-bf16 against llamacpp-bf16 and hf-bf16; for the MoE also plexus-int8 (`quantization="int8"`: every
decoder matmul, the experts included, int8 per output channel, quantized on load) against llamacpp-q8_0 and
plexus-bf16, and plexus-bf16 against llamacpp-q8_0. The share of the memory floor: decode tok/s x the bytes one
decode step reads (every dense weight once, the top-k experts' weights of each MoE layer; 1 byte a decoder
weight for int8) over the machine's read bandwidth (--bandwidth-gbs, measured by the caller, e.g. with a large
torch copy). --without leaves systems out (memory: the MoE's five processes need about 30 GB at their peaks).

    .venv/bin/python benchmarks/families.py [--models qwen3-0.6b,gemma3-1b,qwen3-30b-a3b-3l] [--runs 3]
        [--no-hf] [--without llamacpp-bf16] [--quick] [--bandwidth-gbs 33]

The first run builds each model (a minute or two), converts it (a few minutes for the MoE) and caches both under
~/.cache/plexus/bench/families/; the converter runs in a small venv made there (sentencepiece, protobuf) that
reads this venv's packages.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import common
import latency
import throughput
from common import (CACHE_DIR, HF, LLAMACPP_BF16, LLAMACPP_Q8_0, PLEXUS, PLEXUS_INT8, Workers, comparisons,
                    ensure_peers,
                    kv_cache_space_gib, machine_info, memory_table, random_prompts, ratio_table, run_isolated,
                    stats_table, write_results)

FAMILIES_DIR = CACHE_DIR / "families"
SEED = 0

# The published shapes (config.json of Qwen/Qwen3-0.6B, google/gemma-3-1b-it, Qwen/Qwen3-30B-A3B).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)),
    "gemma3-1b": ("Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "qwen3-30b-a3b-3l": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=3,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False)),
}
MOE = {"qwen3-30b-a3b-3l"}


@dataclass(frozen=True)
class Settings:
    prompt_length: int = 32
    new_tokens: int = 128
    num_requests: int = 64
    prompt_range: tuple[int, int] = (32, 256)
    output_range: tuple[int, int] = (16, 64)


QUICK = Settings(prompt_length=16, new_tokens=8, num_requests=4, prompt_range=(8, 32), output_range=(4, 8))


# ---------------------------------------------------------------- model files

def hf_dir(name: str) -> pathlib.Path:
    """The model's HF directory (random bf16 weights of the real shape, seeded), made once."""
    path = FAMILIES_DIR / name / "hf"
    if not (path / "config.json").is_file():
        run_isolated(_build_hf, name, str(path))
    return path


def _build_hf(name: str, out: str) -> None:
    import torch
    import transformers

    cls_name, config = MODELS[name]
    # token ids of the byte tokenizer: HF's generate needs an eos and a pad id (EOS is ignored: min_new_tokens)
    cfg = getattr(transformers, cls_name)(**config, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(SEED)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    partial = pathlib.Path(out + ".partial")
    model.save_pretrained(partial)
    _byte_tokenizer(partial)
    partial.rename(out)
    print(f"Wrote {out}", flush=True)


def _byte_tokenizer(path: pathlib.Path) -> None:
    """A byte-level tokenizer.json for plexus and HF (the benchmark passes token ids; the engines only load it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)


def _converter_dir(name: str) -> pathlib.Path:
    """What llama.cpp's converter reads: the HF directory's config and weights (linked) with a SentencePiece
    tokenizer.model of 256 pieces (the converter pads the vocabulary to the config's size), written by
    tests/fixtures/make_family_ggufs.py's write_tokenizer in the converter's venv (it has sentencepiece)."""
    source, path = hf_dir(name), FAMILIES_DIR / name / name    # the converter names the model after its directory
    path.mkdir(exist_ok=True)
    for file in source.iterdir():
        if file.name == "config.json" or file.name.startswith("model"):
            link = path / file.name
            if not link.exists():
                link.symlink_to(file)
    code = ("import pathlib, sys; sys.path.insert(0, sys.argv[1]); from make_family_ggufs import write_tokenizer; "
            "write_tokenizer(pathlib.Path(sys.argv[2]))")
    subprocess.run([str(_converter_python()), "-c", code, str(common.REPO / "tests" / "fixtures"), str(path)],
                   check=True)
    return path


def gguf(name: str, outtype: str) -> pathlib.Path:
    """The model as a GGUF file: bf16 by llama.cpp's converter, q8_0 by its quantizer on that file."""
    path = FAMILIES_DIR / name / f"{name}-{outtype}.gguf"
    if path.is_file():
        return path
    if outtype == "q8_0":
        run_isolated(common._quantize, gguf(name, "bf16"), path, "LLAMA_FTYPE_MOSTLY_Q8_0")
        return path
    source = _converter_dir(name)
    partial = path.with_suffix(".partial")
    # convert_hf_to_gguf.py as __main__, its own gguf-py first on the path; the MoE Qwen converter pointed at
    # tokenizer.model as the dense one reads it (as tests/fixtures/make_family_ggufs.py runs it)
    sys.path.insert(0, str(common.REPO / "tests" / "fixtures"))
    from make_family_ggufs import CONVERTER_RUNNER

    subprocess.run([str(_converter_python()), "-c", CONVERTER_RUNNER, str(_llama_cpp_source()), str(int(name in MOE)),
                    str(source), "--outfile", str(partial), "--outtype", outtype], check=True)
    partial.rename(path)
    return path


def _llama_cpp_source() -> pathlib.Path:
    """llama.cpp's sources, from the sdist of the llama-cpp-python version installed (downloaded once)."""
    import llama_cpp

    root = CACHE_DIR / "llama-cpp-src"
    source = root / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor" / "llama.cpp"
    if not (source / "convert_hf_to_gguf.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(root)], check=True)
        with tarfile.open(next(root.glob(f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"))) as tar:
            tar.extractall(root, filter="data")
    return source


def _converter_python() -> pathlib.Path:
    """A venv with the converter's own needs (sentencepiece, protobuf) that reads this venv's packages (torch,
    transformers, numpy) through a .pth file."""
    venv = CACHE_DIR / "convert-venv"
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next(venv.glob("lib/python*/site-packages"))
        ours = [p for p in sys.path if p.endswith("site-packages")]
        (site / "plexus-venv.pth").write_text("\n".join(ours) + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sentencepiece", "protobuf"], check=True)
    return python


# ---------------------------------------------------------------- what a decode step reads

def decode_step_gb(name: str, decoder_bytes: float = 2) -> float:
    """GB one batch-1 decode step reads: every dense weight once (the decoder's at decoder_bytes a weight, the head
    in bf16), the router, and top_k of each MoE layer's experts; the embedding row is negligible, a tied head
    counts once."""
    _, c = MODELS[name]
    h, layers, head_dim = c["hidden_size"], c["num_hidden_layers"], c["head_dim"]
    attn = h * head_dim * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    if "num_experts" in c:
        mlp = c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"] + h * c["num_experts"]
    else:
        mlp = 3 * h * c["intermediate_size"]
    head = c["vocab_size"] * h
    return (decoder_bytes * layers * (attn + mlp) + 2 * head) / 1e9


# ---------------------------------------------------------------- running

def systems_for(name: str, with_hf: bool, without: tuple[str, ...] = ()) -> dict[str, str]:
    """system -> model path."""
    paths = {PLEXUS: str(hf_dir(name)), LLAMACPP_BF16: str(gguf(name, "bf16"))}
    if name in MOE:
        # int8 first: its load peaks highest (the bf16 weights, then their quantized copy), before the others load
        paths = {PLEXUS_INT8: str(hf_dir(name)), **paths, LLAMACPP_Q8_0: str(gguf(name, "q8_0"))}
    if with_hf:
        paths[HF] = str(hf_dir(name))
    return {system: path for system, path in paths.items() if system not in without}


def run_model(name: str, settings: Settings, runs: int, with_hf: bool, without: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    paths = systems_for(name, with_hf, without)
    vocab = (3, 256)        # token ids the tokenizer has pieces for (the weights are random anyway)
    prompt = random_prompts([settings.prompt_length], vocab)[0]
    seq_len = max(1024, settings.prompt_length + settings.new_tokens)
    kv_space = kv_cache_space_gib(paths[PLEXUS], [settings.prompt_length + settings.new_tokens])
    print(f"\n## {name}: batch 1", flush=True)
    with Workers(list(paths), latency.Runner, lambda s: (s, paths[s], seq_len, kv_space)) as workers:
        found = latency.measure(workers, [prompt], settings.new_tokens, runs)
        memory = dict(workers.memory)
    stats = latency.summarize({s: f[str(settings.prompt_length)] for s, f in found.items() if f})
    out: dict[str, Any] = {"batch1": {"stats": stats, "comparisons": _comparisons(stats, latency.METRICS),
                                      "memory": memory}}
    out["decode_step_gb"] = {system: decode_step_gb(name, 1 if system == PLEXUS_INT8 else 2) for system in paths}

    mix = throughput.Settings(num_requests=settings.num_requests, prompt_range=settings.prompt_range,
                              output_range=settings.output_range, hf_batch_sizes=())
    requests = throughput.make_requests(mix, vocab)
    kv_space = kv_cache_space_gib(paths[PLEXUS], [len(r.prompt) + r.max_tokens for r in requests])
    batch_systems = [s for s in paths if s != HF]          # HF's static batches: batch 1 only here
    print(f"\n## {name}: {settings.num_requests} requests", flush=True)
    with Workers(batch_systems, throughput.Runner,
                 lambda s: (s, paths[s], requests, False, kv_space)) as workers:
        found = throughput.measure(workers, mix, runs)
    stats = {s: {m.key: common.run_stats(run[m.key] for run in f["all"]) for m in throughput.METRICS}
             for s, f in found.items() if f.get("all")}
    out["mix"] = {"stats": stats, "comparisons": _comparisons(stats, throughput.METRICS)}
    out["paths"] = paths
    return out


def _comparisons(stats: dict, metrics) -> dict:
    """common.comparisons, and plexus-bf16 against llamacpp-q8_0 where the MoE has it (plexus's experts are
    bf16: what llama.cpp's 8-bit experts gain is the reference to beat)."""
    found = comparisons(stats, metrics)
    if PLEXUS in stats and LLAMACPP_Q8_0 in stats:
        found.setdefault(PLEXUS, {})[LLAMACPP_Q8_0] = {
            m.key: common.compare(m, stats[PLEXUS].get(m.key), stats[LLAMACPP_Q8_0].get(m.key)) for m in metrics}
    return found


def report(name: str, result: dict[str, Any], settings: Settings, runs: int, bandwidth_gbs: float | None) -> None:
    b1 = result["batch1"]
    print(f"\n### {name}: batch 1, {settings.prompt_length}-token prompt, {settings.new_tokens} new tokens\n")
    print(stats_table(b1["stats"], latency.METRICS, runs))
    if b1["comparisons"]:
        print("\n" + ratio_table(b1["comparisons"], latency.METRICS))
    for system, row in b1["stats"].items():
        tps, step_gb = (row.get("decode_tps") or {}).get("median"), result["decode_step_gb"].get(system)
        if tps and step_gb:
            share = f", {tps * step_gb / bandwidth_gbs:.0%} of {bandwidth_gbs} GB/s" if bandwidth_gbs else ""
            print(f"- {system}: a decode step reads {step_gb:.2f} GB; {tps:.1f} tok/s streams "
                  f"{tps * step_gb:.1f} GB/s{share}")
    print(f"\n### {name}: {settings.num_requests} requests at once\n")
    print(stats_table(result["mix"]["stats"], throughput.METRICS, runs))
    if result["mix"]["comparisons"]:
        print("\n" + ratio_table(result["mix"]["comparisons"], throughput.METRICS))
    print("\n" + memory_table(b1["memory"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="leave HF transformers out")
    parser.add_argument("--without", default="", help="comma-separated systems to leave out (e.g. llamacpp-bf16)")
    parser.add_argument("--quick", action="store_true", help="tiny prompts and outputs, one run")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="the machine's read bandwidth, GB/s")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    settings, runs = (QUICK, 1) if args.quick else (Settings(), args.runs)
    ensure_peers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    without = tuple(s for s in args.without.split(",") if s)
    results = {name: run_model(name, settings, runs, not args.no_hf, without) for name in names}
    for name, result in results.items():
        report(name, result, settings, runs, args.bandwidth_gbs)
    path = write_results("families" + ("_quick" if args.quick else ""),
                         {"benchmark": "families", "machine": machine_info(), "settings": asdict(settings),
                          "runs": runs, "bandwidth_gbs": args.bandwidth_gbs, "results": results}, args.output_json)
    print(f"\nWrote {path} ({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
