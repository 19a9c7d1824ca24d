"""@on marks and Options: validation at decoration time, stacking, filter descriptions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from trainbus.errors import ConfigurationError, ConfigurationTypeError, SubscriptionError
from trainbus.events import EventBus, Options, on
from trainbus.events.marker import Mark, add_mark, check_priority, marks_of


def is_late(state: object) -> bool:
    return True


def test_on_returns_the_function_unchanged_with_a_mark() -> None:
    def handler(*, state: object) -> None:
        pass

    decorated = on("epoch_end", priority=3, every=2)(handler)

    assert decorated is handler
    assert marks_of(handler) == (Mark("epoch_end", Options(priority=3, every=2)),)


def test_stacked_marks_are_kept_innermost_first() -> None:
    @on("train_end", priority=-10)
    @on("epoch_end", once=True)
    def flush(*, state: object) -> None:
        pass

    assert [(m.event, m.options) for m in marks_of(flush)] == [
        ("epoch_end", Options(once=True)),
        ("train_end", Options(priority=-10)),
    ]


def test_marks_are_visible_through_bound_methods() -> None:
    class Holder:
        @on("epoch_end", id="holder")
        def handle(self, *, state: object) -> None:
            pass

    assert marks_of(Holder().handle) == (Mark("epoch_end", Options(id="holder")),)


def test_unmarked_objects_have_no_marks() -> None:
    def plain() -> None:
        pass

    assert marks_of(plain) == ()
    assert marks_of(42) == ()


def test_marking_does_not_subscribe_anything() -> None:
    bus = EventBus()

    @on("epoch_end")
    def handler(*, state: object) -> None:
        pass

    assert bus.plan() == []
    assert not bus.has_subscribers("epoch_end")


def test_marks_of_one_function_do_not_leak_to_another() -> None:
    @on("epoch_end")
    def first(*, state: object) -> None:
        pass

    def second(*, state: object) -> None:
        pass

    assert marks_of(first) != ()
    assert marks_of(second) == ()


@pytest.mark.parametrize("event", [None, 3, ["epoch_end"]])
def test_on_requires_an_event_name_string(event: object) -> None:
    with pytest.raises(ConfigurationTypeError, match="event name as a string"):
        on(event)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"priority": 1.5}, ConfigurationTypeError, "is not an int"),
        ({"priority": "1"}, ConfigurationTypeError, "is not an int"),
        ({"priority": True}, ConfigurationTypeError, "is not an int"),
        ({"every": 0}, ConfigurationError, "not a positive integer"),
        ({"every": True}, ConfigurationError, "not a positive integer"),
        ({"every": 2.0}, ConfigurationError, "not a positive integer"),
        ({"once": 0}, ConfigurationError, "neither True nor a positive integer"),
        ({"once": -1}, ConfigurationError, "neither True nor a positive integer"),
        ({"once": False}, ConfigurationError, "neither True nor a positive integer"),
        ({"every": 2, "once": True}, ConfigurationError, "one counting filter"),
        ({"every": 2, "once": 4}, ConfigurationError, "one counting filter"),
        ({"when": "state.iteration > 2"}, ConfigurationTypeError, "is not callable"),
        ({"on_error": "warn"}, ConfigurationError, "not one of 'raise', 'log'"),
        ({"id": ""}, ConfigurationError, "not a non-empty string"),
        ({"id": 7}, ConfigurationError, "not a non-empty string"),
    ],
)
def test_on_validates_options_when_decorating(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        on("epoch_end", **options)


def test_valid_options_are_accepted() -> None:
    options = Options(priority=-3, once=2, when=is_late, on_error="log", id="x")

    assert (options.priority, options.once, options.when, options.on_error, options.id) == (
        -3,
        2,
        is_late,
        "log",
        "x",
    )
    assert Options() == Options(None, None, None, None, None, None)


def test_add_mark_refuses_non_callables() -> None:
    with pytest.raises(ConfigurationTypeError, match="decorates functions"):
        add_mark("not a function", Mark("epoch_end", Options()))  # type: ignore[type-var]


def test_on_decorator_refuses_non_callables() -> None:
    with pytest.raises(ConfigurationTypeError, match="decorates functions"):
        on("epoch_end")(None)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("options", "text"),
    [
        (Options(), "-"),
        (Options(priority=5, on_error="log", id="x"), "-"),
        (Options(every=2), "every=2"),
        (Options(once=True), "once"),
        (Options(once=3), "once=3"),
        (Options(when=is_late), "when=is_late"),
        (Options(every=4, when=is_late), "every=4,when=is_late"),
        (Options(once=True, when=is_late), "once,when=is_late"),
    ],
)
def test_describe_filter(options: Options, text: str) -> None:
    assert options.describe_filter() == text


def test_describe_filter_of_a_callable_without_qualname_uses_repr() -> None:
    class Predicate:
        def __call__(self, state: object) -> bool:
            return True

        def __repr__(self) -> str:
            return "Predicate()"

    assert Options(when=Predicate()).describe_filter() == "when=Predicate()"


@pytest.mark.parametrize("value", [0, -7, 10**9])
def test_plain_int_priorities_are_accepted_as_given(value: int) -> None:
    check_priority(value)
    bus = EventBus()
    bus.subscribe("epoch_end", is_late, priority=value)

    assert [e.priority for e in bus.plan()] == [value]


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_check_priority_refuses_everything_else(value: object) -> None:
    with pytest.raises(ConfigurationTypeError, match=type(value).__name__):
        check_priority(value)


def test_check_priority_accepts_none_only_when_allowed() -> None:
    check_priority(None, allow_none=True)
    with pytest.raises(ConfigurationTypeError):
        check_priority(None)


async def async_handler(*, state: object) -> None:
    pass


async def async_generator_handler(*, state: object) -> AsyncIterator[None]:
    yield None


def generator_handler(*, state: object) -> Iterator[None]:
    yield None


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        pytest.param(async_handler, "an async function", id="async-def"),
        pytest.param(async_generator_handler, "an async generator function", id="async-gen"),
        pytest.param(generator_handler, "a generator function", id="generator"),
        pytest.param(staticmethod(async_handler), "an async function", id="staticmethod"),
    ],
)
def test_on_refuses_a_handler_that_would_never_run_when_decorating(
    handler: Callable[..., Any], kind: str
) -> None:
    with pytest.raises(SubscriptionError) as info:
        on("epoch_end")(handler)

    message = str(info.value)
    assert f"marked with @on('epoch_end') is {kind}" in message
    assert "a handler must be a plain function returning None or a command" in message
    assert "would never run" in message
    assert marks_of(handler) == ()


async def is_late_async(state: object) -> bool:
    return True


def is_late_generator(state: object) -> Iterator[bool]:
    yield True


@pytest.mark.parametrize("predicate", [is_late_async, is_late_generator])
def test_when_predicate_that_returns_a_coroutine_or_generator_is_refused(
    predicate: Callable[..., Any],
) -> None:
    with pytest.raises(ConfigurationTypeError, match=r"is always true.*plain function"):
        Options(when=predicate)
