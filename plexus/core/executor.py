"""Runs the model: one worker in this process. (Tensor parallelism, one
process per rank over torch.distributed, plugs in here: the step's input and
output are plain data, core/step.py.)"""
from __future__ import annotations

from plexus.core.config import EngineConfig
from plexus.core.step import StepInput, StepOutput


class Executor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker = config.platform.make_worker(config, rank=0)
        self.device = self.worker.device

    def execute_model(self, step: StepInput) -> StepOutput:
        return self.worker.execute_model(step)
