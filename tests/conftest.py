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


def _no_cuda_reason() -> str | None:
    """Why tests marked ``gpu`` cannot run here (None when a CUDA device is present)."""
    try:
        import torch
    except ImportError:
        return "needs a CUDA device: torch is not installed"
    if not torch.cuda.is_available():
        return (f"needs a CUDA device; torch {torch.__version__} sees none (run `pytest -m gpu` on a GPU machine, "
                "see docs/engine.md)")
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where no CUDA device is present: the CPU suite stays green."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = _no_cuda_reason() if gpu else None
    if reason:
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=reason))
