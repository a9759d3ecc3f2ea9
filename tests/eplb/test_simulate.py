"""The simulator's schedule, window and accounting, on small hand-made traces."""

import numpy as np
import pytest

from epkit.eplb import Placement, rebalance, simulate, synthetic_trace
from epkit.eplb.simulate import rearrangements, schedule, summary
from epkit.errors import TopologyError
from epkit.topology import EPLBConfig


def test_schedule_first_rearrangement_is_early_like_vllm():
    rearranged, _ = schedule(10_000, 3000)
    # counter starts at 3000 - 750: the first rearrangement follows step index 749, then every 3000
    assert np.nonzero(rearranged)[0].tolist() == [749, 3749, 6749, 9749]
    assert np.nonzero(schedule(10, 2)[0])[0].tolist() == [0, 2, 4, 6, 8]
    assert np.nonzero(schedule(10, 8)[0])[0].tolist() == [1, 9]
    _, logged = schedule(8, 8, log_interval=3)  # counter 6,7,0,1,2,3,4,5
    assert logged.tolist() == [True, False, True, False, False, True, False, False]


def test_rearrangement_uses_only_the_window():
    rng = np.random.default_rng(0)
    load = rng.integers(0, 100, size=(40, 2, 16)).astype(float)
    load[:30, :, 0] += 10_000  # expert 0 hot long ago, outside the window
    cfg = EPLBConfig(window_size=5, step_interval=40, num_redundant_experts=4)  # rearranges after step 9 and 49
    df = simulate(load, cfg, num_ranks=4)
    assert df.rearranged.sum() == 1 and df.step[df.rearranged].item() == 9
    want = rebalance(load[5:10].sum(0), 20, 1, 1, 4)
    np.testing.assert_array_equal(df.attrs["final_placement"].rank_loads(load[5:10].sum(0), 4),
                                  want.rank_loads(load[5:10].sum(0), 4))


def test_balancedness_rises_after_first_rearrangement_and_bytes_are_counted():
    trace = synthetic_trace(60, 4, 64, tokens_per_step=2048, top_k=4, skew="zipf", skew_param=1.2, seed=1)
    cfg = EPLBConfig(window_size=10, step_interval=40, num_redundant_experts=8, log_balancedness=True)
    df = simulate(trace, cfg, "default", num_ranks=8, num_nodes=2, num_groups=4, bytes_per_expert=1000.0)
    first = df.index[df.rearranged][0]
    assert first == 9
    assert df.balancedness[first + 1:].mean() > df.balancedness[: first + 1].mean() + 0.2
    assert df.experts_moved[first] > 0 and df.bytes_moved[first] == df.experts_moved[first] * 1000.0
    assert (df.experts_moved[~df.rearranged] == 0).all() and df.logged.all()
    np.testing.assert_allclose(df.mean_rank_load, trace.load.sum(-1).sum(-1) / 8)
    assert list(df.columns) == ["step", "balancedness", "no_eplb_balancedness", "mean_rank_load", "max_rank_load",
                                "logged", "rearranged", "experts_moved", "bytes_moved", "rebalance_ms",
                                "window_balancedness_before", "window_balancedness_after", "next_steps",
                                "next_balancedness_kept", "next_balancedness_new"]


def test_sticky_moves_less_than_default_over_a_drifting_trace():
    trace = synthetic_trace(200, 6, 64, tokens_per_step=2048, top_k=4, drift_every=50, drift_fraction=0.1, seed=2)
    cfg = {"window_size": 20, "step_interval": 40, "num_redundant_experts": 16}
    base = simulate(trace, cfg, "default", num_ranks=16, num_nodes=2, num_groups=4)
    sticky = simulate(trace, cfg, "sticky", num_ranks=16, num_nodes=2, num_groups=4)
    later = base.rearranged & (base.index > 20)  # after the first (from-scratch) rearrangement
    assert sticky.experts_moved[later].sum() * 3 < base.experts_moved[later].sum()
    assert sticky.balancedness[20:].mean() > base.balancedness[20:].mean() - 0.03


@pytest.mark.parametrize("config,match", [
    ({"num_redundant_experts": 3}, r"num_redundant_experts=3.*67 physical experts.*EP size 8.*valid num_redundant_experts.*: 0, 8, 16"),
    ({"window_size": 0}, r"window_size=0 must be >= 1"),
    ({"step_interval": -5}, r"step_interval=-5 must be >= 1"),
    ({"windowsize": 10}, r"unknown key\(s\) windowsize; valid keys: window_size"),
])
def test_invalid_settings_fail_with_clear_errors(config, match):
    with pytest.raises(TopologyError, match=match):
        simulate(np.ones((3, 1, 64)), config, num_ranks=8)


def test_unknown_policy_lists_allowed():
    with pytest.raises(TopologyError, match="allowed: default, global, refined, balanced, sticky"):
        simulate(np.ones((3, 1, 64)), None, "fastest", num_ranks=8)


def test_initial_placement_is_vllms_linear_one():
    p = Placement.linear(1, 4, 6)
    assert p.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert p.log2phy[0, 0].tolist() == [0, 4] and p.log2phy[0, 3].tolist() == [3, -1]


def test_window_balancedness_is_predicted_and_next_is_realised():
    """Why a rearrangement can read 0.5 -> 1.0 in the engine's log and 0.5 -> 0.5 a step later.

    1 layer, 4 experts on 2 ranks (2 slots each), window_size 1. Step 0 routes 4 tokens to
    experts 0 and 1, which the start-up placement keeps on rank 0: 0.5. Any placement the
    policy makes from that window puts 0 and 1 on different ranks: 1.0 on the window it saw.
    Step 1 routes only to expert 0, so whatever rank holds it carries everything: 0.5 realised.
    """
    load = np.array([[[4, 4, 0, 0]], [[4, 0, 0, 0]]], dtype=float)
    cfg = EPLBConfig(window_size=1, step_interval=4)  # counter starts at 3: rearranges after step 0 only
    df = simulate(load, cfg, num_ranks=2)
    events = rearrangements(df)
    assert events["step"].tolist() == [0]
    row = events.iloc[0]
    assert (row.window_balancedness_before, row.window_balancedness_after) == (0.5, 1.0)
    assert (row.next_steps, row.next_balancedness_kept, row.next_balancedness_new) == (1, 0.5, 0.5)
    assert df["balancedness"].tolist() == [0.5, 0.5]  # per step, as vLLM's "EPLB step" lines read it
    assert df.loc[~df.rearranged, "window_balancedness_after"].isna().all()


def test_window_figures_are_the_engines_and_next_figures_are_the_per_step_ones():
    """The built-in engine's Rebalancer (fed the same routing) logs exactly the simulator's window
    figures; the realised figures are the per-step balancedness averaged until the next rearrangement."""
    torch = pytest.importorskip("torch")
    from epkit.engine.rebalance import Rebalancer, resolve_eplb_config

    steps, layers, experts, ranks, top_k = 30, 3, 16, 4, 2
    rng = np.random.default_rng(5)
    popularity = np.linspace(3.0, 0.2, experts) / np.linspace(3.0, 0.2, experts).sum()  # skewed, noisy per step
    ids = [[rng.choice(experts, size=(24, top_k), p=popularity) for _ in range(layers)] for _ in range(steps)]
    load = np.zeros((steps, layers, experts))
    for t in range(steps):
        for layer in range(layers):
            np.add.at(load[t, layer], ids[t][layer].ravel(), 1)
    config = {"num_redundant_experts": 4, "window_size": 6, "step_interval": 8}

    engine = Rebalancer(resolve_eplb_config(config, experts, ranks), layers, experts, ranks, 0, 1,
                        torch.device("cpu"), all_reduce=lambda x: x)  # one process holds every rank's tokens
    logged = []
    for t in range(steps):
        for layer in range(layers):
            engine.record(layer, torch.from_numpy(ids[t][layer]))
        before = engine.num_rebalances
        engine.end_step([], build=None)
        if engine.num_rebalances > before:
            logged.append((t, engine.stats["window_balancedness_before"], engine.stats["window_balancedness_after"]))

    df = simulate(load, config, num_ranks=ranks)
    events = rearrangements(df)
    assert events["step"].tolist() == [t for t, _, _ in logged] == [1, 9, 17, 25]
    # same window load (integer counts), same policy code: the same numbers up to float64 rounding
    np.testing.assert_allclose(events["window_balancedness_before"], [b for _, b, _ in logged], rtol=1e-12)
    np.testing.assert_allclose(events["window_balancedness_after"], [a for _, _, a in logged], rtol=1e-12)
    for _, row in events.iterrows():
        following = df["balancedness"].iloc[int(row.step) + 1: int(row.step) + 1 + int(row.next_steps)]
        assert row.next_balancedness_new == pytest.approx(following.mean(), rel=1e-12)
    # the policy fits the window it saw; fresh steps of the same skewed routing balance less well
    assert (events["next_balancedness_new"].iloc[:-1] < events["window_balancedness_after"].iloc[:-1]).all()
    assert events["next_steps"].tolist() == [8, 8, 8, 4]


def test_no_eplb_baseline_and_summary():
    # 5 experts on 2 ranks without EPLB: blocks {0, 1, 2} and {3, 4} (vLLM gives the first rank the extra one)
    load = np.array([[[1, 1, 1, 0, 0]], [[0, 0, 0, 3, 3]]], dtype=float)
    df = simulate(load, {"num_redundant_experts": 1, "step_interval": 4}, num_ranks=2, bytes_per_expert=2.0 ** 29)
    assert df["no_eplb_balancedness"].tolist() == [0.5, 0.5]
    table = summary(df)
    assert table["run"].tolist() == ["no EPLB", "EPLB default"]
    assert table.loc[0, "mean_balancedness"] == 0.5 and table.loc[0, "rearrangements"] == 0
    assert table.loc[1, "rearrangements"] == 1 and table.loc[1, "bytes_moved"] == df["experts_moved"].sum() * 2.0 ** 29
