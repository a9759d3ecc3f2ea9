"""Fixtures for the engine tests; the helpers live in ``deployments.py`` beside this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from deployments import Deployment, wait_gone  # noqa: E402


@pytest.fixture
def deploy(tmp_path):
    """Start deployments; every one is stopped (and its processes checked) at teardown."""
    started: list[Deployment] = []

    def start(args: list[str], headless: list[list[str]] = (), api_key: str | None = None) -> Deployment:
        d = Deployment(tmp_path, args, headless, api_key)
        started.append(d)
        return d.wait_ready()

    yield start
    for d in started:
        pids = d.pids()
        d.stop()
        assert not wait_gone(pids), "processes left behind"
