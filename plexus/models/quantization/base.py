"""What every quantization method's config provides: the LinearMethod for each layer, and the layers it
leaves alone (a checkpoint's `ignore` list in compressed-tensors' spelling, or transformers'
`modules_to_not_convert`)."""
from __future__ import annotations

import re
from collections.abc import Mapping

from plexus.models.layers.linear import UNQUANTIZED, LinearMethod


class QuantizationConfig:
    """Subclasses set `name` (vLLM's quantization= name) and implement from_config and quantized_method."""

    name: str = ""
    # Module names left unquantized: exact names ("lm_head", "model.layers.0.mlp.down_proj"), a name's
    # last parts ("down_proj" matches every layer's), or "re:<regex>" matched from the start of the name.
    ignored: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, hf_quant_config: dict | None, environ: Mapping[str, str]) -> QuantizationConfig:
        """hf_quant_config: the checkpoint's quantization_config (None when the user named the method);
        environ: the variables the method reads (plexus.envs)."""
        raise NotImplementedError

    def quantized_method(self, prefix: str) -> LinearMethod | None:
        """The method for a layer that is not ignored, or None to leave it unquantized."""
        raise NotImplementedError

    def linear_method(self, prefix: str, shard_names: list[str]) -> LinearMethod:
        """The method for the layer named `prefix`, whose checkpoint tensors are `shard_names` (q_proj,
        k_proj, v_proj for a fused qkv_proj). The shards of one layer must agree on being ignored."""
        ignored = [self.is_ignored(name) for name in shard_names]
        if any(ignored) and not all(ignored):
            kept = [n for n, i in zip(shard_names, ignored) if not i]
            raise ValueError(f"{self.name}: the ignore list skips only some of {', '.join(shard_names)} (not "
                             f"{', '.join(kept)}), which plexus runs as one fused layer {prefix!r}; ignore all or none")
        if all(ignored):
            return UNQUANTIZED
        return self.quantized_method(prefix) or UNQUANTIZED

    def is_ignored(self, name: str) -> bool:
        candidates = (name, f"model.{name}")
        for entry in self.ignored:
            if entry.startswith("re:"):
                if any(re.match(entry[3:], c) for c in candidates):
                    return True
            elif any(c == entry or c.endswith("." + entry) or c.startswith(entry + ".") for c in candidates):
                return True
        return False
