"""Quantization methods on SmolLM2-135M-Instruct: what each one costs in quality and buys in memory and speed.

For every variant, in a fresh process:

- bits: what a quantized weight holds (and its group size);
- weight MiB: the bytes of the model's parameters and buffers as loaded (embeddings and norms included);
- RSS MiB: the resident memory of the process once the model is loaded and warmed up;
- perplexity on plexus/data/perplexity.txt (a fixed text never used for calibration), in windows of 512
  tokens, each token scored once;
- decode tok/s at batch 1: a 32-token prompt, 128 generated tokens, first to last token;
- tok/s for 32 requests: 32 prompts of 32 tokens generating 128 tokens each, output tokens / wall time.

Variants: plexus in fp32 and bf16 (the baselines); weights quantized on load (int8, w8a8, fp8,
bitsandbytes NF4); the bundled Q4_1 GGUF kept quantized (quantization="gguf"); checkpoints written by
`plexus quantize` (RTN, GPTQ, AWQ at W4 group 64, RTN at W8 per channel; made once into the benchmark cache);
and the peer, llama.cpp, on the BF16 requantization of the bundled file (the same weights as plexus's bf16).
llama.cpp on the quantized GGUF types is in latency.py and throughput.py (their LlamaCppSystem takes out the
AMX buffer type that crashes on them on AMX Xeons, llama.cpp #20824).
Quantized variants compute in bf16. Ratios are taken against plexus bf16.

    .venv/bin/python benchmarks/quantized.py [--variants bf16,fp32,gptq-w4g64] [--quick] [--output-json PATH]
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any

from common import (CACHE_DIR, LLAMACPP_BF16, NUM_THREADS, SEED, Request, ensure_peers, limit_threads,
                    llamacpp_gguf, machine_info, print_machine, run_isolated, write_results)

WINDOW = 512
PROMPT_LEN, NEW_TOKENS, NUM_REQUESTS = 32, 128, 32


@dataclass(frozen=True)
class Variant:
    bits: str
    dtype: str = "bfloat16"
    engine: dict = field(default_factory=dict)      # more LLM() arguments
    quantize: dict | None = None                     # plexus quantize settings (QuantizeConfig fields)
    gguf: bool = False                               # run the bundled GGUF file itself
    llamacpp: str | None = None                      # a llama.cpp system: "bf16"


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("32", dtype="float32"),
    "bf16": Variant("16"),
    "int8": Variant("8 (channel)", engine={"quantization": "int8"}),
    "w8a8": Variant("8 (channel), act. 8 (token)", engine={"quantization": "w8a8"}),
    "fp8": Variant("8 e4m3 (channel)", engine={"quantization": "fp8"}),
    "ct-w8-rtn": Variant("8 (channel)", quantize={"method": "rtn", "bits": 8, "group_size": -1,
                                                   "format": "compressed-tensors"}),
    "ct-w4g64-rtn": Variant("4 (g64)", quantize={"method": "rtn", "bits": 4, "group_size": 64,
                                                  "format": "compressed-tensors"}),
    "ct-w4g64-rtn-asym": Variant("4 (g64, zero points)", quantize={"method": "rtn", "bits": 4, "group_size": 64,
                                                                    "sym": False, "format": "compressed-tensors"}),
    "gptq-w4g64": Variant("4 (g64)", quantize={"method": "gptq", "bits": 4, "group_size": 64, "format": "gptq"}),
    "gptq-w4g64-act-order": Variant("4 (g64)", quantize={"method": "gptq", "bits": 4, "group_size": 64,
                                                           "act_order": True, "format": "gptq"}),
    "awq-w4g64": Variant("4 (g64, zero points)", quantize={"method": "awq", "bits": 4, "group_size": 64,
                                                           "sym": False, "format": "awq"}),
    "bnb-nf4": Variant("4 NF4 (g64)", engine={"quantization": "bitsandbytes"}),
    "gguf-q4_1": Variant("4 Q4_1 (g32)", gguf=True, engine={"quantization": "gguf"}),
    "llama.cpp-bf16": Variant("16", llamacpp="bf16"),
}
BASELINE = "bf16"


# ---------------------------------------------------------------- preparing models

def quantized_dir(name: str, settings: dict) -> pathlib.Path:
    """The `plexus quantize` output for a variant, made once (in this process: call it in a child)."""
    from plexus.quantize import QuantizeConfig, quantize

    target = CACHE_DIR / "quantized" / name
    if not (target / "config.json").is_file():
        print(f"  plexus quantize {name} ...", flush=True)
        start = time.perf_counter()
        partial = target.with_name(f"{name}.partial-{os.getpid()}")
        quantize(None, QuantizeConfig(**settings), partial)
        partial.replace(target)
        print(f"  quantized {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def model_path(name: str) -> str | None:
    from plexus.model_files.gguf import bundled_gguf_path

    variant = VARIANTS[name]
    if variant.quantize is not None:
        return str(quantized_dir(name, variant.quantize))
    if variant.gguf:
        return str(bundled_gguf_path())
    if variant.llamacpp == "bf16":
        return str(llamacpp_gguf(LLAMACPP_BF16))
    return None    # the default model


# ---------------------------------------------------------------- measuring

def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def text_ids() -> list[int]:
    from transformers import AutoTokenizer

    from plexus.model_files import resolve_model_dir
    from plexus.utils.perplexity import default_text

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    return tokenizer(default_text(), add_special_tokens=False)["input_ids"]


def requests(vocab: int) -> tuple[list[Request], list[Request]]:
    import random

    rng = random.Random(SEED)
    prompt = lambda: tuple(rng.randrange(1000, vocab) for _ in range(PROMPT_LEN))  # noqa: E731
    return [Request(prompt(), NEW_TOKENS)], [Request(prompt(), NEW_TOKENS) for _ in range(NUM_REQUESTS)]


def plexus_worker(name: str, path: str | None, quick: bool) -> dict[str, Any]:
    limit_threads()
    from systems import PlexusSystem

    from plexus.utils.perplexity import perplexity

    variant = VARIANTS[name]
    system = PlexusSystem(path, max_num_seqs=NUM_REQUESTS, dtype=variant.dtype, **variant.engine)
    model = system.llm.llm_engine.executor.worker.model
    seen, weight_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            weight_bytes += t.numel() * t.element_size()
    single, batch = requests(model.embed_tokens.weight.shape[0])
    system.run([Request(single[0].prompt, 4)])     # warm up
    rss = rss_mib()
    decode = system.run(single).requests[0]
    many = system.run(batch[:4] if quick else batch)
    ppl = perplexity(system.llm, window=WINDOW, max_windows=1 if quick else None)
    return {"bits": variant.bits, "weight_mib": weight_bytes / 2**20, "rss_mib": rss, "perplexity": ppl,
            "decode_tps": (decode.output_tokens - 1) / decode.decode_s, "batch_tps": many.output_tps,
            "settings": system.settings}


def llamacpp_worker(name: str, path: str, quick: bool) -> dict[str, Any]:
    limit_threads()
    import numpy as np
    from systems import LlamaCppSystem

    system = LlamaCppSystem(path, n_seq_max=NUM_REQUESTS, seq_len=PROMPT_LEN + NEW_TOKENS + 64)
    vocab = system.n_vocab
    single, batch = requests(vocab)
    system.run([Request(single[0].prompt, 4)])
    rss = rss_mib()
    decode = system.run(single).requests[0]
    many = system.run(batch[:4] if quick else batch)
    system.close()
    # Perplexity: the same windows of the same token ids, logits for every position.
    import llama_cpp

    lm = llama_cpp.Llama(model_path=path, n_ctx=WINDOW, n_batch=WINDOW, n_threads=NUM_THREADS, logits_all=True,
                         verbose=False)
    ids = text_ids()
    windows = [ids[i:i + WINDOW] for i in range(0, len(ids) - 1, WINDOW)]
    windows = [w for w in windows if len(w) > 1][:1 if quick else None]
    nll, count = 0.0, 0
    for w in windows:
        lm.reset()
        lm.eval(w)
        logits = np.asarray(lm.scores[:len(w) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logprobs[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return {"bits": VARIANTS[name].bits, "weight_mib": os.path.getsize(path) / 2**20, "rss_mib": rss,
            "perplexity": math.exp(nll / count), "decode_tps": (decode.output_tokens - 1) / decode.decode_s,
            "batch_tps": many.output_tps, "settings": system.settings}


# ---------------------------------------------------------------- report

COLUMNS = (("bits", "bits", None), ("weight_mib", "weight MiB", "{:.0f}"), ("rss_mib", "RSS MiB", "{:.0f}"),
           ("perplexity", "perplexity", "{:.3f}"), ("decode_tps", "decode tok/s (batch 1)", "{:.1f}"),
           ("batch_tps", f"tok/s ({NUM_REQUESTS} requests)", "{:.1f}"))


def table(rows: dict[str, dict]) -> str:
    base = rows.get(BASELINE, {})
    lines = ["| variant | " + " | ".join(title for _, title, _ in COLUMNS) + " | ppl vs bf16 | decode vs bf16 |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | " + " | ".join("" for _ in COLUMNS) + f" | failed: {row['error'][:60]} | |")
            continue
        cells = [str(row[key]) if fmt is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        ratio = lambda key: f"{row[key] / base[key]:.3f}" if base.get(key) else ""  # noqa: E731
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio('perplexity')} | {ratio('decode_tps')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="one perplexity window, 4 requests: a smoke test")
    parser.add_argument("--output-json", help="where to write the results (default: benchmarks/results/)")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if any(VARIANTS[n].llamacpp for n in names):
        ensure_peers()
    info = machine_info()
    print_machine(info)
    rows: dict[str, dict] = {}
    for name in names:
        print(f"Running {name} ...", flush=True)
        try:
            path = run_isolated(model_path, name)
            worker = llamacpp_worker if VARIANTS[name].llamacpp else plexus_worker
            rows[name] = run_isolated(worker, name, path, args.quick)
        except Exception as exc:  # noqa: BLE001  (one failing variant must not lose the others' numbers)
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  {rows[name]}", flush=True)
    print(table(rows))
    path = write_results("quantized", {"machine": info, "threads": NUM_THREADS, "window": WINDOW,
                                       "variants": rows}, args.output_json)
    print(f"Results: {path}")


if __name__ == "__main__":
    main()
