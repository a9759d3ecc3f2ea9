"""epkit.analysis.results on the committed sample results (real sweeps) and on `vllm bench serve` files."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from epkit.analysis import results as R
from epkit.bench import load_result


def test_load_one_row_per_point_with_topology_workload_and_metrics(sample_dir):
    df = R.load(sample_dir / "ladder")
    raw = sorted((sample_dir / "ladder").glob("*/*.json"))  # the store: <topology_id>/<point>.json
    assert len(df) == len(raw) > 0
    assert set(df["sweep"]) == {"ladder"}
    for col in ("topology_id", "workload_id", "repeat", "status", "model", "engine", "engine_version", "tp", "dp",
                "ep_size", "world_size", "nodes", "all2all_backend", "eplb", "workload_input_len", "request_rate",
                "max_concurrency", "median_ttft_ms", "p99_itl_ms", "output_throughput", "hardware", "git_commit",
                "config", "topology", "load", "gpus", "output_tok_s_per_gpu", "total_tok_s_per_gpu",
                "input_tok_s_per_gpu", "interactivity_pareto_tok_s", "interactivity_inferencex_tok_s"):
        assert col in df, col
    assert not df.duplicated(["topology_id", "workload_id", "repeat"]).any()
    assert set(df["repeat"]) == {0, 1}


def test_every_number_is_the_stored_one(sample_dir):
    df = R.load(sample_dir / "ladder")
    for _, row in df.iterrows():
        doc = json.loads(open(row["source"]).read())
        point = doc["epkit"]["point"]
        assert row["topology_id"] == point["topology_id"] and row["workload_id"] == point["workload_id"]
        for key in ("output_throughput", "median_ttft_ms", "p99_itl_ms", "total_token_throughput"):
            assert row[key] == doc[key]
        assert row["gpus"] == point["derived"]["world_size"]
        assert row["output_tok_s_per_gpu"] == pytest.approx(doc["output_throughput"] / point["derived"]["world_size"])
        assert row["total_tok_s_per_gpu"] == pytest.approx(doc["total_token_throughput"] / point["derived"]["world_size"])
        assert row["input_tok_s_per_gpu"] == pytest.approx(doc["total_input_tokens"] / doc["duration"] / row["gpus"])
        assert row["interactivity_pareto_tok_s"] == doc["interactivity_pareto_tok_s"]
        assert row["interactivity_mean_tpot_tok_s"] == pytest.approx(1e3 / doc["mean_tpot_ms"])
        assert f"DP{point['topology']['dp']}" in row["config"]
        if point["topology"].get("all2all_backend"):  # the DP=1 reference (no EP) leaves vLLM's default
            assert row["all2all_backend"] in row["config"]
        else:
            assert pd.isna(row["all2all_backend"])


def test_requests_frame_matches_the_bench_tables(sample_dir):
    runs = R.load(sample_dir / "quickstart")
    reqs = R.requests(runs)
    first = runs.iloc[0]
    table = load_result(first["source"]).requests
    mine = reqs[reqs["source"] == first["source"]]
    assert len(mine) == int((~table["warmup"].astype(bool)).sum())
    derived = load_result(first["source"]).derived()
    assert np.allclose(np.sort(mine["ttft_ms"].dropna()), np.sort(derived["ttft_ms"].dropna()))
    assert R.itl_samples(mine)["itl_ms"].dtype == float
    # the median TTFT of the stored result is the median of its requests
    assert float(np.median(mine["ttft_ms"].dropna())) == pytest.approx(first["median_ttft_ms"])


def test_failed_points_are_rows_without_metrics(sample_dir, tmp_path):
    shutil.copytree(sample_dir / "quickstart", tmp_path / "quickstart")
    victim = sorted((tmp_path / "quickstart").rglob("*.json"))[0]
    doc = json.loads(victim.read_text())
    doc["epkit"]["point"].update(status="failed", failure={"kind": "startup_timeout", "message": "engine did not start",
                                                           "log_tail": "…", "node": 0})
    victim.write_text(json.dumps({"epkit": doc["epkit"]}))  # docs/sweep.md: a failed point holds only "epkit"
    df = R.load(tmp_path)
    bad = df[df["status"] == "failed"]
    assert len(bad) == 1 and bad.iloc[0]["failure_kind"] == "startup_timeout"
    assert math.isnan(bad.iloc[0]["output_throughput"])
    assert len(R.load(tmp_path, failed=False)) == len(df) - 1
    assert len(R.requests(df)) == len(R.requests(df[df["status"] == "ok"]))
    assert bad.iloc[0]["max_concurrency"] is None or math.isnan(bad.iloc[0]["max_concurrency"]) \
        or bad.iloc[0]["max_concurrency"] == doc["epkit"]["point"]["workload"]["max_concurrency"]


def test_reads_vllm_bench_serve_json(sample_dir, tmp_path):
    """A `vllm bench serve --save-result --save-detailed` file (the committed one came from a real
    `vllm bench serve` run against the built-in engine) gives a row and a request table."""
    files = sorted((sample_dir / "vllm").glob("*.json"))
    if not files:
        pytest.skip("no vllm bench serve sample committed")
    df = R.load(files)
    doc = json.loads(files[0].read_text())
    assert df.iloc[0]["median_ttft_ms"] == doc["median_ttft_ms"]
    assert df.iloc[0]["client"] == "vllm bench serve"
    assert df.iloc[0]["interactivity_inferencex_tok_s"] == pytest.approx(1e3 / doc["median_tpot_ms"])
    reqs = R.requests(df)
    assert len(reqs) == doc["completed"] + doc["failed"]
    assert float(np.median(reqs["ttft_ms"].dropna())) == pytest.approx(doc["median_ttft_ms"], rel=1e-6)


def test_non_result_json_is_ignored(sample_dir, tmp_path):
    shutil.copytree(sample_dir / "quickstart", tmp_path / "q")
    (tmp_path / "q" / "notes.json").write_text('{"hello": 1}')
    (tmp_path / "q" / "empty.json").write_text("")
    assert len(R.load(tmp_path)) == len(R.load(sample_dir / "quickstart"))
    with pytest.raises(FileNotFoundError):
        R.load(tmp_path / "missing")


def _dominated(row, others, x, y):
    return ((others[x] >= row[x]) & (others[y] >= row[y]) & ((others[x] > row[x]) | (others[y] > row[y]))).any()


@pytest.mark.parametrize("seed", range(5))
def test_pareto_frontier_is_exactly_the_non_dominated_rows(seed):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": rng.integers(0, 8, 60).astype(float), "y": rng.integers(0, 8, 60).astype(float),
                       "g": rng.choice(["a", "b"], 60)})
    front = R.pareto_frontier(df, "x", "y", by="g")
    for g, part in df.groupby("g"):
        on = front[front["g"] == g]
        for i, row in part.iterrows():
            dominated = _dominated(row, part.drop(index=i), "x", "y")
            if not dominated and not ((on["x"] == row["x"]) & (on["y"] == row["y"])).any():
                pytest.fail(f"non-dominated {row.to_dict()} missing from the frontier")
            if i in on.index:
                assert not dominated
        assert list(on["x"]) == sorted(on["x"])


def test_pareto_frontier_minimising_latency():
    df = pd.DataFrame({"lat": [10.0, 20.0, 30.0, 15.0], "tput": [5.0, 9.0, 8.0, 4.0]})
    front = R.pareto_frontier(df, "lat", "tput", maximize=(False, True))
    assert front[["lat", "tput"]].values.tolist() == [[10.0, 5.0], [20.0, 9.0]]
    with pytest.raises(KeyError, match="nope"):
        R.pareto_frontier(df, "nope", "tput")


def test_sample_results_are_small(sample_dir):
    total = sum(p.stat().st_size for p in sample_dir.rglob("*") if p.is_file())
    assert total < 2 * 2**20


def test_short_labels_name_only_what_differs(sample_dir):
    runs = R.load(sample_dir / "quickstart")
    labels = R.short_labels(runs, "topology")
    assert sorted(labels.values()) == ["DP1 EP1 · no EPLB",  # no all2all runs at EP size 1: no backend named
                                       "DP2 EP2 · all_to_all · no EPLB", "DP2 EP2 · allgather_reducescatter · EPLB",
                                       "DP2 EP2 · allgather_reducescatter · no EPLB", "DP2 EP2 · naive · no EPLB"]
    assert set(labels) == set(runs["topology"])  # keyed by the full name
    assert R.shared_label(runs, "topology") == "epkit-tiny-moe · epkit 0.1.0 · TP1 · 1 node"
    # the load varies inside a topology, so only a per-point grouping names it; repeats only where they differ
    configs = R.short_labels(runs, "config")
    assert configs[runs["config"][0]].endswith(("· rate=4 req/s", "· rate=16 req/s"))
    ladder = R.load(sample_dir / "ladder")
    assert R.short_labels(ladder, "load") == {f"rate=inf, concurrency={c}": f"concurrency={c}" for c in (1, 2, 4, 8)}
    assert "rate=inf" in R.shared_label(ladder, "load")
    assert {v for v in R.short_labels(ladder, "config").values() if "repeat" in v} and \
        not any("repeat 0" in v for v in R.short_labels(ladder, "config").values())


def test_short_labels_of_mixed_results_stay_unique(sample_dir):
    """Sweeps and a plain `vllm bench serve` file (no topology) together: every label differs,
    the file that records no topology keeps its own name, and the request frame labels alike."""
    runs = R.load(sample_dir)
    for by in ("topology", "config", "load"):
        labels = R.short_labels(runs, by)
        assert len(set(labels.values())) == len(labels) == runs[by].nunique(), by
    assert R.short_labels(runs, "topology")["epkit-tiny-moe"] == "epkit-tiny-moe"
    reqs = R.requests(R.heaviest_load(runs))
    assert R.short_labels(reqs, "topology") == {k: v for k, v in R.short_labels(runs, "topology").items()
                                                if k in set(reqs["topology"])}
