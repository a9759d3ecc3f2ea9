"""GPT-2's byte-level alphabet: which printable character stands for each byte in a ByteLevel ``tokenizer.json``.

Plain data shared by both sides of the engine boundary: the built-in engine's byte-level tokenizer
(``epkit/engine/tokenizer.py``: one token per byte for epkit's bundled models) and the paced test server's
(``epkit/bench/stream_server.py``) both order their 256 byte tokens by it. Like ``backends.py``, it is an
exception to "the engine imports only ``eplb/`` and ``models.py``" so that neither side imports the other.
Stdlib only: importing it must stay cheap.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["byte_of"]


@lru_cache(maxsize=1)
def _byte_table() -> dict[str, int]:
    # GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the others for 256, 257, ...
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_of(ch: str) -> int:
    """The byte that ByteLevel character ``ch`` stands for (a ``KeyError`` for any other character)."""
    return _byte_table()[ch]
