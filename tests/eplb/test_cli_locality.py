"""`epkit eplb` sub-commands through epkit's dispatcher, and node locality on a hand-made case."""

import json

import numpy as np
import pytest

from epkit.cli import main as epkit_main
from epkit.eplb import Placement, node_locality


def test_redundant_lists_valid_values(capsys):
    assert epkit_main(["eplb", "redundant", "--model", "deepseek-ai/DeepSeek-V3-0324", "--ep", "24"]) == 0
    assert "8, 32, 56, 80" in capsys.readouterr().out


def test_simulate_and_compare_run(capsys, tmp_path):
    csv = tmp_path / "sim.csv"
    rc = epkit_main(["eplb", "simulate", "--ep", "8", "--nodes", "2", "--groups", "4", "--layers", "2", "--experts", "32",
                     "--steps", "30", "--tokens", "256", "--eplb-config", '{"num_redundant_experts":8,"step_interval":20}',
                     "--csv", str(csv)])
    out = capsys.readouterr().out
    assert rc == 0 and csv.exists()
    lines = out.splitlines()
    baseline = next(line.split() for line in lines if line.strip().startswith("no EPLB"))
    policy = next(line.split() for line in lines if line.strip().startswith("EPLB default"))
    assert baseline[-3:] == ["0", "0", "n/a"] and policy[-3] == "2"  # rearrangements; no --model: no GiB
    assert "GiB_moved needs --model" in out and "no EPLB: 32 experts in contiguous blocks" in out
    assert any(line.startswith("window_before/after:") for line in lines)  # the legend of the event table


def test_simulate_reports_the_engines_window_figures_and_gib(capsys, tmp_path):
    """A trace the built-in engine dumped names its model: bytes moved come in GiB from its expert size."""
    from epkit.topology.models import ModelSpec

    rng = np.random.default_rng(0)
    load = rng.integers(0, 8, size=(12, 4, 32)) * np.linspace(4, 1, 32).round()  # epkit-tiny-moe: 4 layers, 32 experts
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"format": "epkit-eplb-trace", "version": 1, "kind": "logical", "model": "epkit-tiny-moe",
                                "num_logical_experts": 32, "steps": [{"step": i, "load": s.tolist()} for i, s in enumerate(load)]}))
    assert epkit_main(["eplb", "simulate", "--trace", str(path), "--ep", "2", "--eplb-config",
                       '{"num_redundant_experts": 2, "step_interval": 8, "window_size": 8}']) == 0
    out = capsys.readouterr().out
    assert "bytes per expert from epkit-tiny-moe" in out
    header = next(line.split() for line in out.splitlines() if line.lstrip().startswith("step "))
    assert header == ["step", "window_before", "window_after", "next_steps", "next_kept", "next_new", "experts_moved",
                      "GiB_moved", "policy_ms"]
    first = next(line.split() for line in out.splitlines() if line.lstrip().startswith("1 "))
    moved = int(first[6])
    assert float(first[7]) == pytest.approx(moved * ModelSpec.load("epkit-tiny-moe").bytes_per_expert / 2**30, rel=1e-3)
    assert epkit_main(["eplb", "compare", "--reference", "--policies", "default,balanced"]) == 0
    assert "dsv3_like_ep16_2nodes_r16" in capsys.readouterr().out


def test_bad_settings_exit_2_with_message(capsys):
    rc = epkit_main(["eplb", "simulate", "--ep", "8", "--layers", "1", "--experts", "30", "--steps", "2",
                     "--eplb-config", '{"num_redundant_experts":1}'])
    err = capsys.readouterr().err
    assert rc == 2 and "num_redundant_experts=1" in err and "2, 10, 18" in err


def test_node_locality_counts_remote_copies_and_nodes():
    # 2 nodes × 1 rank × 2 slots: experts 0,1 on node 0; 2,3 on node 1
    p = Placement.from_phy2log([[0, 1, 2, 3]])
    routing = np.array([[[0, 1]], [[0, 2]]])  # token 0 on node 0, token 1 on node 1
    loc = node_locality(p, routing, num_ranks=2, num_nodes=2)
    assert loc["remote_copy_fraction"] == 0.25  # only token 1 → expert 0 leaves its node
    assert loc["remote_nodes_per_token"] == 0.5
    assert loc["nodes_per_token"] == 1.5
