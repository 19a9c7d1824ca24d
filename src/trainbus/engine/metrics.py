"""Evaluation metrics: :class:`LossMetricConfig`, any ``torchmetrics.Metric``, and their binding.

``Trainer(metrics={"loss": LossMetricConfig(loss_name="loss"), "accuracy": Accuracy(...)})``
names each metric. During an evaluation pass every metric accumulates on the device (no
host-device sync per batch); values are read once, at the end of the pass, as floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torchmetrics
import torchmetrics.aggregation

from trainbus.errors import ConfigurationError, ConfigurationTypeError, ModelContractError


@dataclass(frozen=True, slots=True)
class LossMetricConfig:
    """The mean of a loss returned by ``evaluation_step``, weighted by batch size."""

    loss_name: str = "loss"

    def __post_init__(self) -> None:
        if not isinstance(self.loss_name, str) or not self.loss_name:
            raise ConfigurationError(
                f"loss_name={self.loss_name!r} is not a non-empty string; pass the key under "
                "which evaluation_step returns the loss, e.g. LossMetricConfig(loss_name='loss')"
            )


@dataclass(frozen=True, slots=True)
class TorchMetricConfig:
    """A ``torchmetrics.Metric`` fed ``outputs[preds], outputs[target]`` of ``evaluation_step``."""

    metric: torchmetrics.Metric
    preds: str = "preds"
    target: str = "target"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, torchmetrics.Metric):
            raise ConfigurationTypeError(
                f"metric={self.metric!r} is not a torchmetrics.Metric; pass an instance, e.g. "
                "TorchMetricConfig(torchmetrics.Accuracy(task='binary'))"
            )
        for name in ("preds", "target"):
            key = getattr(self, name)
            if not isinstance(key, str) or not key:
                raise ConfigurationError(
                    f"{name}={key!r} is not a non-empty string; pass the key under which "
                    f"evaluation_step returns the {name}, e.g. {name}={name!r}"
                )


MetricSpec = LossMetricConfig | TorchMetricConfig | torchmetrics.Metric


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """How a Trainer's metric describes itself (in ``maps.json`` and to the callbacks).

    - ``metric_class``: the class of what the user passed, e.g. ``"MulticlassAccuracy"``
      (the torchmetrics metric, also when wrapped in a :class:`TorchMetricConfig`) or
      ``"LossMetricConfig"``.
    - ``higher_is_better``: the direction of improvement, ``None`` when nothing tells.
    - ``declared``: ``True`` when the metric itself declares the direction (torchmetrics'
      ``higher_is_better``), ``False`` when it is a convention (a mean loss goes down) or
      unknown; a callback told another direction explicitly warns only about a declared one.
    """

    metric_class: str
    higher_is_better: bool | None
    declared: bool


class BoundMetric(Protocol):
    """A metric ready to accumulate evaluation outputs."""

    name: str
    higher_is_better: bool | None
    info: MetricInfo

    def to(self, device: torch.device) -> None: ...
    def update(self, outputs: Mapping[str, Any], batch_size: int) -> None: ...
    def compute(self) -> float: ...
    def reset(self) -> None: ...


class _MeanLoss:
    """Batch-size-weighted mean of ``outputs[loss_name]``, accumulated on the device.

    A torchmetrics ``MeanMetric``: in a distributed run its totals are summed over the ranks
    when it is computed. NaN is kept (a diverged evaluation must show, not be dropped).
    """

    higher_is_better: bool | None = False
    info = MetricInfo(LossMetricConfig.__name__, higher_is_better=False, declared=False)

    def __init__(self, name: str, loss_name: str) -> None:
        self.name = name
        self.loss_name = loss_name
        # NaN replaced by NaN keeps it; "disable" would also drop the batch-size weights.
        self.metric = torchmetrics.aggregation.MeanMetric(nan_strategy=math.nan)
        self._count = 0

    def to(self, device: torch.device) -> None:
        self.metric.to(device)

    def update(self, outputs: Mapping[str, Any], batch_size: int) -> None:
        value = _lookup(outputs, self.loss_name, self.name)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise ModelContractError(
                f"metric {self.name!r} reads evaluation_step's {self.loss_name!r}, which is "
                f"{_describe(value)}; return the batch's mean loss as a scalar tensor (e.g. "
                "loss.mean(), not loss.item(), a list or an array)"
            )
        self.metric.update(value.detach().float(), batch_size)
        self._count += batch_size

    def compute(self) -> float:
        if self._count == 0 and not _synchronised():
            return math.nan
        return float(self.metric.compute().item())  # host-device sync, once per pass

    def reset(self) -> None:
        self.metric.reset()
        self._count = 0


def _synchronised() -> bool:
    """Whether metrics are reduced across processes (every rank must then compute)."""
    distributed = torch.distributed
    return bool(
        distributed.is_available()
        and distributed.is_initialized()
        and distributed.get_world_size() > 1
    )


class _TorchMetric:
    """A torchmetrics metric fed from named evaluation outputs."""

    def __init__(self, name: str, config: TorchMetricConfig) -> None:
        self.name = name
        self.config = config
        self.metric = config.metric
        declared = config.metric.higher_is_better
        self.higher_is_better = declared
        self.info = MetricInfo(
            type(config.metric).__name__, higher_is_better=declared, declared=declared is not None
        )

    def to(self, device: torch.device) -> None:
        self.metric.to(device)

    def update(self, outputs: Mapping[str, Any], batch_size: int) -> None:
        preds = self._tensor(outputs, self.config.preds)
        target = self._tensor(outputs, self.config.target)
        try:
            self.metric.update(preds.detach(), target.detach())
        except Exception as exc:
            # torchmetrics names neither the metric nor where its inputs came from.
            exc.add_note(
                f"trainbus: raised by metric {self.name!r} fed evaluation_step's "
                f"{self.config.preds!r} ({_describe(preds)}) and {self.config.target!r} "
                f"({_describe(target)}); return what this metric takes under these keys"
            )
            raise

    def _tensor(self, outputs: Mapping[str, Any], key: str) -> torch.Tensor:
        value = _lookup(outputs, key, self.name)
        if not isinstance(value, torch.Tensor):
            raise ModelContractError(
                f"metric {self.name!r} reads evaluation_step's {key!r}, which is "
                f"{_describe(value)}; a torchmetrics metric takes tensors: return {key!r} as "
                "a torch.Tensor on the batch's device (e.g. torch.as_tensor(value, "
                "device=...)), or configure the metric to read another key with "
                "TorchMetricConfig(metric, preds=..., target=...)"
            )
        return value

    def compute(self) -> float:
        value = self.metric.compute()
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ModelContractError(
                    f"metric {self.name!r} computed a tensor of shape {tuple(value.shape)}; "
                    "metrics must reduce to one number (e.g. pass average='macro')"
                )
            return float(value.item())  # host-device sync, once per pass
        return float(value)

    def reset(self) -> None:
        self.metric.reset()


def bind_metrics(metrics: Mapping[str, MetricSpec] | None) -> dict[str, BoundMetric]:
    """Check the user's metric mapping and bind each entry; ``None`` means the mean loss."""
    if metrics is None:
        return {"loss": _MeanLoss("loss", "loss")}
    if not isinstance(metrics, Mapping):
        raise ConfigurationTypeError(
            f"metrics={metrics!r} is not a mapping; pass a dict of name -> metric, e.g. "
            "{'loss': LossMetricConfig(loss_name='loss')}"
        )
    bound: dict[str, BoundMetric] = {}
    for name, spec in metrics.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(
                f"metric name {name!r} is not an identifier; metric names become column names "
                "and keys of state.metrics: use names like 'loss' or 'val_accuracy'"
            )
        if isinstance(spec, LossMetricConfig):
            bound[name] = _MeanLoss(name, spec.loss_name)
        elif isinstance(spec, TorchMetricConfig):
            bound[name] = _TorchMetric(name, spec)
        elif isinstance(spec, torchmetrics.Metric):
            bound[name] = _TorchMetric(name, TorchMetricConfig(spec))
        else:
            raise ConfigurationTypeError(
                f"metric {name!r} is {spec!r}; expected LossMetricConfig, TorchMetricConfig or "
                "a torchmetrics.Metric"
            )
    return bound


def is_better(value: float, best: float | None, higher_is_better: bool | None) -> bool:
    """Whether ``value`` improves on ``best`` (NaN never does; unknown direction: lower wins)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if higher_is_better else value < best


def _lookup(outputs: Mapping[str, Any], key: str, metric: str) -> Any:
    if not isinstance(outputs, Mapping):
        raise ModelContractError(
            f"evaluation_step returned {type(outputs).__name__}; metric {metric!r} needs a dict "
            f"holding {key!r}"
        )
    try:
        return outputs[key]
    except KeyError:
        raise ModelContractError(
            f"metric {metric!r} reads {key!r} from evaluation_step's outputs, which hold "
            f"{sorted(outputs)}; return {key!r} or configure the metric's keys"
        ) from None


def _describe(value: Any) -> str:
    """A short description of an evaluation output, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if value is None:
        return "None"
    kind = type(value)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    article = "an" if name[0].lower() in "aeiou" else "a"
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple):  # an array of another library
        return f"{article} {name} of shape {shape}"
    text = repr(value)
    return f"{article} {name} ({text if len(text) <= 60 else text[:57] + '...'})"
