import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of the venv with the real vLLM (made by scripts/vllm_venv.sh)."""
    default = Path(os.environ.get("EPKIT_VLLM_VENV", Path.home() / ".cache/epkit/vllm-venv")) / "bin/python"
    python = Path(os.environ.get("EPKIT_VLLM_PYTHON", default))
    if not python.exists():
        pytest.fail(f"no vLLM venv at {python}: run `bash scripts/vllm_venv.sh` (the README's test command does)")
    return python
