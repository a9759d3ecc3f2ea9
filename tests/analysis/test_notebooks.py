"""Every notebook runs top to bottom (nbclient, a real kernel) on the committed sample results;
02_local_sweep runs a one-topology quickstart sweep on the built-in engine."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(path: Path, env: dict[str, str], timeout: int = 300):
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment; parameters read it
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs(nb, mime: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if mime in o.get("data", {})]


def test_all_four_notebooks_exist_and_are_thin():
    assert [p.stem for p in NOTEBOOKS] == ["01_plan", "02_local_sweep", "03_compare", "04_eplb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), path.name
        for c in code:
            assert "def " not in c.source and "class " not in c.source, (path.name, c.source)
            assert len(c.source.splitlines()) <= 10, (path.name, c.source)
        assert all(not c.get("outputs") for c in code), f"{path.name}: commit notebooks without outputs"


SAMPLE = ROOT / "results" / "sample"


@pytest.mark.parametrize("name, results", [("01_plan", None), ("03_compare", SAMPLE / "ladder"),
                                           ("03_compare", SAMPLE / "quickstart"), ("04_eplb", None)])
def test_notebook_executes(name, results):
    nb = execute(ROOT / "notebooks" / f"{name}.ipynb", {"EPKIT_RESULTS": str(results)} if results else {})
    if name != "01_plan":
        assert len(outputs(nb, "application/vnd.plotly.v1+json")) >= 3
    else:
        assert outputs(nb, "application/vnd.jupyter.widget-view+json")
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        assert "vllm serve deepseek-ai/DeepSeek-V3-0324" in text and "memory per GPU" in text


def test_local_sweep_notebook_runs_a_tiny_sweep(tmp_path):
    nb = execute(ROOT / "notebooks" / "02_local_sweep.ipynb",
                 {"EPKIT_RESULTS_ROOT": str(tmp_path), "EPKIT_SWEEP_ONLY": "epkit_default_tp1_dp1_n1_noep"},
                 timeout=400)
    stored = sorted((tmp_path / "quickstart").glob("*/*.json"))
    assert stored, "the sweep stored no point"
    assert outputs(nb, "application/vnd.plotly.v1+json")
