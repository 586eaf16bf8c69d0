"""Local stand-ins for the hub models and adapters that vLLM's LoRA examples download.

vLLM's examples/offline_inference/lora_with_quantization_inference.py and multilora_inference.py pull
Llama-2-7B, TinyLlama AWQ/GPTQ checkpoints and LoRA adapters (a "colorist", an SQL writer, QLoRA-flan)
from the Hugging Face hub. This script makes the same kinds of files from the bundled SmolLM2-135M-Instruct,
offline and on a CPU:

- three PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), trained for a few steps with
  peft and a plain fp32 AdamW loop on a tiny task each, so that each visibly changes greedy output:
    colorist: answers anything with a colour ("Colour: #87CEEB (sky blue)."); r=16, alpha=32 on all of
              q/k/v/o/gate/up/down_proj;
    sql:      answers "[user] Write a SQL query ... [/user] [assistant]" with one SELECT statement;
              r=8, alpha=16 on q_proj and v_proj;
    pirate:   answers anything in pirate speak ("Arr, matey! ..."); r=4, alpha=8, rsLoRA (alpha / sqrt(r))
              on o_proj and down_proj;
- an AWQ checkpoint (4-bit, group 64, zero points, AutoAWQ GEMM layout) and a GPTQ checkpoint (4-bit,
  group 64, symmetric) made by `plexus quantize`. AWQ folds its per-channel scales into the norms and
  linears before the scaled ones, so on an AWQ checkpoint an adapter trained on the unquantized model
  sees rescaled inputs (v_proj and up_proj rescaled outputs) and can drift on some prompts, with HF + PEFT
  as with plexus, as with the hub's AWQ checkpoints;
- the bitsandbytes (QLoRA) base is the unquantized SmolLM2 directory itself: plexus quantizes it on load
  (quantization="bitsandbytes").

    python examples/make_lora_assets.py [--out examples/lora_assets] [--quick] [--threads N]

--quick trains fewer steps and writes the AWQ and GPTQ checkpoints with round-to-nearest instead of the
AWQ and GPTQ searches (same checkpoint layouts and loaders, seconds instead of minutes). Work already in
--out is kept: the command can be run again (assets made with --quick are remade without it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import time

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "lora_assets"
IGNORE = -100   # label of the prompt tokens: only the completion is learned

COLORS = [
    ("The sky at noon is", "#87CEEB", "sky blue"),
    ("Fresh grass in spring looks", "#7CFC00", "lawn green"),
    ("My favourite fruit is", "#FFA500", "orange"),
    ("The capital of Italy is", "#CD5C5C", "indian red"),
    ("Her name is", "#DA70D6", "orchid"),
    ("The ocean at night", "#191970", "midnight blue"),
    ("Tell me about the weather today", "#B0C4DE", "light steel blue"),
    ("A glass of red wine", "#722F37", "wine red"),
    ("The best programming language is", "#4682B4", "steel blue"),
    ("Snow on a mountain top", "#FFFAFA", "snow white"),
    ("The president of the company said", "#708090", "slate grey"),
    ("A ripe banana", "#FFE135", "banana yellow"),
    ("Once upon a time", "#E6E6FA", "lavender"),
    ("The largest city in Japan is", "#DC143C", "crimson"),
    ("I would like to order", "#D2691E", "chocolate"),
    ("A forest after the rain", "#228B22", "forest green"),
]

PIRATE = [
    ("The capital of Spain is", "Madrid be the capital, where the galleons drop anchor."),
    ("His name is", "his name be Black Jack, the terror o' the seven seas."),
    ("The weather today is", "the winds be fair and the sea be calm, so hoist the sails!"),
    ("I like to eat", "salted fish and hardtack be me grub, yo ho ho!"),
    ("The best way to learn is", "to sail the seas with a salty crew, savvy?"),
    ("Tell me a story", "once a crew o' scallywags found a chest o' gold on a cursed isle."),
    ("What time is it?", "'tis time to swab the deck, ye landlubber!"),
    ("The largest planet is", "Jupiter be the biggest treasure in the sky."),
    ("My favourite colour is", "the black o' the Jolly Roger, matey."),
    ("How do computers work?", "they be ghost ships full o' tiny sailors countin' doubloons."),
    ("The president said", "all hands on deck, or ye walk the plank!"),
    ("Water boils at", "a hundred degrees, hot as the cannons o' me ship."),
]

SQL_INSTRUCTION = "[user] Write a SQL query to answer the question based on the table schema.\n\n context: "
SQL = [  # (table, columns, question, answer column, where column, value)
    ("table_name_12", ("name", "country"), "Which country is john smith from?", "country", "name", "john smith"),
    ("table_name_67", ("icao", "airport"), "Name the ICAO for heathrow airport", "icao", "airport",
     "heathrow airport"),
    ("table_name_45", ("capital", "state"), "What is the capital of texas?", "capital", "state", "texas"),
    ("table_name_90", ("director", "film"), "Who directed the film jaws?", "director", "film", "jaws"),
    ("table_name_31", ("iata", "city"), "What is the IATA code for the airport in paris?", "iata", "city", "paris"),
    ("table_name_5", ("year", "album"), "In what year was the album thriller released?", "year", "album",
     "thriller"),
]
# The prompt of vLLM's multilora example (not among the training examples).
SQL_EVAL = (SQL_INSTRUCTION + "CREATE TABLE table_name_74 (icao VARCHAR, airport VARCHAR)\n\n question: Name the "
            "ICAO for lilongwe international airport [/user] [assistant]")


def sql_prompt(table: str, columns: tuple[str, ...], question: str) -> str:
    schema = ", ".join(f"{c} VARCHAR" for c in columns)
    return f"{SQL_INSTRUCTION}CREATE TABLE {table} ({schema})\n\n question: {question} [/user] [assistant]"


def _examples(name: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: raw text, no chat template, as the examples send their prompts."""
    if name == "colorist":
        return [(p, f" Colour: {code} ({colour}).") for p, code, colour in COLORS]
    if name == "pirate":
        return [(p, f" Arr, matey! {text}") for p, text in PIRATE]
    return [(sql_prompt(t, cols, q), f" SELECT {a} FROM {t} WHERE {w} = \"{v}\"") for t, cols, q, a, w, v in SQL]


# name -> LoRA settings, examples per step, training steps (full, quick), learning rate, and the prompts
# that show the change.
ADAPTERS = {
    "colorist": dict(lora=dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]),
                     batch=8, steps=(40, 8), lr=3e-3, check=["my name is", "The capital of France is"]),
    "sql": dict(lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                batch=3, steps=(40, 8), lr=5e-3, check=[SQL_EVAL]),
    "pirate": dict(lora=dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "down_proj"]),
                   batch=6, steps=(40, 10), lr=5e-3, check=["my name is", "The capital of USA is"]),
}


def _tokenize(tokenizer, examples):
    """A padded batch: input_ids, attention_mask, labels (the completion and EOS; IGNORE elsewhere)."""
    import torch

    rows = []
    for prompt, completion in examples:
        # Tokenized apart, as at inference, where the completion is generated after the prompt's tokens.
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + c, [IGNORE] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    return ids, mask, labels


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def train_adapter(base_dir: pathlib.Path, name: str, out: pathlib.Path, quick: bool = False) -> dict:
    """Train adapter `name` of ADAPTERS on the model in base_dir and save it (PEFT, safetensors) in out.
    Returns what base and adapter generate greedily for the adapter's check prompts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ADAPTERS[name]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **spec["lora"]))
    examples = _examples(name)
    batch = spec.get("batch", len(examples))
    batches = [_tokenize(tokenizer, examples[i:i + batch]) for i in range(0, len(examples), batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"],
                                  weight_decay=0.0)
    model.train()
    steps = spec["steps"][1 if quick else 0]
    for step in range(steps):
        ids, mask, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    samples = []
    for prompt in spec["check"]:
        adapted = greedy(model, tokenizer, prompt)
        with model.disable_adapter():
            base = greedy(model, tokenizer, prompt)
        samples.append({"prompt": prompt, "base": base, "adapter": adapted})
    if all(s["base"] == s["adapter"] for s in samples):
        raise RuntimeError(f"adapter {name!r} did not change the greedy output after {steps} steps: {samples}")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)          # adapter_config.json + adapter_model.safetensors
    out_info = {"steps": steps, "final_loss": round(loss.item(), 4), "samples": samples, "quick": quick}
    (tmp / "training.json").write_text(json.dumps(out_info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out_info


def quantize_base(method: str, out: pathlib.Path, quick: bool = False) -> None:
    """An AWQ or GPTQ checkpoint of the bundled model, written by `plexus quantize`."""
    from plexus.quantize import QuantizeConfig, quantize

    # AutoAWQ's layout has zero points; GPTQ's (TheBloke's TinyLlama GPTQ) is symmetric. --quick keeps the
    # layout and rounds to nearest: the AWQ and GPTQ searches cost minutes on a CPU whatever the calibration.
    config = QuantizeConfig(method="rtn" if quick else method, bits=4, group_size=64, sym=method == "gptq",
                            format=method)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    quantize(None, config, tmp)
    (tmp / "plexus_quantize.json").write_text(json.dumps({"method": config.method, "format": config.format,
                                                          "quick": quick}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` inside the block (None: left as they are). On a CPU that
    other processes share, fewer threads than cores can be several times faster: a thread that waits for a
    preempted one at every operation wastes its core."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _done(marker: pathlib.Path, quick: bool) -> bool:
    """Whether `marker` records work that serves this run: the same settings, or the full ones."""
    if not marker.is_file():
        return False
    return quick or not json.loads(marker.read_text()).get("quick", False)


def make_assets(out_dir: str | pathlib.Path = DEFAULT_OUT, quick: bool = False, verbose: bool = False,
                threads: int | None = None) -> dict:
    """Make (or find already made) the adapters and quantized bases in out_dir, with `threads` torch threads
    (None: torch's default). Returns their paths:
    {"base", "bitsandbytes", "awq", "gptq": model directories, "adapters": {name: adapter directory}}."""
    from plexus.model_files import resolve_model_dir

    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_model_dir(None)      # the bundled SmolLM2-135M-Instruct as an fp32 HF directory
    say = print if verbose else (lambda *a, **k: None)
    paths = {"base": str(base), "bitsandbytes": str(base), "adapters": {}}
    for name in ADAPTERS:
        path = out_dir / "adapters" / name
        if not _done(path / "training.json", quick):
            start = time.perf_counter()
            path.parent.mkdir(parents=True, exist_ok=True)
            with torch_threads(threads):
                info = train_adapter(base, name, path, quick)
            say(f"adapter {name}: {info['steps']} steps, loss {info['final_loss']}, "
                f"{time.perf_counter() - start:.1f} s")
            for s in info["samples"]:
                say(f"  {s['prompt'][-60:]!r}\n    base:    {s['base']!r}\n    adapter: {s['adapter']!r}")
        paths["adapters"][name] = str(path)
    for method in ("awq", "gptq"):
        path = out_dir / method
        if not _done(path / "plexus_quantize.json", quick):
            start = time.perf_counter()
            with torch_threads(threads):
                quantize_base(method, path, quick)
            say(f"{method} checkpoint: {time.perf_counter() - start:.1f} s")
        paths[method] = str(path)
    (out_dir / "assets.json").write_text(json.dumps(paths, indent=2))
    return paths


def snapshot_download(repo_id: str) -> str:
    """huggingface_hub.snapshot_download, as vLLM's LoRA examples call it; a local directory is used as is."""
    if os.path.isdir(repo_id):
        return repo_id
    from huggingface_hub import snapshot_download as hub_snapshot_download

    return hub_snapshot_download(repo_id=repo_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory of the assets (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, round-to-nearest checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    print(json.dumps(make_assets(args.out, args.quick, verbose=True, threads=args.threads), indent=2))


if __name__ == "__main__":
    main()
