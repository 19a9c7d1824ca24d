"""The parts every room of the engine shares: model, bus, state, policy, optimizers.

The :class:`Engine` is built once per Trainer, from objects the facade chose and validated
(the callbacks included: the engine never picks defaults). The rooms take it: the loop
(:mod:`~trainbus.engine.loop`), one call's lifecycle (:mod:`~trainbus.engine.call`), the
writers of checkpoints (:mod:`~trainbus.engine.saving`) and resume
(:mod:`~trainbus.engine.restore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trainbus.engine import distributed as dist_tools
from trainbus.engine import sharding
from trainbus.engine.compute import Precision
from trainbus.engine.dispatch import Dispatcher
from trainbus.engine.maps import Maps
from trainbus.engine.metrics import BoundMetric
from trainbus.engine.model import Model
from trainbus.engine.policy import CommandPolicy
from trainbus.engine.settings import LoopSettings
from trainbus.engine.state import StateKeeper
from trainbus.errors import ConfigurationError, ModelContractError
from trainbus.events.bus import EventBus
from trainbus.events.callback import Callback
from trainbus.events.plugins import PluginRecord


class Engine:
    """What one Trainer's calls share; every field has one owner room that changes it."""

    def __init__(
        self,
        *,
        settings: LoopSettings,
        model: Model,
        metrics: Mapping[str, BoundMetric],
        callbacks: Sequence[Callback],
        sources: Mapping[str, str],
        bus: EventBus,
        maps: Maps,
        placement: dist_tools.Placement,
        device: torch.device,
        precision: Precision,
        seed: int | None,
        weights_seeded: bool | None = None,
        plugins: Sequence[PluginRecord],
        defaults_kept: Sequence[str],
        ddp_options: Mapping[str, Any],
        strategy: str = "ddp",
    ) -> None:
        self.settings = settings
        self.model = model
        self.metrics = dict(metrics)
        self.callbacks = tuple(callbacks)
        self.sources = dict(sources)
        self.bus = bus
        self.maps = maps
        self.placement = placement
        self.device = device
        self.precision = precision
        self.seed = seed
        self.weights_seeded = weights_seeded
        self.plugins = list(plugins)
        self.defaults_kept = list(defaults_kept)
        self.ddp_options = dict(ddp_options)
        self.strategy = strategy
        """``"ddp"`` or ``"fsdp"`` (see :mod:`~trainbus.engine.sharding`)."""
        # On the CPU, training batches are used as the loader yields them: walking each batch
        # to find nothing to move costs microseconds per step.
        self.moves_batches = device.type != "cpu"
        self.state = StateKeeper(
            max_epochs=settings.max_epochs, rank=placement.rank, world_size=placement.world_size
        )
        self.policy = CommandPolicy(self.state)
        self.dispatcher = Dispatcher(
            bus, self.state, model, maps, self.policy, distributed=placement.distributed
        )
        self.optimizers: tuple[torch.optim.Optimizer, ...] = ()
        self.scaler: torch.amp.GradScaler | None = None
        self.forward: nn.Module | None = None
        """What the loop calls under torchrun: the DDP wrapper, or the FSDP root."""
        self.sharded: nn.Module | None = None
        """The FSDP root once the model is sharded (for good: the later calls use it too)."""
        self.tensor_rates = False
        self.compiled = False
        self.calls: list[dict[str, Any]] = []
        self.adopt_maps = False
        self.stepping_batches: int | None = None
        """Optimizer steps of the running training (``Trainer.estimated_stepping_batches``)."""
        self.stepping_estimated = False

    def prepare_model(self) -> None:
        """Move the model and the metrics to the device; compile once when asked."""
        self.model.to(self.device)
        for metric in self.metrics.values():
            metric.to(self.device)
        options = self.settings.compile_options
        if options is not None and not self.compiled:
            for name in ("forward_step", "evaluation_step", "predict_step"):
                setattr(self.model, name, torch.compile(getattr(self.model, name), **options))
            self.compiled = True

    def prepare_training(self) -> bool:
        """Build the optimizers (once) and wrap the model under torchrun; True when built now.

        Under ``strategy="fsdp"`` the model is sharded first: its optimizers must be built
        on the sharded parameters.
        """
        self.prepare_model()
        group = self.dispatcher.group
        if group is not None and self.strategy == "fsdp" and self.sharded is None:
            if self.optimizers:
                raise ConfigurationError(
                    "strategy='fsdp': this Trainer trained in one process before, and its "
                    "optimizers hold the unsharded parameters; train under torchrun from the "
                    "first call, or use a new Trainer"
                )
            self.sharded = sharding.shard_model(self.model, self.device, self.precision)
        built_now = False
        if not self.optimizers:
            self.optimizers = built_optimizers(self.model)
            self.tensor_rates = any(isinstance(r, torch.Tensor) for r in rates_of(self.optimizers))
            self.scaler = self.precision.grad_scaler()
            self.state.update(**learning_rates(self.optimizers, read_tensors=True))
            built_now = True
        if self.sharded is not None:
            self.forward = self.sharded
        elif group is not None:
            self.forward = dist_tools.wrap_model(self.model, self.device, self.ddp_options)
        return built_now

    def zero_grad(self) -> None:
        """Clear every optimizer's gradients (set to None: no kernel launch)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def settings_record(self) -> dict[str, Any]:
        """The Trainer's settings as ``maps.json`` and training states record them."""
        return {
            **self.settings.record(),
            "device": str(self.device),
            "precision": self.precision.name,
            "strategy": self.strategy,
            "default_callbacks": list(self.defaults_kept),
        }


def built_optimizers(model: Model) -> tuple[torch.optim.Optimizer, ...]:
    """``model.build_optimizers()`` as a tuple, checked against the contract."""
    built = model.build_optimizers()
    optimizers = [built] if isinstance(built, torch.optim.Optimizer) else list(built)
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise ModelContractError(
            f"{type(model).__name__}.build_optimizers returned {built!r}; return a "
            "torch.optim.Optimizer or a non-empty list of them"
        )
    for index, optimizer in enumerate(optimizers):
        first = next(i for i, o in enumerate(optimizers) if o is optimizer)
        if first != index:
            raise ModelContractError(
                f"{type(model).__name__}.build_optimizers returned the same optimizer "
                f"({type(optimizer).__name__}) at positions {first} and {index}; it would step "
                "twice per step: return each optimizer once"
            )
    return tuple(optimizers)


def rates_of(optimizers: Sequence[torch.optim.Optimizer]) -> tuple[Any, ...]:
    """The learning rate of every parameter group, as the optimizers hold them."""
    return tuple(group["lr"] for optimizer in optimizers for group in optimizer.param_groups)


def rates_moved(optimizers: Sequence[torch.optim.Optimizer], recorded: tuple[Any, ...]) -> bool:
    """Whether a learning rate differs from ``recorded`` (not for tensor rates: a sync)."""
    if len(optimizers) == 1:
        groups = optimizers[0].param_groups
        if len(groups) == 1:
            return (groups[0]["lr"],) != recorded
    return rates_of(optimizers) != recorded


def learning_rates(
    optimizers: Sequence[torch.optim.Optimizer], *, read_tensors: bool
) -> dict[str, tuple[float, ...]]:
    """``{"learning_rates": ...}`` for the state, or ``{}`` when reading them would sync."""
    rates = rates_of(optimizers)
    if any(isinstance(rate, torch.Tensor) for rate in rates) and not read_tensors:
        return {}  # a tensor learning rate is read at log intervals only (host-device sync)
    return {"learning_rates": tuple(float(rate) for rate in rates)}


def plain_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as JSON-ready plain values (anything else as its repr)."""
    plain: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str | int | float | bool | None):
            plain[key] = value
        elif isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
            plain[key] = list(value)
        else:
            plain[key] = repr(value)
    return plain
