"""Resume: choose the training state to continue from, check it fits, and load it.

Everything a training state holds goes back where it came from: weights, optimizers, scaler,
counters, the bus's filter counters, every callback's state, the loop's position, epoch-start
generator states and loss accumulator, and (at the loop) every random state. A state that
does not fit this Trainer (another optimizer class, another architecture, another number of
batches per epoch) is refused with an error naming the difference before anything changes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from trainbus.engine import checkpoint, sharding
from trainbus.engine.batches import length
from trainbus.engine.call import recorded_calls
from trainbus.engine.core import Engine, plain_values
from trainbus.engine.limits import epoch_batches
from trainbus.engine.loop import TrainingLoop
from trainbus.engine.maps import MAPS_FILE
from trainbus.engine.resume import EpochStart
from trainbus.engine.saving import STATE_FORMAT, optimizer_class
from trainbus.engine.settings import EXACTNESS_SETTINGS
from trainbus.engine.weights import check_fit
from trainbus.errors import (
    CheckpointError,
    ConfigurationError,
    CorruptCheckpointError,
    TrainbusWarning,
)


def resume_point(engine: Engine, *, auto: bool = False) -> checkpoint.FoundState | None:
    """The training state to resume from; None to start afresh (no MAPS yet).

    ``auto`` (``resume="auto"``) also starts afresh in a Trainer that already ran in this
    process (it goes on from memory), and in a MAPS whose every call failed before a
    training state was written (see :func:`_start_again`).
    """
    maps = engine.maps
    if maps.created:
        if auto:
            return None
        raise ConfigurationError(
            "this Trainer already ran in this process; resume=True is for a new Trainer "
            "(e.g. Trainer.from_maps) after an interruption"
        )
    if not maps.is_maps():
        maps.check_available()
        return None
    maps.check_unlocked()
    found = checkpoint.find_training_state(maps)
    if found is None and auto:
        _start_again(engine)
        return None
    if found is None and _restarted_before_first_state(engine):
        warnings.warn(
            f"torchrun restarted this run (attempt {engine.placement.restart_count + 1}) "
            "before it wrote a training state: training starts again from scratch, "
            f"replacing what the failed attempt wrote in {str(maps.path)!r}",
            TrainbusWarning,
            stacklevel=4,
        )
        maps.overwrite = True
        return None
    if found is None:
        raise CheckpointError(
            f"MAPS {str(maps.path)!r} holds no training state to resume from (was "
            "TrainingCheckpointCallback switched off, or did the run stop before its first "
            "save?); pass overwrite=True to train again from scratch"
        )
    if found.skipped:
        warnings.warn(
            f"resuming from {found.path.name}; passed over: " + "; ".join(found.skipped),
            TrainbusWarning,
            stacklevel=4,
        )
    return found


_FAILED = frozenset({"failed", "interrupted", "running"})
"""Statuses of a call that ended before its end: ``running`` is a killed one (its lock is free)."""


def _start_again(engine: Engine) -> None:
    """Replace a MAPS whose every call failed before its first training state; keep its calls.

    Nothing of value is lost (no training state, no finished call), and the earlier calls stay
    in ``maps.json``, before the new one. A MAPS with a call that did not fail (a finished
    training without training states, a validate) is refused: replacing it is for
    ``overwrite=True``.
    """
    maps = engine.maps
    try:
        calls = recorded_calls(maps.read_json(MAPS_FILE))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"resume='auto' cannot read {maps.file(MAPS_FILE)} ({exc}) to check that every "
            "earlier call failed before writing a training state; pass overwrite=True to "
            "train again from scratch, or train into another MAPS"
        ) from exc
    kept = [f"{c.get('call')} ({c.get('status')})" for c in calls if c.get("status") not in _FAILED]
    if kept:
        raise CheckpointError(
            f"MAPS {str(maps.path)!r} holds no training state to resume from, and not every "
            f"earlier call failed: {', '.join(kept)}; resume='auto' starts afresh only in a "
            "MAPS where nothing would be lost. Pass overwrite=True to train again from "
            "scratch, or train into another MAPS"
        )
    maps.overwrite = True
    engine.adopt_maps = False  # the MAPS is replaced, not continued
    engine.calls[:0] = calls


def _restarted_before_first_state(engine: Engine) -> bool:
    """Whether a torchrun restart meets this MAPS as its own failed attempt left it."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if not engine.placement.restart_count or not run:
        return False
    try:
        calls = engine.maps.read_json(MAPS_FILE).get("calls", [])
    except (OSError, ValueError, AttributeError):
        return False
    return bool(calls) and isinstance(calls[-1], dict) and calls[-1].get("run_id") == run


def restore(
    engine: Engine, loop: TrainingLoop, found: checkpoint.FoundState, loader: Iterable[Any]
) -> None:
    """Load everything a training state holds; random states are restored at the loop."""
    weights, tensors, document = checkpoint.load_training_state(found.path)
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{found.path / checkpoint.STATE_FILE} has format "
            f"{document.get('format') if isinstance(document, dict) else document!r}; this "
            f"trainbus reads {STATE_FORMAT!r}: resume with the trainbus version that wrote it"
        )
    _check_layout(found, tensors, document)
    name = found.path.name
    own = _own_part(engine, found, tensors, document)
    position = document["position"]
    if position["in_epoch"] and document.get("world_size", 1) != engine.placement.world_size:
        # Another world size: the position inside the epoch belongs to the old shards.
        position = {"epoch": position["epoch"], "batches_done": 0, "in_epoch": False}
    # limit_train_batches included: a changed limit changes the epoch as a changed loader does.
    num_batches, _ = epoch_batches(engine.settings, loader)
    if position["in_epoch"] and document["state"]["num_batches"] != num_batches:
        raise CheckpointError(
            f"the training state {name} stopped after batch "
            f"{position['batches_done']} of an epoch of {document['state']['num_batches']} "
            f"batches, but this epoch has {num_batches} (train_loader has {length(loader)}, "
            f"limit_train_batches={engine.settings.limit_train_batches!r}); resume with the "
            "same training data, batch size and limit_train_batches"
        )
    sharded = _check_strategy(engine, document, name)
    if sharded:
        _check_optimizer_classes(engine.optimizers, document.get("optimizers"), name)
        sharding.load_sharded(found.path, engine.model, engine.optimizers, name)
    else:
        check_fit(
            weights,
            engine.model,
            f"the training state {name}",
            strict=True,
            remedy=(
                "Resume with the model the interrupted run trained, or start a new run "
                "(another MAPS, or overwrite=True)"
            ),
        )
        saved_optimizers = tensors["optimizers"]
        _check_optimizers(engine.optimizers, saved_optimizers, document.get("optimizers"), name)
        engine.model.load_state_dict(weights)
        for optimizer, saved in zip(engine.optimizers, saved_optimizers, strict=True):
            optimizer.load_state_dict(saved)
    _warn_changed_hyperparameters(engine.optimizers, document.get("optimizer_defaults"), name)
    if engine.scaler is not None and tensors["scaler"]:
        engine.scaler.load_state_dict(tensors["scaler"])
    restored = {
        key: tuple(value) if key == "learning_rates" else value
        for key, value in document["state"].items()
        if key not in {"stage", "max_epochs", "rank", "world_size"}
    }
    if restored.get("stop_resumable"):
        restored.update(stopped_by=None, stop_reason=None, stop_resumable=False)
    engine.state.update(**restored)
    engine.bus.load_state_dict(document["bus"])
    _load_callback_states(engine, tensors["callbacks"], name)
    loop.losses.load(own, engine.device)
    loop.position = dict(position)
    loop.pending_random = own["random"]
    loop.pending_loader_generators = own["loader_generators"]
    if position["in_epoch"]:
        loop.epoch_start = EpochStart.from_dict(own["epoch_start"])
    _warn_changed_settings(engine, document["trainer"])
    if engine.placement.is_main:
        for newer in checkpoint.training_states(engine.maps):
            if newer.name > name:
                # Passed over as unusable: moved aside, so rotation never counts it as kept.
                checkpoint.quarantine(newer)
    engine.calls[-1]["resumed_from"] = {
        "state": name,
        "epoch": document["state"]["current_epoch"],
        "iteration": document["state"]["iteration"],
        "skipped": list(found.skipped),
    }


_DOCUMENT_LAYOUT = {"position": dict, "state": dict, "bus": dict, "trainer": dict}
_TENSORS_LAYOUT = {"optimizers": list, "callbacks": dict, "other_ranks": list}
_POSITION_LAYOUT = {"epoch": int, "batches_done": int, "in_epoch": bool}


def _check_layout(found: checkpoint.FoundState, tensors: object, document: object) -> None:
    """Files that verify against their manifest but lack what a training state holds: corrupt."""
    problems = [
        *_missing(document, _DOCUMENT_LAYOUT, checkpoint.STATE_FILE),
        *_missing(tensors, _TENSORS_LAYOUT, checkpoint.TRAINER_FILE),
    ]
    if not problems and isinstance(document, dict):
        problems = _missing(document["position"], _POSITION_LAYOUT, "position")
    if problems:
        raise CorruptCheckpointError(
            f"the training state {found.path} is corrupt: {'; '.join(problems)}; move it aside "
            "to resume from an older state"
        )


def _missing(value: object, layout: Mapping[str, type], where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where} holds {type(value).__name__}, not an object"]
    return [
        f"{where} has no {key!r} of type {kind.__name__}"
        for key, kind in layout.items()
        if not isinstance(value.get(key), kind)
    ]


def _check_strategy(engine: Engine, document: Mapping[str, Any], name: str) -> bool:
    """Whether the state is sharded; an unsharded one cannot go into a sharded model.

    A sharded state loads into any model: Distributed Checkpoint reshards it to this run's
    ranks, or gathers it whole into an unsharded model (``"ddp"``, one process).
    """
    sharded = bool(document.get("sharded", False))
    if engine.sharded is not None and not sharded:
        raise CheckpointError(
            f"the training state {name} was written unsharded (strategy="
            f"{document.get('trainer', {}).get('strategy', 'ddp')!r} or one process), and "
            "this Trainer shards the model (strategy='fsdp'): its optimizer states cannot be "
            "split over the shards; resume with the strategy of the interrupted run"
        )
    return sharded


def _check_optimizer_classes(
    optimizers: Sequence[torch.optim.Optimizer], saved_classes: object, name: str
) -> list[str]:
    """The optimizers' classes; refused when the state was written by others."""
    classes = [optimizer_class(o) for o in optimizers]
    if isinstance(saved_classes, list) and saved_classes != classes:
        raise CheckpointError(
            f"the training state {name} was written with optimizers {saved_classes}, but "
            f"build_optimizers now builds {classes}; an optimizer cannot continue from "
            "another one's state: resume with the same optimizer, or start a new run"
        )
    return classes


def _check_optimizers(
    optimizers: Sequence[torch.optim.Optimizer],
    saved: Sequence[Mapping[str, Any]],
    saved_classes: object,
    name: str,
) -> None:
    """Refuse optimizer states another optimizer (or parameter grouping) would misread."""
    if len(saved) != len(optimizers):
        raise CheckpointError(
            f"the training state {name} holds {len(saved)} optimizer state(s), but the "
            f"model's build_optimizers built {len(optimizers)}; resume with the same "
            "build_optimizers"
        )
    classes = _check_optimizer_classes(optimizers, saved_classes, name)
    for index, (optimizer, state) in enumerate(zip(optimizers, saved, strict=True)):
        groups = state.get("param_groups", [])
        now = optimizer.param_groups
        shape_saved = [len(group.get("params", ())) for group in groups]
        shape_now = [len(group["params"]) for group in now]
        if shape_saved != shape_now:
            raise CheckpointError(
                f"the training state {name}: optimizer {index} ({classes[index]}) held "
                f"parameter groups of sizes {shape_saved}, it now has {shape_now}; resume with "
                "the same model and build_optimizers"
            )
        # A scheduler adds keys to the groups (initial_lr, max_lr, ...); an optimizer of
        # another class lacks some of the keys this one's step reads (Adam's betas).
        lacking = sorted(
            {key for group in groups for key in optimizer.defaults if key not in group}
        )
        if lacking:
            raise CheckpointError(
                f"the training state {name}: optimizer {index} ({classes[index]}) needs the "
                f"settings {lacking}, which the saved optimizer state lacks: it was written by "
                "another optimizer class; resume with the same optimizer, or start a new run"
            )


def _warn_changed_hyperparameters(
    optimizers: Sequence[torch.optim.Optimizer], saved_defaults: object, name: str
) -> None:
    """Warn when build_optimizers now gives other settings (lr, ...) than the saved run's."""
    if not isinstance(saved_defaults, list) or len(saved_defaults) != len(optimizers):
        return
    changes = []
    for index, (optimizer, saved) in enumerate(zip(optimizers, saved_defaults, strict=True)):
        now = plain_values(optimizer.defaults)
        for key in sorted(now.keys() & saved.keys()):
            if now[key] != saved[key]:
                changes.append(f"optimizer {index} {key}: {saved[key]!r} -> {now[key]!r}")
    if changes:
        warnings.warn(
            f"build_optimizers gives other settings than the run that wrote {name}: "
            + "; ".join(changes)
            + ". The training state's values are used (they are part of the optimizer state "
            "an exact resume restores); to change them, set them in a handler of the 'resume' "
            "event, or start a new run",
            TrainbusWarning,
            stacklevel=5,
        )


def _warn_changed_settings(engine: Engine, recorded: Mapping[str, Any]) -> None:
    now = engine.settings_record()
    changed = {
        key: (value, now.get(key))
        for key, value in recorded.items()
        if key in EXACTNESS_SETTINGS and now.get(key) != value
    }
    if changed:
        warnings.warn(
            "resuming with settings that differ from the interrupted run: "
            + ", ".join(f"{key}={new!r} (was {old!r})" for key, (old, new) in changed.items())
            + "; the values given now are used, so training continues, but not as the "
            "interrupted run would have",
            TrainbusWarning,
            stacklevel=5,
        )


def _own_part(
    engine: Engine,
    found: checkpoint.FoundState,
    tensors: Mapping[str, Any],
    document: Mapping[str, Any],
) -> dict[str, Any]:
    """This rank's generators, loader position and losses from a training state.

    The same world size continues exactly. Another one continues with a warning: weights,
    optimizers, schedulers, counters and callback states are restored, but this rank's
    random states are not (they did not exist), and the shards and the global batch change.
    A state written in the middle of an epoch restarts that epoch from its first batch: the
    position inside it belongs to the old shards.
    """
    placement = engine.placement
    saved = int(document.get("world_size", 1))
    now = placement.world_size
    if saved == now:
        mine: dict[str, Any] = (
            dict(tensors) if placement.rank == 0 else tensors["other_ranks"][placement.rank - 1]
        )
        return mine
    position = document["position"]
    restart = (
        f"; it was written after batch {position['batches_done']} of epoch "
        f"{position['epoch'] + 1}, whose position belongs to {saved} shards: that epoch "
        "starts again from its first batch"
        if position["in_epoch"]
        else ""
    )
    warnings.warn(
        f"resuming {found.path.name}, written by {saved} process(es), with {now}: weights, "
        "optimizers, schedulers, counters and callback states are restored, but the "
        "random states are not, each rank's share of the data and the global batch size "
        f"change{restart}; the run continues, not as it would have with the same world size",
        TrainbusWarning,
        stacklevel=5,
    )
    return {"random": None, "loader_generators": None, "epoch_start": None, "losses": None}


def _load_callback_states(engine: Engine, states: Mapping[str, Any], source: str) -> None:
    current = {c.callback_id: c for c in engine.callbacks}
    missing = sorted(current.keys() - states.keys())
    unused = sorted(states.keys() - current.keys())
    for callback_id, callback in current.items():
        if callback_id in states:
            callback.load_state_dict(states[callback_id])
    if missing or unused:
        warnings.warn(
            f"the training state {source} and this Trainer's callbacks differ: "
            f"{missing or 'none'} start without saved state, the saved state of "
            f"{unused or 'none'} is not used; callback ids are class names (#n for the "
            "n-th of a class): pass the same callbacks as the interrupted run",
            TrainbusWarning,
            stacklevel=5,
        )
