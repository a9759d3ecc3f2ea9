"""``epkit a2a-bench`` end to end on 2 gloo ranks: points in the results store, read back by
``epkit.analysis.results.load`` and ``epkit.analysis.a2a.load``, the log-log figure, the offline report page;
bad flags end with one line naming flag, value and what is allowed. Tiny shape (2 shared cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epkit.analysis import a2a
from epkit.analysis import results as R
from epkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "epkit-tiny-moe", "--hidden-size", "64", "--num-experts", "8", "--top-k", "2"]


def test_a2a_bench_stores_points_reads_them_back_and_writes_the_report(tmp_path, capsys):
    results, report = tmp_path / "a2a", tmp_path / "a2a.html"
    argv = ["a2a-bench", *TINY, "--ranks", "2", "--tokens", "1,16", "--routing", "skewed", "--iters", "2",
            "--warmup", "0", "--link-gbps", "100", "--results", str(results), "--report", str(report)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote 6 point(s)" in out and "all_to_all" in out

    files = sorted(results.glob("*/*.json"))
    assert len(files) == 6
    doc = json.loads(files[0].read_text())
    point = doc["epkit"]["point"]
    assert doc["benchmark"] == "a2a" and point["status"] == "ok" and point["git_commit"]
    assert point["topology"]["hidden_size"] == 64 and point["topology"]["routing"] == "skewed"
    assert len(doc["epkit"]["a2a"]["latencies_us"]) == 2

    frame = a2a.load(results)
    assert len(frame) == 6 and set(frame["all2all_backend"]) == {"allgather_reducescatter", "naive", "all_to_all"}
    assert sorted(set(frame["tokens_per_rank"])) == [1, 16] and (frame["ep_size"] == 2).all()
    assert frame["link_fraction"].tolist() == pytest.approx((frame["busbw_gbs"] / 100).tolist())
    assert frame["identity_ok"].all() and frame["device_name"].str.startswith("cpu").all()

    # the sweep store's own loader reads the same points; the figures pick them out of a mixed frame
    mixed = R.load([results, ROOT / "results/sample/quickstart"])
    mine, others = a2a.split(mixed)
    assert len(mine) == 6 and len(others) > 0
    figs = a2a.figures(mixed)
    lat = figs["all2all latency vs tokens"]
    assert lat.layout.xaxis.type == "log" and lat.layout.yaxis.type == "log"
    assert {t.name for t in lat.data if t.showlegend is not False} == {"allgather_reducescatter", "naive", "all_to_all"}
    assert "all2all fraction of the link" in figs

    page = report.read_text()
    assert "all2all latency vs tokens" in page and "Plotly" in page
    assert "<script src=" not in page  # plotly.js inlined: the page opens offline

    # `epkit report` on the same folder: the a2a figures, not an error about missing serving columns
    page2 = tmp_path / "report.html"
    assert main(["report", str(results), "-o", str(page2)]) == 0
    assert "all2all latency vs tokens" in page2.read_text()


@pytest.mark.parametrize("extra, said", [
    (["--routing", "zipf"], "--routing='zipf'; allowed: uniform, skewed"),
    (["--dtype", "int4"], "--dtype='int4'; allowed: bfloat16, float16, float32"),
    (["--tokens", "1,two"], "--tokens='1,two'; allowed: a comma-separated list of integers >= 1"),
    (["--backend", "deepep_low_latency"], "--backend deepep_low_latency needs the DeepEP package"),
    (["--backend", "nvshmem"], "--backend='nvshmem'; allowed: allgather_reducescatter, naive, all_to_all, pplx"),
    (["--link-gbps", "0"], "--link-gbps=0.0; allowed: a number > 0"),
    (["--ranks", "9"], "--ranks=9; allowed: 1..8: every rank needs an expert"),
])
def test_bad_flags_name_flag_value_and_allowed(tmp_path, capfd, extra, said):
    import importlib.util

    if "deepep" in extra[-1] and importlib.util.find_spec("deep_ep"):
        said = "--backend deepep_low_latency: DeepEP is importable, but"
    assert main(["a2a-bench", *TINY, "--tokens", "1", "--iters", "1", "--results", str(tmp_path / "r"), *extra]) == 2
    err = capfd.readouterr().err
    assert said in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_unknown_model_is_refused_with_the_bundled_names(tmp_path, capsys):
    assert main(["a2a-bench", "--model", "no/such-model", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--model='no/such-model'" in err and "Qwen/Qwen3-30B-A3B" in err


def test_storing_points_needs_neither_pandas_plotly_nor_torch():
    """A GPU box may lack pandas and plotly: the command stores its points with the standard library (only
    --report draws), and it reaches the engine's torch code only through ``python -m epkit.engine.a2a_bench``."""
    import subprocess
    import sys

    code = ("import sys, epkit.cli.a2a_bench, epkit.sweep.store; "
            "print(sorted(m for m in ('pandas', 'plotly', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
