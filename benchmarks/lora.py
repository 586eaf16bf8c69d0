"""Multi-LoRA throughput: plexus against HF transformers + PEFT on SmolLM2-135M-Instruct.

One batch of 32 requests (the prompts of quantized.py's 32-request mix: 32 tokens of seeded random
token ids; 64 new tokens each, greedy, EOS ignored) with 0, 1, 4 and 8 distinct LoRA adapters,
requests assigned round-robin to the adapters (request i gets adapter i mod N). Reported: output
tok/s (output tokens / wall time of the whole batch).

The adapters: 8 PEFT LoRA adapters made for the run in a temporary directory, r=16, alpha=32, on
q/k/v/o/gate/up/down_proj of every layer, random A and B (init_lora_weights=False, adapter i seeded
with i), saved with save_pretrained (fp32 safetensors).

Configurations, everything in bf16 with 2 threads:

- plexus-bf16: LLM(dtype="bfloat16"), enable_lora=False: the no-LoRA baseline;
- plexus-bf16+lora: LLM(..., enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=8),
  generate(..., lora_request=[LoRARequest or None per prompt]); 0 adapters = lora_request=None;
- hf-bf16: transformers generate() on one left-padded batch of the 32 requests, no PEFT;
- hf-bf16+peft: the same model wrapped in one PeftModel holding the 8 adapters
  (PeftModel.from_pretrained + load_adapter(adapter_name=...), autocast_adapter_dtype=False so the
  adapter weights stay bf16 too), generate(..., adapter_names=[one per row]); "__base__" = no adapter.

Each of the four systems is loaded once in its own (spawned) process and warmed up (one short
request, then one per adapter, so plexus has every adapter loaded before timing). The timed runs
are interleaved: round 1 runs every configuration once, one at a time, in table order, then round
2, ...; the others wait idle. The table gives the median over rounds with (min-max) beside it; each
ratio is taken within a round, then its median (min-max) over the rounds.

    .venv/bin/python benchmarks/lora.py [--runs 3] [--systems plexus-bf16,hf-bf16] [--adapters 0,1,4,8]
                                        [--quick] [--output-json PATH]

Needs peft (in the bench and dev extras). Run it on a quiet machine (README.md).
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common import (HF, NUM_THREADS, PLEXUS, SEED, Request, hf_model_dir, limit_threads, machine_info, median,
                    print_machine, run_isolated, write_results)

# The LoRA systems take these names; the table shows them against their no-LoRA baselines.
PLEXUS_LORA, HF_PEFT = f"{PLEXUS}+lora", f"{HF}+peft"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AGREE_TOKENS = 16          # plexus and HF "agree" on a request when their first 16 tokens are the same


@dataclass(frozen=True)
class Settings:
    num_requests: int = 32
    prompt_len: int = 32
    new_tokens: int = 64
    adapter_counts: tuple[int, ...] = (0, 1, 4, 8)
    rank: int = 16
    alpha: int = 32


QUICK = Settings(num_requests=8, prompt_len=8, new_tokens=16)


def make_requests(settings: Settings, model_dir: str) -> list[Request]:
    """quantized.py's 32-request mix (same seed, same token ids), cut to the settings."""
    import json
    import pathlib

    from quantized import requests as quantized_requests

    # quantized.py draws ids in [1000, embedding rows); SmolLM2's vocab_size is its embedding rows.
    vocab = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["vocab_size"]
    _, batch = quantized_requests(vocab)
    if settings.num_requests > len(batch):
        raise ValueError(f"at most {len(batch)} requests")
    return [Request(r.prompt[:settings.prompt_len], settings.new_tokens) for r in batch[:settings.num_requests]]


# ---------------------------------------------------------------- adapters

def make_adapters(model_dir: str, target: str, count: int, settings: Settings) -> list[str]:
    """`count` random PEFT LoRA adapters for the model, saved under target/adapter<i> (run in a child)."""
    limit_threads()
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(NUM_THREADS)
    transformers.utils.logging.disable_progress_bar()
    quiet_peft()
    paths = []
    for i in range(count):
        torch.manual_seed(SEED + i)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(TARGET_MODULES),
                            init_lora_weights=False, task_type="CAUSAL_LM")
        path = f"{target}/adapter{i}"
        get_peft_model(model, config).save_pretrained(path)
        paths.append(path)
    return paths


def quiet_peft() -> None:
    """PEFT 0.21 calls a transformers method that transformers 5 deprecates, once per model."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


# ---------------------------------------------------------------- systems

class _WithAdapters:
    """Stands in for a system's LLM / model: generate() also gets the adapters of the current run.

    systems.PlexusSystem and systems.HFSystem call self.llm.generate(...) / self.model.generate(...);
    putting this object there lets their run() do the timing, length checks and padding unchanged.
    """

    def __init__(self, target: Any, keyword: str) -> None:
        self.target, self.keyword, self.adapters = target, keyword, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.target.generate(*args, **kwargs, **{self.keyword: self.adapters})


class LoraSystem:
    """One of the four systems; run(requests, n) gives request i adapter i mod n (n=None: no LoRA at all)."""

    def __init__(self, name: str, model_dir: str, adapter_paths: Sequence[str], max_num_seqs: int,
                 settings: Settings) -> None:
        from systems import HFSystem, PlexusSystem

        self.name, self.paths = name, list(adapter_paths)
        self.router: _WithAdapters | None = None          # the LoRA systems' generate() with adapters
        if name == PLEXUS:
            self.system = PlexusSystem(model_dir, max_num_seqs=max_num_seqs)
        elif name == PLEXUS_LORA:
            self.system = PlexusSystem(model_dir, max_num_seqs=max_num_seqs, enable_lora=True,
                                       max_loras=len(self.paths), max_lora_rank=settings.rank,
                                       max_cpu_loras=len(self.paths))
            self.system.llm = self.router = _WithAdapters(self.system.llm, "lora_request")
        elif name == HF:
            self.system = HFSystem(model_dir)             # one batch of all requests
        elif name == HF_PEFT:
            from peft import PeftModel

            quiet_peft()
            self.system = HFSystem(model_dir)
            # autocast_adapter_dtype=False: keep the adapter weights in the base model's bf16 (PEFT's
            # default would upcast them to fp32).
            model = PeftModel.from_pretrained(self.system.model, self.paths[0], adapter_name="adapter0",
                                              autocast_adapter_dtype=False)
            for i, path in enumerate(self.paths[1:], start=1):
                model.load_adapter(path, adapter_name=f"adapter{i}", autocast_adapter_dtype=False)
            self.system.model = self.router = _WithAdapters(model.eval(), "adapter_names")
        else:
            raise ValueError(f"unknown system {name!r}")

    def adapters(self, count: int, n: int | None) -> Any:
        """What generate() gets for `count` requests over n adapters (round-robin)."""
        if self.name == PLEXUS_LORA:
            from plexus.lora.request import LoRARequest

            if not n:
                return None
            return [LoRARequest(f"adapter{i % n}", i % n + 1, self.paths[i % n]) for i in range(count)]
        if self.name == HF_PEFT:
            return [f"adapter{i % n}" if n else "__base__" for i in range(count)]
        return None

    def run(self, requests: Sequence[Request], n: int | None) -> Any:
        if self.router is not None:
            self.router.adapters = self.adapters(len(requests), n)
        return self.system.run(requests)

    def warm_up(self, requests: Sequence[Request]) -> None:
        """One short request, then (LoRA systems) one per adapter in one batch: every adapter loaded."""
        short = [Request(r.prompt, 4) for r in requests]
        self.run(short[:1], None)
        if self.name in (PLEXUS_LORA, HF_PEFT):
            self.run([short[i % len(short)] for i in range(len(self.paths))], len(self.paths))

    @property
    def settings(self) -> dict[str, Any]:
        settings = dict(self.system.settings)
        if self.name == HF_PEFT:
            import torch

            dtypes = {str(p.dtype) for n, p in self.router.target.named_parameters() if "lora_" in n}
            settings.update(adapters=len(self.paths), adapter_dtypes=sorted(dtypes),
                            peft_mode="generate(adapter_names=[per row]), '__base__' = no adapter",
                            torch_threads=torch.get_num_threads())
        return settings


def serve(conn: Any, name: str, model_dir: str, adapter_paths: list[str], requests: list[Request],
          settings: Settings) -> None:
    """A system's process: load and warm up, then run the batch with n adapters for each n received."""
    try:
        limit_threads()
        system = LoraSystem(name, model_dir, adapter_paths, len(requests), settings)
        system.warm_up(requests)
        conn.send(("ready", system.settings))
    except BaseException:  # noqa: BLE001  (the parent reports it and goes on with the other systems)
        conn.send(("error", traceback.format_exc()))
        return
    while (n := conn.recv()) != "stop":
        try:
            result = system.run(requests, n)
            conn.send(("ok", {"wall_s": result.wall_s, "output_tps": result.output_tps,
                              "computed_tokens": result.computed_tokens, "output_ids": result.output_ids}))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class Worker:
    """A system loaded in its own spawned process, driven one run at a time."""

    def __init__(self, name: str, *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.name, (self.conn, child) = name, context.Pipe()
        self.process = context.Process(target=serve, args=(child, name, *args), daemon=True)
        self.process.start()
        child.close()
        self.settings = self._answer()

    def _answer(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: the process died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"{self.name}:\n{payload}")
        return payload

    def run(self, n: int | None) -> dict[str, Any]:
        self.conn.send(n)
        return self._answer()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


# ---------------------------------------------------------------- measuring

def configurations(systems: Sequence[str], counts: Sequence[int]) -> list[tuple[str, int | None]]:
    """(system process, adapters) in table order; adapters None = that system without LoRA."""
    configs: list[tuple[str, int | None]] = []
    if PLEXUS in systems:
        configs += [(PLEXUS, None)] + [(PLEXUS_LORA, n) for n in counts]
    if HF in systems:
        configs += [(HF, None)] + [(HF_PEFT, n) for n in counts]
    return configs


def measure(model_dir: str, adapter_paths: list[str], requests: list[Request], settings: Settings,
            systems: Sequence[str], rounds: int) -> tuple[dict, dict]:
    """Every configuration once per round, rounds times; returns (system settings, runs by configuration)."""
    configs = configurations(systems, settings.adapter_counts)
    workers: dict[str, Worker | dict] = {}
    try:
        for name in dict.fromkeys(name for name, _ in configs):      # loaded one after the other
            print(f"Loading {name} ...", flush=True)
            start = time.perf_counter()
            try:
                workers[name] = Worker(name, model_dir, adapter_paths, requests, settings)
                print(f"  ready in {time.perf_counter() - start:.0f} s", flush=True)
            except Exception as exc:  # noqa: BLE001  (one broken system must not lose the others' numbers)
                print(f"  {name} failed: {exc}", flush=True)
                workers[name] = {"error": str(exc)}
        runs: dict[str, list | dict] = {}
        for r in range(rounds):
            print(f"Round {r + 1}/{rounds}:", flush=True)
            round_start = time.perf_counter()
            for name, n in configs:
                key = label(name, n)
                worker = workers[name]
                if isinstance(worker, dict) or isinstance(runs.get(key), dict):
                    runs.setdefault(key, worker if isinstance(worker, dict) else runs[key])
                    continue
                try:
                    result = worker.run(n)
                except Exception as exc:  # noqa: BLE001
                    print(f"  {key} failed: {exc}", flush=True)
                    runs[key] = {"error": str(exc)}
                    if not worker.process.is_alive():
                        workers[name] = {"error": str(exc)}
                    continue
                if r > 0:
                    result.pop("output_ids")          # the first round's tokens are enough for the checks
                runs.setdefault(key, []).append(result)
                print(f"  {key}: {result['output_tps']:.1f} tok/s", flush=True)
            print(f"  (round {r + 1} took {time.perf_counter() - round_start:.0f} s)", flush=True)
    finally:
        for worker in workers.values():
            if isinstance(worker, Worker):
                worker.stop()
    return {n: w.settings if isinstance(w, Worker) else w for n, w in workers.items()}, runs


def label(name: str, n: int | None) -> str:
    return name if n is None else f"{name} x{n}"


# ---------------------------------------------------------------- report

def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """'median (min-max)', or the value alone for one run."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def summarize(runs: dict[str, list | dict], settings: Settings) -> tuple[list[dict], dict[str, dict]]:
    """Table rows (one per adapter count, plus the no-LoRA row) and the ratios' per-round values."""
    def tps(name: str, n: int | None) -> list[float] | None:
        found = runs.get(label(name, n))
        return [run["output_tps"] for run in found] if isinstance(found, list) else None

    def ratio(a: list[float] | None, b: list[float] | None) -> list[float] | None:
        return [x / y for x, y in zip(a, b)] if a and b else None

    base_plexus, base_hf = tps(PLEXUS, None), tps(HF, None)
    rows = [{"adapters": "none (no LoRA)", "plexus": base_plexus, "hf": base_hf,
             "plexus/hf": ratio(base_plexus, base_hf), "plexus/no-lora": ratio(base_plexus, base_plexus),
             "hf/no-lora": ratio(base_hf, base_hf)}]
    for n in settings.adapter_counts:
        plexus, hf = tps(PLEXUS_LORA, n), tps(HF_PEFT, n)
        rows.append({"adapters": str(n), "plexus": plexus, "hf": hf, "plexus/hf": ratio(plexus, hf),
                     "plexus/no-lora": ratio(plexus, base_plexus), "hf/no-lora": ratio(hf, base_hf)})
    summary = {row["adapters"]: {key: ({"median": median(v), "min": min(v), "max": max(v), "runs": v} if v else None)
                                 for key, v in row.items() if key != "adapters"} for row in rows}
    return rows, summary


def table(rows: list[dict]) -> str:
    def cell(values: list[float] | None, fmt: str) -> str:
        return "n/a" if not values else spread(values, fmt)

    lines = ["| adapters in the batch | plexus tok/s | HF+PEFT tok/s | plexus / HF+PEFT | "
             "plexus / plexus no-LoRA | HF+PEFT / HF no-LoRA |", "|---" * 6 + "|"]
    for row in rows:
        lines.append(f"| {row['adapters']} | {cell(row['plexus'], '{:.1f}')} | {cell(row['hf'], '{:.1f}')} | "
                     f"{cell(row['plexus/hf'], '{:.2f}x')} | {cell(row['plexus/no-lora'], '{:.2f}x')} | "
                     f"{cell(row['hf/no-lora'], '{:.2f}x')} |")
    return "\n".join(lines)


def checks(runs: dict[str, list | dict], settings: Settings) -> dict[str, str]:
    """Spot checks on the first round's tokens: LoRA on with no adapter gives the no-LoRA tokens;
    every adapter changes its requests' tokens; plexus and HF(+PEFT) agree on the first tokens."""
    def ids(name: str, n: int | None) -> list[list[int]] | None:
        found = runs.get(label(name, n))
        return found[0]["output_ids"] if isinstance(found, list) else None

    def same(a: list[list[int]], b: list[list[int]], k: int | None = None) -> int:
        return sum(x[:k] == y[:k] for x, y in zip(a, b))

    found: dict[str, str] = {}
    for lora, plain, title in ((PLEXUS_LORA, PLEXUS, "plexus"), (HF_PEFT, HF, "HF+PEFT")):
        base = ids(plain, None)
        for n in settings.adapter_counts:
            out = ids(lora, n)
            if out and base and n == 0:
                found[f"{title} x0: requests identical to {plain} (no LoRA)"] = f"{same(out, base)}/{len(base)}"
            elif out and base:
                found[f"{title} x{n}: requests changed by their adapter"] = f"{len(base) - same(out, base)}/{len(base)}"
    for n in (None, *settings.adapter_counts):
        plexus, hf = ids(PLEXUS if n is None else PLEXUS_LORA, n), ids(HF if n is None else HF_PEFT, n)
        if plexus and hf:
            found[f"{'no LoRA' if n is None else f'x{n}'}: requests whose first {AGREE_TOKENS} tokens are the same "
                  f"in plexus and HF"] = f"{same(plexus, hf, AGREE_TOKENS)}/{len(hf)}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (median, min and max reported)")
    parser.add_argument("--systems", default=f"{PLEXUS},{HF}",
                        help=f"comma-separated subset of {PLEXUS} (with and without LoRA), {HF} (with and "
                             "without PEFT)")
    parser.add_argument("--adapters", default=",".join(map(str, Settings.adapter_counts)),
                        help="comma-separated numbers of distinct adapters in the batch, at most 8")
    parser.add_argument("--quick", action="store_true", help="8 short requests, 1 round: a smoke test")
    parser.add_argument("--output-json", help="where to write the results (default: benchmarks/results/)")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := sorted(set(systems) - {PLEXUS, HF}):
        parser.error(f"unknown systems {unknown}; choose from {PLEXUS}, {HF}")
    counts = tuple(int(n) for n in args.adapters.split(","))
    if any(n < 0 or n > 8 for n in counts):
        parser.error("--adapters: numbers from 0 to 8")
    settings = QUICK if args.quick else Settings()
    settings = Settings(**{**asdict(settings), "adapter_counts": counts})
    rounds = 1 if args.quick else args.runs
    if settings.num_requests < max(counts):
        parser.error(f"{settings.num_requests} requests cannot use {max(counts)} adapters")

    began = time.perf_counter()
    info = machine_info()
    info["versions"]["peft"] = _version("peft")
    print_machine(info)
    model_dir = run_isolated(_model_dir)
    requests = make_requests(settings, model_dir)
    print(f"{len(requests)} requests: {settings.prompt_len}-token prompts, {settings.new_tokens} new tokens each, "
          f"adapters {list(counts)}, {rounds} interleaved round(s)", flush=True)
    adapter_dir = tempfile.mkdtemp(prefix="plexus-bench-lora-")
    try:
        print(f"Making {max(counts)} LoRA adapters (r={settings.rank}, alpha={settings.alpha}) in {adapter_dir} ...",
              flush=True)
        paths = run_isolated(make_adapters, model_dir, adapter_dir, max(max(counts), 1), settings)
        system_settings, runs = measure(model_dir, paths, requests, settings, systems, rounds)
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)

    rows, summary = summarize(runs, settings)
    print(f"\n### {len(requests)} requests, {settings.prompt_len}-token prompts, {settings.new_tokens} new tokens each: "
          f"output tok/s, {'one run' if rounds == 1 else f'median (min-max) of {rounds} interleaved rounds'}\n")
    print(table(rows))
    print("\nRequest i uses adapter i mod N. Ratios are taken within each round. 'none': plexus with "
          "enable_lora=False, HF without PEFT; '0': plexus with enable_lora=True and no adapter requested, "
          "HF+PEFT with every row '__base__'.")
    errors = {k: v["error"] for k, v in runs.items() if isinstance(v, dict)}
    errors.update({k: v["error"] for k, v in system_settings.items() if "error" in v})
    for key, error in errors.items():
        print(f"\n{key} FAILED:\n{error}")
    found = checks(runs, settings)
    if found:
        print("\nChecks (first round's tokens):")
        for what, value in found.items():
            print(f"- {what}: {value}")
    name = "lora_quick" if args.quick else "lora"
    payload = {"benchmark": "lora", "machine": info, "settings": asdict(settings), "rounds": rounds,
               "adapters": {"rank": settings.rank, "alpha": settings.alpha, "target_modules": TARGET_MODULES,
                            "init_lora_weights": False, "seeds": [SEED + i for i in range(max(counts))]},
               "model_dir": model_dir, "systems": system_settings, "summary": summary, "checks": found,
               "runs": {k: [{f: v for f, v in run.items() if f != "output_ids"} for run in r] if isinstance(r, list)
                        else r for k, r in runs.items()}}
    print(f"\nWrote {write_results(name, payload, args.output_json)} ({time.perf_counter() - began:.0f} s in all)")


def _model_dir() -> str:
    return str(hf_model_dir())


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
