"""Fixtures: a real paced streaming server in its own process, and the byte-level tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from epkit.bench.stream_server import write_byte_tokenizer


def _raise_priority() -> None:
    """Timing tests share a small CI box with other jobs: wake the server (and client) first
    when they can (root); a no-op elsewhere."""
    try:
        os.nice(-10)
    except OSError:
        pass


class StreamServer:
    """``python -m epkit.bench.stream_server`` on a free port; ``url``, ``log()``, ``stop()``."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "epkit.bench.stream_server", "--port", "0", *args],
                                     stdout=subprocess.PIPE, text=True, preexec_fn=_raise_priority)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"stream server did not start: {line!r}")
        self.url = line.split()[-1]

    def log(self, clear: bool = True) -> list[dict]:
        req = urllib.request.Request(self.url + "/debug/requests", method="DELETE" if clear else "GET")
        return json.load(urllib.request.urlopen(req))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def stream_server():
    """Factory: ``stream_server("--ttft-ms", "50", ...)`` -> a started StreamServer, stopped after the test."""
    started: list[StreamServer] = []

    def start(*args: str) -> StreamServer:
        s = StreamServer(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def module_stream_server():
    """Like ``stream_server``, but the servers live for the whole test module."""
    started: list[StreamServer] = []

    def start(*args: str) -> StreamServer:
        started.append(StreamServer(*args))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> str:
    return str(write_byte_tokenizer(tmp_path_factory.mktemp("byte-tokenizer")))
