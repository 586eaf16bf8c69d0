"""The LoRA manager: which adapters are known, which are held in host memory, which sit in device slots.

- Known adapters: every LoRARequest the engine has accepted, by lora_int_id. One id names one path for
  the engine's life (until remove_lora); a second path under the same id is refused.
- Host memory: up to max_cpu_loras adapters' weights, read from disk and checked (core/lora/adapter.py),
  least recently used evicted first, pinned ones never. An evicted adapter is read from disk again when a
  request needs it.
- Device slots: max_loras. The scheduler never runs more than max_loras distinct adapters in one step, so
  every adapter of a step gets a slot; a slot whose adapter is not in the step is reused, least recently
  used first (pinned adapters last). Filling a slot ships the adapter's weights with the step (StepInput.
  lora_loads), as plain data.
- Prefix-cache key: each registration of an id gets its own key, so blocks computed with one adapter are
  never reused by another, nor by the same id after it was removed and registered again."""
from __future__ import annotations

import itertools
from collections import OrderedDict

from plexus import model_files
from plexus.core.config import LoRAConfig
from plexus.core.lora.adapter import LoRAWeights, load_adapter
from plexus.core.lora.request import LoRARequest


class LoRAManager:
    def __init__(self, config: LoRAConfig, targets: dict[str, tuple[int, int]],
                 hub: model_files.HubOptions | None) -> None:
        self.config = config
        self.targets = targets
        self.hub = hub
        self.known: dict[int, LoRARequest] = {}
        self.cache_keys: dict[int, int] = {}
        self._keys = itertools.count(1)
        self.host: OrderedDict[int, LoRAWeights] = OrderedDict()     # least recently used first
        self.pinned: set[int] = set()
        self.slots: list[int | None] = [None] * config.max_loras      # slot -> adapter id
        self.slot_use: OrderedDict[int, None] = OrderedDict((i, None) for i in range(config.max_loras))
        self.loads_from_disk = 0                                      # for tests and stats

    # ------------------------------------------------------------------ registration

    def check_request(self, lora_request: LoRARequest) -> None:
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        known = self.known.get(lora_request.lora_int_id)
        if known is not None and known.lora_path != lora_request.lora_path:
            raise ValueError(f"lora_int_id={lora_request.lora_int_id} already names the adapter at "
                             f"{known.lora_path!r} ({known.lora_name!r}); {lora_request.lora_name!r} asks for it with "
                             f"lora_path={lora_request.lora_path!r}. One id names one adapter: give it another "
                             "lora_int_id, or remove_lora the first")

    def add(self, lora_request: LoRARequest) -> bool:
        """Read, check and hold the adapter in host memory. True if it was not there already. Raises
        ValueError (naming the adapter and the problem) and leaves the manager as it was."""
        self.check_request(lora_request)
        lora_id = lora_request.lora_int_id
        if lora_id in self.host:
            self.host.move_to_end(lora_id)
            return False
        weights = self._read(lora_request)
        self._make_host_room()
        self.host[lora_id] = weights
        if lora_id not in self.known:
            self.known[lora_id] = lora_request
            self.cache_keys[lora_id] = next(self._keys)
        return True

    def register(self, lora_request: LoRARequest) -> None:
        """For a request: an adapter already accepted stays as it is (read again only when a step needs it and
        it has left host memory); a new one is read and checked now, so a bad adapter fails its request here."""
        self.check_request(lora_request)
        if lora_request.lora_int_id in self.known:
            if lora_request.lora_int_id in self.host:
                self.host.move_to_end(lora_request.lora_int_id)
            return
        self.add(lora_request)

    def _read(self, lora_request: LoRARequest) -> LoRAWeights:
        weights = load_adapter(lora_request, self.targets, self.config.max_lora_rank, self.hub)
        self.loads_from_disk += 1
        return weights

    def _make_host_room(self) -> None:
        while len(self.host) >= self.config.max_cpu_loras:
            victim = next((i for i in self.host if i not in self.pinned), None)
            if victim is None:
                raise ValueError(f"every one of the max_cpu_loras={self.config.max_cpu_loras} host slots holds a "
                                 "pinned adapter; raise max_cpu_loras or unpin one (remove_lora)")
            del self.host[victim]

    def remove(self, lora_id: int) -> bool:
        """Forget the adapter: host copy, pin, slot and id (a request already queued with it reads it again)."""
        if lora_id not in self.known:
            return False
        self.host.pop(lora_id, None)
        self.pinned.discard(lora_id)
        del self.known[lora_id]
        del self.cache_keys[lora_id]
        for slot, held in enumerate(self.slots):
            if held == lora_id:
                self.slots[slot] = None
        return True

    def pin(self, lora_id: int) -> bool:
        if lora_id not in self.host:
            raise ValueError(f"pin_lora({lora_id}): no adapter with lora_int_id={lora_id} is loaded; add it first "
                             "(add_lora, or a request that uses it)")
        self.pinned.add(lora_id)
        return True

    def list(self) -> set[int]:
        return set(self.host)

    def cache_key(self, lora_id: int) -> int:
        return self.cache_keys[lora_id]

    # ------------------------------------------------------------------ device slots, per step

    def assign_slots(self, lora_ids: set[int], requests: dict[int, LoRARequest]
                     ) -> tuple[dict[int, int], dict[int, LoRAWeights | None], dict[int, Exception]]:
        """Slots for the adapters of one step (at most max_loras of them). Returns (adapter id -> slot, the
        slots to fill with their weights, adapter id -> the error that kept it from loading). `requests`: a
        LoRARequest for each id, to read it again from disk if it left host memory (or was removed)."""
        if len(lora_ids) > len(self.slots):
            raise AssertionError(f"{len(lora_ids)} adapters in one step, above max_loras={len(self.slots)}")
        slot_of = {lora_id: slot for slot, lora_id in enumerate(self.slots) if lora_id in lora_ids}
        loads: dict[int, LoRAWeights | None] = {}
        failed: dict[int, Exception] = {}
        for lora_id in sorted(lora_ids - set(slot_of)):
            try:
                weights = self._host_weights(lora_id, requests[lora_id])
            except Exception as error:  # noqa: BLE001  (the files went away or changed since it was accepted)
                failed[lora_id] = error
                continue
            slot = self._free_slot(set(slot_of.values()))
            self.slots[slot] = lora_id
            slot_of[lora_id] = slot
            loads[slot] = weights
        for slot in slot_of.values():
            self.slot_use.move_to_end(slot)
        return slot_of, loads, failed

    def _host_weights(self, lora_id: int, lora_request: LoRARequest) -> LoRAWeights:
        if lora_id not in self.host:
            if lora_id not in self.known:         # removed while a request with it was queued
                self.known[lora_id] = lora_request
                self.cache_keys[lora_id] = next(self._keys)
            weights = self._read(self.known[lora_id])
            self._make_host_room()
            self.host[lora_id] = weights
        self.host.move_to_end(lora_id)
        return self.host[lora_id]

    def _free_slot(self, taken: set[int]) -> int:
        """An empty slot, else the least recently used one not taken in this step (unpinned first)."""
        for slot, held in enumerate(self.slots):
            if held is None and slot not in taken:
                return slot
        candidates = [s for s in self.slot_use if s not in taken]
        unpinned = [s for s in candidates if self.slots[s] not in self.pinned]
        return (unpinned or candidates)[0]
