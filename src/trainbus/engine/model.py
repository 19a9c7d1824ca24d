"""The Model contract (the essential logic of an experiment) and :class:`SupervisedModel`.

A :class:`Model` is an ``nn.Module`` that says how a batch is processed; the Trainer decides
when. Override:

- :meth:`Model.forward_step` (required): a training batch -> the loss to backpropagate, as a
  scalar tensor, or a dict of named losses holding it under ``"loss"``.
- :meth:`Model.evaluation_step`: an evaluation batch -> the outputs the metrics read (a dict;
  ``"loss"`` for :class:`~trainbus.LossMetricConfig`, ``"preds"``/``"target"`` for torchmetrics).
- :meth:`Model.build_optimizers`: one optimizer or a sequence of them.
- :meth:`Model.predict_step`, :meth:`Model.backward_step`, :meth:`Model.optimization_step`
  when the defaults do not fit (several optimizers stepped differently, custom backward).
- :meth:`Model.shard`: the units of sharded training (``Trainer(strategy="fsdp")``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

from trainbus.errors import ConfigurationTypeError, ModelContractError

StepOutput: TypeAlias = torch.Tensor | Mapping[str, torch.Tensor]
OptimizerFactory: TypeAlias = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFunction: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Model(nn.Module):
    """Base class of trainable models; see the module documentation for the contract."""

    def forward_step(self, batch: Any) -> StepOutput:
        """Compute the training loss of ``batch`` (scalar tensor or dict with ``"loss"``)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward_step(batch) returning the loss"
        )

    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        """Outputs of an evaluation batch for the metrics; default: the losses of forward_step."""
        output = self.forward_step(batch)
        if isinstance(output, torch.Tensor):
            return {"loss": output}
        return dict(output)

    def predict_step(self, batch: Any) -> Any:
        """What :meth:`Trainer.predict` collects for one batch; default: evaluation_step."""
        return self.evaluation_step(batch)

    def build_optimizers(self) -> torch.optim.Optimizer | Sequence[torch.optim.Optimizer]:
        """The optimizer(s) of this model; default: Adam(lr=1e-3) over every parameter."""
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (already divided for accumulation and scaled for fp16)."""
        loss.backward()  # type: ignore[no-untyped-call]

    def optimization_step(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        """Step every optimizer (through ``scaler`` when fp16 loss scaling is on).

        Gradients are already unscaled and clipped; the Trainer updates the scaler and zeroes
        the gradients afterwards.
        """
        for optimizer in optimizers:
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()

    def shard(self, shard: Callable[[nn.Module], None]) -> None:
        """Choose the units of sharded training (``Trainer(strategy="fsdp")``).

        Call ``shard(module)`` on each submodule that gathers its parameters on its own
        (``fully_shard``), innermost first; trainbus then shards the whole model as the root
        unit, which holds every parameter left. A unit's parameters are gathered for its
        forward and backward only, so peak memory follows the largest unit. The default rule:
        every element, holding parameters, of each outermost ``nn.ModuleList`` or
        ``nn.Sequential`` (the usual home of transformer blocks and layer stacks). Override it
        to choose others; a unit's parameters must be used inside its ``forward`` (a module
        whose weights are tied to another's goes in the same unit).
        """
        for unit in sharding_units(self):
            shard(unit)


def sharding_units(module: nn.Module) -> list[nn.Module]:
    """The default units of :meth:`Model.shard` under ``module`` (containers' elements)."""
    units: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, nn.ModuleList | nn.Sequential):
            units.extend(
                element for element in child.children() if any(True for _ in element.parameters())
            )
        else:
            units.extend(sharding_units(child))
    return units


class SupervisedModel(Model):
    """A network trained on ``(inputs, target)`` batches with one loss and one optimizer.

    ``optimizer`` is an optimizer class or a factory taking the parameters, e.g.
    ``functools.partial(torch.optim.SGD, lr=0.1)``; default Adam(lr=1e-3). Evaluation outputs
    are ``{"loss", "preds", "target"}`` (``preds`` are the network's raw outputs). Batches are
    ``(inputs, target)`` pairs or ``{"input", "target"}`` dicts; :meth:`predict_step` also
    takes inputs alone (a tensor, ``(inputs,)`` as ``TensorDataset(X)`` gives, or
    ``{"input"}``).
    """

    def __init__(
        self,
        network: nn.Module,
        loss: nn.Module | LossFunction,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ConfigurationTypeError(
                f"network={network!r} is not a torch.nn.Module; pass the network to train"
            )
        if not callable(loss):
            raise ConfigurationTypeError(
                f"loss={loss!r} is not callable; pass e.g. torch.nn.CrossEntropyLoss()"
            )
        if optimizer is not None and not callable(optimizer):
            raise ConfigurationTypeError(
                f"optimizer={optimizer!r} is not an optimizer class or factory; pass e.g. "
                "functools.partial(torch.optim.SGD, lr=0.1)"
            )
        self._step_network: nn.Module
        self._step_loss: nn.Module | LossFunction
        self.network = network
        self.loss = loss
        self.optimizer_factory = optimizer

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("network", "loss"):
            # Read at every step: a plain instance attribute costs a dict lookup, where a
            # submodule read through nn.Module.__getattr__ costs a Python call.
            self.__dict__[f"_step_{name}"] = value

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's output for ``inputs``."""
        output: torch.Tensor = self.network(inputs)
        return output

    def forward_step(self, batch: Any) -> StepOutput:
        """The loss of one ``(inputs, target)`` batch."""
        inputs, target = _split(batch, "forward_step")
        loss: torch.Tensor = self._step_loss(self._step_network(inputs), target)
        return loss

    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        """``{"loss", "preds", "target"}`` for one batch."""
        inputs, target = _split(batch, "evaluation_step")
        preds = self.network(inputs)
        return {"loss": self.loss(preds, target), "preds": preds, "target": target}

    def predict_step(self, batch: Any) -> Any:
        """The network's output for the inputs of one batch (a target, if any, is ignored).

        A batch is the inputs tensor, ``(inputs,)`` (what ``DataLoader(TensorDataset(X))``
        yields), ``(inputs, target)``, or a dict with ``"input"``.
        """
        return self.network(_inputs(batch))

    def build_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer from the factory given at construction (default Adam, lr=1e-3)."""
        if self.optimizer_factory is None:
            return torch.optim.Adam(self.network.parameters(), lr=1e-3)
        optimizer = self.optimizer_factory(self.network.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ModelContractError(
                f"optimizer factory {self.optimizer_factory!r} returned {optimizer!r}, not a "
                "torch.optim.Optimizer"
            )
        return optimizer


def _split(batch: Any, method: str) -> tuple[Any, Any]:
    if (type(batch) is tuple or type(batch) is list) and len(batch) == 2:
        return batch[0], batch[1]  # the common case, without abstract-class checks
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "input" in batch and "target" in batch:
        return batch["input"], batch["target"]
    if _inputs_only(batch):
        raise ModelContractError(
            f"SupervisedModel.{method} needs a target, but the batch is {_describe(batch)}: "
            "inputs only (e.g. from TensorDataset(X)); train and evaluate on (inputs, target) "
            "batches, e.g. TensorDataset(X, y); inputs-only batches are for predict()"
        )
    raise ModelContractError(
        f"SupervisedModel.{method} expects batches of (inputs, target) or "
        f"{{'input', 'target'}}, got {_describe(batch)}; adapt the loader or subclass Model "
        f"and override {method}"
    )


def _inputs(batch: Any) -> Any:
    """The inputs of a batch for predict_step: a target, if any, is left out."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) in (1, 2):
        return batch[0]
    if isinstance(batch, Mapping) and "input" in batch:
        return batch["input"]
    raise ModelContractError(
        f"SupervisedModel.predict_step expects batches of inputs: a tensor, (inputs,), "
        f"(inputs, target) or {{'input': ...}}, got {_describe(batch)}; adapt the loader or "
        "subclass SupervisedModel and override predict_step"
    )


def _inputs_only(batch: Any) -> bool:
    if isinstance(batch, torch.Tensor):
        return True
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return len(batch) == 1
    return isinstance(batch, Mapping) and "input" in batch and "target" not in batch


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = "item" if len(value) == 1 else "items"
        return f"a {type(value).__name__} of {len(value)} {items}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return repr(value)[:80]


def supervised_step(model: Model) -> SupervisedModel | None:
    """``model`` when its training step is SupervisedModel's own, else None.

    The loop then applies the network and the loss itself, one Python call fewer per step,
    exactly as :meth:`SupervisedModel.forward_step` does for an ``(inputs, target)`` tuple or
    list. A subclass that overrides ``forward_step``, or a compiled one, is called as usual.
    """
    if isinstance(model, SupervisedModel) and own_method(model, "forward_step", SupervisedModel):
        return model
    return None


def own_method(model: Model, name: str, owner: type[Model] = Model) -> bool:
    """Whether ``model.<name>`` is ``owner``'s own method, unchanged.

    False when a subclass overrides it or when it was replaced on the instance (as
    ``compile=True`` replaces the steps).
    """
    return getattr(type(model), name) is getattr(owner, name) and name not in vars(model)
