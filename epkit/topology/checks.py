"""Field checks shared by the self-checking configs: each raises :class:`~epkit.errors.TopologyError`
naming the owner, the field, the value and what is allowed."""

from __future__ import annotations

from typing import Any

from epkit.errors import TopologyError


def check_int(owner: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{owner}.{name}={value!r} must be an integer >= {minimum}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise TopologyError(f"{owner}.{name}={value!r} must be {bound}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TopologyError(f"{owner}.{name}={value!r} must be true or false")
