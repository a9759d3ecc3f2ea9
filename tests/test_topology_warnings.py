"""A backend choice that changes nothing is flagged (Topology.warnings), a sweep grid does not run it twice,
and the quickstart compares backends only where they run different code."""

from __future__ import annotations

from pathlib import Path

import pytest

from epkit.cli.sweep import main as sweep_main
from epkit.sweep.spec import load_sweep, parse_sweep, plan_sweep
from epkit.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="epkit-tiny-moe", engine="epkit", gpus_per_node=2)
DSV3 = dict(model="deepseek-ai/DeepSeek-V3-0324")


def no_effect(t: Topology) -> list[str]:
    return [w for w in t.warnings() if "has no effect" in w]


@pytest.mark.parametrize("fields, effect, why", [
    (dict(TINY, dp=1, enable_expert_parallel=True, all2all_backend="naive"), False, "at dp=1 (ep_size=1)"),
    (dict(TINY, dp=2, all2all_backend="naive"), False, "without enable_expert_parallel"),
    (dict(TINY, dp=2, enable_expert_parallel=True, all2all_backend="naive"), True, None),
    # vLLM runs its all2all kernels only with dp > 1 (FusedMoEParallelConfig.use_all2all_kernels), whatever the TP
    (dict(DSV3, tp=8, enable_expert_parallel=True, all2all_backend="deepep_low_latency"), False, "tp=8 × dp=1"),
    (dict(DSV3, dp=8, enable_expert_parallel=True, all2all_backend="deepep_low_latency"), True, None),
    (dict(DSV3, tp=4, enable_expert_parallel=True, all2all_backend="deepep_low_latency",
          extra_args=["--prefill-context-parallel-size", "2"]), True, None),
])
def test_backend_without_effect_is_flagged(fields, effect, why):
    t = Topology.from_dict(fields)
    assert t.all2all_in_effect is effect
    notes = no_effect(t)
    if effect:
        assert notes == []
    else:
        assert len(notes) == 1 and why in notes[0] and repr(fields["all2all_backend"]) in notes[0], notes
        assert "every backend runs the same code" in notes[0]


def test_no_backend_no_warning():
    assert no_effect(Topology.from_dict(dict(TINY, dp=1, enable_expert_parallel=True))) == []


def _sweep(topologies):
    return parse_sweep({"name": "t", "model": "epkit-tiny-moe", "engine": "epkit",
                        "defaults": {"gpus_per_node": 2, "enable_expert_parallel": True}, "topologies": topologies,
                        "workloads": [{"dataset": "random", "input_len": 8, "output_len": 4, "num_prompts": 4}]})


def test_grid_runs_a_backend_without_effect_once_and_says_so():
    spec = _sweep({"grid": {"all2all_backend": ["allgather_reducescatter", "naive"], "dp": [1, 2]}})
    ids = [t.id for t in spec.topologies]
    assert ids == ["epkit_allgather_reducescatter_tp1_dp1_n1_ep", "epkit_allgather_reducescatter_tp1_dp2_n1_ep",
                   "epkit_naive_tp1_dp2_n1_ep"]  # naive at DP=1 is the same deployment as the first one
    plan = plan_sweep(spec)
    first = plan["topologies"][0]["warnings"]
    assert any("'naive'" in w and "left out" in w for w in first), first
    assert any("has no effect" in w for w in first)  # and the kept point's own backend choice is flagged
    assert plan["topologies"][1]["warnings"] == plan["topologies"][2]["warnings"] == []


def test_same_deployment_listed_twice_by_hand_runs_both_with_a_warning():
    spec = _sweep([{"dp": 1, "all2all_backend": "naive"}, {"dp": 1, "all2all_backend": "all_to_all"}])
    assert [t.id for t in spec.topologies] == ["epkit_naive_tp1_dp1_n1_ep", "epkit_all_to_all_tp1_dp1_n1_ep"]
    assert spec.topologies[0].notes == ()
    assert "same code as epkit_naive_tp1_dp1_n1_ep" in spec.topologies[1].notes[0]


def test_quickstart_compares_only_what_differs(capsys):
    path = ROOT / "launchers/local/quickstart.yaml"
    spec = load_sweep(path)
    topologies = [t.topology for t in spec.topologies]
    assert all(no_effect(t) == [] for t in topologies) and all(t.notes == () for t in spec.topologies)
    backends = {t.all2all_backend for t in topologies if t.all2all_in_effect}
    assert backends == {"allgather_reducescatter", "naive", "all_to_all"}  # every backend the engine implements
    assert all(t.dp == 2 for t in topologies if t.all2all_backend)
    assert [t.dp for t in topologies].count(1) == 1 and sum(t.eplb is not None for t in topologies) == 1
    assert len(spec.topologies) == 5  # as many deployments as before: the run time stays about the same
    assert sweep_main([str(path), "--dry-run", "--results", "/nonexistent-epkit-results"]) == 0
    assert "warning" not in capsys.readouterr().out
