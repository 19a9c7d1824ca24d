"""Dispatch order of one event: priorities, then the ``before=``/``after=`` constraints.

Subscriptions sort by priority (higher first; ties in registration order). Constraints name
other subscribers by subscriber id or by callback id; :func:`constrained` moves only the
constrained subscriptions, keeping everything else in priority order, and a cycle among the
constraints is a :class:`~trainbus.errors.SubscriptionError` that names it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from trainbus.errors import SubscriptionError
from trainbus.events.subscription import Subscription


def order_key(subscription: Subscription) -> tuple[int, int]:
    return (-subscription.priority, subscription.sequence)


def _targets(target: str, subscriptions: Sequence[Subscription]) -> list[int]:
    """Positions of the subscriptions ``target`` names: a subscriber id, or a callback id."""
    return [
        index
        for index, s in enumerate(subscriptions)
        if s.id == target or s.owner == target or s.id.startswith(f"{target}.")
    ]


def constrained(event: str, ordered: Sequence[Subscription]) -> tuple[Subscription, ...]:
    """A topological order of the ``before``/``after`` graph, closest to ``ordered``.

    The constrained subscription moves: one that must run ``before`` others moves up to just
    before the first of them, one that must run ``after`` others waits for the last of them;
    everything else keeps its priority order. Deterministic: ties go to the earlier position
    in ``ordered``.
    """
    successors: list[set[int]] = [set() for _ in ordered]
    pulled_by: list[set[int]] = [set() for _ in ordered]  # before= edges only
    for index, subscription in enumerate(ordered):
        for target in subscription.options.before:
            targets = {t for t in _targets(target, ordered) if t != index}
            successors[index].update(targets)
            pulled_by[index].update(targets)
        for target in subscription.options.after:
            for t in _targets(target, ordered):
                if t != index:
                    successors[t].add(index)
    waiting = [0] * len(ordered)
    for targets in successors:
        for index in targets:
            waiting[index] += 1
    walk = _topological(successors, waiting)
    if len(walk) < len(ordered):
        # Kahn's walk leaves exactly the nodes of a cycle, and those behind one, waiting.
        cycle = _find_cycle(successors, sorted(set(range(len(ordered))) - set(walk)))
        path = " -> ".join(ordered[i].id for i in [*cycle, cycle[0]])
        raise SubscriptionError(
            f"the before=/after= constraints of {event!r} form a cycle: {path} (each must run "
            "before the next); remove one of these constraints"
        )
    anchor = list(range(len(ordered)))
    for index in reversed(walk):
        for following in pulled_by[index]:
            anchor[index] = min(anchor[index], anchor[following])
    ready = [(anchor[index], index) for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    result: list[Subscription] = []
    while ready:
        _, index = heapq.heappop(ready)
        result.append(ordered[index])
        for following in successors[index]:
            waiting[following] -= 1
            if waiting[following] == 0:
                heapq.heappush(ready, (anchor[following], following))
    return tuple(result)


def _topological(successors: Sequence[set[int]], waiting: Sequence[int]) -> list[int]:
    remaining = list(waiting)
    queue = [index for index, count in enumerate(remaining) if count == 0]
    result = []
    while queue:
        index = queue.pop()
        result.append(index)
        for following in successors[index]:
            remaining[following] -= 1
            if remaining[following] == 0:
                queue.append(following)
    return result


def _find_cycle(successors: Sequence[set[int]], candidates: Sequence[int]) -> list[int]:
    """One cycle among the nodes Kahn's walk left waiting, in constraint order.

    Each of them still waits for a predecessor that is left too, so walking back along
    predecessors never stops and must come round to a node already seen.
    """
    allowed = set(candidates)
    predecessors: dict[int, list[int]] = {node: [] for node in allowed}
    for node, following in enumerate(successors):
        if node in allowed:
            for successor in following:
                if successor in allowed:
                    predecessors[successor].append(node)
    path: list[int] = []
    seen: dict[int, int] = {}
    node = min(allowed)
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(predecessors[node])
    cycle = list(reversed(path[seen[node] :]))
    start = cycle.index(min(cycle))  # named from its earliest subscriber, for stable messages
    return cycle[start:] + cycle[:start]
