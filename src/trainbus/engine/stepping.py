"""Optimizer steps outside the loop's common case, and the finite-loss checks around them.

The loop steps the common case itself (one optimizer, nothing between backward and step);
everything else (loss scaling, clipping, accumulation, several optimizers, an overridden
``optimization_step``, several processes) goes through :func:`optimizer_step`. Both announce
the same events.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch.nn.parallel import DistributedDataParallel

from trainbus.engine import sharding
from trainbus.engine.core import Engine, learning_rates, rates_moved
from trainbus.engine.model import Model, own_method


def direct_optimizer(engine: Engine) -> torch.optim.Optimizer | None:
    """The optimizer the loop steps itself, or None when :func:`optimizer_step` must.

    The common case (one optimizer, no loss scaling, clipping or accumulation, the model's
    ``optimization_step`` not overridden, one process) is stepped in the loop.
    """
    optimizers = engine.optimizers
    overridden = not own_method(engine.model, "optimization_step")
    if (
        overridden
        or len(optimizers) != 1
        or engine.scaler is not None
        or engine.settings.gradient_clip_val is not None
        or engine.settings.accumulate_grad_batches != 1
        or engine.dispatcher.group is not None
    ):
        return None
    return optimizers[0]


def backward_of(model: Model) -> Callable[[torch.Tensor], None]:
    """What the loop calls to backpropagate: the model's ``backward_step`` when overridden.

    Otherwise ``Tensor.backward`` itself, which is all ``Model.backward_step`` does: one
    Python call fewer per step.
    """
    if own_method(model, "backward_step"):
        return torch.Tensor.backward
    return model.backward_step


def gradient_sync(engine: Engine) -> Callable[[bool], None] | None:
    """What tells DDP or FSDP whether the next backward reduces gradients; None: nothing to.

    Inside an accumulation group only the last backward reduces (one reduction per step).
    """
    wrapped = engine.forward
    if isinstance(wrapped, DistributedDataParallel):
        return functools.partial(setattr, wrapped, "require_backward_grad_sync")
    if wrapped is not None and engine.settings.accumulate_grad_batches > 1:
        return functools.partial(sharding.set_gradient_sync, wrapped)
    return None


def optimizer_step(engine: Engine, batches_in_group: int) -> None:
    """Unscale, clip, announce and step every optimizer through ``model.optimization_step``."""
    settings, optimizers, scaler = engine.settings, engine.optimizers, engine.scaler
    if batches_in_group != settings.accumulate_grad_batches:
        # A short last group: gradients were divided by the full group size.
        scale_gradients(optimizers, settings.accumulate_grad_batches / batches_in_group)
    if scaler is not None:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    if settings.gradient_clip_val is not None:
        parameters = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        if settings.gradient_clip_algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(parameters, settings.gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(parameters, settings.gradient_clip_val)
    dispatcher = engine.dispatcher
    if dispatcher.fire_skippable("optimizer_step_start", optimizers):
        if scaler is not None:
            scaler.update()
        engine.zero_grad()
        return
    engine.model.optimization_step(optimizers, scaler)
    if scaler is not None:
        scaler.update()
    engine.zero_grad()
    engine.state.step_done()
    record_moved_rates(engine)
    dispatcher.fire("optimizer_step_end", optimizers)


def record_moved_rates(engine: Engine) -> None:
    """Put the optimizers' learning rates into the state if one moved since it was recorded.

    Tensor learning rates are left to the log intervals: comparing them would sync.
    """
    if not engine.tensor_rates and rates_moved(
        engine.optimizers, engine.state.values["learning_rates"]
    ):
        engine.state.update(**learning_rates(engine.optimizers, read_tensors=True))


def scale_gradients(optimizers: Iterable[torch.optim.Optimizer], factor: float) -> None:
    """Multiply every gradient by ``factor``."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.mul_(factor)


def all_finite(engine: Engine, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (a host-device sync, every step)."""
    finite = bool(torch.isfinite(loss))
    group = engine.dispatcher.group
    return finite if group is None else group.all_true(finite)


def release_reduction(engine: Engine) -> None:
    """After a DDP forward whose backward is skipped: a zero backward ends its reduction.

    DDP expects the backward of a forward that syncs gradients; without one, the next
    forward fails on every rank. Zero gradients through the parameters (not the loss,
    which may be NaN) complete it and average what the group accumulated so far.
    """
    ddp = engine.forward
    if not isinstance(ddp, DistributedDataParallel) or not ddp.require_backward_grad_sync:
        return
    parameters = [p for p in engine.model.parameters() if p.requires_grad]
    torch.stack([p.sum() * 0 for p in parameters]).sum().backward()  # type: ignore[no-untyped-call]
