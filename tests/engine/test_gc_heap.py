"""freeze_startup_heap: the start-up heap leaves the collector's scans; garbage made afterwards is still collected."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import gc, json, weakref
from epkit.engine.gc_heap import freeze_startup_heap

class Node:
    pass

heap = [[Node() for _ in range(50)] for _ in range(4000)]  # 200k objects alive at "start-up"
stats = freeze_startup_heap("test")
# serving makes cyclic garbage after the freeze: a full collection still frees it
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps(dict(stats=stats, frozen=gc.get_freeze_count(), collected=gone() is None, alive=len(heap))))
"""


def test_startup_heap_frozen_and_later_cycles_collected():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["stats"]["objects"] == out["frozen"] >= 200_000  # the heap alive at the freeze, and the interpreter's
    assert out["collected"] and out["alive"] == 4000
