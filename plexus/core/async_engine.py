"""AsyncLLM (vLLM's AsyncLLM / AsyncLLMEngine): one engine loop for many concurrent callers.

One thread owns the LLMEngine and is the only one that touches it. It drains the commands callers queued
(add a request, abort, add or remove a LoRA adapter, ...), runs one step, and hands each RequestOutput to
its caller's asyncio queue through the caller's event loop; with nothing to do it sleeps on a condition.
Callers never poll and never step: `generate()` is an async iterator over a request's outputs, and
leaving it early (a client that disconnects, a cancelled task) aborts the request and frees its blocks.

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=...))
    async for output in engine.generate("Hello", SamplingParams(max_tokens=16), request_id="1"):
        print(output.outputs[0].text)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from plexus.core.arg_utils import EngineArgs
from plexus.core.engine import LLMEngine
from plexus.core.metrics import StatLogger
from plexus.core.outputs import RequestOutput
from plexus.core.sampling_params import SamplingParams

logger = logging.getLogger("plexus")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; every request in flight fails with it."""


class QueueFullError(RuntimeError):
    """More requests are waiting than max_num_queued_requests allows (the server answers 503)."""


class _Finished:
    """Put on a request's queue after its last output (or with the error that ended it)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class AsyncLLM:
    """An LLMEngine driven by one background loop, for asyncio callers (the OpenAI server).

    Args:
        engine: the engine, or a function that builds it. Prefer the function (from_engine_args does):
            the engine is then built on the loop's own thread. OpenMP gives its fast, spinning thread team
            only to the first thread that runs a parallel region; a loop thread started after the model
            was loaded on another thread decodes about 1.6x slower on CPU.
        max_num_queued_requests: refuse a new request (QueueFullError) while this many wait beyond the
            batch slots still free (max_num_seqs minus the running requests); None: no limit.
        stat_loggers: called with every step's StepStats (core/metrics.py), besides the engine's own.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_num_queued_requests: int | None = None,
                 stat_loggers: list[StatLogger] | None = None) -> None:
        if max_num_queued_requests is not None and max_num_queued_requests < 0:
            raise ValueError(f"max_num_queued_requests must be >= 0 or None, got {max_num_queued_requests}")
        self.max_num_queued_requests = max_num_queued_requests
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self.dead_error: BaseException | None = None
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="plexus-engine", daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()     # a failure to build is raised here, in the caller
        self.engine.stat_loggers.extend(stat_loggers or [])

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, max_num_queued_requests: int | None = None,
                         stat_loggers: list[StatLogger] | None = None, **kwargs: Any) -> AsyncLLM:
        return cls(lambda: LLMEngine.from_engine_args(engine_args), max_num_queued_requests=max_num_queued_requests,
                   stat_loggers=stat_loggers)

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], built: concurrent.futures.Future) -> None:
        if not isinstance(engine, LLMEngine):
            try:
                engine = engine()
            except BaseException as error:  # noqa: BLE001  (the constructor raises it)
                built.set_exception(error)
                return
        self.engine = engine
        built.set_result(engine)
        self._loop()

    # ------------------------------------------------------------------ state

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    @property
    def is_stopped(self) -> bool:
        return not self._thread.is_alive()

    async def check_health(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine loop died: {self.dead_error}") from self.dead_error
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")
        try:
            self.engine.check_health()       # a worker process that is gone (the "mp" executor)
        except Exception as error:  # noqa: BLE001
            raise EngineDeadError(f"the engine cannot run steps: {error}") from error

    async def get_tokenizer(self, lora_request: Any = None):
        return self.engine.get_tokenizer()

    async def get_model_config(self):
        return self.engine.get_model_config()

    def get_num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt: Any, sampling_params: SamplingParams, request_id: str,
                       lora_request: Any = None, priority: int = 0, **kwargs: Any
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request and yield its RequestOutputs as the engine produces them (what each holds follows
        sampling_params.output_kind). Errors in the request itself (a bad prompt, a bad adapter) are raised
        before the first output; leaving the iterator before the last output aborts the request."""
        await self.check_health()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def add() -> None:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
            limit = self.max_num_queued_requests
            if limit is not None and self._num_queued() >= limit:
                raise QueueFullError(f"the server has {limit} requests waiting (max_num_queued_requests="
                                     f"{limit}); try again later")
            self.engine.add_request(request_id, prompt, sampling_params, lora_request=lora_request,
                                    priority=priority, **kwargs)
            self._streams[request_id] = (loop, queue)

        try:
            await self._call(add)
        except asyncio.CancelledError:      # the add may have run already: take the request back out
            self._submit(lambda: self._abort([request_id]))
            raise
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Finished):
                    finished = True
                    if item.error is not None:
                        raise item.error
                    return
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(lambda: self._abort([request_id]))

    def _num_queued(self) -> int:
        """Requests waiting beyond the batch slots still free: those that will not run at the next step."""
        scheduler = self.engine.scheduler
        free = max(0, scheduler.config.max_num_seqs - len(scheduler.running))
        return max(0, len({r.parent_id for r in scheduler.waiting}) - free)

    async def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await self._call(lambda: self._abort(ids))

    async def add_lora(self, lora_request: Any) -> bool:
        return await self._call(lambda: self.engine.add_lora(lora_request))

    async def remove_lora(self, lora_id: int) -> bool:
        return await self._call(lambda: self.engine.remove_lora(lora_id))

    async def list_loras(self) -> set[int]:
        return await self._call(self.engine.list_loras)

    async def pin_lora(self, lora_id: int) -> bool:
        return await self._call(lambda: self.engine.pin_lora(lora_id))

    async def reset_prefix_cache(self) -> bool:
        return await self._call(self.engine.reset_prefix_cache)

    async def run_in_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine's thread, between steps (a consistent view of its state)."""
        return await self._call(lambda: fn(self.engine))

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self.engine.shutdown()

    # ------------------------------------------------------------------ the loop

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopping or self.dead_error is not None:
                future.set_exception(EngineDeadError("the engine is not running"))
                return future
            self._commands.append((fn, future))
            self._wake.notify()
        return future

    def _abort(self, ids: list[str]) -> None:
        live = [i for i in ids if i in self._streams]
        self.engine.abort_request(live)
        for request_id in live:
            self._deliver(request_id, _Finished())

    def _deliver(self, request_id: str, item: Any) -> None:
        loop, queue = self._streams[request_id]
        if isinstance(item, _Finished) or item.finished:
            del self._streams[request_id]
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:        # the caller's loop is closed: nobody is listening any more
            self.engine.abort_request(request_id)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wake:
                    while not self._commands and not engine.has_unfinished_requests() and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, deque()
                for fn, future in commands:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as error:  # noqa: BLE001  (the caller gets it)
                            future.set_exception(error)
                if engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.request_id in self._streams:
                            self._deliver(output.request_id, output)
        except BaseException as error:  # noqa: BLE001  (fail every caller rather than hang them)
            logger.exception("the engine loop died")
            self.dead_error = error
        finally:
            self._fail_all(self.dead_error)

    def _fail_all(self, error: BaseException | None) -> None:
        failure = EngineDeadError(f"the engine loop stopped: {error}" if error else "the engine shut down")
        with self._wake:
            self._stopping = True
            commands, self._commands = self._commands, deque()
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(failure)
        for request_id in list(self._streams):
            self._deliver(request_id, _Finished(failure))


AsyncLLMEngine = AsyncLLM

