"""The layering of plexus, checked from the imports in its source (``ast`` only).

Each module belongs to one part; an arrow says what a part may import:

    api          plexus/__init__.py and vLLM's import paths (outputs, sampling_params, inputs,
                 utils, lora, engine, distributed, config): re-exports only -> anything
    entrypoints  LLM, the CLI            -> core
    core         engine, scheduler, ...  -> platforms (the interface)
    platforms    interface, registry, host: no other part at run time
    platforms/X  one device package (cpu, neuron, ...) -> worker, models, core, platforms
    worker       -> models, core, platforms
    models       -> nothing above it
    quantize     the offline quantizer (`plexus quantize`) -> model_files, envs, logger only
    model_files, envs, logger: leaves that anyone may import

Imports under ``if TYPE_CHECKING:`` never run and are not counted; imports inside
functions are (a lazy import is still a dependency).  ``from plexus import sub``, where
``sub`` is a module, counts as importing ``plexus.sub`` only: the top package is loaded
before any plexus module anyway.
"""
from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

PLEXUS = Path(__file__).parent.parent / "plexus"
NAMED_PARTS = {"core", "models", "worker", "entrypoints", "model_files", "envs", "logger", "quantize"}


@dataclass(frozen=True)
class Import:
    file: str  # e.g. plexus/core/engine.py
    line: int
    module: str  # the importing module, e.g. plexus.core.engine
    name: str  # the imported name(s), e.g. plexus.core.config.EngineArgs
    src: str  # part of the importing module
    dst: str  # part of the imported name

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.module} -> {self.name} ({self.src} -> {self.dst})"


def is_device(part: str) -> bool:
    return part.startswith("platforms/")


class Layering:
    """Every run-time import between the modules under ``root`` (a package directory)."""

    def __init__(self, root: Path):
        self.root, self.top = root, root.name
        files = {}
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent).with_suffix("")
            files[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
        self.modules = {m.rsplit(".", i)[0] for m in files for i in range(m.count(".") + 1)}
        self.imports = [imp for module, path in files.items() for imp in self._scan(module, path)]

    def part(self, module: str) -> str:
        """The part of a module name (first matching rule of the module docstring)."""
        names = module.split(".")[1:]
        if names[:1] == ["platforms"]:
            is_dir = len(names) > 1 and (self.root / "platforms" / names[1]).is_dir()
            return f"platforms/{names[1]}" if is_dir else "platforms"
        return names[0] if names and names[0] in NAMED_PARTS else "api"

    def resolve(self, name: str) -> str:
        """The part of an imported name: that of its longest existing module prefix."""
        while name not in self.modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return self.part(name)

    def _scan(self, module: str, path: Path):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        rel, by_part = str(path.relative_to(self.root.parent)), {}
        for node, name in self._names(tree.body, package):
            if name == self.top or name.startswith(self.top + "."):
                by_part.setdefault((node.lineno, self.resolve(name)), []).append(name)
        for (line, dst), names in by_part.items():  # one per statement and part: most specific names
            names = [n for n in dict.fromkeys(names) if not any(m.startswith(n + ".") for m in names)]
            yield Import(rel, line, module, ", ".join(names), self.part(module), dst)

    def _names(self, body: list, package: str):
        for node in body:
            if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                             or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
                yield from self._names(node.orelse, package)  # the body never runs
                continue
            if isinstance(node, ast.Import):
                yield from ((node, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                up = package.split(".")[: package.count(".") + 2 - node.level] if node.level else []
                if node.level and not up:
                    continue  # a relative import above the top package
                base = ".".join(up + ([node.module] if node.module else []))
                subs = [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
                if base != self.top or not any(sub in self.modules for sub in subs):
                    yield node, base
                yield from ((node, sub) for sub in subs)
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):  # functions, try, ...
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from self._names([n for n in inner if isinstance(n, ast.AST)], package)

    def offending(self, src: Callable[[str], bool], dst: Callable[[str], bool]) -> list[Import]:
        return [i for i in self.imports if i.src != i.dst and src(i.src) and dst(i.dst)]

    def cycle(self) -> list[str]:
        """One circle between parts, as ["a -> b -> a", "  example import", ...], or []."""
        edges: dict[str, dict[str, Import]] = {}
        for imp in self.imports:
            if imp.src != imp.dst:
                edges.setdefault(imp.src, {}).setdefault(imp.dst, imp)
        done: set[str] = set()

        def visit(part: str, stack: list[str]) -> list[str]:
            if part in stack:
                return stack[stack.index(part):] + [part]
            for nxt in [] if part in done else sorted(edges.get(part, {})):
                if found := visit(nxt, stack + [part]):
                    return found
            done.add(part)
            return []

        circle = next((c for start in sorted(edges) if (c := visit(start, []))), [])
        return [" -> ".join(circle)] + [f"  {edges[a][b]}" for a, b in zip(circle, circle[1:])] if circle else []


# The rules: key -> (what breaking it means, importing parts, imported parts forbidden to them).
RULES: dict[str, tuple[str, Callable[[str], bool], Callable[[str], bool]]] = {
    "core": ("core imports a device package, models, worker or entrypoints", lambda s: s == "core",
             lambda d: is_device(d) or d in {"models", "worker", "entrypoints"}),
    "models": ("models imports core, worker, entrypoints or platforms", lambda s: s == "models",
               lambda d: d.startswith("platforms") or d in {"core", "worker", "entrypoints"}),
    "entrypoints": ("entrypoints imported from outside entrypoints and api",
                    lambda s: s not in {"entrypoints", "api"}, lambda d: d == "entrypoints"),
    "api": ("api (re-export modules) imported from outside api", lambda s: s != "api", lambda d: d == "api"),
    "platforms": ("platforms (interface, registry, host) imports core, models, worker, entrypoints or a device",
                  lambda s: s == "platforms",
                  lambda d: is_device(d) or d in {"core", "models", "worker", "entrypoints"}),
    "worker": ("worker imports a device package or entrypoints", lambda s: s == "worker",
               lambda d: is_device(d) or d == "entrypoints"),
    "devices": ("a device package imports another device package", is_device, is_device),
    "quantize": ("quantize imports core, models, worker, entrypoints, platforms or api", lambda s: s == "quantize",
                 lambda d: d.startswith("platforms") or d in {"core", "models", "worker", "entrypoints", "api"}),
}


def rule_violations(root: Path, rule: str, layering: Layering | None = None) -> list[str]:
    what, src, dst = RULES[rule]
    return [f"{what}: {imp}" for imp in (layering or Layering(root)).offending(src, dst)]


def cycle_violations(root: Path, layering: Layering | None = None) -> list[str]:
    found = (layering or Layering(root)).cycle()
    return [f"import circle between parts: {found[0]}", *found[1:]] if found else []


def violations(root: Path) -> list[str]:
    """Every broken layering rule under the package directory ``root``, one line each."""
    layering = Layering(root)
    return [v for rule in RULES for v in rule_violations(root, rule, layering)] + cycle_violations(root, layering)


def assert_none(found: list[str]) -> None:
    assert not found, "layering violations:\n" + "\n".join(found)


# --- the rules, over the real plexus ------------------------------------------------

def test_core_does_not_import_models_platform_devices_or_entrypoints():
    assert_none(rule_violations(PLEXUS, "core"))


def test_models_do_not_import_core_worker_entrypoints_or_platforms():
    assert_none(rule_violations(PLEXUS, "models"))


def test_only_entrypoints_and_api_import_entrypoints():
    assert_none(rule_violations(PLEXUS, "entrypoints"))


def test_only_api_imports_the_api_reexport_modules():
    assert_none(rule_violations(PLEXUS, "api"))


def test_platform_interface_and_registry_import_no_other_part_at_run_time():
    assert_none(rule_violations(PLEXUS, "platforms"))


def test_worker_does_not_import_platform_devices_or_entrypoints():
    assert_none(rule_violations(PLEXUS, "worker"))


def test_device_packages_do_not_import_each_other():
    assert_none(rule_violations(PLEXUS, "devices"))


def test_quantizer_imports_only_model_files_envs_and_logger():
    assert_none(rule_violations(PLEXUS, "quantize"))


def test_no_import_circle_between_parts():
    assert_none(cycle_violations(PLEXUS))


def test_plexus_has_no_layering_violations():
    assert_none(violations(PLEXUS))


# --- the checks can fail: planted violations in a temporary package tree -------------

def make_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """tmp_path/plexus/<path> for each file, with the __init__.py files a package needs."""
    root = tmp_path / "plexus"
    for rel, text in {"__init__.py": "", **files}.items():
        for parent in [p for p in (root / rel).parents if p == root or root in p.parents]:
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "__init__.py").touch()
        (root / rel).write_text(text)
    return root


def test_clean_tree_has_no_violations(tmp_path):
    root = make_tree(tmp_path, {
        "core/engine.py": "from plexus.platforms import interface\nimport plexus.envs", "envs.py": "",
        "platforms/interface.py": "", "models/llama.py": "from . import layers", "models/layers.py": "",
        "entrypoints/llm.py": "from ..core.engine import E", "outputs.py": "from plexus.core import engine"})
    assert violations(root) == []


@pytest.mark.parametrize("rule, files, expected", [
    ("core", {"core/bad.py": "from plexus.models import llama", "models/llama.py": ""},
     "plexus/core/bad.py:1: plexus.core.bad -> plexus.models.llama (core -> models)"),
    ("models", {"models/bad.py": "\n\nfrom ..core.config import EngineArgs", "core/config.py": ""},
     "plexus/models/bad.py:3: plexus.models.bad -> plexus.core.config.EngineArgs (models -> core)"),
    ("entrypoints", {"worker/bad.py": "import plexus.entrypoints.llm", "entrypoints/llm.py": ""},
     "plexus/worker/bad.py:1: plexus.worker.bad -> plexus.entrypoints.llm (worker -> entrypoints)"),
    ("api", {"models/bad.py": "from plexus import SamplingParams"},
     "plexus/models/bad.py:1: plexus.models.bad -> plexus.SamplingParams (models -> api)"),
    ("platforms", {"platforms/registry.py": "from .cpu import CpuPlatform", "platforms/cpu/x.py": ""},
     "plexus/platforms/registry.py:1: plexus.platforms.registry -> plexus.platforms.cpu.CpuPlatform "
     "(platforms -> platforms/cpu)"),
    ("worker", {"worker/bad.py": "from plexus.platforms.neuron import sdk", "platforms/neuron/sdk.py": ""},
     "plexus/worker/bad.py:1: plexus.worker.bad -> plexus.platforms.neuron.sdk (worker -> platforms/neuron)"),
    ("devices", {"platforms/neuron/bad.py": "from plexus.platforms.cpu import ops", "platforms/cpu/ops.py": ""},
     "plexus/platforms/neuron/bad.py:1: plexus.platforms.neuron.bad -> plexus.platforms.cpu.ops "
     "(platforms/neuron -> platforms/cpu)"),
    ("quantize", {"quantize/bad.py": "from plexus.core.config import EngineArgs", "core/config.py": ""},
     "plexus/quantize/bad.py:1: plexus.quantize.bad -> plexus.core.config.EngineArgs (quantize -> core)"),
])
def test_planted_violation_is_reported(tmp_path, rule, files, expected):
    root = make_tree(tmp_path, files)
    assert f"{RULES[rule][0]}: {expected}" in rule_violations(root, rule)
    assert f"{RULES[rule][0]}: {expected}" in violations(root)


def test_planted_circle_through_a_runtime_import_is_reported(tmp_path):
    root = make_tree(tmp_path, {
        "core/engine.py": "from plexus.platforms.interface import Platform",
        "platforms/interface.py": "def make():\n    from plexus.core.engine import Engine\n"})
    assert cycle_violations(root) == [
        "import circle between parts: core -> platforms -> core",
        "  plexus/core/engine.py:1: plexus.core.engine -> plexus.platforms.interface.Platform (core -> platforms)",
        "  plexus/platforms/interface.py:2: plexus.platforms.interface -> plexus.core.engine.Engine "
        "(platforms -> core)"]


def test_import_under_type_checking_is_not_reported(tmp_path):
    root = make_tree(tmp_path, {
        "core/engine.py": "import typing\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    from plexus.models.llama import Llama\nif typing.TYPE_CHECKING:\n"
                          "    import plexus.worker.worker\n",
        "models/llama.py": "", "worker/worker.py": ""})
    assert violations(root) == []


def test_lazy_import_inside_a_function_is_reported(tmp_path):
    root = make_tree(tmp_path, {
        "core/engine.py": "class E:\n    def run(self):\n        try:\n            from plexus.worker import worker\n"
                          "        except ImportError:\n            pass\n",
        "worker/worker.py": ""})
    assert rule_violations(root, "core") == [
        f"{RULES['core'][0]}: plexus/core/engine.py:4: plexus.core.engine -> plexus.worker.worker (core -> worker)"]


# --- one file per architecture, one registry ------------------------------------------------------------

def test_model_files_have_no_model_type_flags():
    """What differs between architectures is declared by their classes, never branched on inside models/."""
    found = [f"{path.relative_to(PLEXUS.parent)}:{node.lineno}" for path in sorted((PLEXUS / "models").rglob("*.py"))
             if path.name != "registry.py"
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Attribute) and node.attr == "model_type"]
    assert found == []


def test_every_registered_architecture_declares_its_shards_and_recipe():
    from plexus.models.registry import ARCHITECTURES, MODEL_TYPE_TO_ARCHITECTURE

    assert set(MODEL_TYPE_TO_ARCHITECTURE.values()) <= set(ARCHITECTURES)
    for cls in set(ARCHITECTURES.values()):
        assert {"packed_modules_mapping", "decode_recipe"} <= set(vars(cls)), cls.__name__


# --- fast paths are declared, never assumed --------------------------------------------------------------
# A whole-model fast path (the CPU platform's fused C++ decode step, compiled decode graphs) runs a model only
# if the model declares the recipe the path implements (plexus.models.layers.recipe). Planted here: a Llama
# with one more op, an RMSNorm of each query head (not of the keys) before the rotary embedding, which the fused
# kernel does not compute (it has Qwen3's norms of both).

def _cpu_kernel_ops():
    import shutil

    from plexus.envs import cache_dir
    from plexus.platforms.cpu import kernels

    if shutil.which("c++") is None or not kernels.load(cache_dir()):
        pytest.skip("needs the CPU kernels (a C++ compiler)")
    from plexus.platforms.cpu.ops import CpuModelOps, CpuPagedAttention

    return CpuModelOps(fused_decode=True), CpuPagedAttention


def _q_norm_llama(declares):
    """A Llama subclass whose attention normalizes each query head, declaring `declares` as its recipe."""
    import torch

    from plexus.models.layers.decoder import SelfAttention
    from plexus.models.layers.norm import RMSNorm
    from plexus.models.llama import LlamaForCausalLM

    class QNormAttention(SelfAttention):
        def forward(self, positions, x, kv_cache, meta):
            q, kv = self.qkv_proj(x).split([self.q_size, 2 * self.kv_size], dim=-1)
            q = self.q_norm(q.reshape(-1, self.head_dim).contiguous()).view(q.shape)
            self.rotary.to_device(positions.device)
            q = self.ops.rope_and_cache(torch.cat([q, kv], dim=-1).contiguous(), positions, self.rotary.cos,
                                        self.rotary.sin, kv_cache, meta.slot_mapping, self.num_heads,
                                        self.num_kv_heads, self.head_dim)
            return self.o_proj(self.attn(q, kv_cache, meta))

    class QNormLlama(LlamaForCausalLM):
        decode_recipe = declares

        def make_layer(self, cfg, attn_backend, linear, prefix):
            layer = super().make_layer(cfg, attn_backend, linear, prefix)
            layer.self_attn.__class__ = QNormAttention
            layer.self_attn.q_norm = RMSNorm(layer.self_attn.head_dim, cfg.rms_norm_eps, linear.ops)
            return layer

    return QNormLlama


def _decode_step(model_cls, ops, backend):
    """(the model, its fused output, its layer-by-layer output) for one decode step of two sequences whose
    earlier keys and values are random."""
    import torch
    from transformers import LlamaConfig

    from plexus.models.layers.attention import AttentionMetadata

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = model_cls(cfg, backend, 64, ops=ops).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    caches = [torch.randn(2, 6, 4, 2, 16) for _ in range(2)]
    meta = AttentionMetadata.build([1, 1], [5, 9], [[0, 1], [2, 3, 4]], 4, torch.device("cpu"),
                                   use_decode_kernel=True)
    ids = torch.tensor([3, 7])
    with torch.inference_mode():
        fused = model(ids, meta.positions, [c.clone() for c in caches], meta, fused=True)
        eager = model(ids, meta.positions, [c.clone() for c in caches], meta, fused=False)
        hidden = model.embed_tokens(ids)
        ran_fused = ops.decode_layers(model, hidden, meta.positions, [c.clone() for c in caches], meta) is not None
    return model, fused, eager, ran_fused


def test_fused_decode_runs_the_recipe_it_implements():
    import torch

    from plexus.models.llama import LlamaForCausalLM

    ops, backend = _cpu_kernel_ops()
    _, fused, eager, ran_fused = _decode_step(LlamaForCausalLM, ops, backend)
    assert ran_fused
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("declares", ["its-own", "nothing"])
def test_model_with_an_extra_op_falls_back_to_layer_by_layer(declares):
    import dataclasses

    import torch

    from plexus.models.layers.recipe import LLAMA_RECIPE

    ops, backend = _cpu_kernel_ops()
    recipe = dataclasses.replace(LLAMA_RECIPE, attention="q-normed") if declares == "its-own" else None
    _, fused, eager, ran_fused = _decode_step(_q_norm_llama(recipe), ops, backend)
    assert not ran_fused
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    # The check has teeth: the same model declaring Llama's recipe is taken by the fused kernel, which has no
    # q-norm, and its output is wrong.
    _, wrong, eager, ran_fused = _decode_step(_q_norm_llama(LLAMA_RECIPE), ops, backend)
    assert ran_fused
    assert (wrong - eager).abs().max() > 1e-2


def test_compiled_decode_graphs_serve_only_a_declared_recipe():
    import torch

    from plexus.models.layers.attention import AttentionMetadata
    from plexus.models.layers.recipe import LLAMA_RECIPE
    from plexus.worker.compiled_decode import CompiledDecode

    meta = AttentionMetadata.build([1, 1], [5, 9], [[0, 1], [2, 3, 4]], 4, torch.device("cpu"),
                                   use_decode_kernel=True)
    for model_cls, bucket in [(_q_norm_llama(LLAMA_RECIPE), 2), (_q_norm_llama(None), None)]:
        graphs = CompiledDecode(model_cls, [], [1, 2, 4], max_blocks=16, scratch_block=5, block_size=4)
        assert graphs.bucket_for(meta) == bucket
