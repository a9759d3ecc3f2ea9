"""The instances of one side (prefill or decode) and the routing policies that order them for a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


@dataclass
class Instance:
    """One prefill or decode instance as the router sees it: its URL and its requests in flight through the router."""

    role: str
    index: int
    url: str
    in_flight: int = 0


class Policy(Protocol):
    def __call__(self, instances: list[Instance], turn: int) -> list[Instance]:
        """Every instance, the one to try first at the front, the rest in the order to retry them."""


def round_robin(instances: list[Instance], turn: int) -> list[Instance]:
    """Instance ``turn mod n`` first, then the ones after it."""
    start = turn % len(instances)
    return instances[start:] + instances[:start]


def least_outstanding(instances: list[Instance], turn: int) -> list[Instance]:
    """Fewest requests in flight first; among equals, round-robin order (a stable sort of the rotated list)."""
    return sorted(round_robin(instances, turn), key=lambda inst: inst.in_flight)


POLICIES: dict[str, Policy] = {"round_robin": round_robin, "least_outstanding": least_outstanding}


class Pool:
    """One side's instances under one policy. ``order()`` is called once per request; the caller counts the
    request on the instance it uses (``enter`` / ``leave``) before it awaits anything, so that concurrent
    requests see each other under least_outstanding."""

    def __init__(self, role: str, urls: tuple[str, ...], policy: str,
                 on_change: Callable[[Instance], None] = lambda inst: None):
        self.role, self.policy = role, POLICIES[policy]
        self.instances = [Instance(role, i, url) for i, url in enumerate(urls)]
        self._turn = 0
        self._on_change = on_change

    def order(self) -> list[Instance]:
        ordered = self.policy(self.instances, self._turn)
        self._turn += 1
        return ordered

    def enter(self, inst: Instance) -> None:
        inst.in_flight += 1
        self._on_change(inst)

    def leave(self, inst: Instance) -> None:
        inst.in_flight -= 1
        self._on_change(inst)
