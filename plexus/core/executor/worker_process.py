"""A worker process of the "mp" executor: `python -m plexus.core.executor.worker_process ADDRESS RANK`.

It listens on ADDRESS (a local socket; the key is in $PLEXUS_WORKER_AUTHKEY), takes one connection from the
engine, and answers its messages in order: ("__init__", (config,)) builds the platform's worker for RANK; any
other (method, args, kwargs) calls that worker method (or a function given the worker first) and sends back
("ok", result, None) or ("error", exception, traceback). It exits on ("shutdown", ...) or when the engine's
end of the connection closes, so a worker never outlives its engine."""
from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Listener

import cloudpickle

from plexus.core.executor.mp import AUTHKEY_VARIABLE


def main(address: str, rank: int) -> None:
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_VARIABLE))
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        conn = listener.accept()
    worker = None
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        try:
            method, args, kwargs = cloudpickle.loads(message)
            if method == "shutdown":
                return
            if method == "__init__":
                config = args[0]
                worker = config.platform.make_worker(config, rank)
                result = None
            elif isinstance(method, str):
                result = getattr(worker, method)(*args, **kwargs)
            else:
                result = method(worker, *args, **kwargs)
            reply = ("ok", result, None)
        except Exception as error:  # noqa: BLE001  (sent to the engine, which raises it)
            reply = ("error", error, traceback.format_exc())
        try:
            payload = cloudpickle.dumps(reply)
        except Exception as error:  # noqa: BLE001  (an answer or exception that does not pickle)
            payload = cloudpickle.dumps(("error", RuntimeError(f"worker rank {rank}: {reply[1]!r} ({error})"),
                                         reply[2]))
        conn.send_bytes(payload)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
