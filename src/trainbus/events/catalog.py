"""The catalogue of events: their names, their payload names, and where each one fires.

Every event carries ``state`` (the frozen :class:`~trainbus.TrainerState` snapshot), ``model``
and ``maps``; :data:`EVENTS` lists what each event adds. A handler declares the payload names
it wants as keyword-only parameters, and the bus checks them against this catalogue when the
handler is registered.

Where each event fires (``tests/events/test_catalog.py`` runs every entry point and checks
the recorded sequence against this map; ``name?`` fires at most once, ``name*`` any number of
times, ``repeat`` blocks run any number of times, ``optionally`` blocks at most once)::

    Trainer(...):
        trainer_init
    train(train_loader, val_loader):
        train_start
        resume?                                when a training state was restored
        repeat for each epoch:
            epoch_start?                       not repeated for an epoch resumed in its middle
            repeat for each training batch:
                batch_start                    SkipStep here skips the rest of the batch
                optionally, unless the batch was skipped:
                    forward_start
                    backward_start             SkipStep here skips backward and the step
                    optionally, unless the backward was skipped:
                        backward_end
                        optionally, every accumulate_grad_batches batches and at the last:
                            optimizer_step_start   SkipStep here skips the optimizer step
                            optimizer_step_end?    unless the step was skipped
                loss_logged?                   every log_every_n_batches batches and at the last
                batch_end
                checkpoint*                    one per save asked during the batch
            optionally, every val_every_n_epochs epochs and at the last:
                validation_start
                repeat for each validation batch:
                    evaluation_step_start
                    evaluation_step_end
                metrics_computed
                validation_end
            epoch_end
            checkpoint*                        one per save asked during the epoch
        train_end
        checkpoint*                            one per save asked at train_end
        teardown
    validate(loader):
        validate_start
        repeat for each batch:
            evaluation_step_start
            evaluation_step_end
        metrics_computed
        validate_end
        teardown
    test(loader):
        test_start
        repeat for each batch:
            evaluation_step_start
            evaluation_step_end
        metrics_computed
        test_end
        teardown
    predict(loader):
        predict_start
        repeat for each batch:
            evaluation_step_start
            evaluation_step_end
        predict_end
        teardown

When a handler or the model raises inside ``train``, ``validate``, ``test`` or ``predict``, the
events after the failure do not fire; ``exception`` goes to every subscriber, then
``teardown``, then the exception propagates to the caller.

A :class:`~trainbus.Stop` ends training at the next boundary. Asked at a batch-level event, it
cuts the epoch short after ``batch_end`` (no validation; ``epoch_end`` still fires); asked
anywhere else, training ends after ``epoch_end``. ``train_end`` and ``teardown`` always fire.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trainbus.errors import ConfigurationError, ConfigurationTypeError, UnknownEventError

COMMON_PAYLOAD: tuple[str, ...] = ("state", "model", "maps")
"""Payload names every event carries."""

ITERATION_COUNTER = "iteration"
EPOCH_COUNTER = "epoch_number"
COUNTERS: tuple[str, ...] = (
    EPOCH_COUNTER,
    "current_epoch",
    ITERATION_COUNTER,
    "global_step",
    "batch_idx",
    "samples_seen",
)
"""The int counters of :class:`~trainbus.TrainerState` an event's ``counter`` may name."""


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One event: its name, what its payload adds to the common names, and how filters count it.

    ``counter`` names the attribute of the ``state`` payload that ``every``/``once`` filters
    count with (one of :data:`COUNTERS`, so the count survives a resume with the state);
    ``None`` makes the bus count occurrences itself. ``skippable`` events accept a
    :class:`~trainbus.SkipStep` command.
    """

    name: str
    payload: tuple[str, ...] = ()
    doc: str = ""
    counter: str | None = None
    skippable: bool = False

    @property
    def payload_names(self) -> frozenset[str]:
        """Every name a handler of this event may ask for."""
        return frozenset(COMMON_PAYLOAD) | frozenset(self.payload)


def _spec(
    name: str,
    doc: str,
    payload: tuple[str, ...] = (),
    *,
    counter: str | None = None,
    skippable: bool = False,
) -> EventSpec:
    return EventSpec(name, payload, doc, counter, skippable)


_BATCH = ITERATION_COUNTER
_EPOCH = EPOCH_COUNTER

EVENTS: Mapping[str, EventSpec] = {
    spec.name: spec
    for spec in (
        _spec("trainer_init", "The Trainer is constructed and every subscriber registered."),
        _spec(
            "train_start",
            "train() begins, after optimizers are built; `bus` lets a handler read the "
            "dispatch plan and per-subscriber accounting (the Monitor does); `validates` "
            "tells whether this call validates at all (a val_loader was passed), so a "
            "handler that monitors a validation metric can say when it never will.",
            ("optimizers", "bus", "validates"),
        ),
        _spec(
            "resume",
            "train(resume=True) restored the training state at `checkpoint`: weights, "
            "optimizers, counters, random states and every callback's state_dict.",
            ("checkpoint",),
        ),
        _spec("epoch_start", "A training epoch begins.", counter=_EPOCH),
        _spec(
            "batch_start",
            "A training batch arrives (not yet on the device).",
            ("batch",),
            counter=_BATCH,
            skippable=True,
        ),
        _spec(
            "forward_start",
            "The batch is on the device; forward_step runs next.",
            ("batch",),
            counter=_BATCH,
        ),
        _spec(
            "backward_start",
            "forward_step returned; `loss` is the tensor about to be "
            "backpropagated, `losses` every named loss.",
            ("batch", "loss", "losses"),
            counter=_BATCH,
            skippable=True,
        ),
        _spec(
            "backward_end",
            "Gradients of this batch are accumulated.",
            ("batch", "loss", "losses"),
            counter=_BATCH,
        ),
        _spec(
            "optimizer_step_start",
            "Gradients are complete (unscaled and clipped); the optimizers step next.",
            ("optimizers",),
            counter=_BATCH,
            skippable=True,
        ),
        _spec(
            "optimizer_step_end",
            "The optimizers stepped and gradients were zeroed.",
            ("optimizers",),
            counter=_BATCH,
        ),
        _spec(
            "loss_logged",
            "The mean training loss since the last log interval was read "
            "from the device (one host-device sync).",
            ("train_loss",),
            counter=_BATCH,
        ),
        _spec(
            "batch_end",
            "The batch is done; `loss` is None when the batch was skipped.",
            ("batch", "loss", "losses"),
            counter=_BATCH,
        ),
        _spec("validation_start", "Validation inside train() begins."),
        _spec(
            "evaluation_step_start",
            "An evaluation batch arrives (validation, test or predict: see state.stage).",
            ("batch",),
        ),
        _spec(
            "evaluation_step_end",
            "evaluation_step (or predict_step) returned `outputs`.",
            ("batch", "outputs"),
        ),
        _spec("metrics_computed", "Metrics of a validation or test pass, as floats.", ("metrics",)),
        _spec("validation_end", "Validation inside train() ended.", ("metrics",)),
        _spec("epoch_end", "A training epoch ended (after its validation).", counter=_EPOCH),
        _spec(
            "checkpoint",
            "A checkpoint was committed: `kind` is 'weights' (SaveCheckpoint, `tag` its name) "
            "or 'training' (SaveTrainingState, `tag` the state's directory name); `waited`: "
            "seconds an asynchronous save waited for the previous background write (0.0 "
            "when it did not).",
            ("checkpoint", "tag", "kind", "waited"),
        ),
        _spec("train_end", "train() finished its last epoch or was stopped."),
        _spec("validate_start", "validate() begins."),
        _spec("validate_end", "validate() ended.", ("metrics",)),
        _spec("test_start", "test() begins."),
        _spec("test_end", "test() ended.", ("metrics",)),
        _spec("predict_start", "predict() begins."),
        _spec(
            "predict_end",
            "predict() ended; `predictions` holds one entry per batch.",
            ("predictions",),
        ),
        _spec("exception", "Something raised inside train/validate/test/predict.", ("exception",)),
        _spec("teardown", "train/validate/test/predict is about to return or raise."),
    )
}
"""The built-in events, by name, in the order they first fire."""

PAIRED_START: dict[str, str] = {
    "train_end": "train_start",
    "epoch_end": "epoch_start",
    "batch_end": "batch_start",
    "backward_end": "backward_start",
    "optimizer_step_end": "optimizer_step_start",
    "validation_end": "validation_start",
    "evaluation_step_end": "evaluation_step_start",
    "validate_end": "validate_start",
    "test_end": "test_start",
    "predict_end": "predict_start",
}
"""End events and the start event each closes (``reverse=True`` mirrors the order)."""


def closest_names(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The names closest to ``name``, best first, for "did you mean" hints."""
    return difflib.get_close_matches(name, list(names), n=n, cutoff=0.5)


def unknown_event(name: object, known: Iterable[str]) -> UnknownEventError:
    """The error for an event name that is not declared, with the closest known names."""
    known = sorted(known)
    hint = ""
    if isinstance(name, str):
        close = closest_names(name, known)
        if close:
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?"
    return UnknownEventError(
        f"unknown event {name!r}.{hint} Known events: {', '.join(known)}. "
        "Declare a custom event with bus.declare(EventSpec(...)) before subscribing to it."
    )


def validate_spec(spec: EventSpec) -> None:
    """Check a custom event's declaration; raise a :class:`ConfigurationError` if it is unusable.

    A wrong type raises :class:`ConfigurationTypeError`; every check happens at declaration,
    so a bad ``counter`` cannot fail later at dispatch.
    """
    if not isinstance(spec.name, str) or not spec.name.isidentifier() or not spec.name.islower():
        raise ConfigurationError(
            f"event name {spec.name!r} is not a lower_snake_case identifier; "
            "use names like 'sample_logged'"
        )
    if not isinstance(spec.payload, tuple):
        raise ConfigurationError(
            f"payload of event {spec.name!r} is {spec.payload!r}; pass a tuple of names, "
            "e.g. payload=('value',)"
        )
    for item in spec.payload:
        if not isinstance(item, str) or not item.isidentifier():
            raise ConfigurationError(
                f"payload name {item!r} of event {spec.name!r} is not a Python identifier; "
                "handlers receive payload values as keyword arguments"
            )
    if not isinstance(spec.doc, str):
        raise ConfigurationTypeError(
            f"doc={spec.doc!r} of event {spec.name!r} is not a string; pass a sentence saying "
            "when the event fires, e.g. doc='A sample was logged.'"
        )
    if spec.counter is not None and not isinstance(spec.counter, str):
        raise ConfigurationTypeError(
            f"counter={spec.counter!r} of event {spec.name!r} is not a string or None; pass "
            f"the name of a state counter ({', '.join(map(repr, COUNTERS))}) or None to let "
            "the bus count occurrences"
        )
    if spec.counter is not None and spec.counter not in COUNTERS:
        raise ConfigurationError(
            f"counter={spec.counter!r} of event {spec.name!r} is not a counter of the state; "
            f"pass one of {', '.join(map(repr, COUNTERS))}, or None to let the bus count "
            "occurrences"
        )
    if not isinstance(spec.skippable, bool):
        raise ConfigurationTypeError(
            f"skippable={spec.skippable!r} of event {spec.name!r} is not a bool; pass "
            "skippable=True if a handler may return SkipStep at this event, else False"
        )
    duplicated = set(spec.payload) & set(COMMON_PAYLOAD)
    if duplicated or len(set(spec.payload)) != len(spec.payload):
        raise ConfigurationError(
            f"payload of event {spec.name!r} repeats a name ({sorted(spec.payload)}); "
            f"{', '.join(COMMON_PAYLOAD)} are always present and must not be listed"
        )
