"""Ordering beyond priorities: before=/after= constraints, cycles, and mirrored end events."""

from __future__ import annotations

from typing import Any

import pytest

from trainbus import Callback, on
from trainbus.errors import ConfigurationTypeError, SubscriptionError
from trainbus.events.bus import EventBus

from .support import State, emit


def noop(**_: Any) -> None:
    pass


def order(bus: EventBus, event: str) -> list[str]:
    return [s.id for s in bus.dispatch_order(event)]


def test_constraints_override_priorities_only_where_they_say_so() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", noop, id="high", priority=10)
    bus.subscribe("epoch_end", noop, id="middle", priority=5)
    bus.subscribe("epoch_end", noop, id="low", priority=0, before="high")
    bus.subscribe("epoch_end", noop, id="lowest", priority=-5)
    assert order(bus, "epoch_end") == ["low", "high", "middle", "lowest"]


def test_after_moves_the_constrained_subscriber_down_and_leaves_its_target() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", noop, id="high", priority=10, after="low")
    bus.subscribe("epoch_end", noop, id="middle", priority=5)
    bus.subscribe("epoch_end", noop, id="low", priority=0)
    bus.subscribe("epoch_end", noop, id="lowest", priority=-5)
    assert order(bus, "epoch_end") == ["middle", "low", "high", "lowest"]


def test_after_a_callback_id_means_after_all_its_handlers_of_the_event() -> None:
    class Saver(Callback):
        priority = -10

        @on("epoch_end")
        def first(self) -> None: ...

        @on("epoch_end")
        def second(self) -> None: ...

    bus = EventBus()
    bus.subscribe("epoch_end", noop, id="upload", priority=100, after="Saver")
    bus.attach(Saver())
    assert order(bus, "epoch_end") == ["Saver.first", "Saver.second", "upload"]


def test_a_constraint_on_an_absent_subscriber_is_ignored_and_shown_in_the_plan() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", noop, id="a", before="OptionalPluginCallback")
    bus.subscribe("epoch_end", noop, id="b", priority=1)
    assert order(bus, "epoch_end") == ["b", "a"]
    assert [entry.order for entry in bus.plan("epoch_end")] == [
        "-",
        "before=OptionalPluginCallback",
    ]


def test_constraints_apply_when_the_target_subscribes_later() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", noop, id="early", after="late")
    bus.subscribe("epoch_end", noop, id="late", priority=-100)
    assert order(bus, "epoch_end") == ["late", "early"]


def test_the_order_is_deterministic_whatever_the_registration_order() -> None:
    def build(names: list[str]) -> list[str]:
        bus = EventBus()
        constraints = {"c": {"before": "a"}, "d": {"after": "b"}}
        for name in names:
            bus.subscribe("epoch_end", noop, id=name, **constraints.get(name, {}))
        return order(bus, "epoch_end")

    first = build(["a", "b", "c", "d"])
    assert first == ["c", "a", "b", "d"]
    assert build(["a", "b", "c", "d"]) == first


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        ({"a": {"before": "b"}, "b": {"before": "a"}}, "a -> b -> a"),
        ({"a": {"before": "b"}, "b": {"before": "c"}, "c": {"before": "a"}}, "a -> b -> c -> a"),
        ({"a": {"after": "c"}, "b": {"after": "a"}, "c": {"after": "b"}}, "a -> b -> c -> a"),
    ],
    ids=["two", "three-before", "three-after"],
)
def test_a_cycle_is_refused_at_registration_naming_its_subscribers(
    edges: dict[str, dict[str, str]], cycle: str
) -> None:
    bus = EventBus()
    names = list(edges)
    for name in names[:-1]:
        bus.subscribe("epoch_end", noop, id=name, **edges[name])
    before = order(bus, "epoch_end")
    with pytest.raises(SubscriptionError, match=r"form a cycle: .*remove one") as caught:
        bus.subscribe("epoch_end", noop, id=names[-1], **edges[names[-1]])
    assert cycle in str(caught.value)
    assert order(bus, "epoch_end") == before  # the refused subscription left nothing behind
    assert [s.id for s in bus.subscriptions("epoch_end")] == before


def test_a_callback_whose_handlers_would_close_a_cycle_is_attached_not_at_all() -> None:
    class Ahead(Callback):
        @on("epoch_end", before="Behind")
        def one(self) -> None: ...

        @on("train_end")
        def unrelated(self) -> None: ...

    bus = EventBus()
    bus.subscribe("epoch_end", noop, id="Behind.x", before="Ahead")
    with pytest.raises(SubscriptionError, match="cycle"):
        bus.attach(Ahead())
    assert order(bus, "train_end") == []
    assert order(bus, "epoch_end") == ["Behind.x"]


@pytest.mark.parametrize("value", [3, ["ok", 4], [""]])
def test_bad_constraint_values_are_refused(value: Any) -> None:
    with pytest.raises(ConfigurationTypeError, match=r"before=.* is not a subscriber id"):
        EventBus().subscribe("epoch_end", noop, before=value)


# --------------------------------------------------------------------- reverse
class Wrapper(Callback):
    """Opens something at every start event and closes it at the paired end event."""

    reverse_end_events = True

    def __init__(self, log: list[str], priority: int) -> None:
        self.log = log
        self.priority_value = priority

    def on_train_start(self) -> None:
        self.log.append(f"open {self.callback_id}")

    def on_train_end(self) -> None:
        self.log.append(f"close {self.callback_id}")


def make_wrapper(name: str, priority: int, log: list[str]) -> Wrapper:
    wrapper_type = type(name, (Wrapper,), {"priority": priority})
    return wrapper_type(log, priority)


def test_reverse_end_events_close_in_the_mirror_of_the_opening_order() -> None:
    log: list[str] = []
    bus = EventBus()
    for name, priority in (("Outer", 10), ("Middle", 0), ("Inner", 0)):
        bus.attach(make_wrapper(name, priority, log))
    bus.subscribe("train_end", lambda: log.append("plain"), id="plain", priority=0)
    emit(bus, "train_start", State())
    emit(bus, "train_end", State())
    assert log == [
        "open Outer",
        "open Middle",
        "open Inner",
        "close Inner",
        "close Middle",
        "plain",
        "close Outer",
    ]
    assert [e.order for e in bus.plan("train_end") if e.id.endswith("on_train_end")] == [
        "reverse",
        "reverse",
        "reverse",
    ]


def test_reverse_on_a_method_mark_and_the_mirror_follows_the_start_order() -> None:
    log: list[str] = []

    class Timer(Callback):
        priority = 50

        def on_epoch_start(self) -> None:
            log.append("start timer")

        @on("epoch_end", reverse=True)
        def stop(self) -> None:
            log.append("stop timer")

    bus = EventBus()
    bus.subscribe("epoch_end", lambda: log.append("checkpoint"), id="checkpoint", priority=-500)
    bus.subscribe("epoch_end", lambda: log.append("report"), id="report", priority=0)
    bus.attach(Timer())
    emit(bus, "epoch_start", State())
    emit(bus, "epoch_end", State())
    # Opened at 50, it closes at the mirror, -50: after what opened later (0), before what
    # opened earlier (a checkpoint at -500 mirrors 500).
    assert log == ["start timer", "report", "stop timer", "checkpoint"]


def test_reverse_is_refused_where_no_start_event_pairs_with_the_event() -> None:
    with pytest.raises(SubscriptionError, match=r"reverse=True .* 'metrics_computed'"):
        EventBus().subscribe("metrics_computed", noop, reverse=True)
