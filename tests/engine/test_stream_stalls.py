"""What kept streamed tokens from arriving at the pace of the steps (issue 19's p99 ITL): Nagle's algorithm on the
links between the engine cores and the API servers, and full garbage collections of the start-up heap."""

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


def test_core_links_send_without_nagle():
    """Both ends of a real multiprocessing TCP link (what each API server and engine core hold) get TCP_NODELAY, and
    a step's outputs over 16 KiB - which multiprocessing sends as two writes - still arrive whole."""
    import socket
    import threading
    from multiprocessing.connection import Client, Listener

    from epkit.engine.core import without_nagle

    listener = Listener(("127.0.0.1", 0), authkey=b"k")
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(without_nagle(listener.accept())))
    thread.start()
    client = without_nagle(Client(listener.address, authkey=b"k"))
    thread.join(10)
    server = accepted[0]

    def nodelay(conn) -> int:
        s = socket.socket(fileno=conn.fileno())
        try:
            return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            s.detach()  # the connection keeps its descriptor

    assert nodelay(client) and nodelay(server)
    outputs = [("out", list(range(64)), "x" * 400) for _ in range(64)]  # ~40 KB pickled: the two-write path
    server.send(outputs)
    assert client.recv() == outputs
    for c in (client, server):
        c.close()
    listener.close()
