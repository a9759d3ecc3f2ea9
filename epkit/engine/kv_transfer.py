"""Disaggregated prefill/decode: vLLM's ``--kv-transfer-config`` and NixlConnector's request protocol, and the
wire format of the engine's KV side channel (torch-free; the core's side of it is :mod:`epkit.engine.kv_agent`).

A prefill instance runs a request whose ``kv_transfer_params.do_remote_decode`` is true, answers with its
one token and keeps the prompt's KV blocks, naming them in the response's ``kv_transfer_params`` as vLLM
0.32.0's NixlConnector does (``request_finished``). A decode instance given those params (and the same
prompt) pulls the prompt's KV from the prefill's side channel, treats it as computed except the last prompt
token, which it recomputes to sample the first token (vLLM's ``_update_waiting_for_remote_kv``), and decodes on.

Each DP rank's engine core listens on ``VLLM_NIXL_SIDE_CHANNEL_HOST:VLLM_NIXL_SIDE_CHANNEL_PORT + dp_rank``
(vLLM's names and defaults). A message is a 4-byte big-endian length, a JSON header, then ``nbytes`` raw
bytes when the header says so: JSON, never pickle, since the peer is another deployment.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import uuid
from typing import Any

from epkit.errors import EngineError
from epkit.topology.backends import KV_BUFFER_DEVICES, KV_LOAD_FAILURE_POLICIES, KV_ROLES, NIXL_BACKENDS

KV_CONNECTORS = ("NixlConnector",)  # the protocol the engine implements
# vLLM 0.32.0's KVTransferConfig fields; kv_rank / kv_parallel_size / kv_ip / kv_buffer_size are older releases'
# (P2P connectors) and accepted without effect, so one rendered config serves every release
KV_TRANSFER_KEYS = ("kv_connector", "engine_id", "kv_buffer_device", "kv_role", "kv_port", "kv_connector_extra_config",
                    "kv_connector_module_path", "enable_permute_local_kv", "kv_load_failure_policy",
                    "kv_rank", "kv_parallel_size", "kv_ip", "kv_buffer_size")
LEASE_DEFAULT_S = 30.0  # vLLM 0.32.0: kv_connector_extra_config.kv_lease_duration, default 30 s
SIDE_CHANNEL_HOST_DEFAULT, SIDE_CHANNEL_PORT_DEFAULT = "localhost", 5600  # vLLM's VLLM_NIXL_SIDE_CHANNEL_*
CONNECT_TIMEOUT_S, REPLY_TIMEOUT_S = 10.0, 60.0
WIRE_MAGIC = b"EPKV\x01"  # every side-channel message starts with it (protocol version 1)
MAX_HEADER_BYTES = 1 << 20  # a JSON header is a few hundred bytes; more means the peer speaks something else
PULL_FIELDS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise EngineError(message)


def check_kv_transfer_config(config: Any) -> dict[str, Any]:
    """``--kv-transfer-config`` checked field by field as vLLM 0.32.0 reads it; returns it with an ``engine_id``.

    Only NixlConnector's protocol is implemented: any other connector is refused by name. Raises
    :class:`EngineError` naming the field, the value and what is allowed."""
    _check(isinstance(config, dict), f"kv_transfer_config={config!r} must be a JSON object")
    unknown = sorted(set(config) - set(KV_TRANSFER_KEYS))
    _check(not unknown, f"kv_transfer_config has unknown keys {unknown}; valid keys: {', '.join(KV_TRANSFER_KEYS)}")
    connector = config.get("kv_connector")
    _check(connector in KV_CONNECTORS,
           f"kv_transfer_config.kv_connector={connector!r}: the built-in engine implements {', '.join(KV_CONNECTORS)}'s "
           "protocol only (its KV moves over the engine's own side channel); use vLLM for other connectors")
    role = config.get("kv_role")
    _check(role in KV_ROLES, f"kv_transfer_config.kv_role={role!r}; allowed: {', '.join(KV_ROLES)} "
                             "(vLLM requires one when kv_connector is set)")
    device = config.get("kv_buffer_device", "cpu")
    _check(device in KV_BUFFER_DEVICES, f"kv_transfer_config.kv_buffer_device={device!r}; allowed: "
                                        f"{', '.join(KV_BUFFER_DEVICES)}")
    extra = config.get("kv_connector_extra_config", {})
    _check(isinstance(extra, dict), f"kv_transfer_config.kv_connector_extra_config={extra!r} must be a JSON object")
    backends = extra.get("backends", ["UCX"])
    _check(isinstance(backends, list) and all(b in NIXL_BACKENDS for b in backends),
           f"kv_transfer_config.kv_connector_extra_config.backends={backends!r}; allowed: a list of "
           f"{', '.join(NIXL_BACKENDS)}")
    _check(backends == ["UCX"], f"kv_transfer_config.kv_connector_extra_config.backends={backends!r}: the built-in "
                                "engine moves KV over TCP, or over NIXL with its UCX backend only; allowed: [\"UCX\"] "
                                "(or leave it out)")
    lease = extra.get("kv_lease_duration", LEASE_DEFAULT_S)
    _check(not isinstance(lease, bool) and isinstance(lease, (int, float)) and lease > 0,
           f"kv_transfer_config.kv_connector_extra_config.kv_lease_duration={lease!r} must be a number of seconds > 0")
    policy = config.get("kv_load_failure_policy", "fail")
    _check(policy in KV_LOAD_FAILURE_POLICIES,
           f"kv_transfer_config.kv_load_failure_policy={policy!r}; allowed: fail, recompute")
    _check(policy == "fail", f"kv_transfer_config.kv_load_failure_policy={policy!r}: the built-in engine fails a "
                             "request whose KV pull failed and does not recompute it; allowed: fail")
    engine_id = config.get("engine_id") or str(uuid.uuid4())
    _check(isinstance(engine_id, str), f"kv_transfer_config.engine_id={engine_id!r} must be a string")
    return {**config, "engine_id": engine_id}


def hold_timeout_s(config: dict[str, Any], environ=None) -> float:
    """Seconds a prefill keeps a finished request's blocks for its decode: ``kv_connector_extra_config.
    kv_lease_duration`` (vLLM 0.32.0; default 30), else ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT`` (older vLLM's name for
    the same deadline, whose default was 480 s)."""
    extra = config.get("kv_connector_extra_config") or {}
    if "kv_lease_duration" in extra:
        return float(extra["kv_lease_duration"])
    value = (os.environ if environ is None else environ).get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT")
    if value is None:
        return LEASE_DEFAULT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    _check(seconds > 0, f"VLLM_NIXL_ABORT_REQUEST_TIMEOUT={value!r} must be a number of seconds > 0")
    return seconds


def side_channel_address(dp_rank: int, environ=None) -> tuple[str, int]:
    """(host, port) of DP rank ``dp_rank``'s side channel: vLLM's ``VLLM_NIXL_SIDE_CHANNEL_HOST`` and
    ``VLLM_NIXL_SIDE_CHANNEL_PORT + dp_rank``."""
    environ = os.environ if environ is None else environ
    host = environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", SIDE_CHANNEL_HOST_DEFAULT)
    raw = environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", str(SIDE_CHANNEL_PORT_DEFAULT))
    _check(raw.strip().isdigit() and 1 <= int(raw) + dp_rank <= 65535,
           f"VLLM_NIXL_SIDE_CHANNEL_PORT={raw!r} must be a port such that port + dp_rank ({dp_rank}) is in 1..65535")
    return host, int(raw) + dp_rank


def rank_of_engine(engine_id: str, remote_engine_id: Any) -> int | None:
    """The DP rank that ``remote_engine_id`` (vLLM's ``<engine_id>_dp<rank>``) names in this engine, or None."""
    prefix = f"{engine_id}_dp"
    if isinstance(remote_engine_id, str) and remote_engine_id.startswith(prefix) and remote_engine_id[len(prefix):].isdigit():
        return int(remote_engine_id[len(prefix):])
    return None


def prompt_digest(token_ids) -> str:
    """A short digest of a prompt's token ids: the decode side checks it got the prompt the prefill computed."""
    return hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest()[:16]


def remote_decode_params(engine_id: str, request_id: str, block_ids: list[int], host: str, port: int,
                         num_tokens: int) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill returns: vLLM 0.32.0's keys (``NixlPullConnectorScheduler.
    request_finished``), its block ids as one list per KV cache group."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [list(block_ids)],
            "remote_engine_id": engine_id, "remote_request_id": request_id, "remote_host": host, "remote_port": port,
            "tp_size": 1, "dcp_size": 1, "pp_size": 1, "remote_num_tokens": num_tokens,
            "remote_blocks_expiry_time": None, "transfer_mode": "pull"}


# ---- wire format --------------------------------------------------------------------------
def no_delay(sock: socket.socket) -> socket.socket:
    """``sock`` with TCP_NODELAY: a message is its header then its payload, two writes, and with Nagle's algorithm
    on the second would wait for the first's (delayed, up to 40 ms) ACK."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_message(sock: socket.socket, header: dict[str, Any], payload=None) -> None:
    """One message: the magic :data:`WIRE_MAGIC`, length, JSON header (with ``nbytes`` when a payload follows),
    payload."""
    if payload is not None:
        header = {**header, "nbytes": len(payload)}
    data = json.dumps(header).encode()
    sock.sendall(WIRE_MAGIC + struct.pack(">I", len(data)) + data)
    if payload is not None:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, into=None):
    buf = into if into is not None else bytearray(n)
    view, got = memoryview(buf).cast("B"), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        got += k
    return buf


def recv_message(sock: socket.socket, alloc=None) -> tuple[dict[str, Any], Any]:
    """(header, payload or None) of one message; ``alloc(nbytes)`` gives the payload's buffer (a writable
    buffer such as a pinned tensor's numpy view) and is returned as the payload, else a bytearray."""
    magic = bytes(_recv_exact(sock, len(WIRE_MAGIC)))
    size = struct.unpack(">I", bytes(_recv_exact(sock, 4)))[0] if magic == WIRE_MAGIC else 0
    if magic != WIRE_MAGIC or size > MAX_HEADER_BYTES:
        peer = sock.getpeername()
        peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "the peer")
        raise ValueError(f"{peer} is not the built-in engine's KV side channel (it sent {magic!r}…; a vLLM instance "
                         "speaks NIXL's own handshake there): prefill and decode must both be `epkit serve`")
    header = json.loads(bytes(_recv_exact(sock, size)))
    if "nbytes" not in header:
        return header, None
    nbytes = int(header["nbytes"])
    if alloc is None:
        return header, _recv_exact(sock, nbytes)
    buffer = alloc(nbytes)
    _recv_exact(sock, nbytes, into=buffer)
    return header, buffer


def ask(host: str, port: int, header: dict[str, Any]) -> tuple[dict[str, Any], bytearray | None]:
    """Send ``header`` to a side channel and return its reply; OSError when it cannot be reached."""
    with no_delay(socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)) as sock:
        sock.settimeout(REPLY_TIMEOUT_S)
        send_message(sock, header)
        return recv_message(sock)


def release(params: dict[str, Any]) -> dict[str, Any]:
    """Ask the side channel named by a prefill's ``kv_transfer_params`` to free the blocks it holds for them.

    Returns the reply: ``{"ok": True, "blocks": n, ...}`` or ``{"ok": False, "error": ...}``."""
    header, _ = ask(str(params["remote_host"]), int(params["remote_port"]),
                    {"op": "release", "engine_id": params.get("remote_engine_id"),
                     "request_id": params.get("remote_request_id")})
    return header
