"""Sweeps: a YAML spec → topologies × workloads → one deployment per topology, every workload against it.

```yaml
name: quickstart
model: epkit-tiny-moe
engine: epkit                # or vllm (+ vllm_version, vllm_bin: the command that runs vLLM, default `vllm`)
executor: local              # or slurm, with a `slurm:` block (timeout_min required)
defaults: {enable_expert_parallel: true, gpus_per_node: 2}   # topology fields for every point
topologies:                  # one block or a list; `grid` axes multiply, other keys are fixed
  grid: {all2all_backend: [allgather_reducescatter, naive], dp: [1, 2]}
workloads:
  - {name: short, dataset: random, input_len: 32, output_len: 8, num_prompts: 8,
     request_rate: [4, inf], repeats: 1}
```

Expanding a spec is pure (:func:`expand_topologies`, :func:`expand_workloads`); checking it
(:func:`load_sweep`, :func:`plan_sweep`) also asks each engine, without starting it, whether it can
run each point: the built-in engine's ``--check-args``, the local vLLM's ``--version`` (once per
executable). Every topology, rendered command and workload is built before anything starts, and a
bad one raises a :class:`~epkit.errors.TopologyError` naming the point. :func:`run_sweep` does the
work and resumes: a point whose stored JSON says ``ok`` is skipped, a ``failed`` one is
retried only with ``retry_failed``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Collection, Mapping

from epkit.errors import TopologyError
from epkit.sweep import pd as pd_axis
from epkit.topology import Topology

SPEC_KEYS = ("name", "model", "engine", "vllm_version", "vllm_bin", "executor", "slurm", "defaults", "topologies", "workloads",
             "plan", "run", "max_parallel", "results_dir")
WORKLOAD_LOAD_KEYS = ("request_rate", "max_concurrency", "num_warmups", "max_requests", "duration_s", "burstiness",
                      "repeats", "name", "dataset", "seed_load", "endpoint", "ignore_eos", "profile")
RUN_KEYS = ("startup_timeout_s", "hang_timeout_s", "grace_s", "lease_timeout_s", "request_timeout_s",
            "point_estimate_s", "startup_estimate_s")
PLAN_KEYS = ("gpus", "runtime_reserve_gib", "allow_unfit")  # read by epkit.topology.spec.plan_block, as in `epkit plan` specs
DRY_RUN_ADDRESS = "<node0-hostname>"


@dataclass(frozen=True)
class TopologyPoint:
    id: str
    topology: Topology  # a split point (pd: <p>P<d>D): the colocated topology on the same GPUs
    notes: tuple[str, ...] = ()  # what the expansion says about this point (e.g. grid points it stands for)
    pd: str | None = None  # the point's pd (epkit.sweep.pd), None when the spec has no pd
    disagg: Any = None  # a split point's DisaggTopology (its instances, connector and router)
    share_gpus: bool = False  # a split point whose instances all run on the point's GPUs

    @property
    def gpus(self) -> int:
        """The GPUs the point holds."""
        return self.topology.world_size if self.disagg is None or self.share_gpus else self.disagg.gpus

    def parts(self) -> list[tuple[str, Topology]]:
        """What the point deploys: ``[("", topology)]``, or each instance of a split point (``prefill0``…)."""
        if self.disagg is None:
            return [("", self.topology)]
        return [(f"{role}{index}", topo) for role, index, topo in self.disagg.instances]


@dataclass(frozen=True)
class WorkloadPoint:
    """One load step of one workload: dataset params + load shape; ``repeats`` runs of it."""

    id: str
    dataset: str
    params: dict
    load: dict  # request_rate, max_concurrency, num_warmups, max_requests, duration_s, burstiness
    repeats: int = 1
    endpoint: str = "/v1/completions"

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, **self.params, **self.load, "repeats": self.repeats,
                "endpoint": self.endpoint}

    def workload(self):
        from epkit.bench import make_workload

        return make_workload(self.dataset, **self.params)

    def estimate_s(self, default: float) -> float:
        rate, n = self.load.get("request_rate", math.inf), self.load.get("max_requests") or self.params.get("num_prompts")
        if self.load.get("duration_s"):
            return float(self.load["duration_s"])
        if n and rate not in (math.inf, None):
            return n / rate
        return default


@dataclass(frozen=True)
class SweepSpec:
    name: str
    topologies: tuple[TopologyPoint, ...]
    workloads: tuple[WorkloadPoint, ...]
    executor: str = "local"
    slurm: Mapping[str, Any] = field(default_factory=dict)
    plan: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    max_parallel: int = 1
    results_dir: str = "results"
    source_text: str = ""
    vllm_bin: str | None = None  # the command that runs vLLM's CLI (epkit.launch.vllm_install); None: default

    @property
    def num_points(self) -> int:
        return len(self.topologies) * sum(w.repeats for w in self.workloads)

    def make_executor(self):
        from epkit.launch import LocalExecutor, SlurmExecutor

        if self.executor == "slurm":
            return replace(SlurmExecutor.from_dict(self.slurm), vllm_bin=self.vllm_bin)
        return LocalExecutor(vllm_bin=self.vllm_bin)


# ---- expansion (pure) ------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return re.sub(r"[^A-Za-z0-9.+-]", "", str(value))


def topology_id(t: Topology) -> str:
    """A readable, stable id: engine, backend, sizes, EP, EPLB."""
    parts = [t.engine, t.all2all_backend or "default", f"tp{t.tp}", f"dp{t.dp}", f"n{t.nodes}"]
    parts.append("ep" if t.enable_expert_parallel else "noep")
    if t.eplb is not None:
        parts.append(f"eplb-r{t.redundant_experts}")
    return "_".join(parts)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _rate(value: Any, where: str) -> float:
    if value in ("inf", None):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TopologyError(f"{where}: request_rate={value!r} must be a number > 0 or inf")
    return float(value)


def expand_topologies(data: Mapping[str, Any]) -> list[TopologyPoint]:
    """Every topology of the spec (fixed keys + the product of its blocks' ``grid`` axes)."""
    base = {k: data[k] for k in ("model", "engine", "vllm_version") if data.get(k) is not None}
    if not isinstance(data.get("defaults") or {}, Mapping):
        raise TopologyError(f"sweep: defaults={data['defaults']!r} must be a mapping of topology fields")
    defaults = dict(data.get("defaults") or {})
    blocks = data.get("topologies")
    if blocks is None:
        raise TopologyError("sweep: `topologies` is missing; give a block like {grid: {dp: [1, 2]}}")
    out: list[TopologyPoint] = []
    for b, block in enumerate(_as_list(blocks)):
        if not isinstance(block, Mapping):
            raise TopologyError(f"sweep: topologies[{b}]={block!r} must be a mapping of topology fields (+ grid)")
        block = dict(block)
        grid = block.pop("grid", None) or {}
        given_id = block.pop("id", None)
        if not isinstance(grid, Mapping):
            raise TopologyError(f"sweep: topologies[{b}].grid must map topology fields to lists of values")
        axes = list(grid)
        kept: dict[str, int] = {}  # this block's points by what they run
        for values in itertools.product(*(_as_list(grid[a]) for a in axes)):
            combo = dict(zip(axes, values))
            fields_, pd_options = pd_axis.pop_pd({**base, **defaults, **block, **combo})
            where = f"topologies[{b}]" + (f" {combo}" if combo else "")
            try:
                topo = Topology.from_dict(fields_)
                disagg = pd_axis.split(topo, pd_options)
            except TopologyError as exc:
                raise TopologyError(f"sweep point {where}: {exc}") from exc
            pd = pd_axis.pd_name(pd_options["pd"]) if pd_options else None
            key = _runs_as(topo) if disagg is None else pd_axis.runs_as(disagg, _runs_as)
            if key in kept:  # a grid point that differs only in a backend with no effect: run it once
                first = out[kept[key]]
                out[kept[key]] = replace(first, notes=first.notes + (
                    f"the grid point {combo} runs the same code (all2all_backend has no effect here) and is left out",))
                continue
            kept[key] = len(out)
            tid = given_id if given_id and not combo else topology_id(topo)
            if given_id and combo:
                tid = f"{given_id}_{topology_id(topo)}"
            tid += f"_{pd}" if pd and not (given_id and not combo) else ""
            notes = ()
            share = bool(pd_options.get("share_gpus")) and disagg is not None
            if share:
                notes = (f"pd={pd} with share_gpus: every instance runs on the point's {topo.world_size} GPU(s)",)
            elif disagg is not None and disagg.gpus != topo.world_size:
                notes = (f"pd={pd} with prefill/decode overrides uses {disagg.gpus} GPUs, the colocated point "
                         f"{topo.world_size}",)
            out.append(TopologyPoint(tid, topo, notes, pd, disagg, share))
    seen: dict[str, int] = {}
    unique = []
    for tp in out:  # same id from different extra_args/env: number them
        n = seen.get(tp.id, 0)
        seen[tp.id] = n + 1
        unique.append(tp if n == 0 else replace(tp, id=f"{tp.id}_{n + 1}"))
    first_of: dict[str, str] = {}
    for i, tp in enumerate(unique):  # listed twice by hand (different blocks): run both, but say so
        key = _runs_as(tp.topology) if tp.disagg is None else pd_axis.runs_as(tp.disagg, _runs_as)
        other = first_of.setdefault(key, tp.id)
        if other != tp.id:
            unique[i] = replace(tp, notes=tp.notes + (
                f"runs the same code as {other} (they differ only in all2all_backend, which has no effect here)",))
    return unique


def _runs_as(topo: Topology) -> str:
    """What a topology runs: its fields, less an all2all backend that has no effect."""
    fields_ = topo.to_dict()
    if not topo.all2all_in_effect:
        fields_.pop("all2all_backend", None)
    return json.dumps(fields_, sort_keys=True, default=str)


def expand_workloads(items: Any) -> list[WorkloadPoint]:
    """Every load step of every workload (rates × concurrencies)."""
    from epkit.bench import DATASETS, LoadShape, make_workload

    if not items:
        raise TopologyError("sweep: `workloads` is missing or empty; give e.g. [{dataset: random, num_prompts: 8}]")
    out = []
    for i, item in enumerate(_as_list(items)):
        if not isinstance(item, Mapping):
            raise TopologyError(f"sweep: workloads[{i}]={item!r} must be a mapping")
        item = dict(item)
        dataset = item.pop("dataset", "random")
        name = item.pop("name", None)
        rates = [_rate(r, f"workloads[{i}]") for r in _as_list(item.pop("request_rate", math.inf))]
        concs = _as_list(item.pop("max_concurrency", None))
        repeats = item.pop("repeats", 1)
        endpoint = item.pop("endpoint", "/v1/completions")
        load_fixed = {k: item.pop(k) for k in ("num_warmups", "max_requests", "duration_s", "burstiness") if k in item}
        for key in ("ignore_eos", "profile"):  # client options, not a load shape: checked here, passed to the client
            if key in item:
                if not isinstance(item[key], bool):
                    raise TopologyError(f"sweep: workloads[{i}].{key}={item[key]!r} must be true or false")
                load_fixed[key] = item.pop(key)
        if name is not None and not isinstance(name, str):
            raise TopologyError(f"sweep: workloads[{i}].name={name!r} must be a string (it names result files)")
        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise TopologyError(f"sweep: workloads[{i}].dataset={dataset!r}; choose from {', '.join(sorted(DATASETS))}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise TopologyError(f"sweep: workloads[{i}].repeats={repeats!r} must be an integer >= 1")
        try:
            make_workload(dataset, **item)
        except (TypeError, ValueError) as exc:
            raise TopologyError(f"sweep: workloads[{i}] ({name or dataset}): {exc}") from exc
        base = name or "-".join([dataset] + [f"{k[0]}{_fmt(item[k])}" for k in ("input_len", "output_len") if k in item])
        for rate, conc in itertools.product(rates, concs):
            load = {"request_rate": rate, "max_concurrency": conc, **load_fixed}
            try:
                LoadShape(**{k: v for k, v in load.items() if k not in ("ignore_eos", "profile")})
            except (TypeError, ValueError) as exc:
                raise TopologyError(f"sweep: workloads[{i}] ({base}) load {load}: {exc}") from exc
            wid = base + (f"_rate{_fmt(rate)}" if len(rates) > 1 or not math.isinf(rate) else "")
            wid += f"_conc{conc}" if conc is not None else ""
            out.append(WorkloadPoint(wid, dataset, item, load, repeats, endpoint))
    ids = [w.id for w in out]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise TopologyError(f"sweep: workload ids {dup} appear twice; give the workloads distinct `name`s")
    return out


def parse_sweep(data: Mapping[str, Any], source: str = "sweep", text: str = "", vllm_bin: str | None = None,
                only: Collection[str] | None = None) -> SweepSpec:
    """Build and check a :class:`SweepSpec` from parsed YAML; every point is checked here (with ``only``, the
    CLI's ``--only``: those points; an id the spec does not make is an error). ``vllm_bin`` (the CLI's
    ``--vllm-bin``) overrides the spec's ``vllm_bin:``."""
    if not isinstance(data, Mapping):
        raise TopologyError(f"{source}: the top level must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise TopologyError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SPEC_KEYS)}")
    name = data.get("name") or Path(source).stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(name)):
        raise TopologyError(f"{source}: name={name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    executor = data.get("executor", "local")
    if executor not in ("local", "slurm"):
        raise TopologyError(f"{source}: executor={executor!r}; allowed: local, slurm")
    for key in ("run", "slurm"):
        if not isinstance(data.get(key) or {}, Mapping):
            raise TopologyError(f"{source}: {key}={data[key]!r} must be a mapping")
    extra = sorted(map(str, set(data.get("run") or {}) - set(RUN_KEYS)))
    if extra:
        raise TopologyError(f"{source}: run has unknown key(s) {', '.join(extra)}; valid keys: {', '.join(RUN_KEYS)}")
    from epkit.topology.spec import merge_topology_fields, plan_block

    plan_options, plan_fields = plan_block(data.get("plan"), source, PLAN_KEYS)
    if plan_fields:  # deprecated plan.max_model_len / plan.gpu_memory_utilization: topology fields now
        if not isinstance(data.get("defaults") or {}, Mapping):
            raise TopologyError(f"{source}: defaults={data['defaults']!r} must be a mapping of topology fields")
        data = {**data, "defaults": merge_topology_fields(data.get("defaults") or {}, plan_fields, source)}
    slurm = dict(data.get("slurm") or {})
    if executor == "slurm":
        from epkit.launch.slurm import SlurmExecutor

        SlurmExecutor.from_dict(slurm)  # timeout_min and the keys are checked before anything starts
    max_parallel = data.get("max_parallel", 1)
    if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
        raise TopologyError(f"{source}: max_parallel={max_parallel!r} must be an integer >= 1")
    if executor == "local" and max_parallel > 1:
        raise TopologyError(f"{source}: max_parallel={max_parallel} needs executor: slurm (local runs one at a time)")
    try:
        topologies = expand_topologies(data)
        workloads = expand_workloads(data.get("workloads"))
    except TopologyError as exc:
        raise TopologyError(f"{source}: {exc}") from exc
    vllm_bin = vllm_bin if vllm_bin is not None else data.get("vllm_bin")
    if vllm_bin is not None:
        from epkit.launch.vllm_install import command

        if not isinstance(vllm_bin, str):
            raise TopologyError(f"{source}: vllm_bin={vllm_bin!r} must be a command line as a string "
                                "(e.g. /opt/vllm/bin/vllm or 'python3 -m vllm.entrypoints.cli.main')")
        try:
            command(vllm_bin)
        except ValueError as exc:
            raise TopologyError(f"{source}: {exc}") from None
    spec = SweepSpec(str(name), tuple(topologies), tuple(workloads), executor, slurm, plan_options,
                     dict(data.get("run") or {}), max_parallel, str(data.get("results_dir") or "results"), text,
                     vllm_bin)
    if only:
        unknown = sorted(set(only) - {tp.id for tp in topologies})
        if unknown:
            raise TopologyError(f"{source}: --only {' '.join(unknown)}: no such topology; the spec makes "
                                f"{', '.join(tp.id for tp in topologies)}")
    for tp in topologies:  # every command renders, every memory plan fits (or is allowed not to)
        if not only or tp.id in only:  # a point not run is not checked (its engine may not be on this machine)
            _check_point(spec, tp, source)
    return spec


def _check_point(spec: SweepSpec, tp: TopologyPoint, source: str) -> None:
    """Every part the point deploys (each instance of a split point) renders, fits and can run here."""
    from epkit.topology.render import render

    seen: set[str] = set()
    for name, topo in tp.parts():
        where = f"sweep point {tp.id}" + (f" ({name})" if name else "")
        try:
            launches = render(topo, address=DRY_RUN_ADDRESS if topo.nodes > 1 else None)
        except TopologyError as exc:
            raise TopologyError(f"{source}: {where}: {exc}") from exc
        key = _runs_as(topo)
        if key in seen:  # prefill0 and prefill1 run the same command: one check
            continue
        seen.add(key)
        plan = _memory_plan(spec, topo)
        if plan is not None and not plan.fits and not spec.plan.get("allow_unfit", False):
            raise TopologyError(f"{source}: {where} does not fit on {plan.gpu}: {plan.reason} "
                                "(set plan.allow_unfit: true to run it anyway)")
        missing = engine_problems(topo, launches) + spec.make_executor().problems(topo)
        if missing:  # what the engine or this machine cannot run is refused now, not by a failed deployment
            raise TopologyError(f"{source}: {where} cannot run: {'; '.join(missing)}")


CHECK_ARGS_TIMEOUT_S = 60.0  # `epkit serve --check-args` imports no torch; this bounds a machine under load


def engine_problems(topology: Topology, launches) -> list[str]:
    """What keeps the built-in engine from running ``topology``, in the engine's own words: its command line
    run with ``--check-args`` (its parser, its config checks, its EPKIT_* variables, whether it implements the
    all2all backend here), one subprocess per topology, nothing started. Empty for vLLM, whose parser and
    releases the topology has checked already.

    The primary node's command is the one checked: the other nodes' commands differ from it only in the
    flags rendered from the topology's own (already checked) sizes (``--headless``, the start rank)."""
    if topology.engine != "epkit":
        return []
    import os
    import subprocess
    import sys

    launch = launches[0]
    cmd = [sys.executable, "-m", "epkit.cli", *launch.argv[1:], "--check-args"]  # argv: `epkit serve MODEL ...`
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=CHECK_ARGS_TIMEOUT_S,
                              env={**os.environ, **launch.env})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"`epkit serve --check-args` could not check its command: {exc}"]
    if done.returncode == 0:
        return []
    said = [line for line in done.stderr.splitlines() if line.strip()]
    last = said[-1] if said else f"exit code {done.returncode}"
    return [f"`epkit serve` refuses its command: {last.removeprefix('epkit serve: error: ')}"]


def _memory_plan(spec: SweepSpec, topology: Topology):
    if not spec.plan.get("gpus"):
        return None
    from epkit.topology.plan import GIB, memory_plan

    reserve = spec.plan.get("runtime_reserve_gib")
    kw = {} if reserve is None else {"runtime_reserve_bytes": reserve * GIB}
    plans = [memory_plan(topology, gpu, **kw) for gpu in spec.plan["gpus"]]
    return min(plans, key=lambda p: (p.fits, p.kv_cache_tokens))


def memory_verdict(spec: SweepSpec, tp: TopologyPoint):
    """The memory plan on the tightest of ``plan.gpus`` (None when the spec names no GPU); of a split point, the
    tightest of its instances."""
    plans = [plan for _, topo in tp.parts() if (plan := _memory_plan(spec, topo)) is not None]
    return min(plans, key=lambda p: (p.fits, p.kv_cache_tokens)) if plans else None


def load_sweep(path: str | Path, vllm_bin: str | None = None, only: Collection[str] | None = None) -> SweepSpec:
    """Read and check a sweep YAML; errors name the file and the point. ``vllm_bin`` overrides the spec's;
    ``only``: check just these topology ids (``--only``)."""
    from epkit.topology.spec import read_spec_file

    data, text = read_spec_file(path, "sweep spec")  # missing, a folder, not text, not YAML: one line each
    return parse_sweep(data, str(path), text, vllm_bin, only)


# ---- the plan a dry run prints (pure) ---------------------------------------------------------
def _node_commands(spec: SweepSpec, topology: Topology) -> list[str]:
    from epkit.topology.render import render

    address = None if topology.nodes == 1 else (topology.data_parallel_address
                                                if spec.executor == "local" else DRY_RUN_ADDRESS)
    address = address or ("127.0.0.1" if spec.executor == "local" else DRY_RUN_ADDRESS)
    return [launch.shell() for launch in render(topology, address=address if topology.nodes > 1 else None)]


def point_commands(spec: SweepSpec, tp: TopologyPoint) -> list[str]:
    """Every node's command; of a split point, every instance's (``# prefill0 node 0`` first, with its KV side
    channel as a deployment sets it: ports from vLLM's default 5600 here, a free range when it runs) and the
    router's."""
    if tp.disagg is None:
        return _node_commands(spec, tp.topology)
    from epkit.launch.disagg import instance_topologies, router_argv
    from epkit.launch.node import NODE_HOSTNAME

    host = "127.0.0.1" if spec.executor == "local" else NODE_HOSTNAME
    out, urls = [], {"prefill": [], "decode": []}
    for name, topo in instance_topologies(tp.disagg, side_channel_host=host).items():
        out += [f"# {name} node {n}\n{cmd}" for n, cmd in enumerate(_node_commands(spec, topo))]
        urls[name.rstrip("0123456789")].append(f"<{name}-url>")
    router = tp.disagg.router
    argv = router_argv(tp.disagg, urls["prefill"], urls["decode"], "<host>", router.port or 8000)
    return out + [f"# router (epkit proxy, on {router.on})\n" + shlex.join(argv)]


def _warnings(tp: TopologyPoint) -> list[str]:
    """What the point's topology says (of a split point: each instance's, named, once per distinct warning)."""
    out: list[str] = []
    seen: set[str] = set()
    for name, topo in tp.parts():
        for warning in topo.warnings():
            if warning not in seen:
                seen.add(warning)
                out.append(f"{name}: {warning}" if name else warning)
    return out


def plan_sweep(spec: SweepSpec, done: Mapping[tuple[str, str, int], str] | None = None) -> dict:
    """Per topology: commands per node, memory verdict, points to run; totals and GPU-hours."""
    done = done or {}
    startup_s = spec.run.get("startup_estimate_s", 600.0 if any(t.topology.engine == "vllm" for t in spec.topologies) else 30.0)
    point_s = spec.run.get("point_estimate_s", 60.0)
    rows, gpu_s, pending_total = [], 0.0, 0
    executor = spec.make_executor()
    for tp in spec.topologies:
        commands = point_commands(spec, tp)
        plan = memory_verdict(spec, tp)
        pending = [(w.id, r) for w in spec.workloads for r in range(w.repeats) if done.get((tp.id, w.id, r)) != "ok"]
        seconds = startup_s + sum(w.estimate_s(point_s) * w.repeats for w in spec.workloads)
        gpus = tp.topology.nodes * tp.topology.gpus_on_node if tp.disagg is None else tp.gpus
        if pending:
            gpu_s += gpus * seconds
        pending_total += len(pending)
        rows.append({"id": tp.id, "pd": tp.pd, "nodes": sum(t.nodes for _, t in tp.parts()), "gpus": gpus,
                     "commands": commands,
                     "engine": executor.engine_notes(tp.topology),
                     "memory": None if plan is None else {"gpu": plan.gpu, "fits": plan.fits, "reason": plan.reason},
                     "warnings": _warnings(tp) + list(tp.notes),
                     "points": sum(w.repeats for w in spec.workloads),
                     "pending": len(pending)})
    return {"sweep": spec.name, "executor": spec.executor, "deployments": len(spec.topologies),
            "deployments_to_start": sum(1 for r in rows if r["pending"]), "points": spec.num_points,
            "points_pending": pending_total, "gpu_hours": gpu_s / 3600.0, "topologies": rows,
            "workloads": [{"id": w.id, **w.to_dict()} for w in spec.workloads]}
