"""EventBus: ordering, filters, registration checks, custom events, failures, plans, blinker."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import blinker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainbus.errors import (
    CommandError,
    ConfigurationError,
    ConfigurationTypeError,
    HandlerFailureWarning,
    SubscriptionError,
    UnknownEventError,
)
from trainbus.events import (
    EVENTS,
    EventBus,
    EventSpec,
    HandlerFailure,
    PlanEntry,
    SkipStep,
    Stop,
    Subscription,
)

from .support import MAPS, MODEL, State, emit


def recorder(calls: list[str], name: str) -> Callable[..., None]:
    def handler(*, state: State) -> None:
        calls.append(name)

    return handler


def record_epoch(*, state: State) -> None:
    """A module-level handler, for derived ids."""


def ids(subscriptions: tuple[Subscription, ...] | list[Subscription]) -> list[str]:
    return [s.id for s in subscriptions]


# ------------------------------------------------------------------------------ ordering


def test_higher_priority_runs_first() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("epoch_end", recorder(calls, "zero"), priority=0, id="zero")
    bus.subscribe("epoch_end", recorder(calls, "high"), priority=10, id="high")
    bus.subscribe("epoch_end", recorder(calls, "low"), priority=-5, id="low")

    emit(bus, "epoch_end")

    assert calls == ["high", "zero", "low"]
    assert ids(bus.dispatch_order("epoch_end")) == ["high", "zero", "low"]


def test_equal_priorities_run_in_registration_order() -> None:
    bus = EventBus()
    calls: list[str] = []
    for name in ("first", "second", "third"):
        bus.subscribe("epoch_end", recorder(calls, name), priority=3, id=name)
    bus.subscribe("epoch_end", recorder(calls, "later-but-higher"), priority=4, id="higher")

    emit(bus, "epoch_end")

    assert calls == ["later-but-higher", "first", "second", "third"]


def test_dispatch_order_is_cached_while_nothing_changes() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", record_epoch, id="a")
    first = bus.dispatch_order("epoch_end")

    emit(bus, "epoch_end")

    assert bus.dispatch_order("epoch_end") is first


def test_dispatch_order_is_rebuilt_on_subscribe_and_unsubscribe() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", record_epoch, id="a")
    before = bus.dispatch_order("epoch_end")

    added = bus.subscribe("epoch_end", record_epoch, id="b", priority=1)
    after_subscribe = bus.dispatch_order("epoch_end")
    assert after_subscribe is not before
    assert ids(after_subscribe) == ["b", "a"]

    bus.unsubscribe(added)
    after_unsubscribe = bus.dispatch_order("epoch_end")
    assert after_unsubscribe is not after_subscribe
    assert ids(after_unsubscribe) == ["a"]


def test_dispatch_order_is_rebuilt_on_detach() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", record_epoch, id="kept")
    bus.subscribe("epoch_end", record_epoch, id="owned", owner="Owner", priority=5)
    bus.subscribe("train_end", record_epoch, id="owned-too", owner="Owner")
    before = bus.dispatch_order("epoch_end")
    assert ids(before) == ["owned", "kept"]

    bus.detach("Owner")

    assert bus.dispatch_order("epoch_end") is not before
    assert ids(bus.dispatch_order("epoch_end")) == ["kept"]
    assert bus.dispatch_order("train_end") == ()
    assert not bus.has_subscribers("train_end")


def test_event_without_subscribers_has_an_empty_order() -> None:
    bus = EventBus()
    sub = bus.subscribe("epoch_end", record_epoch)
    bus.unsubscribe(sub)

    assert bus.dispatch_order("epoch_end") == ()
    assert not bus.has_subscribers("epoch_end")
    assert bus.plan("epoch_end") == []


@settings(max_examples=50, deadline=None)
@given(
    priorities=st.lists(st.integers(-1000, 1000), min_size=1, max_size=8, unique=True),
    data=st.data(),
)
def test_distinct_priorities_give_the_same_plan_in_any_registration_order(
    priorities: list[int], data: st.DataObject
) -> None:
    permutation = data.draw(st.permutations(priorities))
    plans = []
    for order in (priorities, permutation):
        bus = EventBus()
        for priority in order:
            bus.subscribe("epoch_end", record_epoch, priority=priority, id=f"p{priority}")
        plans.append([(e.id, e.priority) for e in bus.plan("epoch_end")])

    expected = [(f"p{p}", p) for p in sorted(priorities, reverse=True)]
    assert plans[0] == expected
    assert plans[1] == expected


@settings(max_examples=50, deadline=None)
@given(
    priorities=st.lists(st.integers(-2, 2), min_size=1, max_size=10),
    data=st.data(),
)
def test_tied_priorities_keep_registration_order_in_any_permutation(
    priorities: list[int], data: st.DataObject
) -> None:
    registration = data.draw(st.permutations(range(len(priorities))))
    bus = EventBus()
    calls: list[str] = []
    for index in registration:
        name = f"s{index}"
        bus.subscribe("epoch_end", recorder(calls, name), priority=priorities[index], id=name)

    emit(bus, "epoch_end")

    expected = [f"s{i}" for i in sorted(registration, key=lambda i: -priorities[i])]
    assert [e.id for e in bus.plan("epoch_end")] == expected
    assert calls == expected


# ------------------------------------------------------------------------ strong refs


def _subscribe_local_closure(bus: EventBus, calls: list[int]) -> None:
    def local_handler(*, state: State) -> None:
        calls.append(state.epoch_number)

    bus.subscribe("epoch_end", local_handler)


class _Recorder:
    def __init__(self, calls: list[int]) -> None:
        self.calls = calls

    def handle(self, *, state: State) -> None:
        self.calls.append(state.epoch_number)


def test_closure_registered_in_a_function_survives_garbage_collection() -> None:
    bus = EventBus()
    calls: list[int] = []
    _subscribe_local_closure(bus, calls)
    gc.collect()

    emit(bus, "epoch_end", State(epoch_number=7))

    assert calls == [7]


def test_bound_method_of_an_unreferenced_object_survives_garbage_collection() -> None:
    bus = EventBus()
    calls: list[int] = []
    bus.subscribe("epoch_end", _Recorder(calls).handle)
    bus.subscribe("epoch_end", lambda *, state: calls.append(-state.epoch_number))
    gc.collect()

    emit(bus, "epoch_end", State(epoch_number=2))

    assert calls == [2, -2]


# ---------------------------------------------------------------------------- filters


def fired_at(bus: EventBus, event: str, times: int, state: State, **options: Any) -> list[int]:
    """Emit ``event`` ``times`` times; return the 1-based emissions a filtered handler ran at."""
    emitted = 0
    fired: list[int] = []

    def handler(*, state: State) -> None:
        fired.append(emitted)

    bus.subscribe(event, handler, **options)
    for _ in range(times):
        emitted += 1
        emit(bus, event, state)
    return fired


def test_every_on_an_iteration_counted_event_uses_state_iteration() -> None:
    bus = EventBus()
    states = [State(iteration=i, epoch_number=3) for i in range(1, 8)]
    calls: list[int] = []
    bus.subscribe("batch_end", lambda *, state: calls.append(state.iteration), every=3)

    for state in states:
        emit(bus, "batch_end", state)

    assert calls == [3, 6]


def test_every_on_an_epoch_counted_event_uses_state_epoch_number() -> None:
    bus = EventBus()
    calls: list[int] = []
    bus.subscribe("epoch_end", lambda *, state: calls.append(state.epoch_number), every=2)

    for epoch in range(1, 6):
        emit(bus, "epoch_end", State(iteration=epoch * 10, epoch_number=epoch))

    assert calls == [2, 4]


def test_every_on_an_event_without_counter_counts_occurrences() -> None:
    bus = EventBus()
    fired = fired_at(bus, "validation_end", 5, State(iteration=6, epoch_number=6), every=2)

    assert fired == [2, 4]
    (memory,) = bus.state_dict()["filters"].values()
    assert memory == {"seen": 5, "fired_once": False}


def test_filtered_subscription_does_not_filter_its_neighbours() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("batch_end", recorder(calls, "every"), every=2, id="every")
    bus.subscribe("batch_end", recorder(calls, "always"), id="always")

    for iteration in (1, 2, 3):
        emit(bus, "batch_end", State(iteration=iteration))

    assert calls == ["always", "every", "always", "always"]


def test_once_true_fires_only_the_first_time() -> None:
    bus = EventBus()
    calls: list[int] = []
    bus.subscribe("batch_end", lambda *, state: calls.append(state.iteration), once=True)

    for iteration in (5, 6, 7):
        emit(bus, "batch_end", State(iteration=iteration))

    assert calls == [5]


def test_once_n_fires_only_at_the_nth_count() -> None:
    bus = EventBus()
    calls: list[int] = []
    bus.subscribe("batch_end", lambda *, state: calls.append(state.iteration), once=3)

    for iteration in range(1, 7):
        emit(bus, "batch_end", State(iteration=iteration))

    assert calls == [3]


def test_once_n_on_an_event_without_counter_fires_at_the_nth_occurrence() -> None:
    bus = EventBus()
    fired = fired_at(bus, "validation_end", 4, State(iteration=2), once=2)

    assert fired == [2]


def test_when_predicate_gates_each_call() -> None:
    bus = EventBus()
    calls: list[int] = []
    bus.subscribe(
        "batch_end",
        lambda *, state: calls.append(state.iteration),
        when=lambda state: state.iteration > 2,
    )

    for iteration in range(1, 5):
        emit(bus, "batch_end", State(iteration=iteration))

    assert calls == [3, 4]


def test_once_is_not_used_up_while_the_predicate_is_false() -> None:
    bus = EventBus()
    calls: list[int] = []
    bus.subscribe(
        "batch_end",
        lambda *, state: calls.append(state.iteration),
        once=True,
        when=lambda state: state.iteration >= 2,
    )

    for iteration in range(1, 5):
        emit(bus, "batch_end", State(iteration=iteration))

    assert calls == [2]


def test_every_and_once_together_are_refused() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="one counting filter"):
        bus.subscribe("batch_end", record_epoch, every=2, once=True)
    assert bus.plan() == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"every": 0}, ConfigurationError),
        ({"every": -2}, ConfigurationError),
        ({"every": True}, ConfigurationError),
        ({"every": 1.5}, ConfigurationError),
        ({"once": 0}, ConfigurationError),
        ({"once": False}, ConfigurationError),
        ({"once": "first"}, ConfigurationError),
        ({"when": True}, ConfigurationTypeError),
        ({"on_error": "ignore"}, ConfigurationError),
        ({"id": ""}, ConfigurationError),
        ({"id": "   "}, ConfigurationError),
    ],
)
def test_invalid_subscription_options_are_refused(
    options: dict[str, Any], error: type[Exception]
) -> None:
    bus = EventBus()
    with pytest.raises(error):
        bus.subscribe("batch_end", record_epoch, **options)
    assert not bus.has_subscribers("batch_end")


def _filtered_bus() -> tuple[EventBus, list[str]]:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("validation_end", recorder(calls, "every"), every=2, id="every")
    bus.subscribe("epoch_end", recorder(calls, "once"), once=True, id="once")
    return bus, calls


def test_state_dict_round_trip_lets_a_new_bus_continue_counting() -> None:
    bus, calls = _filtered_bus()
    for _ in range(3):
        emit(bus, "validation_end")
    emit(bus, "epoch_end")
    assert calls == ["every", "once"]

    saved = json.loads(json.dumps(bus.state_dict()))
    assert saved == {
        "filters": {
            "validation_end:every": {"seen": 3, "fired_once": False},
            "epoch_end:once": {"seen": 0, "fired_once": True},
        }
    }

    resumed, resumed_calls = _filtered_bus()
    resumed.load_state_dict(saved)
    emit(resumed, "validation_end")
    emit(resumed, "epoch_end")

    assert resumed_calls == ["every"]
    assert resumed.state_dict()["filters"]["validation_end:every"]["seen"] == 4


def test_once_flags_loaded_before_subscribing_still_apply() -> None:
    bus = EventBus()
    bus.load_state_dict({"filters": {"epoch_end:once": {"seen": 0, "fired_once": True}}})
    calls: list[str] = []
    bus.subscribe("epoch_end", recorder(calls, "once"), once=True, id="once")

    emit(bus, "epoch_end")

    assert calls == []


def test_once_flags_of_same_id_on_two_events_are_independent_after_resume() -> None:
    def build() -> tuple[EventBus, list[str]]:
        bus = EventBus()
        calls: list[str] = []
        bus.subscribe("epoch_end", recorder(calls, "epoch_end"), once=True, id="flush")
        bus.subscribe("train_end", recorder(calls, "train_end"), once=True, id="flush")
        return bus, calls

    bus, _ = build()
    emit(bus, "epoch_end")
    resumed, calls = build()
    resumed.load_state_dict(bus.state_dict())

    emit(resumed, "train_end")

    assert calls == ["train_end"]


# ----------------------------------------------------------------------- registration


def test_unknown_event_is_refused_with_a_did_you_mean_hint() -> None:
    bus = EventBus()
    with pytest.raises(UnknownEventError, match="Did you mean 'epoch_end'") as info:
        bus.subscribe("epoch_ends", record_epoch)
    assert isinstance(info.value, ValueError)
    assert "bus.declare(EventSpec" in str(info.value)


def test_unknown_non_string_event_is_refused() -> None:
    with pytest.raises(UnknownEventError):
        EventBus().subscribe(["epoch_end"], record_epoch)  # type: ignore[arg-type]


def test_handler_asking_for_a_missing_payload_name_is_refused() -> None:
    def wants_loss(*, state: State, loss: object) -> None:
        pass

    bus = EventBus()
    with pytest.raises(SubscriptionError) as info:
        bus.subscribe("epoch_end", wants_loss)

    message = str(info.value)
    assert "'loss'" in message
    assert "It provides: maps, model, state." in message
    assert not bus.has_subscribers("epoch_end")


def test_parameter_with_a_default_is_accepted_and_keeps_its_default() -> None:
    received: list[tuple[object, object]] = []

    def handler(*, state: State, loss: object = "default", batch: object = "unset") -> None:
        received.append((loss, batch))

    bus = EventBus()
    bus.subscribe("epoch_end", handler)
    bus.subscribe("batch_end", handler)

    emit(bus, "epoch_end")
    emit(bus, "batch_end", batch="the batch")

    assert received == [("default", "unset"), (None, "the batch")]


def test_handler_receives_only_the_names_it_asks_for() -> None:
    received: list[tuple[object, object]] = []

    def handler(*, maps: object, batch: object) -> None:
        received.append((maps, batch))

    bus = EventBus()
    bus.subscribe("batch_start", handler)
    emit(bus, "batch_start", batch="b")

    assert received == [(MAPS, "b")]


def test_positional_or_keyword_parameter_is_passed_by_keyword() -> None:
    received: list[State] = []

    def handler(state: State) -> None:
        received.append(state)

    bus = EventBus()
    bus.subscribe("epoch_end", handler)
    state = State(epoch_number=4)
    emit(bus, "epoch_end", state)

    assert received == [state]


def test_var_keyword_handler_receives_the_whole_payload() -> None:
    received: list[dict[str, Any]] = []

    def handler(**payload: Any) -> None:
        received.append(payload)

    bus = EventBus()
    bus.subscribe("batch_end", handler)
    state = State(iteration=2)
    emit(bus, "batch_end", state, batch="b", loss=1.0, losses={"loss": 1.0})

    assert received == [
        {
            "state": state,
            "model": MODEL,
            "maps": MAPS,
            "batch": "b",
            "loss": 1.0,
            "losses": {"loss": 1.0},
        }
    ]
    assert set(received[0]) == EVENTS["batch_end"].payload_names


def test_positional_only_parameter_is_refused() -> None:
    def handler(state: State, /) -> None:
        pass

    with pytest.raises(SubscriptionError, match="positional parameter 'state'"):
        EventBus().subscribe("epoch_end", handler)


def test_var_positional_parameter_is_refused() -> None:
    def handler(*args: Any) -> None:
        pass

    with pytest.raises(SubscriptionError, match="positional parameter 'args'"):
        EventBus().subscribe("epoch_end", handler)


@pytest.mark.parametrize("priority", [1.5, "10", True, False, None])
def test_non_int_priority_is_refused(priority: object) -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationTypeError, match="is not an int"):
        bus.subscribe("epoch_end", record_epoch, priority=priority)  # type: ignore[arg-type]
    assert bus.plan() == []


def test_non_callable_handler_is_refused() -> None:
    with pytest.raises(ConfigurationTypeError, match="not callable"):
        EventBus().subscribe("epoch_end", "record_epoch")  # type: ignore[arg-type]


def test_duplicate_explicit_id_on_one_event_is_refused() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", record_epoch, id="writer")

    with pytest.raises(SubscriptionError, match="'writer' is already subscribed to 'epoch_end'"):
        bus.subscribe("epoch_end", lambda *, state: None, id="writer")

    assert ids(bus.dispatch_order("epoch_end")) == ["writer"]
    other = bus.subscribe("train_end", record_epoch, id="writer")
    assert other.id == "writer"


def test_derived_ids_get_numbered_suffixes() -> None:
    bus = EventBus()
    base = f"{record_epoch.__module__}.{record_epoch.__qualname__}"

    made = [bus.subscribe("epoch_end", record_epoch) for _ in range(3)]

    assert [s.id for s in made] == [base, f"{base}#2", f"{base}#3"]


def test_derived_id_with_an_owner_uses_the_owner_name() -> None:
    bus = EventBus()
    first = bus.subscribe("epoch_end", record_epoch, owner="Owner")
    second = bus.subscribe("epoch_end", record_epoch, owner="Owner")

    assert (first.id, second.id) == ("Owner.record_epoch", "Owner.record_epoch#2")


def test_derived_id_skips_suffixes_already_taken() -> None:
    bus = EventBus()
    base = f"{record_epoch.__module__}.{record_epoch.__qualname__}"
    bus.subscribe("epoch_end", record_epoch)
    bus.subscribe("epoch_end", record_epoch, id=f"{base}#2")

    assert bus.subscribe("epoch_end", record_epoch).id == f"{base}#3"


# ---------------------------------------------------------------------- custom events


def test_declared_custom_event_can_be_subscribed_and_emitted() -> None:
    bus = EventBus()
    spec = EventSpec("sample_logged", payload=("value",))
    received: list[tuple[object, int]] = []

    assert bus.declare(spec) is spec
    bus.subscribe(
        "sample_logged", lambda *, value, state: received.append((value, state.iteration))
    )
    emit(bus, "sample_logged", State(iteration=9), value=0.5)

    assert received == [(0.5, 9)]
    assert bus.events["sample_logged"] == spec
    assert "sample_logged" not in EVENTS


def test_custom_event_is_declared_on_one_bus_only() -> None:
    EventBus().declare(EventSpec("sample_logged", payload=("value",)))

    with pytest.raises(UnknownEventError):
        EventBus().subscribe("sample_logged", record_epoch)


def test_custom_event_payload_is_checked_at_registration() -> None:
    bus = EventBus()
    bus.declare(EventSpec("sample_logged", payload=("value",)))

    with pytest.raises(SubscriptionError, match="It provides: maps, model, state, value"):
        bus.subscribe("sample_logged", lambda *, loss: None)


@pytest.mark.parametrize(
    "spec",
    [
        EventSpec("SampleLogged"),
        EventSpec("sample-logged"),
        EventSpec("1st_sample"),
        EventSpec(""),
        EventSpec("sample logged"),
        EventSpec("sample_logged", payload=("state",)),
        EventSpec("sample_logged", payload=("value", "maps")),
        EventSpec("sample_logged", payload=("value", "value")),
        EventSpec("sample_logged", payload=("not valid",)),
        EventSpec("sample_logged", payload=("1value",)),
        EventSpec("sample_logged", payload=(3,)),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_invalid_custom_spec_is_refused(spec: EventSpec) -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError):
        bus.declare(spec)
    assert set(bus.events) == set(EVENTS)


def test_string_payload_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        EventBus().declare(EventSpec("sample_logged", payload="value"))  # type: ignore[arg-type]


def test_declare_refuses_something_that_is_not_a_spec() -> None:
    with pytest.raises(ConfigurationTypeError, match="takes an EventSpec"):
        EventBus().declare("sample_logged")  # type: ignore[arg-type]


def test_redeclaring_the_same_spec_is_a_no_op() -> None:
    bus = EventBus()
    bus.declare(EventSpec("sample_logged", payload=("value",)))
    bus.subscribe("sample_logged", lambda *, value: None, id="kept")

    bus.declare(EventSpec("sample_logged", payload=("value",)))
    bus.declare(EVENTS["epoch_end"])

    assert ids(bus.dispatch_order("sample_logged")) == ["kept"]
    assert bus.events["epoch_end"] == EVENTS["epoch_end"]


@pytest.mark.parametrize(
    "spec",
    [
        EventSpec("sample_logged", payload=("other",)),
        EventSpec("sample_logged", payload=("value",), counter="iteration"),
        EventSpec("epoch_end"),
    ],
)
def test_redeclaring_a_different_spec_under_a_known_name_is_refused(spec: EventSpec) -> None:
    bus = EventBus()
    original = bus.declare(EventSpec("sample_logged", payload=("value",)))

    with pytest.raises(SubscriptionError, match="already declared"):
        bus.declare(spec)

    assert bus.events["sample_logged"] == original
    assert bus.events["epoch_end"] == EVENTS["epoch_end"]


def test_custom_event_with_a_counter_filters_on_that_state_attribute() -> None:
    bus = EventBus()
    bus.declare(EventSpec("sample_logged", payload=("value",), counter="iteration"))
    calls: list[int] = []
    bus.subscribe("sample_logged", lambda *, state: calls.append(state.iteration), every=2)

    for iteration in (1, 2, 3, 4):
        emit(bus, "sample_logged", State(iteration=iteration))

    assert calls == [2, 4]


# -------------------------------------------------------------------- dispatch errors


def test_handler_exception_propagates_with_a_note_and_stops_dispatch() -> None:
    def broken(*, state: State) -> None:
        raise ValueError("boom")

    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("epoch_end", broken, priority=1, id="broken-handler")
    bus.subscribe("epoch_end", recorder(calls, "after"), id="after")

    with pytest.raises(ValueError, match="boom") as info:
        emit(bus, "epoch_end")

    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1
    assert "'broken-handler'" in notes[0]
    assert "'epoch_end'" in notes[0]
    assert calls == []
    assert bus.failures == []


def test_logged_failure_lets_dispatch_go_on_and_is_recorded() -> None:
    def broken(*, state: State) -> None:
        raise ValueError("boom")

    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("epoch_end", broken, priority=1, id="broken-handler", on_error="log")
    bus.subscribe("epoch_end", recorder(calls, "after"), id="after")

    with pytest.warns(HandlerFailureWarning, match="'broken-handler' raised ValueError: boom"):
        requests = emit(bus, "epoch_end")

    assert requests == []
    assert calls == ["after"]
    assert len(bus.failures) == 1
    failure = bus.failures[0]
    assert isinstance(failure, HandlerFailure)
    assert (failure.event, failure.subscriber, failure.error) == (
        "epoch_end",
        "broken-handler",
        "ValueError: boom",
    )
    assert "raise ValueError" in failure.traceback
    assert failure.counter is None


def test_logged_failure_records_the_filter_counter() -> None:
    def broken(*, state: State) -> None:
        raise RuntimeError("late")

    bus = EventBus()
    bus.subscribe("batch_end", broken, every=2, on_error="log")

    emit(bus, "batch_end", State(iteration=1))
    with pytest.warns(HandlerFailureWarning):
        emit(bus, "batch_end", State(iteration=2))

    assert [(f.counter, f.error) for f in bus.failures] == [(2, "RuntimeError: late")]


def test_logged_subscription_does_not_swallow_base_exceptions() -> None:
    def interrupted(*, state: State) -> None:
        raise KeyboardInterrupt

    bus = EventBus()
    bus.subscribe("epoch_end", interrupted, on_error="log")

    with pytest.raises(KeyboardInterrupt):
        emit(bus, "epoch_end")
    assert bus.failures == []


# ------------------------------------------------------------------------------ plans


def test_plan_entries_describe_every_subscription() -> None:
    def is_late(state: State) -> bool:
        return state.iteration > 10

    bus = EventBus()
    bus.subscribe("batch_end", record_epoch, id="every", priority=5, every=2, source="builtin")
    bus.subscribe("batch_end", record_epoch, id="plain", owner="Owner", on_error="log")
    bus.subscribe("batch_end", record_epoch, id="late", priority=-1, when=is_late)
    bus.subscribe("epoch_end", record_epoch, id="once", once=True, rank_zero_only=True)
    bus.subscribe("epoch_end", record_epoch, id="third", once=3)

    def stopper(*, state: State) -> Stop | None:
        return None

    bus.subscribe("epoch_end", stopper, id="stopper")

    plan = bus.plan()

    assert [entry.commands for entry in plan] == [False] * 5 + [True]
    assert [replace(entry, commands=True) for entry in plan[:5]] == [
        PlanEntry("batch_end", 1, "every", 5, "every=2", "builtin", None, "raise", False, True),
        PlanEntry("batch_end", 2, "plain", 0, "-", "user", "Owner", "log", False, True),
        PlanEntry(
            "batch_end",
            3,
            "late",
            -1,
            f"when={is_late.__qualname__}",
            "user",
            None,
            "raise",
            False,
            True,
        ),
        PlanEntry("epoch_end", 1, "once", 0, "once", "user", None, "raise", True, True),
        PlanEntry("epoch_end", 2, "third", 0, "once=3", "user", None, "raise", False, True),
    ]
    assert plan[0].as_dict() == {
        "event": "batch_end",
        "position": 1,
        "id": "every",
        "priority": 5,
        "filter": "every=2",
        "source": "builtin",
        "owner": None,
        "on_error": "raise",
        "rank_zero_only": False,
        "active": True,
        "order": "-",
        "commands": False,
    }
    json.dumps([entry.as_dict() for entry in plan])


def test_plan_of_one_event_lists_only_that_event() -> None:
    bus = EventBus()
    bus.subscribe("batch_end", record_epoch, id="a")
    bus.subscribe("epoch_end", record_epoch, id="b")
    bus.subscribe("epoch_end", record_epoch, id="c", priority=1)

    assert [(e.event, e.position, e.id) for e in bus.plan("epoch_end")] == [
        ("epoch_end", 1, "c"),
        ("epoch_end", 2, "b"),
    ]
    assert bus.plan("train_end") == []


def test_plan_follows_catalogue_order_of_events() -> None:
    bus = EventBus()
    bus.subscribe("train_end", record_epoch)
    bus.subscribe("train_start", record_epoch)
    bus.subscribe("epoch_end", record_epoch)

    assert [e.event for e in bus.plan()] == ["train_start", "epoch_end", "train_end"]


def test_plan_of_an_unknown_event_raises() -> None:
    with pytest.raises(UnknownEventError, match="Did you mean 'epoch_end'"):
        EventBus().plan("epoch_edn")


def test_rank_zero_only_subscription_is_planned_but_not_called_on_other_ranks() -> None:
    bus = EventBus(rank=1)
    calls: list[str] = []
    bus.subscribe("epoch_end", recorder(calls, "rank0"), id="rank0", rank_zero_only=True)
    bus.subscribe("epoch_end", recorder(calls, "all"), id="all")

    emit(bus, "epoch_end")

    assert calls == ["all"]
    assert ids(bus.dispatch_order("epoch_end")) == ["all"]
    assert [(e.id, e.rank_zero_only, e.active) for e in bus.plan("epoch_end")] == [
        ("rank0", True, False),
        ("all", False, True),
    ]
    assert ids(bus.subscriptions("epoch_end")) == ["rank0", "all"]


def test_rank_zero_only_alone_leaves_no_subscribers_on_other_ranks() -> None:
    bus = EventBus(rank=1)
    bus.subscribe("epoch_end", record_epoch, rank_zero_only=True)

    assert not bus.has_subscribers("epoch_end")
    assert len(bus.plan("epoch_end")) == 1


def test_rank_zero_only_subscription_is_called_on_rank_zero() -> None:
    bus = EventBus(rank=0)
    calls: list[str] = []
    bus.subscribe("epoch_end", recorder(calls, "rank0"), rank_zero_only=True)

    emit(bus, "epoch_end")

    assert calls == ["rank0"]


# ------------------------------------------------------------------------- accounting


def test_calls_are_counted_and_timing_is_sampled_when_asked() -> None:
    bus = EventBus()
    sub = bus.subscribe("batch_end", record_epoch)
    bus.measure_time(2)

    for iteration in range(1, 6):
        emit(bus, "batch_end", State(iteration=iteration))

    assert sub.calls == 5
    assert sub.timed_calls == 2
    assert sub.seconds >= 0.0


@pytest.mark.parametrize("value", [-1, 1.0, True, "2"])
def test_measure_time_refuses_non_counts(value: object) -> None:
    with pytest.raises(ConfigurationTypeError):
        EventBus().measure_time(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- blinker


def test_signal_is_a_named_signal_of_the_bus_own_namespace() -> None:
    bus = EventBus()
    signal = bus.signal("epoch_end")

    assert isinstance(signal, blinker.NamedSignal)
    assert signal.name == "epoch_end"
    assert bus.signal("epoch_end") is signal
    assert EventBus().signal("epoch_end") is not signal
    assert blinker.default_namespace.get("epoch_end") is not signal


def test_signal_of_an_unknown_event_raises() -> None:
    with pytest.raises(UnknownEventError):
        EventBus().signal("epoch_edn")


def test_subscriptions_are_the_receivers_of_the_signal() -> None:
    bus = EventBus()
    sub = bus.subscribe("epoch_end", lambda *, state: state.epoch_number * 10)
    state = State(epoch_number=3)

    results = bus.signal("epoch_end").send(None, state=state, model=MODEL, maps=MAPS)

    assert list(bus.signal("epoch_end").receivers.values()) == [sub]
    assert results == [(sub, 30)]


def test_connecting_a_raw_function_through_blinker_is_refused() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("epoch_end", recorder(calls, "a"), id="a", priority=1)
    bus.subscribe("epoch_end", recorder(calls, "b"), id="b")
    before = ids(bus.dispatch_order("epoch_end"))

    def raw(sender: object, **payload: Any) -> None:
        calls.append("raw")

    signal = bus.signal("epoch_end")
    with pytest.raises(SubscriptionError, match=r"bus\.subscribe\(\)"):
        signal.connect(raw, weak=False)

    assert ids(bus.dispatch_order("epoch_end")) == before
    assert len(signal.receivers) == 2
    emit(bus, "epoch_end")
    assert calls == ["a", "b"]


# ------------------------------------------------------------------------------- emit


def test_emit_without_subscribers_returns_empty_and_calls_nothing() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("epoch_start", recorder(calls, "other"))

    assert emit(bus, "epoch_end") == []
    assert calls == []
    assert bus.state_dict() == {"filters": {}}


def test_emit_of_an_unknown_event_raises() -> None:
    bus = EventBus()
    with pytest.raises(UnknownEventError, match="Did you mean 'epoch_end'"):
        bus.emit("epoch_ends", state=State(), model=MODEL, maps=MAPS)


def test_a_log_subscriber_returning_a_non_command_is_recorded_not_raised() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe("epoch_end", lambda *, state: "oops", on_error="log", id="sloppy")
    bus.subscribe("epoch_end", recorder(calls, "after"), priority=-1)

    with pytest.warns(HandlerFailureWarning, match="sloppy"):
        requests = emit(bus, "epoch_end")

    assert requests == []
    assert calls == ["after"]
    assert [f.subscriber for f in bus.failures] == ["sloppy"]
    assert "CommandError" in bus.failures[0].error


def test_skip_step_error_lists_custom_skippable_events_too() -> None:
    bus = EventBus()
    bus.declare(EventSpec("augment_start", skippable=True))
    bus.subscribe("epoch_end", lambda *, state: SkipStep(), id="skipper")

    with pytest.raises(CommandError, match="augment_start"):
        emit(bus, "epoch_end")


def test_call_counts_stay_exact_on_the_fast_path() -> None:
    bus = EventBus()
    first = bus.subscribe("batch_end", record_epoch, id="first")
    emit(bus, "batch_end", State())
    emit(bus, "batch_end", State())
    second = bus.subscribe("batch_end", record_epoch, id="second")  # rebuilds the plan
    emit(bus, "batch_end", State())
    bus.measure_time(2)  # every second dispatch goes through the timed path
    emit(bus, "batch_end", State())
    emit(bus, "batch_end", State())
    assert (first.calls, second.calls) == (5, 3)
    assert first.timed_calls == 1


def test_a_failing_handler_on_the_fast_path_is_named_and_later_ones_are_not_counted() -> None:
    def fail(*, state: State) -> None:
        raise RuntimeError("broken")

    bus = EventBus()
    before = bus.subscribe("batch_end", record_epoch, id="before", priority=1)
    failing = bus.subscribe("batch_end", fail, id="failing")
    after = bus.subscribe("batch_end", record_epoch, id="after", priority=-1)
    with pytest.raises(RuntimeError, match="broken") as caught:
        emit(bus, "batch_end", State())
    assert "handler 'failing' while handling event 'batch_end'" in "".join(caught.value.__notes__)
    assert (before.calls, failing.calls, after.calls) == (1, 1, 0)
