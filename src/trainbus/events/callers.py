"""Generated dispatch: per event, one function that calls each subscriber with literal keywords.

Calling ``handler(**payload)`` copies a dict per call, and a general dispatch loop looks up
each handler's payload names per call. For an event whose subscriptions are all plain (no
filter, ``on_error="raise"``), the bus instead generates, whenever the subscriptions change,
a function such as::

    def call(state, model, maps, batch):
        _tb_counter[0] += 1
        _tb_found = None
        try:
            _tb_result = _tb_h0(state=state)
            if _tb_result is not None:
                _tb_found = _tb_collect(_tb_found, _tb_result, 0)
            _tb_result = _tb_h1(state=state, batch=batch)
            ...
        except Exception as _tb_error:
            _tb_fail(_tb_error, _tb_error.__traceback__.tb_lineno)
            raise
        return _tb_found

the way :mod:`dataclasses` generates ``__init__``. Which handler raised is read from the
line the traceback names, so the calls carry no bookkeeping. Its parameters are the event's
payload in the catalogue's order (``state``, ``model``, ``maps``, then the event's own
names), passed positionally by the loop. While the bus samples handler times, the function
counts its dispatches and hands every sampled one to the timed general path (its twin), so
the other dispatches keep the generated path.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trainbus.events.subscription import Subscription

Caller = Callable[..., Any]

_PREFIX = "_tb_"


def can_generate(names: Sequence[str]) -> bool:
    """Whether ``names`` can be parameters of a generated function (else: the general path)."""
    return all(
        name.isidentifier() and not keyword.iskeyword(name) and not name.startswith(_PREFIX)
        for name in names
    )


@dataclass(frozen=True, slots=True)
class Binding:
    """What an emitter bound to one loop supplies itself, and what it does with requests.

    An emitter takes only the event's own payload names: ``state`` comes from ``snapshot()``
    (called only when a subscriber reads it), ``model`` and ``maps`` are fixed, and the
    requests go to ``handle(requests)``, whose result the emitter returns (``nothing`` when
    no handler asked for anything). ``cache``, when given, is the object whose ``cached``
    attribute holds the current snapshot (or None): the emitter reads it first and calls
    ``snapshot()`` only when it is None, one Python call fewer per event.
    """

    snapshot: Callable[[], Any]
    model: Any
    maps: Any
    handle: Callable[[list[Any]], Any]
    nothing: Any = None
    cache: Any = None


BOUND_NAMES = ("state", "model", "maps")
"""The payload names every event carries first; a :class:`Binding` supplies them."""


def generate(
    event: str,
    names: Sequence[str],
    subscribers: Sequence[Subscription],
    *,
    counter: list[int],
    collect: Callable[[Any, Any, int], Any],
    fail: Callable[[Exception, int], None],
    sampled: tuple[list[int], int, Callable[[dict[str, Any]], Any]] | None = None,
    binding: Binding | None = None,
) -> Caller:
    """The dispatch function of ``event`` for plain ``subscribers`` (see the module docstring).

    ``counter`` counts dispatches (the subscribers' call counts are settled from it);
    ``collect(found, result, index)`` turns a handler's result into requests; ``fail(error,
    index)`` notes which handler raised. ``sampled`` is ``(tick, every, timed)``: every
    ``every``-th dispatch (counted in ``tick``) goes to ``timed(payload)`` instead. With a
    ``binding``, the function is an emitter: it takes the names after ``state, model, maps``
    and hands the requests on itself.
    """
    parameters = ", ".join(names[len(BOUND_NAMES) :] if binding is not None else names)
    lines = [f"def call({parameters}):"]
    namespace: dict[str, Any] = {
        f"{_PREFIX}counter": counter,
        f"{_PREFIX}collect": collect,
        f"{_PREFIX}fail": fail,
    }
    if binding is not None:
        reads_state = sampled is not None or any(
            s.wants is None or "state" in s.wants for s in subscribers
        )
        namespace.update(
            {
                f"{_PREFIX}snapshot": binding.snapshot,
                f"{_PREFIX}handle": binding.handle,
                f"{_PREFIX}nothing": binding.nothing,
                "model": binding.model,
                "maps": binding.maps,
            }
        )
        if not reads_state:
            lines.append("    state = None")
        elif binding.cache is None:
            lines.append(f"    state = {_PREFIX}snapshot()")
        else:
            namespace[f"{_PREFIX}cache"] = binding.cache
            lines += [
                f"    state = {_PREFIX}cache.cached",
                "    if state is None:",
                f"        state = {_PREFIX}snapshot()",
            ]
    if sampled is not None:
        tick, every, timed = sampled
        namespace[f"{_PREFIX}tick"] = tick
        namespace[f"{_PREFIX}timed"] = timed
        payload = ", ".join(f"{name!r}: {name}" for name in names)
        lines += [
            f"    {_PREFIX}tick[0] += 1",
            f"    if {_PREFIX}tick[0] % {int(every)} == 0:",
            f"        return {_PREFIX}timed({{{payload}}})"
            if binding is None
            else f"        return {_PREFIX}handle({_PREFIX}timed({{{payload}}}) or [])",
        ]
    lines += [
        f"    {_PREFIX}counter[0] += 1",
        f"    {_PREFIX}found = None",
        "    try:",
    ]
    handler_at_line: dict[int, int] = {}
    for index, subscription in enumerate(subscribers):
        namespace[f"{_PREFIX}h{index}"] = subscription.handler
        wanted = names if subscription.wants is None else subscription.wants
        arguments = ", ".join(f"{name}={name}" for name in wanted)
        lines.append(f"        {_PREFIX}result = {_PREFIX}h{index}({arguments})")
        handler_at_line[len(lines)] = index
        lines += [
            f"        if {_PREFIX}result is not None:",
            f"            {_PREFIX}found = "
            f"{_PREFIX}collect({_PREFIX}found, {_PREFIX}result, {index})",
        ]
        handler_at_line[len(lines)] = index
    lines += [
        f"    except Exception as {_PREFIX}error:",
        f"        {_PREFIX}fail({_PREFIX}error, {_PREFIX}error.__traceback__.tb_lineno)",
        "        raise",
    ]
    if binding is None:
        lines.append(f"    return {_PREFIX}found")
    else:
        lines += [
            f"    if {_PREFIX}found is None:",
            f"        return {_PREFIX}nothing",
            f"    return {_PREFIX}handle({_PREFIX}found)",
        ]
    namespace[f"{_PREFIX}fail"] = lambda error, line: fail(error, handler_at_line[line])
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<trainbus dispatch of {event!r}>", "exec"), namespace)
    caller: Caller = namespace["call"]
    caller.__qualname__ = f"dispatch_{event}"
    return caller


def general(names: Sequence[str], dispatch: Callable[[dict[str, Any]], Any]) -> Caller:
    """A caller with the generated one's signature that builds the payload for ``dispatch``."""
    fields = tuple(names)

    def call(*values: Any) -> Any:
        return dispatch(dict(zip(fields, values, strict=True)))

    return call
