"""The API server's side of the engine cores: connections, routing, per-request streams."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from multiprocessing.connection import Client, Connection
from typing import AsyncIterator, Callable

from epkit.engine.config import EngineConfig
from epkit.engine.core import STORE_PREFIX, without_nagle
from epkit.engine.sequence import EngineRequest, RequestOutput, SamplingParams
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")


class EngineClient:
    """Sends requests to DP ranks (least loaded, or pinned) and streams their outputs back.

    One reader thread per engine core hands outputs to the asyncio loop. If a core's
    connection breaks, ``on_core_lost`` is called with a message (the server then exits).
    """

    def __init__(self, cfg: EngineConfig, store, server_index: int, on_core_lost: Callable[[str], None]):
        self.cfg, self.server_index = cfg, server_index
        self.on_core_lost = on_core_lost
        self.dp_size = cfg.data_parallel_size
        self.in_flight = [0] * self.dp_size  # requests this server has sent and not seen finish
        self.core_stats = [(0, 0, 0)] * self.dp_size  # (running, waiting, preemptions) as each core last reported
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._ids = itertools.count()
        self._rr = itertools.count()
        self._send_locks = [threading.Lock() for _ in range(self.dp_size)]
        self.conns: list[Connection] = []
        self.closing = False
        self.on_stats: Callable[[int, int, int, int, float], None] = lambda rank, running, waiting, preemptions, kv: None
        self.on_output: Callable[[RequestOutput], None] = lambda out: None
        self.on_eplb_stats: Callable[[dict], None] = lambda stats: None
        self.on_kv_stats: Callable[[int, int, int], None] = lambda rank, requests, blocks: None
        # replies to questions asked of every rank (eplb_dumps, profile), by (kind, rank)
        self._waiters: dict[tuple[str, int], tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ask_locks: dict[str, asyncio.Lock] = {}
        authkey = store.get(STORE_PREFIX + "authkey")
        deadline = time.time() + cfg.startup_timeout_s
        for rank in range(self.dp_size):
            key = f"{STORE_PREFIX}core/{rank}"
            while True:
                try:
                    store.wait([key], _remaining(deadline))
                    break
                except RuntimeError as exc:  # store timeout: report which rank never came up
                    raise EngineError(f"DP rank {rank} did not come up within {cfg.startup_timeout_s:.0f} s") from exc
            host, port = store.get(key).decode().rsplit(":", 1)
            self.conns.append(without_nagle(Client((host, int(port)), authkey=authkey)))
        for rank, conn in enumerate(self.conns):
            threading.Thread(target=self._read, args=(rank, conn), daemon=True, name=f"core{rank}").start()

    def _read(self, rank: int, conn: Connection) -> None:
        while True:
            try:
                kind, outputs, stats = conn.recv()
                if kind == "stop":
                    log.info("engine core DP rank %d stopped", rank)
                    self.closing = True
                    continue
                if kind in ("eplb", "profile"):
                    waiter = self._waiters.pop((kind, rank), None)
                    if waiter is not None:
                        loop, future = waiter
                        loop.call_soon_threadsafe(lambda f=future, p=outputs: f.done() or f.set_result(p))
                    outputs = []
            except (EOFError, OSError) as exc:
                if not self.closing:
                    self.on_core_lost(f"lost the connection to engine core DP rank {rank} ({type(exc).__name__}); "
                                      "the rank has died or the deployment is stopping")
                return
            _, running, waiting, preemptions, kv_usage, *extra = stats
            self.core_stats[rank] = (running, waiting, preemptions)
            self.on_stats(rank, running, waiting, preemptions, kv_usage)
            if extra and extra[0]:
                self.on_eplb_stats(extra[0])
            if len(extra) > 1:  # (requests, blocks) held for remote decodes (KV transfer on)
                self.on_kv_stats(rank, *extra[1])
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for out in outputs:
                entry = self._queues.get(out.request_id)
                if entry is not None:
                    by_loop.setdefault(entry[0], []).append((entry[1], out))
            for loop, items in by_loop.items():  # one wake-up of the event loop per step, not one per token
                loop.call_soon_threadsafe(_deliver, items)

    def reserve(self, pinned: int | None) -> "Ticket":
        """Count a request against the pinned rank, else the rank with fewest in-flight requests (ties rotate).

        The count is taken now, not when the response starts streaming, so a burst of
        requests spreads evenly; the ticket gives it back when the request ends.
        """
        if pinned is not None:
            rank = pinned
        else:
            low = min(self.in_flight)
            candidates = [r for r, n in enumerate(self.in_flight) if n == low]
            rank = candidates[next(self._rr) % len(candidates)]
        return Ticket(self, rank)

    def _post(self, rank: int, message: tuple) -> None:
        with self._send_locks[rank]:
            self.conns[rank].send(message)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, ticket: "Ticket") -> AsyncIterator[RequestOutput]:
        """Yield the outputs of one request until it finishes; aborts it if the consumer leaves."""
        request_id = f"{self.server_index}-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        rank = ticket.rank
        self._queues[request_id] = (asyncio.get_running_loop(), queue, rank)
        finished = False
        try:
            self._post(rank, ("add", EngineRequest(request_id, tuple(prompt_ids), params)))
            while True:
                out: RequestOutput = await queue.get()
                if out.finish_reason is not None:
                    finished = True
                self.on_output(out)
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            ticket.release()
            if not finished and not self.closing:
                try:
                    self._post(rank, ("abort", request_id))
                except OSError:
                    pass

    async def eplb_dumps(self, timeout: float = 60.0) -> list[dict | None]:
        """Every DP rank's :meth:`Rebalancer.dump` (None where EPLB is off), in rank order."""
        return await self._ask_every_rank("eplb", ("eplb_dump",), timeout)

    async def profile(self, action: str, overrides: dict | None = None, timeout: float = 900.0) -> list[tuple[bool, str]]:
        """``start`` or ``stop`` the torch profiler on every DP rank: each rank's ``(ok, message)`` in rank order
        (a stop returns once every rank has written its trace, which takes a while for a long session)."""
        return await self._ask_every_rank("profile", ("profile", action, overrides or {}), timeout)

    async def _ask_every_rank(self, kind: str, message: tuple, timeout: float) -> list:
        lock = self._ask_locks.setdefault(kind, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            futures = []
            for rank in range(self.dp_size):
                future = loop.create_future()
                self._waiters[(kind, rank)] = (loop, future)
                futures.append(future)
                self._post(rank, message)
            try:
                return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
            finally:
                for rank in range(self.dp_size):
                    self._waiters.pop((kind, rank), None)

    def close(self) -> None:
        self.closing = True
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


class Ticket:
    """A request counted against DP rank ``rank`` until :meth:`release` (idempotent)."""

    def __init__(self, client: EngineClient, rank: int):
        self.client, self.rank, self.released = client, rank, False
        client.in_flight[rank] += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.client.in_flight[self.rank] -= 1


def _deliver(items: list) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _remaining(deadline: float):
    from datetime import timedelta

    return timedelta(seconds=max(1.0, deadline - time.time()))
