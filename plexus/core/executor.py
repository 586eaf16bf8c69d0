"""Runs the model: one worker in this process. (Tensor parallelism, one
process per rank over torch.distributed, plugs in here.)"""
from __future__ import annotations

from plexus.core.config import EngineConfig


class Executor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = config.platform.make_worker(config, rank=0)
        self.device = self.worker.device

    def execute_model(self, scheduler_output, default_generator):
        return self.worker.execute_model(scheduler_output, default_generator)
