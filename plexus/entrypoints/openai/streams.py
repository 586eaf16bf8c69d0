"""What the endpoints do with the engine's output streams: wait for the first or last output, merge several
requests' streams, and write OpenAI's usage block and server-sent events."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from plexus.core.outputs import RequestOutput


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def first_output(stream) -> RequestOutput | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def last_output(first: RequestOutput | None, stream) -> RequestOutput | None:
    final = first
    async for output in stream:
        final = output
    return final


async def merge(started: list[tuple]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests' streams as they come; leaving early (a client that went
    away) closes every stream, which aborts its request."""
    if len(started) == 1:
        first, stream = started[0]
        try:
            if first is not None:
                yield 0, first
            async for output in stream:
                yield 0, output
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, first, stream) -> None:
        try:
            if first is not None:
                await queue.put((i, first))
            async for output in stream:
                await queue.put((i, output))
        finally:
            await stream.aclose()
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, first, stream)) for i, (first, stream) in enumerate(started)]
    try:
        remaining = len(tasks)
        while remaining:
            i, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            yield i, output
        for task in tasks:
            task.result()         # a stream that failed mid-way raises here
    finally:
        for task in tasks:
            task.cancel()
