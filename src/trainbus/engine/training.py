"""One ``train()`` call from start to end: resume point, lifecycle, start and end events.

The facade checks the arguments; this module runs the call inside the
:class:`~trainbus.engine.call.CallRunner`'s lifecycle and hands the epochs to the
:class:`~trainbus.engine.loop.TrainingLoop`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Literal

from trainbus.engine import record, restore
from trainbus.engine.call import CallRunner
from trainbus.engine.limits import stepping_batches, validates
from trainbus.engine.loop import TrainingLoop
from trainbus.engine.policy import Boundary
from trainbus.engine.saving import Saver
from trainbus.engine.signals import interruption


def run_training(
    calls: CallRunner,
    loop: TrainingLoop,
    saver: Saver,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    resume: bool | Literal["auto"] | None,
) -> None:
    """Train, resuming first when ``resume`` says so; a stop signal ends in its exception.

    ``resume=None``: resume a MAPS adopted by ``Trainer.from_maps``, or one that torchrun
    restarted this run in (decided once the process group agreed on the restart count).
    """
    engine = calls.engine
    dispatcher = engine.dispatcher
    with calls.exclusive("train"), calls.distributed():
        if resume is None:
            resume = engine.adopt_maps or (
                engine.placement.restart_count > 0 and engine.maps.is_maps()
            )
        train_loader = calls.shard(train_loader, "train_loader", training=True)
        if val_loader is not None:
            val_loader = calls.shard(val_loader, "val_loader", training=False)
        engine.stepping_batches = stepping_batches(engine.settings, train_loader)
        engine.stepping_estimated = True
        saver.flush()  # a resume reads the MAPS as every background write left it
        found = (
            saver.on_main(functools.partial(restore.resume_point, engine, auto=resume == "auto"))
            if resume
            else None
        )
        loop.train_loader = train_loader
        named = {"train": train_loader, "val": val_loader}
        with (
            dispatcher.signals,
            calls.lifecycle("train", adopt=found is not None, loaders=named),
        ):
            if engine.prepare_training():
                saver.on_main(functools.partial(record.write, engine))
            if found is not None:
                restore.restore(engine, loop, found, train_loader)
            elif loop.fresh:
                for callback in engine.callbacks:
                    callback.reset()
            dispatcher.emit(
                "train_start",
                optimizers=engine.optimizers,
                bus=engine.bus,
                validates=validates(engine.settings, val_loader),
            )
            if found is not None:
                dispatcher.emit("resume", checkpoint=found.path)
            dispatcher.agree()
            saver.at_boundary(Boundary.TRAINING, "train_start")
            loop.train(train_loader, val_loader)
            engine.policy.close()
            dispatcher.emit("train_end")
            dispatcher.agree()
            saver.at_boundary(Boundary.TRAINING, "train_end")
            saver.flush()  # the last background write's `checkpoint` event precedes teardown
    received = dispatcher.signal_received()
    if received:
        # After teardown: logs are flushed and the training state is written.
        raise interruption(
            received,
            saved=saver.last_training_state,
            maps=str(engine.maps.path),
            announce=engine.placement.is_main,
        )
