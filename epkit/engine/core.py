"""One engine-core process: a DP rank's scheduler and model runner, stepping in lockstep.

Every loop: read new requests and aborts from the API servers, schedule, then exchange
(token count, stop flag) with every DP rank over gloo. If any rank has tokens, every rank
runs a forward pass - an idle rank with an empty (dummy) batch - so the MoE collectives
line up. A stop flag from any rank stops all of them together; a lost peer raises, and the
rank exits with an error instead of hanging.

When an exchange finds no tokens on any rank, every rank blocks (no collective, no poll) until it
gets something new to step on or a peer wakes it: the rank that gets work first sends a wake-up,
tagged with the idle period's number, to every peer over a direct link (:class:`PeerLinks`), so
all ranks enter the next exchange together at once - as vLLM's DP coordinator starts a new wave
on every engine when one of them gets a request.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import nullcontext
from datetime import timedelta
from multiprocessing.connection import Connection, Listener, wait

from epkit.engine.config import EngineConfig, env_value
from epkit.engine.gc_heap import freeze_startup_heap
from epkit.engine.sequence import EngineRequest, RequestOutput
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

IDLE_TICK_S = 0.5  # while every rank idles: how often the KV agent's timers (leases) are looked at
STORE_PREFIX = "epkit/"


def set_parent_death_signal() -> None:
    """Exit when the launcher dies, even by SIGKILL, so no process outlives its deployment.

    Children are forked by a fork server, so Linux's PR_SET_PDEATHSIG (which we also set)
    would watch the fork server; the launcher's liveness comes from multiprocessing's
    parent sentinel instead: a thread waits on it, then SIGTERMs this process and, if a
    graceful stop has not finished within a few seconds, exits hard.
    """
    import multiprocessing

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        logging.getLogger("epkit.engine").error("the launcher (pid %s) died; exiting", parent.pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def connect_store(cfg: EngineConfig, is_master: bool, timeout_s: float):
    """The TCPStore at ``--data-parallel-address:--data-parallel-rpc-port`` (hosted by the primary)."""
    import torch.distributed as dist

    return dist.TCPStore(cfg.data_parallel_address, cfg.data_parallel_rpc_port, None, is_master,
                         timedelta(seconds=timeout_s), wait_for_workers=False)


def without_nagle(conn: Connection) -> Connection:
    """``conn`` with TCP_NODELAY set on its socket (both ends of a link call this). multiprocessing sends a message
    over 16 KiB as two writes, its 4-byte length then the payload: with Nagle's algorithm on, the payload waits for
    the ACK of the length, which the receiver delays by up to 40 ms - a step's outputs for ~64 streams are that
    big, and every stream's token came ~40 ms late, the next one early (the p99 ITL of class (d) and (e))."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        if s.family in (socket.AF_INET, socket.AF_INET6):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        s.close()  # the duplicate only: the option belongs to the socket both descriptors name
    return conn


def local_address_towards(address: str) -> str:
    """This host's IP on the route to ``address`` (what peers on other nodes can reach)."""
    if address in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class PeerLinks:
    """A duplex connection from this DP rank to every other one, for the wake-ups of idle periods.

    Rank ``r`` listens, publishes its address in the store, connects to every lower rank (sending its
    rank) and accepts every higher one. Only the core's loop reads and writes them; a link that closes
    means its rank died (the caller raises)."""

    def __init__(self, store, rank: int, world_size: int, host: str, authkey: bytes, timeout_s: float):
        from multiprocessing.connection import Client

        self.rank, self.links = rank, {}
        listener = Listener((host, 0), authkey=authkey)
        store.set(f"{STORE_PREFIX}peer/{rank}", "%s:%d" % listener.address)
        accepted: dict[int, Connection] = {}

        def accept() -> None:
            for _ in range(world_size - 1 - rank):
                conn = without_nagle(listener.accept())
                accepted[conn.recv()] = conn

        thread = threading.Thread(target=accept, daemon=True, name="peer-accept")
        thread.start()
        for peer in range(rank):
            key = f"{STORE_PREFIX}peer/{peer}"
            store.wait([key], timedelta(seconds=timeout_s))
            peer_host, port = store.get(key).decode().rsplit(":", 1)
            conn = without_nagle(Client((peer_host, int(port)), authkey=authkey))
            conn.send(rank)
            self.links[peer] = conn
        thread.join(timeout_s)
        if thread.is_alive():
            missing = sorted(set(range(rank + 1, world_size)) - set(accepted))
            raise EngineError(f"DP rank {rank}: DP ranks {missing} did not connect within {timeout_s:.0f} s")
        listener.close()
        self.links.update(accepted)
        self.woken = -1  # the latest idle period a peer woke this rank in

    def wake(self, period: int) -> None:
        """Tell every peer that this rank steps again in idle period ``period``."""
        for conn in self.links.values():
            try:
                conn.send(period)
            except (OSError, ValueError):
                pass  # a dead peer: the next exchange raises

    def read(self, conn: Connection) -> None:
        """Take the wake-ups waiting on ``conn``; a closed link raises :class:`EngineError`."""
        try:
            while conn.poll():
                self.woken = max(self.woken, conn.recv())
        except (EOFError, OSError):
            peer = next(p for p, c in self.links.items() if c is conn)
            raise EngineError(f"DP rank {self.rank}: the link to DP rank {peer} closed (that rank has died)") from None


class EngineCore:
    """The loop of DP rank ``dp_rank``; see the module docstring."""

    def __init__(self, cfg: EngineConfig, dp_rank: int, local_index: int):
        import torch
        import torch.distributed as dist

        from epkit.engine.all2all import Communicator
        from epkit.engine.block_manager import BlockManager
        from epkit.engine.model import model_config_of
        from epkit.engine.runner import ModelRunner, resolve_device
        from epkit.engine.scheduler import Scheduler, SchedulerConfig

        self.cfg, self.rank = cfg, dp_rank
        self.stopping = False
        device = resolve_device(cfg, local_index)
        if device.type == "cpu":
            torch.set_num_threads(int(env_value("EPKIT_CPU_THREADS")))
            log.info("DP rank %d: %d torch CPU threads (EPKIT_CPU_THREADS)", dp_rank, torch.get_num_threads())
        else:
            torch.cuda.set_device(device)
        self.store = connect_store(cfg, False, cfg.startup_timeout_s)
        authkey = self.store.get(STORE_PREFIX + "authkey")
        timeout = timedelta(seconds=cfg.startup_timeout_s)
        prefix = dist.PrefixStore(STORE_PREFIX + "pg", self.store)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, store=prefix, rank=dp_rank, world_size=cfg.data_parallel_size, timeout=timeout, **kwargs)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        self.comm = Communicator(dp_rank, cfg.data_parallel_size, dist.group.WORLD, cpu_group)
        model_config, model_dir = model_config_of(cfg)
        self.runner = ModelRunner(cfg, model_config, model_dir, dp_rank, device, self.comm)
        self.scheduler = Scheduler(
            SchedulerConfig(self.runner.max_num_seqs, self.runner.max_num_batched_tokens, self.runner.max_model_len, self.runner.mcfg.eos_token_id,
                            cfg.enable_chunked_prefill, cfg.long_prefill_token_threshold,
                            cfg.long_prefill_token_threshold_adaptive, cfg.max_num_partial_prefills,
                            cfg.max_long_partial_prefills),
            BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.prefix_caching_hash_algo),
        )
        self.kv = None
        if cfg.kv_transfer_config is not None:
            from epkit.engine.kv_agent import KVAgent

            self.kv = KVAgent(cfg.kv_transfer_config, dp_rank, self.scheduler, self.runner)
        self._conns: list[Connection] = []
        self._conns_lock = threading.Lock()
        self._owner: dict[str, Connection] = {}
        host = local_address_towards(cfg.data_parallel_address)
        self.peers = PeerLinks(self.store, dp_rank, cfg.data_parallel_size, host, authkey, cfg.startup_timeout_s)
        self._wake_r, self._wake_w = socket.socketpair()  # a SIGTERM or a new API connection wakes an idle loop
        self._wake_w.setblocking(False)
        self._idle_period = 0
        self._listener = Listener((host, 0), authkey=authkey)
        threading.Thread(target=self._accept, daemon=True, name="accept").start()
        self.store.set(f"{STORE_PREFIX}core/{dp_rank}", "%s:%d" % self._listener.address)
        self.steps = 0
        self._eplb_sent = -1
        self.profiler = None
        if (cfg.profiler_config or {}).get("profiler") == "torch":
            from epkit.engine.profiler import StepProfiler

            self.profiler = StepProfiler(cfg.profiler_config, dp_rank, device.type)

    def _accept(self) -> None:
        while True:
            try:
                conn = without_nagle(self._listener.accept())
            except OSError:
                return
            with self._conns_lock:
                self._conns.append(conn)
            self.wake()  # an idle loop waits on the connections it knew: take this one in

    # ---- messages ---------------------------------------------------------------------
    def _drain(self, timeout: float, idle: bool = False) -> None:
        """Handle the API servers' messages, waiting up to ``timeout`` s for the first; ``idle``: also for peers'
        wake-ups and a stop."""
        with self._conns_lock:
            conns = list(self._conns)
        waitables = conns + ([self.kv.wakeup] if self.kv is not None else [])
        if idle:
            waitables += [self._wake_r, *self.peers.links.values()]
        for conn in wait(waitables, timeout=timeout):
            if conn is self._wake_r:
                self._wake_r.recv(64)
                continue
            if conn in self.peers.links.values():
                self.peers.read(conn)
                continue
            if self.kv is not None and conn is self.kv.wakeup:
                continue  # a KV peer or pull is ready: served by KVAgent.service
            try:
                while conn.poll():
                    self._handle(conn, conn.recv())
            except (EOFError, OSError):
                log.error("DP rank %d: an API server disconnected", self.rank)
                with self._conns_lock:
                    self._conns.remove(conn)
                for rid in [r for r, c in self._owner.items() if c is conn]:
                    self._abort(rid)

    def _handle(self, conn: Connection, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            request: EngineRequest = message[1]
            self._owner[request.request_id] = conn
            self.scheduler.add(request)
        elif kind == "abort":
            self._abort(message[1])
        elif kind == "eplb_dump":
            rebalancer = self.runner.rebalancer
            payload = rebalancer.dump() if rebalancer is not None else None
            try:
                conn.send(("eplb", payload, self._stats()))
            except (OSError, ValueError):
                pass
        elif kind == "profile":
            self._profile(conn, message[1], message[2])

    def _profile(self, conn: Connection, action: str, overrides: dict) -> None:
        """/start_profile or /stop_profile (the reply: ``(ok, what happened or the error)``)."""
        try:
            if self.profiler is None:
                raise EngineError("profiling is off: start the engine with --profiler-config "
                                  "'{\"profiler\":\"torch\",\"torch_profiler_dir\":\"/abs/dir\"}'")
            reply = (True, self.profiler.start(overrides) if action == "start" else self.profiler.stop())
        except EngineError as exc:
            reply = (False, str(exc))
        try:
            conn.send(("profile", reply, self._stats()))
        except (OSError, ValueError):
            pass

    def _abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self.runner.release(request_id)
        self._owner.pop(request_id, None)

    def _send(self, outputs: list[RequestOutput]) -> None:
        by_conn: dict[int, tuple[Connection, list[RequestOutput]]] = {}
        for out in outputs:
            conn = self._owner.get(out.request_id)
            if conn is None:
                continue
            by_conn.setdefault(id(conn), (conn, []))[1].append(out)
            if out.finish_reason is not None:
                self._owner.pop(out.request_id, None)
                self.runner.release(out.request_id)
        stats = self._stats()
        self._broadcast(("out", [], stats), {key: ("out", outs, stats) for key, (_, outs) in by_conn.items()})

    def _stats(self) -> tuple:
        """(rank, running, waiting, preemptions, KV cache usage 0..1, EPLB stats when rank 0's changed since last
        sent or None[, (requests, blocks) held for remote decodes when KV transfer is on]).

        Waiting includes requests pulling their prompt's KV (vLLM counts them waiting); held blocks count as used."""
        blocks, sched = self.scheduler.blocks, self.scheduler
        stats = (self.rank, len(sched.running), len(sched.waiting) + len(sched.receiving), sched.num_preemptions,
                 1.0 - blocks.num_free_blocks / blocks.num_blocks)
        rebalancer = self.runner.rebalancer
        eplb = None
        if rebalancer is not None and self.rank == 0 and rebalancer.stats_version != self._eplb_sent:
            self._eplb_sent = rebalancer.stats_version
            eplb = dict(rebalancer.stats)
        if self.kv is not None:
            return stats + (eplb, self.kv.held)
        return stats + ((eplb,) if eplb is not None else ())

    def _broadcast(self, message: tuple, per_conn: dict[int, tuple] | None = None) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.send((per_conn or {}).get(id(conn), message))
            except (OSError, ValueError):
                pass

    # ---- loop -------------------------------------------------------------------------
    def wake(self) -> None:
        """Make an idle loop look at ``stopping`` now (safe from a signal handler)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _work_mark(self) -> tuple:
        sched = self.scheduler
        return sched.changes, len(sched.waiting), len(sched.running), len(sched.receiving), sched.blocks.num_free_blocks

    def _idle(self) -> None:
        """Block while no rank has work: until this rank has something new to schedule (then it wakes every
        peer) or is stopping, or a peer woke it in this idle period. Every rank that ran the exchange which
        found no tokens anywhere waits here, so all of them leave for the next exchange together."""
        period, mark, last_stats = self._idle_period, self._work_mark(), None
        while True:
            if self.stopping or (self.scheduler.has_work and self._work_mark() != mark):
                self.peers.wake(period)
                return
            if self.peers.woken >= period:
                return
            stats = (self._work_mark(), len(self.scheduler.holding))
            if stats != last_stats:  # the API servers' gauges (aborts, held KV) follow while idle too
                self._send([])
                last_stats = stats
            self._drain(IDLE_TICK_S, idle=True)
            if self.kv is not None:
                failed = self.kv.service()
                if failed:
                    self._send(failed)

    def run(self) -> None:
        """Step until a stop flag is seen on any rank."""
        busy = False
        while True:
            if busy:
                self._drain(0)
            else:
                self._idle()
            if self.kv is not None:
                failed = self.kv.service()
                if failed:
                    self._send(failed)
            batch = self.scheduler.schedule() if not self.stopping else []
            tokens = sum(n for _, n in batch)
            info = self.comm.exchange_step_info([tokens, int(self.stopping), *self.runner.step_shape(batch)])
            if any(stop for _, stop, *_ in info):
                log.info("DP rank %d: stopping (requested by rank %s)", self.rank, [r for r, (_, s, *_) in enumerate(info) if s])
                if self.runner.graphs is not None:
                    log.info("DP rank %d: %s", self.rank, self.runner.graphs.summary(self.steps))
                self._broadcast(("stop", [], (self.rank, 0, 0, self.scheduler.num_preemptions, 0.0)))
                return
            counts = [n for n, *_ in info]
            busy = sum(counts) > 0
            if not busy:
                self._idle_period += 1
                continue
            with self.profiler.around(batch) if self.profiler is not None else nullcontext():
                sampled = self.runner.execute(batch, counts, [(decode, ctx) for _, _, decode, ctx in info])
            if self.profiler is not None:
                self.profiler.after_step()
            self._send(self.scheduler.postprocess(batch, sampled, self.runner.step_logprobs, self.runner.step_prompt_logprobs))
            self.steps += 1


def run_engine_core(cfg: EngineConfig, dp_rank: int, local_index: int) -> None:
    """Process entry point for DP rank ``dp_rank``; exits 0 on a clean stop, 1 on an error."""
    set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides what Ctrl-C stops
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [EngineCore_DP{dp_rank}] %(levelname)s %(message)s")
    core: EngineCore | None = None

    def _stop(signum, frame):
        if core is not None:
            core.stopping = True
            core.wake()
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        core = EngineCore(cfg, dp_rank, local_index)
        freeze_startup_heap(f"DP rank {dp_rank}")
        log.info("DP rank %d ready", dp_rank)
        core.run()
    except EngineError as exc:
        log.error("DP rank %d: %s", dp_rank, exc)
        os._exit(1)
    except SystemExit:
        raise
    except BaseException as exc:  # a lost peer surfaces as a RuntimeError/DistBackendError from gloo or NCCL
        log.error("DP rank %d failed: %s: %s - stopping this rank (a peer rank may have died)", dp_rank, type(exc).__name__,
                  str(exc).splitlines()[0] if str(exc) else "",
                  exc_info=not isinstance(exc, RuntimeError) or "gloo" not in str(exc))
        os._exit(1)
    os._exit(0)
