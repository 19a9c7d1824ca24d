"""The metric a callback monitors: which way it improves, and whether training ever computes it.

:class:`~trainbus.EarlyStoppingCallback` and :class:`~trainbus.ModelCheckpointCallback` share
these rules. The direction (``mode``) comes, in this order, from the callback's ``mode``
argument, from the metric bound to the Trainer (torchmetrics' ``higher_is_better``; a
:class:`~trainbus.LossMetricConfig` goes down), and from a name that is a loss's or an
error's by convention (``loss``, ``val_loss``, ``top1_error``, ``mse``, ...); when none of
them tells, the Trainer is refused with an error that asks for ``mode``.
"""

from __future__ import annotations

import warnings
from typing import Literal

from trainbus.engine.metrics import MetricInfo
from trainbus.errors import ConfigurationError, TrainbusWarning

Mode = Literal["min", "max"]

_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse", "perplexity", "distance")


def check_mode(mode: object, owner: str) -> Mode | None:
    """``mode`` as given: ``"min"``, ``"max"``, or ``None`` to take it from the metric."""
    if mode is None:
        return None
    if mode not in ("min", "max"):
        raise ConfigurationError(
            f"{owner}: mode={mode!r} is not 'min' or 'max'; pass mode='max' when higher "
            "values are better, mode='min' when lower ones are, or leave it out to take it "
            "from the metric"
        )
    return "min" if mode == "min" else "max"


def mode_from_name(metric: str) -> Mode | None:
    """``"min"`` for a name that is a loss's or an error's by convention, else ``None``."""
    if any(token in metric.lower() for token in _LOWER_IS_BETTER):
        return "min"
    return None


def resolve_mode(owner: str, metric: str, given: Mode | None, info: MetricInfo | None) -> Mode:
    """The direction ``owner`` monitors ``metric`` in, from ``mode``, the metric or its name.

    An explicit ``given`` mode always wins; when it contradicts a direction the metric itself
    declares, a :class:`~trainbus.errors.TrainbusWarning` names both. Raises
    :class:`~trainbus.errors.ConfigurationError` when nothing tells.
    """
    declared = None if info is None else info.higher_is_better
    if given is not None:
        if info is not None and info.declared and declared is not None:
            expected: Mode = "max" if declared else "min"
            if given != expected:
                warnings.warn(
                    f"{owner} monitors {metric!r} with mode={given!r}, but the metric "
                    f"({info.metric_class}) declares higher_is_better={declared}, i.e. "
                    f"mode={expected!r}; {owner} keeps mode={given!r}: pass "
                    f"mode={expected!r} or leave mode out if the metric is right",
                    TrainbusWarning,
                    stacklevel=3,
                )
        return given
    if declared is not None:
        return "max" if declared else "min"
    by_name = mode_from_name(metric)
    if by_name is not None:
        return by_name
    described = (
        f"the metric ({info.metric_class}) declares no higher_is_better"
        if info is not None
        else "it was not told the metric's direction"
    )
    raise ConfigurationError(
        f"{owner} cannot tell whether {metric!r} should go up or down: {described} and "
        f"{metric!r} is not a loss's or an error's name; pass mode='max' (higher is better) "
        "or mode='min' (lower is better)"
    )


def known_mode(owner: str, metric: str, mode: Mode | None) -> Mode:
    """``mode``, once a Trainer told it (or it was given); refuses to rank before that."""
    if mode is None:
        raise ConfigurationError(
            f"{owner} does not know whether {metric!r} should go up or down: a Trainer tells "
            "it when the callback is passed to Trainer(callbacks=[...]), and this one never "
            "was; pass mode='max' (higher is better) or mode='min' (lower is better)"
        )
    return mode


def warn_never_computed(owner: str, metric: str, consequence: str) -> None:
    """Warn that ``metric`` is never computed in this ``train()`` call, and what follows."""
    warnings.warn(
        f"{owner} monitors {metric!r}, but this train() call never validates, so "
        f"{metric!r} is never computed and {consequence}; pass val_loader to train() "
        "(validation runs every val_every_n_epochs epochs and after the last one)",
        TrainbusWarning,
        stacklevel=2,
    )
