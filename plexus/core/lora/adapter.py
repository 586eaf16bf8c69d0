"""Reading a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors (or .bin).

What comes out is plain data (LoRAWeights: per module its A [r, in], B [out, r] and scale), named by the
model's own module names ("layers.0.self_attn.q_proj", "embed_tokens", "lm_head"), checked against what the
model can serve (the worker's LoRA targets: module name -> (in_features, out_features)). Everything PEFT can
write that plexus would serve wrongly is refused here, with the feature named, before any request uses it."""
from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass, field

import torch

from plexus import model_files

ADAPTER_FILES = ["adapter_config.json", "*.safetensors", "*.bin"]
# The tensor-name suffixes PEFT writes for a LoRA layer (the adapter name is dropped on save).
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


@dataclass
class ModuleLoRA:
    a: torch.Tensor          # [r, in]; for an embedding [r, vocab]
    b: torch.Tensor          # [out, r]; for an embedding [hidden, r]
    scale: float             # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAWeights:
    """One adapter's weights, as shipped to the model side when it takes a device slot."""
    lora_id: int
    modules: dict[str, ModuleLoRA] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
                   for m in self.modules.values())


def load_adapter(lora_request, targets: dict[str, tuple[int, int]], max_rank: int,
                 hub: model_files.HubOptions | None) -> LoRAWeights:
    """The adapter `lora_request` names, read and checked. Raises ValueError naming the adapter and what is
    wrong with it."""
    what = f"LoRA adapter {lora_request.lora_name!r} (lora_int_id={lora_request.lora_int_id})"
    directory = _resolve(lora_request.lora_path, what, hub)
    config = _read_config(directory, what)
    _check_config(config, what, targets)
    tensors = _read_tensors(directory, what)
    return LoRAWeights(lora_request.lora_int_id, _modules(tensors, config, what, targets, max_rank))


def _resolve(path: str, what: str, hub: model_files.HubOptions | None) -> pathlib.Path:
    local = pathlib.Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{what}: lora_path {path!r} is a file; pass the adapter's directory "
                         "(adapter_config.json + adapter_model.safetensors)")
    try:
        return model_files.from_hub("LoRA adapter", path, hub, None, ADAPTER_FILES)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def _read_config(directory: pathlib.Path, what: str) -> dict:
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{what}: {directory} has no adapter_config.json (a PEFT LoRA adapter directory holds "
                         "adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what}: could not read {path}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what}: {path} is not a JSON object")
    return config


def _check_config(config: dict, what: str, targets: dict[str, tuple[int, int]]) -> None:
    def refuse(feature: str) -> None:
        raise ValueError(f"{what}: {feature} is not supported; plexus serves plain LoRA (A and B matrices "
                         "added to the base layer's output)")

    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise ValueError(f"{what}: peft_type={config.get('peft_type')!r} is not a LoRA adapter; plexus serves "
                         "peft_type LORA")
    if config.get("use_dora"):
        refuse("DoRA (use_dora=true)")
    if config.get("lora_bias"):
        refuse("lora_bias=true (a bias on lora_B)")
    if config.get("bias", "none") not in ("none", None):
        refuse(f"bias={config['bias']!r} (trained biases in the base layers)")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save={config['modules_to_save']!r} (whole modules trained and saved with the "
               "adapter)")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out=true (GPT-2 style Conv1D layers)")
    for key, feature in [("layer_replication", "layer_replication"), ("target_parameters", "target_parameters"),
                         ("trainable_token_indices", "trainable_token_indices"),
                         ("megatron_config", "megatron_config")]:
        if config.get(key):
            refuse(feature)
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        # PEFT itself refuses this combination: its scaling would be ambiguous.
        refuse("use_rslora together with rank_pattern or alpha_pattern")
    wanted = config.get("target_modules")
    if isinstance(wanted, list):
        have = {name.rpartition(".")[2] for name in targets}
        missing = sorted(t for t in wanted if t.rpartition(".")[2] not in have)
        if missing:
            raise ValueError(f"{what}: target module{'s' if len(missing) > 1 else ''} {', '.join(missing)}: the "
                             f"model has no such module; plexus serves LoRA on {', '.join(sorted(have))}")


def _read_tensors(directory: pathlib.Path, what: str) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    try:
        if safetensors_path.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_path))
        if bin_path.is_file():
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict):
                raise ValueError("not a dict of tensors")
            return tensors
    except Exception as error:  # noqa: BLE001  (a corrupt file fails in many ways; all end in one message)
        path = safetensors_path if safetensors_path.is_file() else bin_path
        raise ValueError(f"{what}: could not read {path}: {type(error).__name__}: {error}") from None
    raise ValueError(f"{what}: {directory} has no adapter_model.safetensors or adapter_model.bin")


def _module_name(key: str) -> tuple[str, str] | None:
    """(the model's module name, "A" or "B") of a PEFT tensor name, or None for a name that is not LoRA A/B."""
    name = key.removeprefix("base_model.model.")
    for suffix, which in _SUFFIXES.items():
        if name.endswith(suffix):
            module = name[:-len(suffix)]
            return module.removeprefix("model."), which
    return None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _modules(tensors: dict[str, torch.Tensor], config: dict, what: str, targets: dict[str, tuple[int, int]],
             max_rank: int) -> dict[str, ModuleLoRA]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in key:
            raise ValueError(f"{what}: DoRA (lora_magnitude_vector in the weights) is not supported")
        if key.endswith(".lora_B.bias"):
            raise ValueError(f"{what}: lora_bias (a bias on lora_B in the weights) is not supported")
        if "modules_to_save" in key:
            raise ValueError(f"{what}: modules_to_save ({key} in the weights) is not supported")
        if key.endswith(".base_layer.weight"):
            # PEFT saves the base embedding / lm_head next to LoRA on them (save_embedding_layers): frozen, so
            # the base model's own, unless the vocabulary was resized for the adapter.
            module = key.removeprefix("base_model.model.").removesuffix(".base_layer.weight").removeprefix("model.")
            if module in targets and module.rpartition(".")[2] in ("embed_tokens", "lm_head"):
                vocab = targets["embed_tokens"][0] if "embed_tokens" in targets else None
                if tensor.dim() != 2 or tensor.shape[0] != vocab:
                    raise ValueError(f"{what}: {key!r} has shape {tuple(tensor.shape)}: the adapter resized the "
                                     f"vocabulary (the model has {vocab} tokens), which plexus does not serve")
                continue
        parsed = _module_name(key)
        if parsed is None:
            raise ValueError(f"{what}: tensor {key!r} is not a LoRA A or B matrix; plexus serves plain LoRA")
        module, which = parsed
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise ValueError(f"{what}: tensor {key!r} must be a 2-d floating-point matrix, got {tensor.dtype} "
                             f"of shape {tuple(tensor.shape)}")
        pairs.setdefault(module, {})[which] = tensor
    if not pairs:
        raise ValueError(f"{what}: the adapter's weights hold no LoRA matrices")

    alpha = config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora"))
    out: dict[str, ModuleLoRA] = {}
    for module, pair in sorted(pairs.items()):
        if module not in targets:
            kinds = sorted({name.rpartition(".")[2] for name in targets})
            raise ValueError(f"{what}: target module {module!r}: the model has no such module; plexus serves "
                             f"LoRA on {', '.join(kinds)}")
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{what}: module {module!r} has lora_{'AB'[0 if 'B' in pair else 1]} but not "
                             f"lora_{'AB'[1 if 'B' in pair else 0]}")
        a, b = pair["A"], pair["B"]
        # (PEFT stores an embedding's A as [r, vocab] and B as [hidden, r]: the same shapes as a linear's.)
        in_features, out_features = targets[module]
        rank = a.shape[0]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise ValueError(f"{what}: module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                             f"not fit the model's layer (in {in_features}, out {out_features}); is the adapter "
                             "for another base model?")
        if rank > max_rank:
            raise ValueError(f"{what}: module {module!r} has rank {rank}, above max_lora_rank={max_rank}; raise "
                             "max_lora_rank")
        peft_name = module if module == "lm_head" else f"model.{module}"
        module_alpha = _pattern_value(config.get("alpha_pattern"), peft_name, alpha)
        scale = module_alpha / math.sqrt(rank) if rslora else module_alpha / rank
        out[module] = ModuleLoRA(a.contiguous(), b.contiguous(), float(scale))
    return out
