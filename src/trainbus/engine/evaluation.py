"""Evaluation passes: validation inside training, ``validate``/``test`` and ``predict``.

Like the training loop, it knows nothing of files: saves asked for during ``validate``,
``test`` or ``predict`` are carried out by the ``boundary`` function at each evaluation batch.
Metrics go to handlers as read-only mappings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any

import torch

from trainbus.engine.compute import batch_size, move_to
from trainbus.engine.core import Engine
from trainbus.engine.dispatch import read_only
from trainbus.engine.limits import evaluation_batches
from trainbus.engine.metrics import is_better
from trainbus.engine.policy import Boundary, BoundaryHook
from trainbus.errors import DataError


class Evaluation:
    """Runs the evaluation passes of one Trainer and records their metrics in the state."""

    def __init__(self, engine: Engine, boundary: BoundaryHook) -> None:
        self.engine = engine
        self.boundary = boundary

    def validation(self, loader: Iterable[Any], *, interruptible: bool = False) -> bool:
        """A validation inside training; False when a stop signal cut it short.

        ``interruptible``: a signal ends the pass at the next evaluation batch, and its
        metrics are dropped unannounced (the loop writes a training state that redoes it).
        """
        engine = self.engine
        engine.state.update(stage="validation")
        emit = engine.dispatcher.emit
        signals = engine.dispatcher.signals
        emit("validation_start")
        metrics = self.evaluation_pass(
            evaluation_batches(engine.settings, loader),
            "val_loader",
            after_batch=(lambda: signals.received is not None) if interruptible else None,
        )
        if interruptible and signals.received is not None:
            return False
        self._record_metrics(metrics, track_best=True)
        view = read_only(metrics)
        emit("metrics_computed", metrics=view)
        emit("validation_end", metrics=view)
        return True

    def evaluation_pass(
        self, loader: Iterable[Any], name: str, *, after_batch: Callable[[], bool] | None = None
    ) -> dict[str, float]:
        """Compute the metrics over ``loader``; ``after_batch`` returning True ends it early."""
        engine = self.engine
        model, state, fire = engine.model, engine.state, engine.dispatcher.fire
        was_training = model.training
        model.eval()
        for metric in engine.metrics.values():
            metric.reset()
        seen_any = False
        step, batches = self._step("evaluation_step"), self._batches_everywhere(loader)
        device_batch = None
        index = -1
        try:
            with torch.no_grad():
                for index, batch in enumerate(loader):
                    seen_any = True
                    state.update(batch_idx=index)
                    fire("evaluation_step_start", batch)
                    device_batch = move_to(batch, engine.device)
                    with engine.precision.autocast():
                        outputs = step(device_batch)
                    size = batch_size(device_batch)
                    for metric in engine.metrics.values():
                        metric.update(outputs, size)
                    fire("evaluation_step_end", device_batch, outputs)
                    if after_batch is not None and after_batch():
                        break
                self._keep_in_step(step, device_batch, index + 1, batches)
        finally:
            model.train(was_training)
        if not seen_any:
            raise DataError(
                f"{name} yielded no batches; pass a loader over a non-empty dataset (check "
                "drop_last with a batch_size larger than the dataset)"
            )
        return {metric_name: metric.compute() for metric_name, metric in engine.metrics.items()}

    def _step(self, name: str) -> Callable[[Any], Any]:
        """The model's ``name`` step; under FSDP through the root, which gathers the weights."""
        sharded = self.engine.sharded
        if sharded is None:
            return getattr(self.engine.model, name)  # type: ignore[no-any-return]
        return functools.partial(sharded, step=name)

    def _batches_everywhere(self, loader: Iterable[Any]) -> int:
        """Under FSDP, the most batches any rank's shard has (every forward is collective)."""
        engine = self.engine
        group = engine.dispatcher.group
        if engine.sharded is None or group is None:
            return 0
        if not isinstance(loader, Sized):
            raise DataError(
                f"the evaluation loader {loader!r} has no len(); under strategy='fsdp' every "
                "rank runs as many evaluation batches as the others (each forward gathers the "
                "weights from all of them): pass a loader over a map-style dataset"
            )
        return group.most(len(loader))

    def _keep_in_step(
        self, step: Callable[[Any], Any], batch: Any, done: int, everywhere: int
    ) -> None:
        """Run the forwards this rank's shorter shard lacks (outputs unused), for FSDP's gathers."""
        if batch is None and done < everywhere:
            raise DataError(
                "under strategy='fsdp' a rank got no evaluation batch while others did; give "
                "the evaluation loader at least one batch per rank"
            )
        for _ in range(everywhere - done):
            with self.engine.precision.autocast():
                step(batch)

    def _record_metrics(self, metrics: Mapping[str, float], *, track_best: bool) -> None:
        engine = self.engine
        state = engine.state
        changes: dict[str, Any] = {"metrics": dict(metrics)}
        if track_best:
            best = dict(state.get("best_metrics"))
            epochs = dict(state.get("best_epochs"))
            for metric_name, value in metrics.items():
                higher = engine.metrics[metric_name].higher_is_better
                if is_better(value, best.get(metric_name), higher):
                    best[metric_name] = value
                    epochs[metric_name] = state.get("current_epoch")
            changes.update(best_metrics=best, best_epochs=epochs)
        state.update(**changes)

    def standalone(self, stage: str, loader: Iterable[Any]) -> dict[str, float]:
        """``validate``/``test``: one pass, the metrics announced read-only and returned."""
        engine = self.engine
        emit = engine.dispatcher.emit
        if stage == "validate" and engine.settings.limit_val_batches != 0:
            loader = evaluation_batches(engine.settings, loader)
        emit(f"{stage}_start")
        metrics = self.evaluation_pass(loader, "loader", after_batch=self._evaluation_boundary)
        self._record_metrics(metrics, track_best=False)
        view = read_only(metrics)
        emit("metrics_computed", metrics=view)
        emit(f"{stage}_end", metrics=view)
        self.boundary(Boundary.EVALUATION, f"{stage}_end")
        return metrics

    def _evaluation_boundary(self) -> bool:
        self.boundary(Boundary.EVALUATION, "evaluation_step_end")
        return False

    def predict(self, loader: Iterable[Any]) -> list[Any]:
        """``model.predict_step`` on every batch (a stop ends early); outputs on the CPU."""
        engine = self.engine
        model, state, policy = engine.model, engine.state, engine.policy
        emit, fire = engine.dispatcher.emit, engine.dispatcher.fire
        predictions: list[Any] = []
        emit("predict_start")
        model.eval()
        step, batches = self._step("predict_step"), self._batches_everywhere(loader)
        device_batch = None
        with torch.no_grad():
            for index, batch in enumerate(loader):
                state.update(batch_idx=index)
                fire("evaluation_step_start", batch)
                device_batch = move_to(batch, engine.device)
                with engine.precision.autocast():
                    outputs = step(device_batch)
                fire("evaluation_step_end", device_batch, outputs)
                predictions.append(move_to(outputs, torch.device("cpu")))
                engine.dispatcher.agree(only_if_due=True)
                self.boundary(Boundary.EVALUATION, "evaluation_step_end")
                if policy.stop_requested:
                    break
            self._keep_in_step(step, device_batch, len(predictions), batches)
        if not predictions:
            raise DataError("loader yielded no batches; pass a loader over a non-empty dataset")
        emit("predict_end", predictions=predictions)
        self.boundary(Boundary.EVALUATION, "predict_end")
        return predictions
