"""Streaming helpers of the API server: text deltas cut at stop strings, SSE framing, merged token streams."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

SSE_DONE = "data: [DONE]\n\n"


class StopChecker:
    """Turns token deltas into text deltas, cutting at the first stop string (held back until sure)."""

    def __init__(self, tokenizer, stops: list[str], prompt_ids: list[int] = ()):
        self.decoder, self.stops = tokenizer.stream_decoder(prompt_ids), stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token_ids: tuple[int, ...], final: bool) -> str:
        self.text += self.decoder.push(list(token_ids), final=final)
        cut = min((i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, end = True, cut
            self.text = self.text[:cut]
        else:
            end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators, yielding (index, item) as items arrive."""
    if len(streams) == 1:  # the usual single prompt: no extra task and queue per token
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # a client that left: the request is aborted now, not at garbage collection
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
