"""One request must not take the others down. When a step raises, its sequences run again one by one, so the
ones that fail on their own finish with finish_reason "error" and the rest go on (rerunning writes the same
keys and values again). A worker that died is not one request's fault: WorkerDiedError goes to the caller."""
from __future__ import annotations

import logging
from collections.abc import Callable

from plexus.core.executor import Executor, WorkerDiedError
from plexus.core.step import StepInput, StepOutput

logger = logging.getLogger("plexus")


def execute_isolating_failures(executor: Executor, step: StepInput,
                               fail: Callable[[str, Exception], None]) -> StepOutput:
    """The step's output; fail(request_id, error) for each sequence that raises on its own."""
    try:
        return executor.execute_model(step)
    except WorkerDiedError:
        raise
    except Exception as error:  # noqa: BLE001
        logger.warning("a step failed (%s: %s); running its %d sequences one by one", type(error).__name__,
                       error, len(step.sequences))
    result = StepOutput()
    for seq in step.sequences:
        try:
            alone = executor.execute_model(StepInput([seq], lora_loads=step.lora_loads))
        except WorkerDiedError:
            raise
        except Exception as seq_error:  # noqa: BLE001
            fail(seq.request_id, seq_error)
            continue
        result.sampled.update(alone.sampled)
        result.prompt_logprobs.update(alone.prompt_logprobs)
    return result
