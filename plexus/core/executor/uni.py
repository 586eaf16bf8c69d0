"""The "uni" executor: the one worker lives in this process and is called directly."""
from __future__ import annotations

from typing import Any

from plexus.core.config import EngineConfig
from plexus.core.executor import Executor
from plexus.core.step import StepInput, StepOutput


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.worker = config.platform.make_worker(config, rank=0)
        self.device = self.worker.device

    def collective_rpc(self, method: str | Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        function = getattr(self.worker, method) if isinstance(method, str) else (
            lambda *a, **k: method(self.worker, *a, **k))
        return [function(*args, **(kwargs or {}))]

    def execute_model(self, step: StepInput) -> StepOutput:
        return self.worker.execute_model(step)
