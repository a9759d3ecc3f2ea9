"""Helpers for the launch tests: process-table checks, greedy completions."""

from __future__ import annotations

import json
import time
import urllib.request

from epkit.launch import procs

TINY = "epkit-tiny-moe"


def no_leftovers(deployment_ids, timeout_s: float = 20.0) -> list:
    """Wait until no process carries any of these deployments' tags; return what is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for d in deployment_ids for p in procs.tagged(d)]
        left += [p for p in procs.processes() if any(d in p.cmdline for d in deployment_ids)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def greedy(url: str, prompts: list[list[int]], max_tokens: int = 8) -> list[str]:
    """Greedy completions of token-id prompts (temperature 0)."""
    out = []
    for prompt in prompts:
        body = json.dumps({"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = json.loads(r.read())
        out.append(data["choices"][0]["text"])
    return out


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [100, 50, 25, 12, 6, 3], list(range(40, 72))]
