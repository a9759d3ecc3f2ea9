"""Field checks shared by the self-checking configs: each raises :class:`~epkit.errors.TopologyError`
naming the owner, the field, the value and what is allowed."""

from __future__ import annotations

import json
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


def json_object(name: str, text: str, example: str) -> dict:
    """``text`` (a flag's JSON value) read as a JSON object; a TopologyError names ``name``, the text and why."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{name}={text!r} is not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise TopologyError(f"{name}={text!r} must be a JSON object like {example}")
    return data
