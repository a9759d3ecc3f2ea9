"""The report's P/D figure and SLA attainment table, on the results of a real small P/D sweep
(tests/data/pd_sweep: colocated and 1P1D, two loads each). Every number checked here is read back from the
stored point JSONs and requests tables."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from epkit.analysis import plots as P
from epkit.analysis import report
from epkit.analysis import results as R
from epkit.analysis import sla as SLA
from epkit.bench.metrics import derive, meets_slos
from epkit.bench.result import load_result
from epkit.cli import main as epkit_main

from .chromium import chromium_binary, load_page

ROOT = Path(__file__).resolve().parents[2]
PD_SWEEP = ROOT / "tests" / "data" / "pd_sweep"


def sla_rows(page: str) -> list[list[str]]:
    """The SLA attainment table's cells, row by row (header first)."""
    section = page[page.index("<h2>SLA attainment</h2>"):page.index("<h2>Results</h2>")]
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", section)]


@pytest.fixture(scope="module")
def runs():
    return R.load(PD_SWEEP)


def test_the_sweep_has_both_configurations_and_the_router_numbers(runs):
    assert sorted(runs["pd"]) == ["1P1D", "1P1D", "colocated", "colocated"] and SLA.has_pd(runs)
    split = runs[runs["pd"] == "1P1D"]
    assert (split["mean_prefill_ms"] > 0).all() and (split["mean_kv_transfer_ms"] > 0).all()
    assert runs.loc[runs["pd"] == "colocated", "mean_prefill_ms"].isna().all()
    assert not SLA.has_pd(R.load(ROOT / "results" / "sample" / "ladder"))  # no pd column: no P/D section


def test_report_has_the_pd_figure_and_the_sla_table(tmp_path):
    out = tmp_path / "r.html"
    assert epkit_main(["report", str(PD_SWEEP), "-o", str(out)]) == 0
    page = out.read_text()
    assert "<h2>P/D: TTFT vs ITL</h2>" in page and "<h2>SLA attainment</h2>" in page
    assert "TTFT ≤ 2000 ms, TPOT ≤ 200 ms" in html.unescape(page)  # the default limits, said
    head, *rows = sla_rows(page)
    assert head[:4] == ["pd", "topology", "load", "repeat"] and "sla_attainment" in head and "request_goodput" in head
    assert [(r[0], r[2]) for r in rows] == [("colocated", "rate=inf, concurrency=1"), ("colocated", "rate=inf, concurrency=3"),
                                            ("1P1D", "rate=inf, concurrency=1"), ("1P1D", "rate=inf, concurrency=3")]


def test_attainment_and_goodput_are_the_stored_requests_under_vllms_goodput_rules(runs):
    slos = {"ttft": 150.0, "tpot": 30.0}
    table = SLA.attainment(runs, R.requests(runs), slos)
    assert len(table) == 4
    for _, row in table.iterrows():
        path = Path(row["source"])
        stored = load_result(path)
        d = derive(stored.requests[~stored.requests["warmup"]])
        good = meets_slos(d, slos)
        doc = json.loads(path.read_text())
        assert row["requests"] == len(d) and row["good"] == good.sum()
        assert row["sla_attainment"] == pytest.approx(good.mean())
        assert row["ttft_attainment"] == pytest.approx(((d["ttft_ms"] <= 150) & d["success"]).mean())
        assert row["request_goodput"] == pytest.approx(good.sum() / doc["duration"])
        assert row["p99_ttft_ms"] == doc["p99_ttft_ms"] and row["p99_itl_ms"] == doc["p99_itl_ms"]
        # the bench's own goodput, recomputed from the stored table with the same limits, agrees
        assert stored.recompute(goodput_slos_ms=slos)["request_goodput"] == pytest.approx(row["request_goodput"])


def test_slo_option_sets_the_limits_and_bad_ones_are_named(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert epkit_main(["report", str(PD_SWEEP), "-o", str(out), "--slo", "ttft=0.001,tpot=1e9"]) == 0
    page = out.read_text()
    assert "TTFT ≤ 0.001 ms, TPOT ≤ 1e+09 ms" in html.unescape(page) and "from epkit report --slo" in page
    head, *rows = sla_rows(page)
    assert {r[head.index("sla_attainment")] for r in rows} == {"0"}
    assert {r[head.index("tpot_attainment")] for r in rows} == {"1"}
    for bad, said in (("ttft", "expected KEY=MS"), ("latency=5", "'latency'"), ("ttft=-1", "ttft='-1'")):
        assert epkit_main(["report", str(PD_SWEEP), "-o", str(out), "--slo", bad]) == 2
        err = capsys.readouterr().err
        assert "--slo" in err and said in err, err
    sample = tmp_path / "ladder.html"  # limits given: the table for results without pd too
    assert epkit_main(["report", str(ROOT / "results" / "sample" / "ladder"), "-o", str(sample), "--slo", "ttft=100"]) == 0
    text = sample.read_text()
    assert "<h2>SLA attainment</h2>" in text and "P/D: TTFT vs ITL" not in text


def test_pd_figure_points_are_the_stored_p99s_with_colocated_as_reference(runs):
    fig = P.pd_latency(runs, slos_ms={"ttft": 1e9})
    by_name = {t.name: t for t in fig.data}
    (ref,) = [t for name, t in by_name.items() if name.endswith("(reference)")]
    (split,) = [t for name, t in by_name.items() if "1P1D" in name]
    assert ref.marker.color == "#111111" and set(ref.marker.symbol) == {"diamond"} and split.marker.color != "#111111"
    for trace, pd_value in ((ref, "colocated"), (split, "1P1D")):
        rows = runs[runs["pd"] == pd_value].sort_values("max_concurrency")
        assert list(trace.x) == list(rows["p99_ttft_ms"]) and list(trace.y) == list(rows["p99_itl_ms"])
        assert list(trace.text) == ["c=1", "c=3"]
        assert all(f"pd: {pd_value}" in h and "concurrency=" in h for h in trace.hovertext)
        for h, source in zip(trace.hovertext, rows["source"]):
            assert source in h  # the file the numbers came from
    assert not fig.layout.shapes  # a limit far beyond the points is not drawn (it would squash them)
    assert len(P.pd_latency(runs, slos_ms={"ttft": 300}).layout.shapes) == 1


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (bash scripts/chromium.sh installs it)")
def test_pd_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "r.html"
    assert report.write(PD_SWEEP, out) == out
    page = load_page(out, width=1400, height=2200)
    assert page.console_errors == [] and page.exceptions == []
    assert len(page.plots) == 8  # the P/D figure and the seven of every report
