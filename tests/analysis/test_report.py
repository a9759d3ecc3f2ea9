"""`epkit report` on the committed sample results, loaded in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from epkit.cli import main as epkit_main

from .chromium import chromium_binary, load_page

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report_html(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert epkit_main(["report", str(sample_dir / "ladder"), "-o", str(out), "--title", "epkit sample: ladder"]) == 0
    return out


def test_report_is_self_contained(report_html):
    text = report_html.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # nothing to fetch: no external scripts, stylesheets or images
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(https?:)?//", text)
    assert "Plotly.newPlot" in text and text.count('class="plotly-graph-div"') >= 6
    assert "Pareto frontier" in text and "TTFT CDF" in text and "ITL CDF" in text


def test_report_on_the_quickstart_results(sample_dir, tmp_path):
    """What `epkit report results/quickstart` gives after the README's main job (rate ladder, no concurrency cap)."""
    out = tmp_path / "quickstart.html"
    assert epkit_main(["report", str(sample_dir / "quickstart"), "-o", str(out)]) == 0
    text = out.read_text()
    assert "Pareto frontier by all2all backend" in text and "Request rate (req\\u002fs)" in text  # JSON-escaped in the figure


def test_report_of_a_sweep_where_every_point_failed(sample_dir, tmp_path):
    sources = sorted((sample_dir / "quickstart").glob("*/*.json"))
    assert len(sources) >= 8
    for src in sources:
        doc = json.loads(src.read_text())
        doc["epkit"]["point"].update(status="failed", failure={"kind": "oom", "message": "CUDA out of memory", "log_tail": ""})
        dst = tmp_path / "q" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps({"epkit": doc["epkit"]}))
    out = tmp_path / "r.html"
    assert epkit_main(["report", str(tmp_path / "q"), "-o", str(out)]) == 0
    text = out.read_text()
    assert f"{len(sources)} failed" in text and "CUDA out of memory" in text


def test_report_cli_errors_name_the_path(tmp_path, capsys):
    assert epkit_main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r.html")]) == 2
    assert "nothing" in capsys.readouterr().err


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (bash scripts/chromium.sh installs it)")
@pytest.mark.parametrize("folder", ["quickstart", "."])
def test_report_renders_in_headless_chromium_with_wide_plots(sample_dir, folder, tmp_path, monkeypatch):
    """At a 1400 px window every plot area (plotly's drag rectangle over the axes) spans ≥ 60 % of
    its figure's width, legends sit below the plot, and they name what differs, not the whole
    configuration. "." is every sample together: sweeps and a vLLM file without a topology."""
    report = tmp_path / "report.html"
    monkeypatch.chdir(ROOT)  # the page names its source as given: results/sample/… in docs/report.png
    source = (sample_dir / folder).resolve().relative_to(ROOT)
    assert epkit_main(["report", str(source), "-o", str(report), "--title", f"epkit sample: {folder}"]) == 0
    shot = tmp_path / "report.png"
    page = load_page(report, screenshot=shot, width=1400, height=2200)
    assert page.console_errors == []
    assert page.exceptions == []
    assert [u for u in page.requests if not u.startswith(("file:", "data:", "blob:", "about:"))] == []
    assert page.title == f"epkit sample: {folder}"
    assert len(page.plots) == 7
    for plot in page.plots:  # every container drawn, with data in it
        assert plot["svg"] > 0 and plot["traces"] > 0 and plot["points"] > 0 and plot["height"] > 300, plot
        figure, area, legend = plot["figure"], plot["plot_area"], plot["legend"]
        assert figure["width"] > 1100, plot  # the page gives the figure the window's width (less the margins)
        assert area["width"] >= 0.6 * figure["width"], plot
        assert area["height"] >= 0.4 * figure["height"], plot
        if legend and plot["legend_items"]:
            assert legend["top"] >= area["bottom"] and figure["left"] <= legend["left"] <= legend["right"] <= figure["right"], plot
            if folder == "quickstart":  # model, engine and TP are shared: in the subtitle, not in every entry
                assert all("epkit-tiny-moe" not in t and len(t) <= 45 for t in plot["legend_texts"]), plot
    assert shot.stat().st_size > 20_000
    if folder == "quickstart" and os.environ.get("EPKIT_UPDATE_SCREENSHOT"):
        shutil.copy(shot, ROOT / "docs" / "report.png")


def test_figures_name_groups_short_and_keep_the_full_name_in_hover(sample_dir):
    from epkit.analysis import plots, results

    runs = results.load(sample_dir / "quickstart")
    fig = plots.metric_vs_load(runs)
    labels = results.short_labels(runs, "topology")
    assert sorted(t.name for t in fig.data) == sorted(labels.values())
    for trace in fig.data:
        full = next(k for k, v in labels.items() if v == trace.name)
        assert all(text.startswith(f"<b>{full}</b>") for text in trace.hovertext)
    assert fig.layout.title.subtitle.text == "all: epkit-tiny-moe · epkit 0.1.0 · TP1 · 1 node"
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.yanchor == "bottom"
    bars = plots.compare_bars(runs, x="topology", color="load")
    assert [t.name for t in bars.data] == ["rate=4 req/s", "rate=16 req/s"]  # natural order
    assert set(bars.data[0].x) == {v.replace(" · ", "<br>") for v in labels.values()}


@pytest.mark.parametrize("folder", ["vllm", "quickstart", "ladder"])
def test_every_report_figure_has_data(sample_dir, folder):
    """A lone `vllm bench serve` file (no topology, unlimited rate) still fills every figure."""
    from epkit.analysis import report, results

    runs = results.load(sample_dir / folder)
    figs = report.figures(runs, results.requests(runs))
    assert len(figs) == 7
    for name, fig in figs.items():
        points = sum(len(t.z if getattr(t, "z", None) is not None else (t.x if t.x is not None else [])) for t in fig.data)
        assert points > 0, name


def test_report_can_share_one_plotly_js(sample_dir, tmp_path):
    """--plotly-js FILE: two pages in different folders load one copy of plotly.js by a relative path (what the
    repository's committed reports do); the pages hold no inlined copy and fetch nothing from the network."""
    from plotly.offline import get_plotlyjs

    js = tmp_path / "results" / "plotly.min.js"
    pages = [tmp_path / "results" / "a" / "report.html", tmp_path / "results" / "b" / "c" / "report.html"]
    for page in pages:
        assert epkit_main(["report", str(sample_dir / "ladder"), "-o", str(page), "--plotly-js", str(js)]) == 0
    assert js.read_text() == get_plotlyjs()
    srcs = [re.search(r'<script type="text/javascript" src="([^"]+)"></script>', p.read_text()).group(1) for p in pages]
    assert srcs == ["../plotly.min.js", "../../plotly.min.js"]
    for page, src in zip(pages, srcs):
        assert (page.parent / src).resolve() == js.resolve()
        text = page.read_text()
        assert len(text) < len(get_plotlyjs()) and "Plotly.newPlot" in text
        assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(https?:)?//", text)
