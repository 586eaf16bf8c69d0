"""The engine's LoRA methods under vLLM's names (add_lora, remove_lora, list_loras, pin_lora), the check of a
request's lora_request, and the device slots of a step's adapters. LLMEngine inherits them; the manager
(core/lora/manager.py) does the work."""
from __future__ import annotations

from typing import Any

from plexus.core.lora.manager import LoRAManager
from plexus.core.lora.request import LoRARequest


class LoRAEngineAPI:
    lora: LoRAManager | None

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter and keep it in host memory (max_cpu_loras, least recently used evicted
        first). True if it was not loaded yet. Raises ValueError naming what is wrong with it."""
        self._check_lora_request(lora_request)
        return self.lora.add(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.lora is not None and self.lora.remove(lora_id)

    def list_loras(self) -> set[int]:
        """The lora_int_ids of the adapters held in host memory."""
        return set() if self.lora is None else self.lora.list()

    def pin_lora(self, lora_id: int) -> bool:
        """Keep an adapter in host memory (never evicted) and prefer keeping it in its device slot."""
        if self.lora is None:
            raise ValueError("pin_lora: LoRA is not enabled; create the engine with enable_lora=True")
        return self.lora.pin(lora_id)

    def _check_lora_request(self, lora_request: Any) -> None:
        if self.lora is None:
            name = getattr(lora_request, "lora_name", lora_request)
            raise ValueError(f"lora_request {name!r} given but LoRA is not enabled; create the engine with "
                             "enable_lora=True")
        self.lora.check_request(lora_request)

    def _lora_slots(self, scheduled, fail) -> tuple[dict[int, int], dict]:
        """Device slots for the step's adapters (adapter id -> slot) and the slots to fill. A request whose
        adapter can no longer be read (its files changed or went away) fails alone: fail(request, error)."""
        if self.lora is None:
            return {}, {}
        requests = {s.request.lora_id: s.request.lora_request for s in scheduled.scheduled if s.request.lora_id}
        if not requests:
            return {}, {}
        slot_of, loads, failed = self.lora.assign_slots(set(requests), requests)
        for s in scheduled.scheduled:
            if s.request.lora_id in failed:
                fail(s.request, failed[s.request.lora_id])
        return slot_of, loads
