"""EventBus failures: warnings safe for a terminal, failing filters, handlers that never run."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from trainbus.errors import HandlerFailureWarning, SubscriptionError
from trainbus.events import Callback, EventBus, HandlerFailure, Options, Stop

from .support import State, emit

# ESC [ (CSI), ESC ] (OSC) ended by BEL, the one-byte C1 CSI, CR, LF and the line separator.
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\r", "\n", "\u2028")
HOSTILE = "\x1b[31mred\x1b]0;title\x07\x9b2J\rforged\nline\u2028end"


# ---------------------------------------------------------------- terminal escapes


def test_handler_failure_warning_escapes_control_characters() -> None:
    hostile_error = type(f"Error{HOSTILE}", (Exception,), {})

    def broken(*, state: State) -> None:
        raise hostile_error(f"boom {HOSTILE}")

    bus = EventBus()
    bus.subscribe("epoch_end", broken, id=f"handler {HOSTILE}", on_error="log")

    with pytest.warns(HandlerFailureWarning) as caught:
        emit(bus, "epoch_end")

    message = str(caught[0].message)
    assert [char for char in RAW_CONTROLS if char in message] == []
    assert "boom \\x1b[31mred\\x1b]0;title\\x07\\x9b2J\\rforged\\nline\\u2028end" in message
    # the record keeps the exception text as raised; whoever shows it escapes it
    assert bus.failures[0].error.endswith(f"boom {HOSTILE}")


def test_failing_when_filter_warning_escapes_control_characters() -> None:
    def hostile(state: State) -> bool:
        raise ValueError(HOSTILE)

    bus = EventBus()
    bus.subscribe(
        "epoch_end", lambda *, state: None, when=hostile, id=f"h{HOSTILE}", on_error="log"
    )

    with pytest.warns(HandlerFailureWarning) as caught:
        emit(bus, "epoch_end")

    message = str(caught[0].message)
    assert [char for char in RAW_CONTROLS if char in message] == []


# ------------------------------------------------------------------ failing filters


def raising_predicate(state: State) -> bool:
    if state.iteration == 2:
        raise ZeroDivisionError("no ratio yet")
    return True


class Ambiguous:
    """A predicate result whose truth cannot be told, like a tensor of several elements."""

    def __bool__(self) -> bool:
        raise RuntimeError("the truth value of this result is ambiguous")


def ambiguous_predicate(state: State) -> bool:
    result: Any = Ambiguous()
    return result  # type: ignore[no-any-return]  # what a predicate outside its type returns


def test_logged_when_filter_failure_is_recorded_and_dispatch_goes_on() -> None:
    bus = EventBus()
    calls: list[tuple[str, int]] = []
    bus.subscribe(
        "batch_end",
        lambda *, state: calls.append(("filtered", state.iteration)),
        when=raising_predicate,
        id="filtered",
        priority=1,
        on_error="log",
    )
    bus.subscribe("batch_end", lambda *, state: calls.append(("next", state.iteration)))

    emit(bus, "batch_end", State(iteration=1))
    with pytest.warns(
        HandlerFailureWarning,
        match=r"the when= filter of handler 'filtered' raised ZeroDivisionError: no ratio yet "
        r"while handling 'batch_end'; the handler was skipped",
    ):
        emit(bus, "batch_end", State(iteration=2))
    emit(bus, "batch_end", State(iteration=3))

    assert calls == [("filtered", 1), ("next", 1), ("next", 2), ("filtered", 3), ("next", 3)]
    assert len(bus.failures) == 1
    failure = bus.failures[0]
    assert isinstance(failure, HandlerFailure)
    assert (failure.event, failure.subscriber, failure.error, failure.stage) == (
        "batch_end",
        "filtered",
        "ZeroDivisionError: no ratio yet",
        "when filter",
    )
    assert failure.counter == 2
    assert "raising_predicate" in failure.traceback
    assert bus.subscriptions("batch_end")[0].calls == 2


def test_logged_failure_of_a_predicate_result_is_recorded_too() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", lambda *, state: None, when=ambiguous_predicate, on_error="log")

    with pytest.warns(HandlerFailureWarning, match="RuntimeError: the truth value"):
        emit(bus, "epoch_end")

    assert [f.stage for f in bus.failures] == ["when filter"]


def test_failing_when_filter_does_not_use_up_once() -> None:
    bus = EventBus()
    calls: list[int] = []
    bus.subscribe(
        "batch_end",
        lambda *, state: calls.append(state.iteration),
        once=True,
        when=raising_predicate,
        on_error="log",
        priority=1,
    )

    with pytest.warns(HandlerFailureWarning):
        emit(bus, "batch_end", State(iteration=2))
    emit(bus, "batch_end", State(iteration=3))
    emit(bus, "batch_end", State(iteration=4))

    assert calls == [3]


def test_raising_when_filter_failure_names_the_subscriber_and_its_filter() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe(
        "batch_end", lambda *, state: calls.append("filtered"), when=raising_predicate, id="f"
    )
    bus.subscribe("batch_end", lambda *, state: calls.append("next"), priority=-1)

    with pytest.raises(ZeroDivisionError, match="no ratio yet") as info:
        emit(bus, "batch_end", State(iteration=2))

    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1
    assert "when= filter of handler 'f'" in notes[0]
    assert "'batch_end'" in notes[0]
    assert calls == []
    assert bus.failures == []


def test_logged_when_filter_failure_in_a_single_subscriber_dispatch() -> None:
    """The ``exception`` event is sent to one subscriber at a time, off the fast path."""
    bus = EventBus()
    subscription = bus.subscribe(
        "exception", lambda *, exception: None, when=lambda s: bool(1 / 0), on_error="log"
    )
    payload = {"state": State(), "model": None, "maps": None, "exception": RuntimeError()}

    with pytest.warns(HandlerFailureWarning, match="when= filter"):
        assert bus.dispatch("exception", (subscription,), payload) == []

    assert [f.error for f in bus.failures] == ["ZeroDivisionError: division by zero"]


# ------------------------------------------------------------ handlers that never run


async def async_handler(*, state: State) -> None:
    pass


async def async_generator_handler(*, state: State) -> AsyncIterator[None]:
    yield None


def generator_handler(*, state: State) -> Iterator[Stop]:
    yield Stop("never")


class AsyncCall:
    async def __call__(self, *, state: State) -> None:
        pass


NEVER_RUN: list[Any] = [
    pytest.param(async_handler, "an async function", id="async-def"),
    pytest.param(async_generator_handler, "an async generator function", id="async-generator"),
    pytest.param(generator_handler, "a generator function", id="generator"),
    pytest.param(functools.partial(async_handler), "an async function", id="partial"),
    pytest.param(AsyncCall(), "an async function", id="async-call"),
]


@pytest.mark.parametrize(("handler", "kind"), NEVER_RUN)
@pytest.mark.parametrize("register", ["subscribe", "add"])
def test_handler_that_would_never_run_is_refused_at_subscription(
    handler: Callable[..., Any], kind: str, register: str
) -> None:
    bus = EventBus()

    subscribe: Callable[[], object] = (
        functools.partial(bus.subscribe, "epoch_end", handler)
        if register == "subscribe"
        else functools.partial(bus.add, "epoch_end", handler, Options())
    )

    with pytest.raises(SubscriptionError) as info:
        subscribe()

    message = str(info.value)
    assert f"is {kind}" in message
    assert "'epoch_end'" in message
    assert "a handler must be a plain function returning None or a command" in message
    assert "would never run" in message
    assert bus.subscriptions() == []


class AsyncHookCallback(Callback):
    def on_epoch_start(self, *, state: State) -> None:
        pass

    async def on_epoch_end(self, *, state: State) -> None:
        pass


class GeneratorHookCallback(Callback):
    def on_train_end(self, *, state: State) -> Iterator[Stop]:
        yield Stop("never")


@pytest.mark.parametrize(
    ("callback", "handler", "kind"),
    [
        (AsyncHookCallback(), "AsyncHookCallback.on_epoch_end", "an async function"),
        (GeneratorHookCallback(), "GeneratorHookCallback.on_train_end", "a generator function"),
    ],
)
def test_callback_method_that_would_never_run_is_refused_at_attach(
    callback: Callback, handler: str, kind: str
) -> None:
    bus = EventBus()

    with pytest.raises(SubscriptionError, match=f"handler '{handler}' of event .* is {kind}"):
        bus.attach(callback)

    assert bus.subscriptions() == []
