"""KV-cache block bookkeeping: reference-counted blocks, one block table per sequence, and the prefix cache.

Prefix caching (``--enable-prefix-caching``, on by default as in vLLM) follows vLLM v1's policy
(``vllm/v1/core/kv_cache_manager.py``, ``block_pool.py``): a block full of computed tokens is known by a
chained hash - its parent block's hash and its own token ids - so equal hashes mean equal K/V. When a
sequence is admitted, the longest run of cached blocks at the start of its tokens is shared (reference
count + 1) and counted as computed, but never its last token: a wholly cached prompt recomputes its last
block, whose last row samples the first token (vLLM's rule). A sequence's blocks enter the cache once
their tokens are computed: at its next allocation (the step after the one that computed them) or when it
frees them. Freed blocks keep their K/V and hash; they are reused as they are on a hit, and evicted -
least recently freed first, a sequence's last block before its first - only when a fresh block is needed
and no never-cached block is free. Blocks held by a sequence are never evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from epkit.engine.sequence import Sequence

HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")  # vLLM 0.32's --prefix-caching-hash-algo choices
ROOT_HASH = hashlib.sha256(b"epkit prefix cache").digest()  # the parent of every sequence's first block


def hash_function(algo: str):
    """``bytes -> bytes`` digest of ``algo``. The engine hashes a canonical byte string (parent digest, then the
    token ids as little-endian int64), so the ``_cbor`` variants are the same digests as their plain ones."""
    if algo in ("sha256", "sha256_cbor"):
        return lambda data: hashlib.sha256(data).digest()
    if algo in ("xxhash", "xxhash_cbor"):
        import xxhash  # refused at config time when missing

        return lambda data: xxhash.xxh3_128_digest(data)
    raise ValueError(f"prefix_caching_hash_algo={algo!r}; allowed: {', '.join(HASH_ALGOS)}")


class BlockManager:
    """Hands out cache blocks of ``block_size`` token slots; the cache holds ``num_blocks``.

    With ``enable_caching``, full computed blocks are kept by hash after their sequence frees them (module
    docstring). ``queries`` / ``hits``: prompt tokens looked up and found at first admissions (vLLM's
    ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False, hash_algo: str = "sha256"):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self._digest = hash_function(hash_algo) if enable_caching else None
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks  # the hash a cached block is known by
        self._by_hash: dict[bytes, int] = {}
        self._fresh: deque[int] = deque(range(num_blocks))  # free and holding nothing cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached: least recently freed first
        self.queries = self.hits = self.evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reused or evicted on demand)."""
        return len(self._fresh) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ---- hashes -----------------------------------------------------------------------
    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of ``seq``'s first ``num_blocks`` blocks (each full of known tokens), kept on ``seq``."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            tokens = array("q", seq.token_ids[i * bs : (i + 1) * bs]).tobytes()
            hashes.append(self._digest((hashes[-1] if hashes else ROOT_HASH) + tokens))
        return hashes[:num_blocks]

    def cached_prefix(self, seq: Sequence) -> list[int] | None:
        """The cached blocks of the longest cached run at the start of ``seq``'s tokens, leaving at least its last
        token to compute; None where no lookup is made (caching off, a sequence that already has blocks, one that
        asks for prompt logprobs - every prompt position must be computed for them, as in vLLM - or a decode whose
        prompt's KV comes from its prefill)."""
        if not self.enable_caching or seq.block_table or seq.params.prompt_logprobs is not None or seq.remote_prefill:
            return None
        found = []
        for h in self.block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def register(self, seq: Sequence) -> None:
        """Enter ``seq``'s blocks that are full of computed tokens into the cache (those not yet in it). A block whose
        content another block already holds (a recomputed last block) stays out of it and is freed as fresh."""
        if not self.enable_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if seq.num_registered_blocks >= full:
            return
        hashes = self.block_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if self._hash[block] is None and h not in self._by_hash:
                self._hash[block], self._by_hash[h] = h, block
        seq.num_registered_blocks = full

    # ---- allocation -------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int, cached: list[int] | None = None) -> int:
        """Free blocks ``seq`` takes so that its first ``num_tokens`` tokens have slots, sharing ``cached`` first
        (a cached block no sequence holds leaves the free pool too)."""
        cached = cached or []
        fresh = max(0, -(-num_tokens // self.block_size) - len(seq.block_table) - len(cached))
        return fresh + sum(1 for block in cached if self._ref[block] == 0)

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: list[int] | None = None) -> bool:
        return self.blocks_needed(seq, num_tokens, cached) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, cached: list[int] | None = None) -> None:
        """Slots for ``seq``'s first ``num_tokens`` tokens. ``cached``: at admission, the result of
        :meth:`cached_prefix` (None: no lookup); its blocks are shared and the lookup is counted at the first
        admission (``seq.num_cached_tokens``). The caller sets ``num_computed_tokens`` past the shared blocks."""
        needed = self.blocks_needed(seq, num_tokens, cached)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"{seq} needs {needed} blocks, {self.num_free_blocks} free")
        self.register(seq)
        if cached is not None and seq.num_cached_tokens is None:
            seq.num_cached_tokens = len(cached) * self.block_size
            self.queries += seq.num_tokens
            self.hits += seq.num_cached_tokens
        for block in cached or ():
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            seq.block_table.append(block)
            seq.num_registered_blocks += 1  # in the cache already
        while len(seq.block_table) * self.block_size < num_tokens:
            block = self._take_fresh()
            self._ref[block] = 1
            seq.block_table.append(block)

    def _take_fresh(self) -> int:
        if self._fresh:
            return self._fresh.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._by_hash[self._hash[block]]
        self._hash[block] = None
        self.evictions += 1
        return block

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references (finished, preempted, aborted or released); its computed full blocks stay cached."""
        self.register(seq)
        for block in reversed(seq.block_table):  # the last block is evicted first: later blocks are shared less
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._fresh.append(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
