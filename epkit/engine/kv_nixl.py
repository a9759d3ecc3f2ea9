"""NIXL as the KV transport of disaggregated prefill/decode, where the ``nixl`` package imports and loads UCX.

The prefill's engine core registers its KV cache tensors with a NIXL agent once. Asked for a held prompt's KV
with ``transport: "nixl"``, it answers on the side channel with its agent's metadata and the memory regions
(address, length, device) of the prompt's slots — per layer, K and V, one region per block — and keeps the
blocks. The decode registers a host buffer shaped ``[layers, 2, tokens, heads, dim]``, READs every region into
it over UCX (one-sided: the prefill's step loop goes on), then sends ``release`` so the prefill frees the blocks,
and the core writes the buffer into the request's blocks as with TCP. Same wire header, same checks.

``EPKIT_KV_TRANSPORT`` picks: ``auto`` (NIXL where it loads, else TCP), ``tcp``, ``nixl`` (an error where it
does not load). NIXL is not a dependency of the engine (docs/engine.md says why).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Any

import torch

from epkit.engine.config import env_value
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

XFER_TIMEOUT_S = 20.0  # below the prefill's default 30 s lease (the release after the read checks it still held)


def load_nixl(agent_name: str, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> "NixlTransport | None":
    """The NIXL transport per ``EPKIT_KV_TRANSPORT``, or None for TCP (with the reason logged once)."""
    choice = env_value("EPKIT_KV_TRANSPORT")
    if choice == "tcp":
        return None
    try:
        return NixlTransport(agent_name, kv_caches)
    except Exception as exc:  # ImportError, or the library / its UCX plugin failing to load
        if choice == "nixl":
            raise EngineError(f"EPKIT_KV_TRANSPORT=nixl but NIXL cannot run here: {type(exc).__name__}: {exc} "
                              "(install nixl-cu12 and the nixl meta wheel without deps, or use tcp)") from exc
        log.info("KV transport: TCP (NIXL not available: %s: %s)", type(exc).__name__, str(exc).splitlines()[0]
                 if str(exc) else "")
        return None


def _mem_type(t: torch.Tensor) -> str:
    return "VRAM" if t.device.type == "cuda" else "DRAM"


class NixlTransport:
    """One engine core's NIXL agent: its KV cache registered (prefill side) and READs into host buffers (decode)."""

    name = "nixl"

    def __init__(self, agent_name: str, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent = nixl_agent(agent_name, nixl_agent_config(backends=["UCX"]))
        self.kv_caches = kv_caches
        self.agent.register_memory([t for pair in kv_caches for t in pair])
        self.mem = _mem_type(kv_caches[0][0])
        self.metadata = base64.b64encode(self.agent.get_agent_metadata()).decode()
        self.lock = threading.Lock()  # one transfer set-up at a time on this agent
        self.remotes: dict[str, str] = {}  # peer metadata -> its agent name here

    # ---- prefill side (the core's thread) ----------------------------------------------------
    def offer(self, block_table: list[int], num_tokens: int, block_size: int) -> dict[str, Any]:
        """What a decode needs to READ a held prompt: this agent's metadata and the prompt's regions, in the
        order of the decode's ``[layers, 2, tokens, heads, dim]`` buffer."""
        regions = []
        for pair in self.kv_caches:
            for t in pair:
                row = t[0].numel() * t.element_size()
                for j, block in enumerate(block_table[: -(-num_tokens // block_size)]):
                    tokens = min(block_size, num_tokens - j * block_size)
                    regions.append((t.data_ptr() + block * block_size * row, tokens * row,
                                    t.device.index or 0))
        return {"agent": self.metadata, "mem": self.mem, "regions": regions}

    # ---- decode side (a pull's thread) ------------------------------------------------------
    def read(self, offer: dict[str, Any], buffer: torch.Tensor) -> None:
        """READ the offered regions into ``buffer`` (contiguous, in the offer's order); raises on failure."""
        local, at = [], buffer.data_ptr()
        for _, length, _ in offer["regions"]:
            local.append((at, length, buffer.device.index or 0))
            at += length
        if at - buffer.data_ptr() != buffer.numel() * buffer.element_size():
            raise ValueError(f"the offered regions hold {at - buffer.data_ptr()} bytes, the buffer "
                             f"{buffer.numel() * buffer.element_size()}")
        with self.lock:
            remote = self.remotes.get(offer["agent"])
            if remote is None:
                remote = self.agent.add_remote_agent(base64.b64decode(offer["agent"]))
                self.remotes[offer["agent"]] = remote
            registered = self.agent.register_memory([buffer])
            try:
                handle = self.agent.initialize_xfer(
                    "READ", self.agent.get_xfer_descs([tuple(r) for r in local], _mem_type(buffer)),
                    self.agent.get_xfer_descs([tuple(r) for r in offer["regions"]], offer["mem"]), remote)
                state = self.agent.transfer(handle)
                deadline = time.monotonic() + XFER_TIMEOUT_S
                while state not in ("DONE", "ERR") and time.monotonic() < deadline:
                    time.sleep(0.0005)
                    state = self.agent.check_xfer_state(handle)
                self.agent.release_xfer_handle(handle)
            finally:
                self.agent.deregister_memory(registered)
        if state != "DONE":
            raise RuntimeError(f"NIXL READ ended in state {state!r}")
