from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "results" / "sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed sample results (real sweeps of the built-in engine, see results/sample/README.md)."""
    return SAMPLE
