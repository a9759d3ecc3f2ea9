"""The process tree of one node: engine cores (one per local DP rank), API servers, teardown.

The primary node (not ``--headless``) hosts the TCPStore at ``--data-parallel-address:
--data-parallel-rpc-port`` that every rank of every node joins, and runs the API servers.
SIGTERM/SIGINT stop every child; a child that exits on its own stops the whole node with an
error. Children die with their parent (PR_SET_PDEATHSIG), so none is left behind.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import secrets
import signal
import time
from multiprocessing.connection import wait

from epkit.engine.config import EngineConfig
from epkit.engine.core import STORE_PREFIX, connect_store
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

STOP_GRACE_S = 10.0


def _core_entry(cfg: EngineConfig, rank: int, local_index: int) -> None:
    os.setpgrp()  # Ctrl-C in a terminal reaches the launcher only; it stops the children in order
    from epkit.engine.core import run_engine_core

    run_engine_core(cfg, rank, local_index)


def _api_entry(cfg: EngineConfig, index: int) -> None:
    os.setpgrp()
    from epkit.engine.server import run_api_server

    run_api_server(cfg, index)


def serve(cfg: EngineConfig) -> int:
    """Run this node's part of the deployment until a signal or a failure; returns the exit code."""
    _check_deployment(cfg)
    store = _join_rendezvous(cfg)
    metrics_dir = _shared_metrics_dir(cfg)
    children = _node_processes(cfg)
    stop_reason: list[str] = []

    def _on_signal(signum, frame):
        if not stop_reason:
            stop_reason.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()
        log.info("started %s (pids %s)", ", ".join(c.name for c in children), ", ".join(str(c.pid) for c in children))
        return _supervise(cfg, children, store, stop_reason)
    finally:
        _stop_all(children)
        for s, handler in old.items():
            signal.signal(s, handler)
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_deployment(cfg: EngineConfig) -> None:
    """Refuse, before any process starts, what the cores would fail on: backend, EP size, batch budget, weights,
    EPLB config; log the weight source and (on the primary) the tokenizer."""
    from epkit.engine.all2all import check_backend
    from epkit.engine.model import ModelConfig, model_config_of

    if cfg.ep_size > 1:
        check_backend(cfg.all2all_backend)
    from epkit.engine.runner import weight_source

    model_config, model_dir = model_config_of(cfg)
    mcfg = ModelConfig.from_dict(model_config)
    if cfg.ep_size > mcfg.num_experts:
        raise EngineError(f"ep_size={cfg.ep_size} exceeds num_experts={mcfg.num_experts}: every EP rank needs an expert")
    from epkit.engine.moe_tp import expert_shards

    expert_shards(cfg.data_parallel_size, cfg.enable_expert_parallel, 0, mcfg.moe_intermediate_size)  # before any start
    max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
    if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens is not None and cfg.max_num_batched_tokens < max_model_len:
        raise EngineError(f"--no-enable-chunked-prefill needs max_num_batched_tokens >= max_model_len, got "
                          f"max_num_batched_tokens={cfg.max_num_batched_tokens} < max_model_len={max_model_len} "
                          "(a whole prompt must fit one step); raise --max-num-batched-tokens or lower --max-model-len")
    _, weights = weight_source(cfg, model_dir)  # refuses random weights where vLLM would fail
    log.info("model %s: weights %s", cfg.model, weights)
    if not cfg.headless:
        from epkit.engine.tokenizer import load_tokenizer

        log.info("tokenizer: %s", load_tokenizer(cfg.tokenizer, model_config, model_dir).describe())
    if cfg.enable_eplb:
        from epkit.engine.rebalance import resolve_eplb_config

        eplb = resolve_eplb_config(cfg.eplb_config, mcfg.num_experts, cfg.ep_size)
        if eplb["use_async"]:
            log.warning("eplb_config.use_async=true: the built-in engine rebalances synchronously between steps")


def _join_rendezvous(cfg: EngineConfig):
    """The TCPStore every rank of every node joins: hosted here on the primary (with a fresh auth key), reached
    from a headless node."""
    try:
        store = connect_store(cfg, not cfg.headless, cfg.startup_timeout_s)
    except (RuntimeError, OSError) as exc:
        role = "reach the primary's" if cfg.headless else "host the"
        raise EngineError(f"could not {role} rendezvous store at {cfg.data_parallel_address}:{cfg.data_parallel_rpc_port}: "
                          f"{exc}") from exc
    if not cfg.headless:
        store.set(STORE_PREFIX + "authkey", secrets.token_hex(16))
    return store


def _shared_metrics_dir(cfg: EngineConfig) -> str | None:
    """With several API servers, prometheus_client's multiprocess folder (set before the fork server imports
    prometheus_client, which reads the variable at import), so every server's /metrics shows all servers' series,
    as vLLM does; None otherwise."""
    if cfg.headless or cfg.api_server_count <= 1:
        return None
    import tempfile

    metrics_dir = tempfile.mkdtemp(prefix="epkit-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    return metrics_dir


def _node_processes(cfg: EngineConfig) -> list[mp.process.BaseProcess]:
    """This node's children, not started: one engine core per local DP rank, then (primary) the API servers.

    A fork server imports torch and the server stack once; every child forks from it, already warm
    (and, unlike fork from this process, without inheriting the TCPStore's threads)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["epkit.engine.core", "epkit.engine.runner", "epkit.engine.server"])
    children: list[mp.process.BaseProcess] = []
    for local_index, rank in enumerate(cfg.local_dp_ranks):
        children.append(ctx.Process(target=_core_entry, args=(cfg, rank, local_index), name=f"EngineCore_DP{rank}"))
    if not cfg.headless:
        for i in range(cfg.api_server_count):
            children.append(ctx.Process(target=_api_entry, args=(cfg, i), name=f"ApiServer_{i}"))
    return children


def _supervise(cfg: EngineConfig, children: list, store, stop_reason: list[str]) -> int:
    """Wait until a signal (``stop_reason`` filled by the handler), a child's exit or, on a headless node, the loss
    of the primary's store; returns the node's exit code."""
    code = 0
    while not stop_reason:
        ready = wait([c.sentinel for c in children], timeout=0.5)
        if ready:
            dead = [c for c in children if c.sentinel in ready]
            for c in dead:
                c.join()
            failed = [c for c in dead if c.exitcode != 0]
            if failed or not cfg.headless or len(dead) == len(children):
                desc = ", ".join(f"{c.name} (pid {c.pid}) exited with code {c.exitcode}" for c in dead)
                code = 1 if failed else 0
                (log.error if failed else log.info)("%s; stopping this node", desc)
                break
        if cfg.headless and not _store_alive(store):
            log.error("lost the primary node's rendezvous store at %s:%d; stopping this node",
                      cfg.data_parallel_address, cfg.data_parallel_rpc_port)
            code = 1
            break
    if stop_reason:
        log.info("received %s; stopping %d processes", stop_reason[0], len(children))
    return code


def _store_alive(store) -> bool:
    try:
        store.check([STORE_PREFIX + "authkey"])
        return True
    except Exception:
        return False


def _stop_all(children: list) -> None:
    """SIGTERM every live child, wait, then SIGKILL stragglers; reaps all of them."""
    for c in children:
        if c.is_alive():
            os.kill(c.pid, signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    for c in children:
        c.join(max(0.0, deadline - time.time()))
    for c in children:
        if c.is_alive():
            log.warning("%s (pid %d) did not stop in %.0f s; killing it", c.name, c.pid, STOP_GRACE_S)
            c.kill()
            c.join()
