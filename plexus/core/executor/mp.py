"""The "mp" executor: one worker process per rank.

Each worker is a fresh interpreter (`python -m plexus.core.executor.worker_process`), so the user's script is
never imported again in it and needs no `if __name__ == "__main__"` guard, and the worker's torch threads are
its own. The engine talks to each over a local socket (an authenticated multiprocessing connection) with
cloudpickled messages: the engine config once, then method calls and their answers.

A worker that exits is an error naming its rank as soon as the engine next waits on it (it polls the process
every 0.1 s while it waits); one that does not answer a step within VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300)
is an error too. Either way the executor is then dead: every later call raises the same error at once, and
the other workers are ended."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from typing import Any

import cloudpickle

from plexus.core.config import EngineConfig
from plexus.core.executor import Executor, WorkerDiedError
from plexus.core.step import StepInput, StepOutput

logger = logging.getLogger("plexus")

AUTHKEY_VARIABLE = "PLEXUS_WORKER_AUTHKEY"   # how a worker gets its connection's key (never on its command line)
_POLL_S = 0.1


@dataclass
class _WorkerHandle:
    rank: int
    process: subprocess.Popen
    conn: Connection | None = None


class MultiprocExecutor(Executor):
    uses_processes = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.timeout_s = config.env.execute_model_timeout_s
        self.dead: WorkerDiedError | None = None
        self._dir = tempfile.mkdtemp(prefix="plexus-workers-")
        authkey = os.urandom(32)
        # The engine's import path, so what a request brings by reference (a logits processor's module) imports there.
        env = dict(os.environ, **{AUTHKEY_VARIABLE: authkey.hex(), "PYTHONPATH": os.pathsep.join(sys.path)})
        self.workers = [
            _WorkerHandle(rank, subprocess.Popen(
                [sys.executable, "-m", "plexus.core.executor.worker_process", self._address(rank), str(rank)],
                env=env)) for rank in range(config.parallel.world_size)]
        self._finalizer = weakref.finalize(self, _shutdown, self.workers, self._dir)
        try:
            for worker in self.workers:
                worker.conn = self._connect(worker, authkey)
            self.collective_rpc("__init__", timeout=None, args=(config,))
        except BaseException:
            self.shutdown()
            raise
        logger.info("mp executor: %d worker process(es), pids %s", len(self.workers),
                    [w.process.pid for w in self.workers])

    def _address(self, rank: int) -> str:
        return os.path.join(self._dir, f"rank{rank}.sock")

    def _connect(self, worker: _WorkerHandle, authkey: bytes) -> Connection:
        address = self._address(worker.rank)
        while True:
            self._check_alive(worker, "starting")
            if os.path.exists(address):
                try:
                    return Client(address, family="AF_UNIX", authkey=authkey)
                except (FileNotFoundError, ConnectionRefusedError):
                    pass
            time.sleep(_POLL_S / 2)

    def _check_alive(self, worker: _WorkerHandle, doing: str) -> None:
        code = worker.process.poll()
        if code is not None:
            self._die(WorkerDiedError(f"worker rank {worker.rank} (pid {worker.process.pid}) exited with code "
                                      f"{code} while {doing}"))

    def _die(self, error: WorkerDiedError) -> None:
        self.dead = error
        logger.error("%s; ending the other workers", error)
        self.shutdown()
        raise error

    # ------------------------------------------------------------------ calls

    def collective_rpc(self, method: str | Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        if self.dead is not None:
            raise WorkerDiedError(str(self.dead))
        name = method if isinstance(method, str) else getattr(method, "__name__", "a function")
        message = cloudpickle.dumps((method, args, kwargs or {}))
        for worker in self.workers:
            try:
                worker.conn.send_bytes(message)
            except OSError:
                self._check_alive(worker, f"sent {name}")
                self._die(WorkerDiedError(f"worker rank {worker.rank} closed its connection before {name}"))
        return [self._receive(worker, name, timeout) for worker in self.workers]

    def _receive(self, worker: _WorkerHandle, name: str, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if worker.conn.poll(_POLL_S):
                try:
                    status, value, trace = cloudpickle.loads(worker.conn.recv_bytes())
                except (EOFError, OSError):
                    try:             # the connection closes as the process ends: wait to read its exit code
                        worker.process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    self._check_alive(worker, f"running {name}")
                    self._die(WorkerDiedError(f"worker rank {worker.rank} closed its connection while running {name}"))
                if status == "error":
                    if hasattr(value, "add_note"):
                        value.add_note(f"(raised in worker rank {worker.rank}:\n{trace})")
                    raise value
                return value
            self._check_alive(worker, f"running {name}")
            if deadline is not None and time.monotonic() > deadline:
                self._die(WorkerDiedError(f"worker rank {worker.rank} did not answer {name} within {timeout:g} s "
                                          "(VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)"))

    def execute_model(self, step: StepInput) -> StepOutput:
        return self.collective_rpc("execute_model", timeout=self.timeout_s, args=(step,))[0]

    def check_health(self) -> None:
        """Whether every worker process is still there. Reads only process state, so another thread (the
        server's health check) may call it while a step runs."""
        if self.dead is not None:
            raise WorkerDiedError(str(self.dead))
        for worker in self.workers:
            code = worker.process.poll()
            if code is not None:
                raise WorkerDiedError(f"worker rank {worker.rank} (pid {worker.process.pid}) exited with code {code}")

    def shutdown(self) -> None:
        self._finalizer()


def _shutdown(workers: list[_WorkerHandle], directory: str) -> None:
    """Ask each worker to exit, then end those that do not within a few seconds."""
    for worker in workers:
        if worker.conn is not None and worker.process.poll() is None:
            try:
                worker.conn.send_bytes(cloudpickle.dumps(("shutdown", (), {})))
            except OSError:
                pass
    deadline = time.monotonic() + 5
    for worker in workers:
        try:
            worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        if worker.conn is not None:
            worker.conn.close()
    shutil.rmtree(directory, ignore_errors=True)
