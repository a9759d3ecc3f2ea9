"""Issue 18 end to end, on this machine: a local sweep of the built-in engine's tiny model with the pd axis
(colocated and 1P1D at DP 2: one deployment of DP 2, then one prefill and one decode instance of DP 1 behind
``epkit proxy``), two load levels, then ``epkit report``: the page holds the P/D figure and the SLA attainment
table with rows for both configurations, and the 1P1D points carry the router's per-request numbers."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epkit.analysis import results as R
from epkit.analysis import sla as SLA

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
SPEC = {
    "name": "pd-e2e", "model": "epkit-tiny-moe", "engine": "epkit", "executor": "local",
    "defaults": {"gpus_per_node": 2},
    "topologies": {"dp": 2, "enable_expert_parallel": True, "grid": {"pd": ["colocated", "1P1D"]}},
    "workloads": [{"name": "tiny", "dataset": "random", "input_len": 16, "output_len": 6, "num_prompts": 6,
                   "max_concurrency": [1, 3]}],
    "run": {"startup_timeout_s": 180, "hang_timeout_s": 120, "grace_s": 3},
}


def epkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epkit.cli", *args], capture_output=True, text=True, timeout=540,
                          cwd=ROOT)


def test_pd_sweep_then_report(tmp_path):
    spec = tmp_path / "pd.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    out = epkit("sweep", str(spec), "--results", str(tmp_path / "results"), "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 ok, 0 failed" in out.stdout and "2 deployments started" in out.stdout, out.stdout

    folder = tmp_path / "results" / "pd-e2e"
    runs = R.load(folder)
    assert sorted(runs["pd"]) == ["1P1D", "1P1D", "colocated", "colocated"]
    assert (runs["gpus"] == 2).all()  # equal GPU count: the comparison P/D is for
    reqs = R.requests(runs)
    split, colocated = reqs[reqs["pd"] == "1P1D"], reqs[reqs["pd"] == "colocated"]
    assert len(split) == len(colocated) == 12 and reqs["success"].all()
    assert (split["prefill_ms"] > 0).all() and split["kv_transfer_ms"].notna().all()
    assert (split["kv_transfer_bytes"] > 0).all() and split["decode_url"].nunique() == 1
    assert colocated[["prefill_ms", "kv_transfer_ms"]].isna().all().all()
    assert (runs.loc[runs["pd"] == "1P1D", "p99_prefill_ms"] > 0).all()

    page_path = tmp_path / "report.html"
    out = epkit("report", str(folder), "-o", str(page_path), "--slo", "ttft=5000,tpot=500")
    assert out.returncode == 0, out.stderr
    page = page_path.read_text()
    assert "<h2>P/D: TTFT vs ITL</h2>" in page and "colocated (reference)" in page
    section = page[page.index("<h2>SLA attainment</h2>"):page.index("<h2>Results</h2>")]
    assert "TTFT ≤ 5000 ms, TPOT ≤ 500 ms" in html.unescape(section)
    rows = [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", r)]
            for r in re.findall(r"<tr>(.*?)</tr>", section)]
    assert [r[0] for r in rows if r] == ["colocated", "colocated", "1P1D", "1P1D"]
    table = SLA.attainment(runs, reqs, {"ttft": 5000, "tpot": 500})
    for cells, (_, row) in zip([r for r in rows if r], table.iterrows()):  # the page's numbers are the stored ones
        assert f"{row['request_goodput']:.4g}" in cells and cells[-1] == row["source"]
