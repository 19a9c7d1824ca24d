"""Callback: on_<event> hooks, @on marks, priorities, ids, ranks, custom events, attach/detach."""

from __future__ import annotations

from typing import ClassVar

import pytest

from trainbus.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    SubscriptionError,
    UnknownEventError,
)
from trainbus.events import Callback, EventBus, EventSpec, Options, on

from .support import MAPS, MODEL, State, emit


def plan_rows(bus: EventBus, event: str | None = None) -> list[tuple[str, str, int]]:
    return [(e.event, e.id, e.priority) for e in bus.plan(event)]


class PrintEpochCallback(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[object, object, State]] = []

    def on_epoch_start(self, *, model: object, maps: object, state: State) -> None:
        self.seen.append((model, maps, state))


def test_seed_hook_signature_subscribes_and_receives_the_payload() -> None:
    bus = EventBus()
    callback = PrintEpochCallback()

    made = bus.attach(callback)
    state = State(epoch_number=3)
    emit(bus, "epoch_start", state)

    assert [(s.event, s.id, s.owner) for s in made] == [
        ("epoch_start", "PrintEpochCallback.on_epoch_start", "PrintEpochCallback")
    ]
    assert callback.seen == [(MODEL, MAPS, state)]


def test_misspelt_hook_is_refused_with_a_did_you_mean() -> None:
    class Misspelt(Callback):
        def on_epoch_ends(self, *, state: State) -> None:
            pass

    bus = EventBus()
    with pytest.raises(SubscriptionError, match="Did you mean 'epoch_end'") as info:
        bus.attach(Misspelt())

    assert "Misspelt.on_epoch_ends" in str(info.value)
    assert bus.plan() == []


def test_hook_with_a_payload_name_the_event_lacks_is_refused() -> None:
    class WantsLoss(Callback):
        def on_epoch_end(self, *, loss: object) -> None:
            pass

    with pytest.raises(SubscriptionError, match="'loss'"):
        EventBus().attach(WantsLoss())


def test_methods_without_on_prefix_are_not_subscribed() -> None:
    class Helpers(Callback):
        def flush(self, *, state: State) -> None:
            raise AssertionError("not a hook")

        def epoch_end(self, *, state: State) -> None:
            raise AssertionError("not a hook")

        def on_train_end(self, *, state: State) -> None:
            pass

    bus = EventBus()
    bus.attach(Helpers())
    emit(bus, "epoch_end")

    assert plan_rows(bus) == [("train_end", "Helpers.on_train_end", 0)]


def test_on_mark_subscribes_a_method_with_any_name() -> None:
    class Flusher(Callback):
        def __init__(self) -> None:
            self.calls: list[int] = []

        @on("train_end")
        def flush(self, *, state: State) -> None:
            self.calls.append(state.epoch_number)

    bus = EventBus()
    callback = Flusher()
    bus.attach(callback)
    emit(bus, "train_end", State(epoch_number=5))

    assert plan_rows(bus) == [("train_end", "Flusher.flush", 0)]
    assert callback.calls == [5]


def test_stacked_marks_subscribe_one_method_to_several_events() -> None:
    class Flusher(Callback):
        def __init__(self) -> None:
            self.calls: list[int] = []

        @on("epoch_end", priority=-10)
        @on("train_end", priority=-20)
        def flush(self, *, state: State) -> None:
            self.calls.append(state.epoch_number)

    bus = EventBus()
    callback = Flusher()
    bus.attach(callback)
    emit(bus, "epoch_end", State(epoch_number=1))
    emit(bus, "train_end", State(epoch_number=2))

    assert plan_rows(bus) == [
        ("epoch_end", "Flusher.flush", -10),
        ("train_end", "Flusher.flush", -20),
    ]
    assert callback.calls == [1, 2]


def test_on_mark_on_an_on_prefixed_method_replaces_its_name_event() -> None:
    class Renamed(Callback):
        @on("train_end")
        def on_epoch_end(self, *, state: State) -> None:
            pass

    bus = EventBus()
    bus.attach(Renamed())

    assert plan_rows(bus) == [("train_end", "Renamed.on_epoch_end", 0)]


def test_on_mark_with_an_unknown_event_is_refused_at_attach() -> None:
    class Typo(Callback):
        @on("train_ends")
        def flush(self, *, state: State) -> None:
            pass

    bus = EventBus()
    with pytest.raises(UnknownEventError, match="Did you mean 'train_end'"):
        bus.attach(Typo())
    assert bus.plan() == []


def test_callback_id_defaults_to_the_class_name_and_can_be_set() -> None:
    callback = PrintEpochCallback()
    assert callback.callback_id == "PrintEpochCallback"

    callback.callback_id = "PrintEpochCallback#2"
    bus = EventBus()
    bus.attach(callback)

    assert [(e.id, e.owner) for e in bus.plan()] == [
        ("PrintEpochCallback#2.on_epoch_start", "PrintEpochCallback#2")
    ]


@pytest.mark.parametrize("value", ["", "  ", 3])
def test_callback_id_must_be_a_non_empty_string(value: object) -> None:
    callback = PrintEpochCallback()
    with pytest.raises(ConfigurationError):
        callback.callback_id = value  # type: ignore[assignment]
    assert callback.callback_id == "PrintEpochCallback"


def test_two_callbacks_with_one_id_are_refused_and_distinct_ids_coexist() -> None:
    bus = EventBus()
    bus.attach(PrintEpochCallback())

    with pytest.raises(SubscriptionError, match="already subscribed"):
        bus.attach(PrintEpochCallback())

    second = PrintEpochCallback()
    second.callback_id = "PrintEpochCallback#2"
    bus.attach(second)
    assert [s.id for s in bus.dispatch_order("epoch_start")] == [
        "PrintEpochCallback.on_epoch_start",
        "PrintEpochCallback#2.on_epoch_start",
    ]


def test_source_and_owner_are_recorded_in_the_plan() -> None:
    bus = EventBus()
    bus.attach(PrintEpochCallback(), source="builtin")

    (entry,) = bus.plan()
    assert (entry.source, entry.owner) == ("builtin", "PrintEpochCallback")


class Prioritised(Callback):
    priority = 5
    priorities: ClassVar[dict[str, int]] = {"epoch_end": -5, "train_end": -1}

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def on_epoch_start(self, *, state: State) -> None:
        self.calls.append("callback.epoch_start")

    def on_epoch_end(self, *, state: State) -> None:
        self.calls.append("callback.epoch_end")

    @on("train_end", priority=50)
    def finish(self, *, state: State) -> None:
        self.calls.append("callback.train_end")


def test_class_priority_per_event_priorities_and_marks_override_in_that_order() -> None:
    bus = EventBus()
    bus.attach(Prioritised([]))

    assert plan_rows(bus) == [
        ("epoch_start", "Prioritised.on_epoch_start", 5),
        ("epoch_end", "Prioritised.on_epoch_end", -5),
        ("train_end", "Prioritised.finish", 50),
    ]


def test_callback_priorities_order_it_against_other_subscribers() -> None:
    bus = EventBus()
    calls: list[str] = []
    for event in ("epoch_start", "epoch_end", "train_end"):
        bus.subscribe(event, lambda *, state, e=event: calls.append(f"plain.{e}"), id="plain")
    bus.attach(Prioritised(calls))

    for event in ("epoch_start", "epoch_end", "train_end"):
        emit(bus, event)

    assert calls == [
        "callback.epoch_start",
        "plain.epoch_start",
        "plain.epoch_end",
        "callback.epoch_end",
        "callback.train_end",
        "plain.train_end",
    ]


def test_priorities_naming_an_unknown_event_are_refused() -> None:
    class Typo(Callback):
        priorities: ClassVar[dict[str, int]] = {"epoch_ends": 3}

        def on_epoch_end(self, *, state: State) -> None:
            pass

    bus = EventBus()
    with pytest.raises(SubscriptionError, match=r"priorities\['epoch_ends'\].*'epoch_end'"):
        bus.attach(Typo())
    assert bus.plan() == []


@pytest.mark.parametrize("priority", [1.5, True, "3"])
def test_non_int_class_priority_is_refused(priority: object) -> None:
    bad = type("Bad", (PrintEpochCallback,), {"priority": priority})

    bus = EventBus()
    with pytest.raises(ConfigurationTypeError, match="is not an int"):
        bus.attach(bad())
    assert bus.plan() == []


@pytest.mark.parametrize("priority", [1.5, True, None])
def test_non_int_per_event_priority_is_refused(priority: object) -> None:
    bad = type("Bad", (PrintEpochCallback,), {"priorities": {"epoch_start": priority}})

    with pytest.raises(ConfigurationTypeError, match="is not an int"):
        EventBus().attach(bad())


def test_on_error_class_attribute_applies_unless_a_mark_overrides_it() -> None:
    class Tolerant(Callback):
        on_error = "log"

        def on_epoch_end(self, *, state: State) -> None:
            pass

        @on("train_end", on_error="raise")
        def strict(self, *, state: State) -> None:
            pass

    bus = EventBus()
    bus.attach(Tolerant())

    assert [(e.event, e.on_error) for e in bus.plan()] == [
        ("epoch_end", "log"),
        ("train_end", "raise"),
    ]


def test_invalid_on_error_class_attribute_is_refused() -> None:
    bad = type("Bad", (PrintEpochCallback,), {"on_error": "ignore"})

    with pytest.raises(ConfigurationError, match="on_error='ignore'"):
        EventBus().attach(bad())


def test_mark_filters_apply_to_the_callback_subscription() -> None:
    class EveryOther(Callback):
        def __init__(self) -> None:
            self.calls: list[int] = []

        @on("batch_end", every=2, id="every-other")
        def tick(self, *, state: State) -> None:
            self.calls.append(state.iteration)

    bus = EventBus()
    callback = EveryOther()
    bus.attach(callback)
    for iteration in range(1, 6):
        emit(bus, "batch_end", State(iteration=iteration))

    assert callback.calls == [2, 4]
    assert [(e.id, e.filter) for e in bus.plan()] == [("every-other", "every=2")]


def test_handlers_yield_bound_methods_with_complete_options() -> None:
    callback = Prioritised([])

    handlers = list(callback.handlers())

    assert [(event, method.__name__) for event, method, _ in handlers] == [
        ("train_end", "finish"),
        ("epoch_end", "on_epoch_end"),
        ("epoch_start", "on_epoch_start"),
    ]
    assert all(method.__self__ is callback for _, method, _ in handlers)
    assert handlers[0][2] == Options(priority=50, on_error="raise", id="Prioritised.finish")
    assert handlers[1][2] == Options(priority=-5, on_error="raise", id="Prioritised.on_epoch_end")


def test_rank_zero_only_callback_is_planned_but_not_called_on_rank_one() -> None:
    class RankZero(PrintEpochCallback):
        rank_zero_only = True

    bus = EventBus(rank=1)
    callback = RankZero()
    bus.attach(callback)
    emit(bus, "epoch_start")

    assert callback.seen == []
    assert not bus.has_subscribers("epoch_start")
    assert [(e.id, e.rank_zero_only, e.active) for e in bus.plan()] == [
        ("RankZero.on_epoch_start", True, False)
    ]


def test_rank_zero_only_callback_is_called_on_rank_zero() -> None:
    class RankZero(PrintEpochCallback):
        rank_zero_only = True

    bus = EventBus(rank=0)
    callback = RankZero()
    bus.attach(callback)
    emit(bus, "epoch_start")

    assert len(callback.seen) == 1
    assert [e.active for e in bus.plan()] == [True]


SAMPLE_LOGGED = EventSpec("sample_logged", payload=("value",))


def test_custom_events_of_a_callback_are_declared_on_attach() -> None:
    class Sampler(Callback):
        events = (SAMPLE_LOGGED,)

        def __init__(self) -> None:
            self.values: list[object] = []

        def on_sample_logged(self, *, value: object) -> None:
            self.values.append(value)

        @on("sample_logged", priority=1)
        def first(self, *, value: object) -> None:
            self.values.append(("first", value))

    bus = EventBus()
    callback = Sampler()
    bus.attach(callback)
    emit(bus, "sample_logged", value=7)

    assert bus.events["sample_logged"] == SAMPLE_LOGGED
    assert callback.values == [("first", 7), 7]


def test_hook_for_an_undeclared_custom_event_is_refused() -> None:
    class Sampler(Callback):
        def on_sample_logged(self, *, value: object) -> None:
            pass

    with pytest.raises(SubscriptionError, match="declare the custom event"):
        EventBus().attach(Sampler())


def test_failing_attach_leaves_no_half_registered_subscriptions() -> None:
    class HalfBroken(Callback):
        def on_epoch_end(self, *, state: State) -> None:
            pass

        def on_epoch_start(self, *, state: State) -> None:
            pass

        def on_train_end(self, *, loss: object) -> None:
            pass

    bus = EventBus()
    bus.subscribe("epoch_end", lambda *, state: None, id="existing")
    order_before = [s.id for s in bus.dispatch_order("epoch_end")]

    with pytest.raises(SubscriptionError, match="'loss'"):
        bus.attach(HalfBroken())

    assert [e.id for e in bus.plan()] == ["existing"]
    assert [s.id for s in bus.dispatch_order("epoch_end")] == order_before
    assert not bus.has_subscribers("epoch_start")
    assert not bus.has_subscribers("train_end")


def test_failing_attach_on_a_misspelt_second_hook_rolls_back() -> None:
    class HalfBroken(Callback):
        def on_epoch_end(self, *, state: State) -> None:
            pass

        def on_epoch_ends(self, *, state: State) -> None:
            pass

    bus = EventBus()
    with pytest.raises(SubscriptionError, match="Did you mean"):
        bus.attach(HalfBroken())

    assert bus.plan() == []
    assert bus.dispatch_order("epoch_end") == ()


def test_detach_removes_every_subscription_of_the_callback() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("epoch_end", lambda *, state: calls.append("plain"), id="plain")
    bus.attach(Prioritised(calls))
    before = bus.dispatch_order("epoch_end")

    bus.detach("Prioritised")
    for event in ("epoch_start", "epoch_end", "train_end"):
        emit(bus, event)

    assert calls == ["plain"]
    assert bus.dispatch_order("epoch_end") is not before
    assert [e.id for e in bus.plan()] == ["plain"]


def test_detach_of_an_unknown_id_changes_nothing() -> None:
    bus = EventBus()
    bus.attach(PrintEpochCallback())
    before = bus.dispatch_order("epoch_start")

    bus.detach("Nobody")

    assert bus.dispatch_order("epoch_start") is before


def test_subclass_override_replaces_the_inherited_hook() -> None:
    class Base(Callback):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def on_epoch_end(self, *, state: State) -> None:
            self.calls.append("base")

        def on_train_end(self, *, state: State) -> None:
            self.calls.append("base.train_end")

    class Child(Base):
        def on_epoch_end(self, *, state: State) -> None:
            self.calls.append("child")

    bus = EventBus()
    callback = Child()
    bus.attach(callback)
    emit(bus, "epoch_end")
    emit(bus, "train_end")

    assert callback.calls == ["child", "base.train_end"]
    assert [e.id for e in bus.plan()] == ["Child.on_epoch_end", "Child.on_train_end"]


def test_subclass_can_disable_an_inherited_hook_with_none() -> None:
    class Child(PrintEpochCallback):
        on_epoch_start = None  # type: ignore[assignment]

    bus = EventBus()
    bus.attach(Child())

    assert bus.plan() == []


def test_config_state_dict_and_repr_defaults() -> None:
    class Configured(Callback):
        def __init__(self) -> None:
            self.patience = 3
            self.monitor = "loss"
            self.history: list[float] = []
            self._private = 1

    callback = Configured()

    assert callback.config() == {"patience": 3, "monitor": "loss"}
    assert callback.state_dict() == {}
    assert repr(callback) == "Configured(patience=3, monitor='loss')"
