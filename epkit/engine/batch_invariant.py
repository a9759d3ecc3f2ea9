"""Exact matrix products for the engine's CPU path: a row's result cannot depend on the batch.

A BLAS library picks kernels, blocking and thread split for every call from the call's shape, and
the order in which a row's products are summed follows that pick: on an AVX-512 EPYC, rows of
``x @ w`` differed by 3.6e-7 between calls of 3 and of 4 rows, and ``torch.bmm`` rows between
experts padded to 4 and to 5 rows; with MKL's AVX2 kernels the last 2 rows of an 8-row call differ
from the first 6. How many rows share a GEMM changes with every DP size, EP setting, all2all
backend and EPLB placement, and the engine's greedy output must not (DESIGN.md).

So on CPU every product is made exact, and then its order cannot matter: each row of ``x`` is
rounded to fixed point, ``bits`` significant bits of its largest entry, each column of the weight
likewise (once), and the two are multiplied in float64. With ``2 * bits + bit_length(K) <= 53``
every product and every partial sum is an integer below 2**53 times one power of two, so the
GEMM is exact for any kernel, blocking, batch, row position and thread count, and the one
rounding to the input dtype depends on the row alone. For K = 256 (the tiny model) that is 22
bits: the error against the exact product of the float32 inputs is at most 2.1e-7 of
``|x| @ |w|`` (a float32 GEMM: 2.6e-7); for K = 2048, 21 bits and 3.7e-7 (float32: 0.8e-7),
measured on Gaussian rows. An entry ``r`` times smaller than its row's largest keeps about
``bits - log2(r)`` bits: rows with outliers thousands of times their typical entry (the "massive
activations" of some checkpoints) get about bfloat16's precision for their other entries.

The price is float64 GEMMs and a few elementwise passes over ``x``: the tiny model's CPU steps
take 1.0-1.5x the CPU time of float32 GEMMs, and the weights are held a second time in float64.
Elementwise ops with ``exp`` (SiLU, sigmoid) get the same care (:func:`rowwise`). GPUs never
come here: their GEMMs, grouped GEMMs and Triton kernels are unchanged.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# columns per row in gate(): ATen's elementwise loops step by two vectors (32 float32 or 64 bfloat16 values with
# AVX-512, fewer with AVX2 or none), so 64 columns leave no element to the scalar tail on any capability
VECTOR_COLUMNS = 64
GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: ATen runs an elementwise op on fewer elements on one thread


def fixed_bits(k: int) -> int:
    """Significant bits per operand so that a sum of ``k`` products of two such integers stays below 2**53."""
    return (53 - k.bit_length()) // 2


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` in float64, built from the bits (exact; exponents clamped to the normal range)."""
    return ((exponent.to(torch.int64).clamp(-1022, 1023) + 1023) << 52).view(torch.float64)


def to_fixed(x: torch.Tensor, bits: int, dim: int, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` in float64, rounded to a multiple of ``2**(e - bits)`` per slice along ``dim``, where the slice's
    largest magnitude ``m`` has ``2**(e-1) <= m < 2**e``: an integer of at most ``bits`` bits times a power
    of two shared by the slice (an all-zero slice stays zero). ``amax`` (keepdim shape) replaces ``m``: the
    largest magnitude of a whole row of which ``x`` holds a part (:mod:`epkit.engine.moe_tp`)."""
    _, e = torch.frexp((x.abs().amax(dim, keepdim=True) if amax is None else amax).double())
    out = x.to(torch.float64, copy=True)
    return out.mul_(_pow2(bits - e)).round_().mul_(_pow2(e - bits))


class FixedWeight:
    """A weight ``[..., K, N]`` rounded once to fixed point per column (per matrix of a stack), in float64.

    A product of a row rounded by :func:`to_fixed` and such a column is a sum of ``K`` integers of at
    most ``2 * bits`` bits times one power of two: exact in float64 whatever the summation order."""

    def __init__(self, w: torch.Tensor):
        self.bits = fixed_bits(w.shape[-2])
        self.values = to_fixed(w, self.bits, -2)


_prepared: dict[int, tuple[weakref.ref, FixedWeight]] = {}


def prepared(w: torch.Tensor) -> FixedWeight:
    """``w``'s :class:`FixedWeight`, made on first use and kept while ``w`` lives (an EPLB rearrangement that rewrites weights in place forgets the entry: moe.LocalExperts.replace_slots)."""
    key = id(w)
    hit = _prepared.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    fixed = FixedWeight(w)
    _prepared[key] = (weakref.ref(w, lambda _, key=key: _prepared.pop(key, None)), fixed)
    return fixed


def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` (``[T, K] @ [K, N]``) from the exact fixed-point product, rounded once to ``x``'s dtype."""
    fw = prepared(w)
    return torch.mm(to_fixed(x, fw.bits, -1), fw.values).to(x.dtype)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x[rows of group g] @ w[g]`` for consecutive groups of ``counts[g]`` rows (``w`` is ``[G, K, N]``), exact as :func:`mm`."""
    fw = prepared(w)
    return grouped_products(to_fixed(x, fw.bits, -1), fw.values, counts).to(x.dtype)


def grouped_products(values: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The exact float64 products of :func:`grouped_mm`, not rounded: fixed-point rows ``values`` (:func:`to_fixed`)
    times fixed-point ``weights`` ``[G, K, N]`` (:class:`FixedWeight` values), groups of ``counts[g]`` rows."""
    out = values.new_empty((values.shape[0], weights.shape[-1]))
    start = 0
    for g, count in enumerate(counts):
        if count:
            torch.mm(values[start : start + count], weights[g], out=out[start : start + count])
            start += count
    return out


def rowwise(fn, x: torch.Tensor, width: int) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` of elementwise ops, with the same arithmetic for every row of ``x``.

    ATen runs an elementwise op as loops over rows: vector code for the body of each loop, scalar code
    for the few elements left at its end, and for ``exp`` / ``sigmoid`` the two may differ by one unit
    in the last place. Two things would move a row's elements between the two: a contiguous tensor
    (rows merged into one loop, so where it ends depends on how many rows there are) and a tensor of
    ``GRAIN_SIZE`` elements or more split between threads at arbitrary elements. So ``fn`` must work on
    strided views (one loop per row; a ``[T, 1]`` input is first broadcast to ``VECTOR_COLUMNS``
    columns, a whole number of vectors, see :func:`gate`), and it is called on blocks of rows of
    fewer than ``GRAIN_SIZE`` elements (``width`` per row), which ATen runs on one thread."""
    rows = max(1, (GRAIN_SIZE - 1) // max(1, width))
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(x[start : start + rows]) for start in range(0, x.shape[0], rows)])


def silu_mul(h: torch.Tensor, inter: int) -> torch.Tensor:
    """``silu(h[:, :inter]) * h[:, inter:]`` (SwiGLU's activation), the same for every row (:func:`rowwise`).

    Every element goes through the vector code: a width that is not a whole number of ``VECTOR_COLUMNS`` is
    padded to one first, so an element's value does not depend on where its row ends either (a 1/dp slice of
    the intermediate dimension, :mod:`epkit.engine.moe_tp`, gives the same values as the whole row)."""
    pad = -inter % VECTOR_COLUMNS
    if pad:
        wide = h.new_zeros((h.shape[0], 2 * (inter + pad)))
        wide[:, :inter] = h[:, :inter]
        wide[:, inter + pad : 2 * inter + pad] = h[:, inter:]
        return silu_mul(wide, inter + pad)[:, :inter]
    return rowwise(lambda block: F.silu(block[:, :inter]) * block[:, inter:], h, inter)


def gate(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid`` of a ``[T, 1]`` gate, the same for every row: each row broadcast to ``VECTOR_COLUMNS``
    columns so that it runs as whole vectors, never in the scalar tail (:func:`rowwise`)."""
    return rowwise(lambda block: torch.sigmoid(block.expand(block.shape[0], VECTOR_COLUMNS))[:, :1], x, VECTOR_COLUMNS)
