"""LoRARequest: which adapter a request runs with, as vLLM's ``vllm.lora.request.LoRARequest``."""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

# vLLM's newest examples leave lora_int_id out (LoRARequest(lora_name=..., lora_path=...)): an id is then
# given per name, the same name always getting the same id, from a range far above hand-picked ids.
_AUTO_IDS = itertools.count(1 << 30)
_ids_by_name: dict[str, int] = {}
_lock = threading.Lock()


def _id_for_name(name: str) -> int:
    with _lock:
        if name not in _ids_by_name:
            _ids_by_name[name] = next(_AUTO_IDS)
        return _ids_by_name[name]


@dataclass(eq=False)
class LoRARequest:
    """A PEFT LoRA adapter (a directory with adapter_config.json and adapter_model.safetensors, or a
    Hugging Face hub id) for a request.

    lora_int_id names the adapter within an engine: requests with the same id share its loaded weights and
    its prefix-cache blocks, so one id must always mean one path. ``lora_local_path`` is vLLM's older name
    for ``lora_path``."""

    lora_name: str
    lora_int_id: int | None = None
    lora_path: str = ""
    lora_local_path: str | None = field(default=None, repr=False)
    long_lora_max_len: int | None = field(default=None, repr=False)
    base_model_name: str | None = None
    tensorizer_config_dict: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.lora_local_path is not None:
            if self.lora_path and self.lora_path != self.lora_local_path:
                raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path={self.lora_path!r} and "
                                 f"lora_local_path={self.lora_local_path!r} differ; pass lora_path only")
            self.lora_path = self.lora_local_path
        if self.lora_int_id is None:
            self.lora_int_id = _id_for_name(self.lora_name)
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise TypeError(f"LoRARequest {self.lora_name!r}: lora_int_id must be an integer, "
                            f"got {self.lora_int_id!r}")
        if self.lora_int_id < 1:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_int_id must be > 0, got {self.lora_int_id}")
        self.lora_path = str(self.lora_path) if self.lora_path else ""
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path is empty; pass the adapter's directory "
                             "or hub id")
        if self.long_lora_max_len is not None:
            raise ValueError("LoRARequest: long_lora_max_len (long-context LoRA) is not supported")
        if self.tensorizer_config_dict is not None:
            raise ValueError("LoRARequest: tensorizer_config_dict (tensorizer-serialized adapters) is not supported")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def local_path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and (self.lora_int_id, self.lora_path) == (other.lora_int_id,
                                                                                         other.lora_path)

    def __hash__(self) -> int:
        return hash((self.lora_int_id, self.lora_path))
