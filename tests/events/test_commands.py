"""Commands returned by handlers: requests, validation at the event, merge policy, safe tags."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from trainbus.errors import CommandError, ConfigurationError, HandlerFailureWarning
from trainbus.events import (
    EVENTS,
    Decision,
    EventBus,
    EventSpec,
    Request,
    SaveCheckpoint,
    SkipStep,
    Stop,
    merge,
)

from .support import State, emit

SKIPPABLE = ("batch_start", "backward_start", "optimizer_step_start")


def returning(value: object) -> Any:
    def handler(*, state: State) -> object:
        return value

    return handler


# ---------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    "command", [Stop("converged"), SkipStep("nan loss"), SaveCheckpoint("best-loss")]
)
def test_returned_command_becomes_a_request_with_source_and_event(command: Any) -> None:
    bus = EventBus()
    bus.subscribe("batch_start", returning(command), id="asker")

    assert emit(bus, "batch_start") == [Request(command, "asker", "batch_start")]


@pytest.mark.parametrize("container", [list, tuple])
def test_returned_sequence_gives_one_request_per_command_in_order(container: type) -> None:
    commands = container([SaveCheckpoint("a"), Stop("done"), SaveCheckpoint("b")])
    bus = EventBus()
    bus.subscribe("epoch_end", returning(commands), id="asker")

    assert emit(bus, "epoch_end") == [Request(c, "asker", "epoch_end") for c in commands]


@pytest.mark.parametrize("result", [None, [], ()])
def test_returning_nothing_gives_no_request(result: object) -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", returning(result))

    assert emit(bus, "epoch_end") == []


def test_requests_follow_dispatch_order() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", returning(Stop("low")), id="low", priority=-1)
    bus.subscribe("epoch_end", returning(None), id="silent", priority=5)
    bus.subscribe("epoch_end", returning(Stop("high")), id="high", priority=10)

    assert [(r.source, r.command) for r in emit(bus, "epoch_end")] == [
        ("high", Stop("high")),
        ("low", Stop("low")),
    ]


@pytest.mark.parametrize("result", ["stop", 1, True, Stop, [Stop(), "stop"], {"stop": True}])
def test_returning_a_non_command_is_refused_naming_the_handler(result: object) -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", returning(result), id="confused")

    with pytest.raises(CommandError, match="handler 'confused' of event 'epoch_end' returned"):
        emit(bus, "epoch_end")


@pytest.mark.parametrize("event", SKIPPABLE)
def test_skip_step_is_accepted_at_skippable_events(event: str) -> None:
    bus = EventBus()
    bus.subscribe(event, returning(SkipStep("why")), id="skipper")

    assert emit(bus, event) == [Request(SkipStep("why"), "skipper", event)]


def test_skippable_events_of_the_catalogue() -> None:
    assert tuple(name for name, spec in EVENTS.items() if spec.skippable) == SKIPPABLE


@pytest.mark.parametrize("event", ["epoch_end", "batch_end", "forward_start", "train_end"])
def test_skip_step_at_a_non_skippable_event_is_refused(event: str) -> None:
    bus = EventBus()
    bus.subscribe(event, returning([SaveCheckpoint("a"), SkipStep()]), id="skipper")

    with pytest.raises(CommandError) as info:
        emit(bus, event)

    message = str(info.value)
    assert "'skipper'" in message
    assert f"SkipStep at {event!r}" in message
    assert "accepted at: batch_start, backward_start, optimizer_step_start" in message


def test_skip_step_at_a_skippable_custom_event_is_accepted() -> None:
    bus = EventBus()
    bus.declare(EventSpec("custom_step", skippable=True))
    bus.subscribe("custom_step", returning(SkipStep()), id="skipper")

    assert emit(bus, "custom_step") == [Request(SkipStep(), "skipper", "custom_step")]


def test_requests_of_a_logged_failure_are_not_collected() -> None:
    def broken(*, state: State) -> None:
        raise RuntimeError("broken")

    bus = EventBus()
    bus.subscribe("epoch_end", broken, id="broken", on_error="log", priority=1)
    bus.subscribe("epoch_end", returning(Stop("ok")), id="fine")

    with pytest.warns(HandlerFailureWarning):
        requests = emit(bus, "epoch_end")

    assert requests == [Request(Stop("ok"), "fine", "epoch_end")]


# ------------------------------------------------------------------------------- merge


def test_merge_stop_wins_and_the_first_stop_is_recorded() -> None:
    requests = [
        Request(SaveCheckpoint("best"), "checkpoint", "epoch_end"),
        Request(Stop("patience"), "early-stopping", "epoch_end"),
        Request(SkipStep("first"), "guard", "batch_start"),
        Request(Stop("time limit"), "timer", "epoch_end"),
        Request(SkipStep("second"), "other-guard", "batch_start"),
        Request(SaveCheckpoint("best"), "other-checkpoint", "epoch_end"),
        Request(SaveCheckpoint("last"), "checkpoint", "epoch_end"),
    ]

    decision = merge(requests)

    assert decision.stop == requests[1]
    assert decision.skip == requests[2]
    assert decision.requests == tuple(requests)
    assert decision.saves == (requests[0], requests[6])
    assert bool(decision)


def test_merge_without_stop_or_skip() -> None:
    save = Request(SaveCheckpoint("epoch-1"), "checkpoint", "epoch_end")

    decision = merge([save])

    assert decision == Decision(requests=(save,), stop=None, skip=None, saves=(save,))


def test_merge_of_nothing_is_an_empty_falsy_decision() -> None:
    decision = merge([])

    assert decision == Decision()
    assert not decision


def test_merge_of_emitted_requests_records_the_higher_priority_stop() -> None:
    bus = EventBus()
    bus.subscribe("epoch_end", returning(Stop("second")), id="second", priority=1)
    bus.subscribe("epoch_end", returning(Stop("first")), id="first", priority=2)
    bus.subscribe("epoch_end", returning(SaveCheckpoint("last")), id="saver", priority=3)

    decision = merge(emit(bus, "epoch_end"))

    assert decision.stop is not None
    assert (decision.stop.source, decision.stop.command) == ("first", Stop("first"))
    assert [r.source for r in decision.requests] == ["saver", "first", "second"]
    assert [r.command for r in decision.saves] == [SaveCheckpoint("last")]


# -------------------------------------------------------------------------------- tags


@pytest.mark.parametrize(
    "tag",
    [
        "../x",
        "a/b",
        "",
        "..",
        ".",
        "/abs",
        "a\\b",
        ".hidden",
        "a..b",
        "-leading-dash",
        "with space",
        "x" * 129,
        5,
        None,
    ],
)
def test_unsafe_checkpoint_tags_are_refused(tag: object) -> None:
    with pytest.raises(ConfigurationError, match="not a safe directory name"):
        SaveCheckpoint(tag)  # type: ignore[arg-type]


@pytest.mark.parametrize("tag", ["best-loss", "epoch-10", "epoch=3", "v1.2", "A_b", "x" * 128])
def test_safe_checkpoint_tags_are_accepted(tag: str) -> None:
    assert SaveCheckpoint(tag).tag == tag


def test_checkpoint_tag_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        SaveCheckpoint("best\n")


def test_commands_are_immutable_values() -> None:
    stop = Stop("done")

    with pytest.raises(dataclasses.FrozenInstanceError):
        stop.reason = "other"  # type: ignore[misc]
    assert Stop("done") == stop
    assert Stop("done") != SkipStep("done")
    assert SaveCheckpoint("a", metadata=(("epoch", 3),)).metadata == (("epoch", 3),)
