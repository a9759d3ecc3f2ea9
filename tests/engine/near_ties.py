"""Greedy outputs that must agree except where a near tie lets another computation order pick the other token."""

from __future__ import annotations

from typing import Callable

import torch


def first_differences(got, want, reference: Callable[[list[int]], torch.Tensor],
                      tolerance: Callable[[torch.Tensor], float]) -> tuple[int, list[dict]]:
    """Compare ``got`` with ``want`` (lists of ``(prompt, tokens)``) up to each sequence's first difference,
    where the reference logits of the two tokens must lie within ``tolerance(logits)``. Returns the number of
    tokens compared and, per difference, its position, gap and tolerance."""
    compared, differed = 0, []
    for (prompt, tokens), (want_prompt, expected) in zip(got, want, strict=True):
        assert prompt == want_prompt
        first = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
        compared += len(expected) if first is None else first
        if first is not None:
            logits = reference(prompt + expected[:first])[-1]  # the position that chose expected[first]
            gap = (logits[expected[first]] - logits[tokens[first]]).item()
            tol = tolerance(logits)
            differed.append({"token": first, "gap": gap, "tol": tol})
            assert abs(gap) <= tol, (f"token {first} of prompt {prompt[:8]}...: {tokens[first]} instead of "
                                     f"{expected[first]}, whose reference logit is {gap:.3g} higher (near tie: <= {tol:.3g})")
    return compared, differed
