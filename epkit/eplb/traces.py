"""Expert-load traces: per step × layer × logical expert token counts, and synthetic ones.

A :class:`Trace` is what the simulator replays. Synthetic traces draw each step's
``tokens_per_step × top_k`` expert choices from a per-layer popularity that can be
skewed (Zipf or lognormal), drift (hot experts hand their popularity to others every
``drift_every`` steps) and burst (one expert of one layer briefly ``burst_scale`` ×
hotter). Readers for recorded traces live in :mod:`epkit.eplb.readers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SKEWS = ("zipf", "lognormal", "uniform")


@dataclass(frozen=True, eq=False)
class Trace:
    """``load[T, L, E]`` logical-expert token counts per engine step; ``step[T]`` the step numbers."""

    load: np.ndarray
    step: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        load = np.asarray(self.load)
        if load.ndim != 3:
            raise ValueError(f"trace load must have shape [steps, layers, experts]; got shape {load.shape}")
        if (load < 0).any():
            raise ValueError("trace load must hold non-negative token counts")
        object.__setattr__(self, "load", load)
        step = np.arange(load.shape[0]) if self.step is None else np.asarray(self.step)
        if step.shape != (load.shape[0],):
            raise ValueError(f"trace step must have shape ({load.shape[0]},); got {step.shape}")
        object.__setattr__(self, "step", step)

    @classmethod
    def from_physical(cls, load, phy2log, num_logical: int | None = None, step=None,
                      meta: dict[str, Any] | None = None) -> "Trace":
        """Fold per-physical-slot counts ``load[T, L, P]`` into logical experts.

        ``phy2log`` is the map in force, ``[L, P]`` for the whole trace or ``[T, L, P]``
        per step (the engine records it whenever it rearranges).
        """
        load = np.asarray(load)
        phy2log = np.broadcast_to(np.asarray(phy2log, dtype=np.int64), load.shape)
        num_logical = int(phy2log.max()) + 1 if num_logical is None else int(num_logical)
        steps, layers, _ = load.shape
        base = (np.arange(steps)[:, None, None] * layers + np.arange(layers)[None, :, None]) * num_logical
        folded = np.bincount((base + phy2log).ravel(), weights=load.ravel().astype(np.float64),
                             minlength=steps * layers * num_logical)
        return cls(folded.reshape(steps, layers, num_logical), step, dict(meta or {}))

    @property
    def num_steps(self) -> int:
        return self.load.shape[0]

    @property
    def num_layers(self) -> int:
        return self.load.shape[1]

    @property
    def num_experts(self) -> int:
        return self.load.shape[2]

    def total(self) -> np.ndarray:
        """``[L, E]`` load summed over every step."""
        return self.load.sum(0)


def popularity(num_layers: int, num_experts: int, skew: str = "zipf", param: float = 1.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """``[L, E]`` routing probabilities, each layer's hot experts at random positions.

    ``zipf``: the expert of popularity rank ``i`` gets ``(i + 1) ** -param``;
    ``lognormal``: ``exp(param × N(0, 1))``; ``uniform``: equal.
    """
    if skew not in SKEWS:
        raise ValueError(f"skew={skew!r}; allowed: {', '.join(SKEWS)}")
    rng = np.random.default_rng(0) if rng is None else rng
    if skew == "zipf":
        base = (np.arange(num_experts) + 1.0) ** -float(param)
        weight = np.stack([rng.permutation(base) for _ in range(num_layers)])
    elif skew == "lognormal":
        weight = np.exp(float(param) * rng.standard_normal((num_layers, num_experts)))
    else:
        weight = np.ones((num_layers, num_experts))
    return weight / weight.sum(1, keepdims=True)


def synthetic_trace(
    num_steps: int,
    num_layers: int,
    num_experts: int,
    tokens_per_step: int = 4096,
    top_k: int = 8,
    skew: str = "zipf",
    skew_param: float = 1.0,
    drift_every: int = 0,
    drift_fraction: float = 0.1,
    burst_prob: float = 0.0,
    burst_scale: float = 8.0,
    seed: int = 0,
) -> Trace:
    """A skewed, optionally drifting and bursty load trace (see the module docstring).

    Each step draws ``tokens_per_step × top_k`` expert choices per layer from the
    layer's popularity (a multinomial, so an expert may be drawn twice for a token;
    fine for load statistics). Every ``drift_every`` steps (0 = never) a
    ``drift_fraction`` of each layer's experts swap popularity with random others.
    With probability ``burst_prob`` a step multiplies one random expert's popularity
    in one random layer by ``burst_scale``.
    """
    for name, value in (("num_steps", num_steps), ("num_layers", num_layers), ("num_experts", num_experts),
                        ("tokens_per_step", tokens_per_step), ("top_k", top_k)):
        if int(value) < 1:
            raise ValueError(f"{name}={value!r} must be >= 1")
    rng = np.random.default_rng(seed)
    prob = popularity(num_layers, num_experts, skew, skew_param, rng)
    load = np.empty((num_steps, num_layers, num_experts), dtype=np.int64)
    draws = tokens_per_step * top_k
    n_drift = max(1, int(round(drift_fraction * num_experts)))
    rows = np.arange(num_layers)[:, None]
    for t in range(num_steps):
        if drift_every and t and t % drift_every == 0:
            src = np.stack([rng.choice(num_experts, n_drift, replace=False) for _ in range(num_layers)])
            dst = np.stack([rng.permutation(s) for s in src])
            prob[rows, dst] = prob[rows, src].copy()
        step_prob = prob
        if burst_prob and rng.random() < burst_prob:
            step_prob = prob.copy()
            layer, expert = rng.integers(num_layers), rng.integers(num_experts)
            step_prob[layer, expert] *= burst_scale
            step_prob[layer] /= step_prob[layer].sum()
        load[t] = rng.multinomial(draws, step_prob)
    meta = dict(source="synthetic", skew=skew, skew_param=skew_param, tokens_per_step=tokens_per_step, top_k=top_k,
                drift_every=drift_every, drift_fraction=drift_fraction, burst_prob=burst_prob, seed=seed)
    return Trace(load, meta=meta)
