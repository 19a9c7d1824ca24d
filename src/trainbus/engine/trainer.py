"""The Trainer: runs the essential loop and announces every step of it on the event bus.

The loop does forward, backward, optimizer step and evaluation; everything else is a
subscriber. See :mod:`trainbus.events.catalog` for the map of where each event fires and
:mod:`trainbus.events.commands` for how handler requests are merged.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import math
import os
import platform
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel

import trainbus
from trainbus.engine import checkpoint
from trainbus.engine import distributed as dist_tools
from trainbus.engine.compute import (
    DeterministicMode,
    Precision,
    batch_size,
    finite_number,
    move_to,
    resolve_device,
    resolve_precision,
    seed_everything,
    with_last,
)
from trainbus.engine.maps import CHECKPOINTS_DIR, MAPS_FILE, TRAINING_DIR, Maps
from trainbus.engine.metrics import BoundMetric, MetricSpec, bind_metrics, is_better
from trainbus.engine.model import Model
from trainbus.engine.resume import (
    EpochStart,
    RandomStates,
    capture_loader_generators,
    capture_random_states,
    restore_loader_generators,
    restore_random_states,
    resumed_iterator,
)
from trainbus.engine.signals import StopSignals
from trainbus.engine.state import StateKeeper, TrainerState
from trainbus.errors import (
    CheckpointError,
    ConfigurationError,
    ConfigurationTypeError,
    DataError,
    MapsError,
    ModelContractError,
    PluginError,
    SubscriptionError,
    TrainbusError,
    TrainbusWarning,
)
from trainbus.events import plugins as plugin_loader
from trainbus.events.bus import SOURCE_BUILTIN, SOURCE_USER, EventBus
from trainbus.events.callback import Callback
from trainbus.events.catalog import EVENTS, closest_names
from trainbus.events.commands import (
    Request,
    SaveCheckpoint,
    SaveTrainingState,
    SkipStep,
    Stop,
    merge,
)
from trainbus.events.marker import Mark, OnError, Predicate, add_mark
from trainbus.handlers.defaults import DEFAULT_TYPES
from trainbus.handlers.defaults import default_callbacks as _default_callbacks
from trainbus.handlers.model_checkpoint import check_tag_conflicts

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
L = TypeVar("L", bound=Iterable[Any])
Stage = Literal["train", "validate", "test", "predict"]


class Trainer:
    """Train, validate, test and predict with a :class:`~trainbus.Model`, announcing every step.

    Arguments (every keyword has a default):

    - ``maps``: the experiment directory; it must not exist yet (or be empty) unless
      ``overwrite=True``. It is created by the first call to train/validate/test/predict.
    - ``model``: a :class:`~trainbus.Model` (e.g. :class:`~trainbus.SupervisedModel`).
    - ``metrics``: ``{name: LossMetricConfig | torchmetrics.Metric | TorchMetricConfig}``;
      default ``{"loss": LossMetricConfig("loss")}``.
    - ``callbacks``: callbacks to add; an instance of a default callback's type replaces it.
    - ``default_callbacks``: ``True`` (the defaults), ``False`` (none), the default types to
      keep, or ``{DefaultType: False}`` to switch single defaults off.
    - ``max_epochs``, ``val_every_n_epochs``, ``log_every_n_batches``: loop lengths.
    - ``accumulate_grad_batches``: batches per optimizer step (a short last group is stepped
      too, with gradients rescaled to a mean over its batches).
    - ``gradient_clip_val`` / ``gradient_clip_algorithm`` (``"norm"`` or ``"value"``):
      clipping after unscaling.
    - ``device`` (``"auto"``, ``"cpu"``, ``"cuda:N"``), ``precision`` (``"32"``, ``"bf16"``,
      ``"16"``), ``compile`` (``False``, ``True`` or ``torch.compile`` keyword arguments).
    - ``seed``: seeds Python, NumPy and torch when given (recorded in ``maps.json``);
      ``deterministic``: deterministic algorithms during each call.
    - ``nonfinite_loss``: ``"stop"`` (default) ends training at the log interval where a NaN
      or infinite mean loss shows (no per-step sync), naming the steps; ``"skip"`` checks
      every step (a host-device sync per step) and skips the update of such a batch.
    - ``plugins``: ``"auto"`` (every installed plugin package, unless
      ``TRAINBUS_DISABLE_PLUGIN_AUTOLOAD=1``), ``False``, or the names to load; ``block``:
      names never to load (checked before import). ``TRAINBUS_PLUGINS=a,b`` in the
      environment is an allow list. See :mod:`trainbus.events.plugins`.
    - ``ddp_options``: keyword arguments for ``DistributedDataParallel`` in a run launched by
      ``torchrun`` (e.g. ``{"find_unused_parameters": True}``); see
      :mod:`trainbus.engine.distributed`.

    Under ``torchrun`` the same script trains data-parallel: rank 0 writes the MAPS and the
    logs, every rank trains on its share of each epoch, and ``state.rank`` /
    ``state.world_size`` say where a handler runs.
    """

    def __init__(
        self,
        maps: str | Any,
        model: Model,
        metrics: Mapping[str, MetricSpec] | None = None,
        callbacks: Iterable[Callback] | None = None,
        *,
        max_epochs: int = 100,
        val_every_n_epochs: int = 1,
        log_every_n_batches: int = 50,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        device: str | torch.device = "auto",
        precision: Literal["32", "bf16", "16"] = "32",
        compile: bool | Mapping[str, Any] = False,
        seed: int | None = None,
        deterministic: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        default_callbacks: bool | Iterable[type[Callback]] | Mapping[type[Callback], bool] = True,
        overwrite: bool = False,
        plugins: Literal["auto"] | Sequence[str] | bool = "auto",
        block: Sequence[str] = (),
        ddp_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, Model):
            raise ConfigurationTypeError(
                f"model={model!r} is not a trainbus.Model; subclass trainbus.Model (forward_step,"
                " evaluation_step, build_optimizers) or wrap the network in "
                "SupervisedModel(network, loss)"
            )
        self.max_epochs = _positive_int("max_epochs", max_epochs)
        self.val_every_n_epochs = _positive_int("val_every_n_epochs", val_every_n_epochs)
        self.log_every_n_batches = _positive_int("log_every_n_batches", log_every_n_batches)
        self.accumulate_grad_batches = _positive_int(
            "accumulate_grad_batches", accumulate_grad_batches
        )
        if gradient_clip_val is not None and (
            isinstance(gradient_clip_val, bool)
            or not isinstance(gradient_clip_val, int | float)
            or not gradient_clip_val > 0
            or not finite_number(gradient_clip_val)
        ):
            raise ConfigurationError(
                f"gradient_clip_val={gradient_clip_val!r} is not a positive finite number; "
                "pass e.g. gradient_clip_val=1.0, or None to disable clipping"
            )
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ConfigurationError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not 'norm' or 'value'"
            )
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.placement = dist_tools.detect_placement()
        if ddp_options is not None and (
            not isinstance(ddp_options, Mapping) or not all(isinstance(k, str) for k in ddp_options)
        ):
            raise ConfigurationTypeError(
                f"ddp_options={ddp_options!r} is not a dict of DistributedDataParallel keyword "
                "arguments; pass e.g. ddp_options={'find_unused_parameters': True}"
            )
        self.ddp_options: dict[str, Any] = dict(ddp_options or {})
        self.device = resolve_device(dist_tools.device_for(self.placement, device))
        # On the CPU, training batches are used as the loader yields them: walking each batch
        # to find nothing to move costs microseconds per step.
        self._moves_batches = self.device.type != "cpu"
        self.precision: Precision = resolve_precision(precision, self.device)
        if not isinstance(compile, bool | Mapping):
            raise ConfigurationTypeError(
                f"compile={compile!r} is not a bool or a dict of torch.compile arguments"
            )
        if isinstance(compile, Mapping):
            accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
            unknown = sorted(str(key) for key in compile if key not in accepted)
            if unknown:
                raise ConfigurationError(
                    f"compile={dict(compile)!r} has keywords {unknown} that torch.compile does "
                    f"not take; it takes {sorted(accepted)}"
                )
        self.compile_options: dict[str, Any] | None = (
            dict(compile) if isinstance(compile, Mapping) else ({} if compile else None)
        )
        if not isinstance(deterministic, bool):
            raise ConfigurationTypeError(f"deterministic={deterministic!r} is not a bool")
        self.deterministic = deterministic
        if nonfinite_loss not in ("stop", "skip"):
            raise ConfigurationError(
                f"nonfinite_loss={nonfinite_loss!r} is not 'stop' or 'skip'; 'stop' ends training "
                "at the log interval where a NaN or infinite loss shows, 'skip' checks every "
                "step (a host-device sync per step) and skips the optimizer update of such a batch"
            )
        self.nonfinite_loss = nonfinite_loss
        self._skipped_nonfinite = 0
        if not isinstance(overwrite, bool):
            raise ConfigurationTypeError(
                f"overwrite={overwrite!r} is not a bool; pass overwrite=True to replace an "
                "existing MAPS, or leave it False"
            )
        defaults_given: object = default_callbacks  # typed as a choice; users pass anything
        if isinstance(defaults_given, str | bytes):
            raise ConfigurationTypeError(
                f"default_callbacks={default_callbacks!r} is a string; pass True, False, a list "
                "of default callback types (e.g. [LoggerCallback]) or {Type: False}"
            )
        self.seed = None if seed is None else seed_everything(seed)
        self.maps = maps if isinstance(maps, Maps) else Maps(maps, overwrite=overwrite)
        self.model = model
        self.metrics: dict[str, BoundMetric] = bind_metrics(metrics)
        self.bus = EventBus(rank=self.placement.rank)
        if not isinstance(default_callbacks, bool | Mapping) and isinstance(
            default_callbacks, Iterable
        ):
            default_callbacks = list(default_callbacks)
        self.plugins, loaded = _load_plugins(plugins, block)
        contributed = {id(c): plugin for plugin in loaded for c in plugin.callbacks}
        self.callbacks: list[Callback] = _resolve_callbacks(
            callbacks, default_callbacks, [c for plugin in loaded for c in plugin.callbacks]
        )
        self._defaults_kept = [t.__name__ for t in _kept_defaults(default_callbacks)]
        for contribution in loaded:
            replaced = [c for c in contribution.callbacks if c not in self.callbacks]
            if replaced:
                names = ", ".join(type(c).__name__ for c in replaced)
                contribution.record.reason += (
                    f"; {names} replaced by the one given in callbacks=[...]"
                )
        check_tag_conflicts(self.callbacks)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.scaler: torch.amp.GradScaler | None = None
        self._state = StateKeeper(
            max_epochs=self.max_epochs,
            rank=self.placement.rank,
            world_size=self.placement.world_size,
        )
        # Distributed runs: the group of the current call, the requests not yet agreed on by
        # every rank, whether an event that may carry one fired since the last agreement, and
        # the signal the ranks agreed on.
        self._group: dist_tools.ProcessGroup | None = None
        self._unshared: list[Request] = []
        self._agreement_due = False
        self._agreed_signal = 0
        self._forward: DistributedDataParallel | None = None
        self._pending: list[Request] = []
        self._calls: list[dict[str, Any]] = []
        self._compiled = False
        self._losses: list[torch.Tensor] = []  # since the last log interval, on the device
        self._tensor_rates = False
        self._signals = StopSignals()
        self._adopt_maps = False
        self._open_group = 0
        self._epoch_start: EpochStart | None = None
        self._position: dict[str, Any] = {"epoch": 0, "batches_done": 0, "in_epoch": False}
        self._resume_random: RandomStates | None = None
        self._resume_loader_generators: dict[str, torch.Tensor] | None = None
        self._train_loader: Iterable[Any] | None = None
        self._sources: dict[str, str] = {}
        for callback in self.callbacks:
            plugin = contributed.get(id(callback))
            if plugin is None:
                self._check_metric_names(callback)
                self.bus.attach(callback, source=_source_of(callback))
                self._sources[callback.callback_id] = _source_of(callback)
                continue
            with _registering(plugin):
                self._check_metric_names(callback)
                subscriptions = self.bus.attach(callback, source=plugin.record.info.source)
            plugin.record.subscribers.extend(s.id for s in subscriptions)
            self._sources[callback.callback_id] = plugin.record.info.source
        for plugin in loaded:
            for event, function, options in plugin.functions:
                with _registering(plugin):
                    subscription = self.bus.add(
                        event, function, options, source=plugin.record.info.source
                    )
                plugin.record.subscribers.append(subscription.id)
        self._emit("trainer_init")

    @classmethod
    def from_maps(
        cls,
        maps: str | os.PathLike[str],
        model: Model,
        metrics: Mapping[str, MetricSpec] | None = None,
        callbacks: Iterable[Callback] | None = None,
        *,
        weights: str | None = None,
        **overrides: Any,
    ) -> Trainer:
        """Rebuild the Trainer of an existing MAPS, to resume its training or evaluate it.

        The loop settings recorded in ``maps.json`` (epochs, accumulation, clipping, precision,
        seed, ...) are reused; ``overrides`` replace any of them (e.g. ``max_epochs=50`` to
        train longer). The model, metrics and callbacks are objects, so they are passed again.
        ``train()`` then resumes from the newest valid training state; ``weights`` names a
        model checkpoint (e.g. ``"best-loss"``) to load now, for validate/test/predict.
        """
        handle = Maps(maps)
        if not handle.is_maps():
            raise MapsError(
                f"{str(handle.path)!r} is not a trainbus MAPS (no {MAPS_FILE}); pass the "
                "directory a Trainer wrote"
            )
        try:
            recorded = handle.read_json(MAPS_FILE)
            settings = dict(recorded["trainer"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MapsError(
                f"{handle.file(MAPS_FILE)} cannot be read ({exc}); it is needed to rebuild "
                "the Trainer"
            ) from exc
        allowed = {
            name
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.kind is parameter.KEYWORD_ONLY
        }
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ConfigurationTypeError(
                f"Trainer.from_maps got unknown settings {unknown}; it takes {sorted(allowed)}"
            )
        reused = {key: settings[key] for key in _REUSED_SETTINGS if key in settings}
        if reused.get("compile") is None:
            reused.pop("compile", None)
        if isinstance(settings.get("default_callbacks"), list):
            by_name = {t.__name__: t for t in DEFAULT_TYPES}
            kept = settings["default_callbacks"]
            reused["default_callbacks"] = [by_name[name] for name in kept if name in by_name]
        if recorded.get("seed") is not None:
            reused["seed"] = recorded["seed"]
        trainer = cls(handle, model, metrics, callbacks, **{**reused, **overrides})
        trainer._adopt_maps = True
        if weights is not None:
            checkpoint.load_weights(handle.path, model, tag=weights)
        return trainer

    # ----------------------------------------------------------------- public
    @property
    def state(self) -> TrainerState:
        """The current state snapshot."""
        return self._state.snapshot()

    @property
    def snapshots_built(self) -> int:
        """How many state snapshots were built (one per change that someone observed)."""
        return self._state.snapshots_built

    def on(
        self,
        event: str,
        *,
        priority: int = 0,
        every: int | None = None,
        once: int | bool | None = None,
        when: Predicate | None = None,
        on_error: OnError = "raise",
        id: str | None = None,
        before: str | Sequence[str] = (),
        after: str | Sequence[str] = (),
        reverse: bool = False,
        rank_zero_only: bool = False,
    ) -> Callable[[F], F]:
        """Decorator: subscribe a function to ``event`` on this trainer's bus.

        ``before``/``after`` name subscriber ids (or callback ids) this one must precede or
        follow whatever the priorities say; ``reverse=True`` at an end event mirrors the
        order of the paired start event (see :class:`~trainbus.events.marker.Options`);
        ``rank_zero_only=True`` calls it on rank 0 only in a run launched by torchrun.

        ::

            @trainer.on("epoch_end", priority=5, every=2)
            def report(*, state):
                print(state.current_epoch, dict(state.metrics))
        """

        def register(function: F) -> F:
            subscription = self.bus.subscribe(
                event,
                function,
                priority=priority,
                every=every,
                once=once,
                when=when,
                on_error=on_error,
                id=id,
                before=before,
                after=after,
                reverse=reverse,
                source=SOURCE_USER,
                rank_zero_only=rank_zero_only,
            )
            return add_mark(function, Mark(event, subscription.options))

        return register

    def emit(self, event: str, /, **payload: Any) -> None:
        """Emit a custom event (declared with ``trainer.bus.declare``) with its payload names."""
        spec = self.bus.spec(event)
        if event in EVENTS:
            raise ConfigurationError(
                f"emit({event!r}): built-in events are announced by the loop only; declare a "
                "custom event (trainer.bus.declare(EventSpec(...))) and emit that"
            )
        given = set(payload)
        expected = set(spec.payload)
        if given != expected:
            raise ConfigurationError(
                f"emit({event!r}) got payload {sorted(given)}, but the event declares "
                f"{sorted(expected)} (state, model and maps are added by the trainer)"
            )
        self._emit(event, **payload)
        self._apply_immediate()

    def plan(self, event: str | None = None) -> list[dict[str, Any]]:
        """The dispatch plan as JSON-ready rows (see :meth:`EventBus.plan`)."""
        return [entry.as_dict() for entry in self.bus.plan(event)]

    def train(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        resume: bool | None = None,
    ) -> TrainerState:
        """Train for ``max_epochs`` (or until a handler asks to stop); returns the final state.

        ``resume=True`` continues from the newest valid training state of the MAPS, exactly
        where it was written (mid-epoch included), or starts afresh when the MAPS does not
        exist yet; the default is ``True`` for a Trainer built by :meth:`from_maps`.
        """
        _check_loader("train_loader", train_loader)
        if val_loader is not None:
            _check_loader("val_loader", val_loader)
        if resume is None:
            # Under torchrun, a restart after a worker failed resumes the interrupted run.
            resume = self._adopt_maps or (self.placement.restart_count > 0 and self.maps.is_maps())
        elif not isinstance(resume, bool):
            raise ConfigurationTypeError(f"resume={resume!r} is not a bool")
        with self._distributed():
            train_loader = self._shard(train_loader, "train_loader", training=True)
            if val_loader is not None:
                val_loader = self._shard(val_loader, "val_loader", training=False)
            found = self._on_main(self._resume_point) if resume else None
            self._train_loader = train_loader
            with StopSignals() as self._signals, self._call("train", adopt=found is not None):
                self._prepare_training()
                if found is not None:
                    self._restore(found, train_loader)
                self._emit("train_start", optimizers=self.optimizers, bus=self.bus)
                if found is not None:
                    self._emit("resume", checkpoint=found.path)
                self._agree()
                self._save_pending()
                while self._position["epoch"] < self.max_epochs and not self._stop_requested():
                    self._run_epoch(train_loader, val_loader)
                self._emit("train_end")
                self._agree()
                self._save_pending()
        received = self._signal_received()
        if received:
            # After teardown: logs are flushed and the training state is written.
            raise SystemExit(128 + received)
        return self.state

    def _signal_received(self) -> int:
        """The stop signal to act on (0: none); in a distributed run, the one agreed on."""
        if self.placement.distributed:
            return self._agreed_signal
        return self._signals.received or 0

    def _stop_on_signal(self, event: str) -> None:
        """A signal arrived: write a training state here, and stop (resumable)."""
        received = self._signal_received()
        if not received or self._stop_requested() or self._open_group:
            return
        reason = f"received {signal.Signals(received).name}"
        self._accept([Request(Stop(reason, resumable=True), SIGNAL_SOURCE, event)])
        self._write_training_state(Request(SaveTrainingState(reason), SIGNAL_SOURCE, event))

    def _run_epoch(self, train_loader: Iterable[Any], val_loader: Iterable[Any] | None) -> None:
        epoch = self._position["epoch"]
        num_batches = _length(train_loader)
        changes = {
            "stage": "train",
            "current_epoch": epoch,
            "num_batches": num_batches,
            **_learning_rates(self.optimizers, read_tensors=False),
        }
        if self._position["in_epoch"]:
            # Resumed in the middle of this epoch: epoch_start fired before the interruption.
            skip = self._position["batches_done"]
            self._state.update(batch_idx=skip - 1, **changes)
            assert self._epoch_start is not None
            dist_tools.set_epoch(train_loader, epoch)
            batches = resumed_iterator(train_loader, self._epoch_start, skip)
        else:
            skip = 0
            self._state.update(batch_idx=-1, **changes)
            self._restore_random_states()
            self._position = {"epoch": epoch, "batches_done": 0, "in_epoch": True}
            self._emit("epoch_start")
            self._agree(only_if_due=True)
            dist_tools.set_epoch(train_loader, epoch)
            self._epoch_start = EpochStart.capture(train_loader)
            batches = iter(train_loader)
        self._restore_random_states()
        completed = self._train_epoch(batches, skip, _reliable_length(train_loader))
        last = epoch + 1 == self.max_epochs or self._stop_requested()
        if (
            val_loader is not None
            and completed
            and ((epoch + 1) % self.val_every_n_epochs == 0 or last)
        ):
            self._validation(val_loader)
        self._state.update(stage="train")
        if completed:
            self._position = {"epoch": epoch + 1, "batches_done": 0, "in_epoch": False}
        # else a stop cut the epoch: the position stays inside it, so a resumable stop
        # continues with the batches that were left.
        self._emit("epoch_end")
        self._agree()
        self._save_pending()
        self._stop_on_signal("epoch_end")

    def validate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Compute the metrics on ``loader``; returns them as floats."""
        return self._standalone_evaluation("validate", loader)

    def test(self, loader: Iterable[Any]) -> dict[str, float]:
        """Compute the metrics on a held-out ``loader``; returns them as floats."""
        return self._standalone_evaluation("test", loader)

    def predict(self, loader: Iterable[Any]) -> list[Any]:
        """Run ``model.predict_step`` on every batch; returns the outputs, moved to the CPU."""
        _check_loader("loader", loader)
        predictions: list[Any] = []
        with self._distributed(), self._call("predict"):
            self._prepare_model()
            self._emit("predict_start")
            self.model.eval()
            with torch.no_grad():
                for index, batch in enumerate(loader):
                    self._state.update(batch_idx=index)
                    self._emit("evaluation_step_start", batch=batch)
                    device_batch = move_to(batch, self.device)
                    with self.precision.autocast():
                        outputs = self.model.predict_step(device_batch)
                    self._emit("evaluation_step_end", batch=device_batch, outputs=outputs)
                    predictions.append(move_to(outputs, torch.device("cpu")))
                    if self._apply_immediate():
                        break
            if not predictions:
                raise DataError("loader yielded no batches; pass a loader over a non-empty dataset")
            self._emit("predict_end", predictions=predictions)
        return predictions

    # ------------------------------------------------------------------- loop
    def _train_epoch(self, batches: Iterator[Any], first: int, total: int | None) -> bool:
        """Train on ``batches`` (numbered from ``first``); False when a stop cut it short."""
        model = self.model
        model.train()
        state = self._state
        ddp = self._forward
        forward = model.forward_step if ddp is None else ddp
        world_size = self.placement.world_size
        accumulate = self.accumulate_grad_batches
        log_every = self.log_every_n_batches
        stop_before_epoch = self._stop_requested()
        self._open_group = 0
        seen_any = False
        for batch_idx, (batch, is_last) in enumerate(_numbered(batches, first, total), first):
            seen_any = True
            iteration = state.get("iteration") + 1
            # One change per batch start: samples_seen counts this batch from batch_start on.
            state.update(
                batch_idx=batch_idx,
                iteration=iteration,
                samples_seen=state.get("samples_seen") + batch_size(batch) * world_size,
            )
            loss: torch.Tensor | None = None
            losses: Mapping[str, torch.Tensor] | None = None
            if not self._emit_skippable("batch_start", batch=batch):
                if self._moves_batches:
                    batch = move_to(batch, self.device)
                self._emit("forward_start", batch=batch)
                if ddp is not None:
                    # Gradients are averaged across ranks at the backward that closes a group.
                    ddp.require_backward_grad_sync = self._open_group + 1 >= accumulate or is_last
                with self.precision.autocast():
                    loss, losses = _loss_of(forward(batch))
                finite = self.nonfinite_loss != "skip" or self._all_finite(loss)
                if not finite:
                    self._skip_nonfinite(loss)
                    self._release_reduction()
                elif self._emit_skippable("backward_start", batch=batch, loss=loss, losses=losses):
                    self._release_reduction()
                else:
                    scaled = loss / accumulate if accumulate > 1 else loss
                    if self.scaler is not None:
                        scaled = self.scaler.scale(scaled)
                    model.backward_step(scaled)
                    self._open_group += 1
                    self._emit("backward_end", batch=batch, loss=loss, losses=losses)
                    if self._open_group == accumulate or is_last:
                        self._optimizer_step(self._open_group)
                        self._open_group = 0
                if finite:
                    self._track_loss(loss)
            self._position["batches_done"] = batch_idx + 1
            log_step = iteration % log_every == 0 or is_last
            if log_step:
                self._log_loss()
            # Distributed: emitted on every rank, so that each knows when to agree, even
            # where the subscribers that may ask for something run on rank 0 only.
            if self._group is not None or self.bus.has_subscribers("batch_end"):
                self._emit(
                    "batch_end", batch=batch, loss=_detached(loss), losses=_detached_all(losses)
                )
            if self._group is not None:
                self._agree(only_if_due=not log_step)
            self._save_pending()
            self._stop_on_signal("batch_end")
            if not stop_before_epoch and self._stop_requested():
                if self._open_group:
                    self._open_group = 0
                    self._zero_grad()
                return False
        if self._open_group:
            # The last batch was skipped while a group was open: step what was accumulated.
            self._optimizer_step(self._open_group)
            self._open_group = 0
            self._agree(only_if_due=True)
            self._save_pending()
        if not seen_any and first == 0:
            raise DataError(
                "train_loader yielded no batches; check that the dataset is not empty and that "
                "batch_size is not larger than the dataset with drop_last=True"
            )
        return True

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (a host-device sync, every step)."""
        finite = bool(torch.isfinite(loss))
        return finite if self._group is None else self._group.all_true(finite)

    def _release_reduction(self) -> None:
        """After a DDP forward whose backward is skipped: a zero backward ends its reduction.

        DDP expects the backward of a forward that syncs gradients; without one, the next
        forward fails on every rank. Zero gradients through the parameters (not the loss,
        which may be NaN) complete it and average what the group accumulated so far.
        """
        ddp = self._forward
        if ddp is None or not ddp.require_backward_grad_sync:
            return
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        torch.stack([p.sum() * 0 for p in parameters]).sum().backward()  # type: ignore[no-untyped-call]

    def _optimizer_step(self, batches_in_group: int) -> None:
        if batches_in_group != self.accumulate_grad_batches:
            # A short last group: gradients were divided by the full group size.
            _scale_gradients(self.optimizers, self.accumulate_grad_batches / batches_in_group)
        if self.scaler is not None:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        if self.gradient_clip_val is not None:
            parameters = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
            if self.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(parameters, self.gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(parameters, self.gradient_clip_val)
        if self._emit_skippable("optimizer_step_start", optimizers=self.optimizers):
            if self.scaler is not None:
                self.scaler.update()
            self._zero_grad()
            return
        self.model.optimization_step(self.optimizers, self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        self._zero_grad()
        step = self._state.get("global_step") + 1
        rates = _rates_of(self.optimizers)
        if self._tensor_rates or rates == self._state.get("learning_rates"):
            # Unchanged (the common case), or tensors: comparing those is a host-device sync,
            # so they are read at log intervals only.
            self._state.update(global_step=step)
        else:
            rates_now = _learning_rates(self.optimizers, read_tensors=False, rates=rates)
            self._state.update(global_step=step, **rates_now)
        self._emit("optimizer_step_end", optimizers=self.optimizers)

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _track_loss(self, loss: torch.Tensor) -> None:
        # Kept on the device, summed and read at log intervals only (a host-device sync);
        # appending costs no kernel launch per step.
        self._losses.append(loss.detach())

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        self._skipped_nonfinite += 1
        snapshot = self._state.snapshot()
        warnings.warn(
            f"the loss of training step {snapshot.iteration} (epoch {snapshot.current_epoch}, "
            f"batch {snapshot.batch_idx}) is {float(loss.detach())}; the batch was skipped "
            "(nonfinite_loss='skip'): no backward, no optimizer update",
            TrainbusWarning,
            stacklevel=4,
        )

    def _log_loss(self) -> None:
        if not self._losses:
            return
        mean_tensor = torch.stack(self._losses).float().mean()
        if self._group is not None:
            mean_tensor = self._group.mean(mean_tensor)
        mean = float(mean_tensor.item())  # host-device sync
        count = len(self._losses)
        self._losses = []
        if not math.isfinite(mean) and self.nonfinite_loss == "stop":
            last = self._state.get("iteration")
            self._accept(
                [
                    Request(
                        Stop(
                            f"the training loss is {mean} over steps {last - count + 1}-{last} "
                            "(not finite): training stopped instead of going on with broken "
                            "weights; lower the learning rate, clip gradients "
                            "(gradient_clip_val=...) or check the data, or pass "
                            "nonfinite_loss='skip' to skip such batches"
                        ),
                        NONFINITE_SOURCE,
                        "loss_logged",
                    )
                ]
            )
        self._state.update(train_loss=mean, **_learning_rates(self.optimizers, read_tensors=True))
        self._emit("loss_logged", train_loss=mean)

    def _validation(self, loader: Iterable[Any]) -> None:
        self._state.update(stage="validation")
        self._emit("validation_start")
        metrics = self._evaluation_pass(loader, "val_loader")
        self._record_metrics(metrics, track_best=True)
        self._emit("metrics_computed", metrics=metrics)
        self._emit("validation_end", metrics=metrics)

    def _evaluation_pass(self, loader: Iterable[Any], name: str) -> dict[str, float]:
        model = self.model
        was_training = model.training
        model.eval()
        for metric in self.metrics.values():
            metric.reset()
        seen_any = False
        try:
            with torch.no_grad():
                for index, batch in enumerate(loader):
                    seen_any = True
                    self._state.update(batch_idx=index)
                    self._emit("evaluation_step_start", batch=batch)
                    device_batch = move_to(batch, self.device)
                    with self.precision.autocast():
                        outputs = model.evaluation_step(device_batch)
                    size = batch_size(device_batch)
                    for metric in self.metrics.values():
                        metric.update(outputs, size)
                    self._emit("evaluation_step_end", batch=device_batch, outputs=outputs)
        finally:
            model.train(was_training)
        if not seen_any:
            raise DataError(
                f"{name} yielded no batches; pass a loader over a non-empty dataset (check "
                "drop_last with a batch_size larger than the dataset)"
            )
        return {name: metric.compute() for name, metric in self.metrics.items()}

    def _record_metrics(self, metrics: Mapping[str, float], *, track_best: bool) -> None:
        changes: dict[str, Any] = {"metrics": dict(metrics)}
        if track_best:
            best = dict(self._state.get("best_metrics"))
            epochs = dict(self._state.get("best_epochs"))
            for name, value in metrics.items():
                if is_better(value, best.get(name), self.metrics[name].higher_is_better):
                    best[name] = value
                    epochs[name] = self._state.get("current_epoch")
            changes.update(best_metrics=best, best_epochs=epochs)
        self._state.update(**changes)

    def _standalone_evaluation(
        self, stage: Literal["validate", "test"], loader: Iterable[Any]
    ) -> dict[str, float]:
        _check_loader("loader", loader)
        with self._distributed(), self._call(stage):
            loader = self._shard(loader, "loader", training=False)
            self._prepare_model()
            self._emit(f"{stage}_start")
            metrics = self._evaluation_pass(loader, "loader")
            self._record_metrics(metrics, track_best=False)
            self._emit("metrics_computed", metrics=metrics)
            self._emit(f"{stage}_end", metrics=metrics)
        return metrics

    # --------------------------------------------------------------- dispatch
    def _emit(self, event: str, **extra: Any) -> list[Request]:
        subscribers = self.bus.dispatch_order(event)
        if self._group is not None and self.bus.may_command(event):
            self._agreement_due = True
        if not subscribers:
            return []
        payload = {"state": self._state.snapshot(), "model": self.model, "maps": self.maps}
        payload.update(extra)
        requests = self.bus.dispatch(event, subscribers, payload)
        if requests:
            if self._group is None:
                self._accept(requests)
            else:
                self._unshared.extend(requests)
        return requests

    def _emit_skippable(self, event: str, **extra: Any) -> bool:
        """Emit ``event``; True when a handler (on any rank) asked to skip the step."""
        requests = self._emit(event, **extra)
        if self._group is None:
            return bool(requests) and merge(requests).skip is not None
        if not self.bus.may_command(event):
            return False
        agreed = self._agree()
        return any(isinstance(r.command, SkipStep) and r.event == event for r in agreed)

    def _agree(self, *, only_if_due: bool = False) -> list[Request]:
        """Distributed runs: make the requests of every rank (and any signal) known to all.

        A collective, so every rank calls it at the same points: after events whose
        subscribers may return commands (:meth:`EventBus.may_command`, the same on every
        rank), at log intervals, and at the boundaries of epochs and of training.
        """
        group = self._group
        if group is None or (only_if_due and not self._agreement_due):
            return []
        self._agreement_due = False
        local, self._unshared = self._unshared, []
        agreed, received = group.agree(local, self._signals.received or 0)
        if received and not self._agreed_signal:
            self._agreed_signal = received
        if agreed:
            self._accept(agreed)
        return agreed

    def _accept(self, requests: list[Request]) -> None:
        for request in requests:
            if isinstance(request.command, Stop) and self._state.get("stopped_by") is None:
                self._state.update(
                    stopped_by=request.source,
                    stop_reason=request.command.reason or f"requested at {request.event}",
                    stop_resumable=request.command.resumable,
                )
            if isinstance(request.command, SaveCheckpoint | SaveTrainingState):
                self._pending.append(request)
        if self._calls:
            self._calls[-1]["requests"].extend(
                {"event": r.event, "source": r.source, "command": repr(r.command)}
                for r in requests
                if not isinstance(r.command, SkipStep)
            )

    def _stop_requested(self) -> bool:
        return self._state.get("stopped_by") is not None

    def _apply_immediate(self) -> bool:
        """Carry out pending saves now; True when a stop was requested."""
        self._agree(only_if_due=True)
        self._save_pending()
        return self._stop_requested()

    def _save_pending(self) -> None:
        if not self._pending:
            return
        decision = merge(self._pending)
        self._pending = []
        for request in decision.saves:
            command = request.command
            assert isinstance(command, SaveCheckpoint)
            snapshot = self._state.snapshot()
            path = self._on_main(
                functools.partial(
                    checkpoint.save_weights,
                    self.maps,
                    command.tag,
                    self.model,
                    metadata={
                        **dict(command.metadata),
                        "requested_by": request.source,
                        "event": request.event,
                        "epoch": snapshot.current_epoch,
                        "global_step": snapshot.global_step,
                        "iteration": snapshot.iteration,
                        "model_class": (
                            f"{type(self.model).__module__}.{type(self.model).__qualname__}"
                        ),
                    },
                )
            )
            self._emit("checkpoint", checkpoint=path, tag=command.tag, kind="weights")
        # The training state goes last, so it includes what handlers of the weights'
        # `checkpoint` events recorded (e.g. where the best weights are).
        if decision.training_state is not None:
            if self._open_group:
                # Mid accumulation group: the gradients are not part of a training state, so
                # it is written once the group's optimizer step is done.
                self._pending.append(decision.training_state)
            else:
                self._write_training_state(decision.training_state)

    def _write_training_state(self, request: Request) -> None:
        snapshot = self._state.snapshot()
        in_epoch = bool(self._position["in_epoch"])
        name = checkpoint.training_state_name(snapshot.iteration, epoch_end=not in_epoch)
        own: dict[str, Any] = {
            "random": capture_random_states(),
            "loader_generators": capture_loader_generators(self._train_loader),
            "epoch_start": (
                self._epoch_start.as_dict() if in_epoch and self._epoch_start else None
            ),
            # The losses themselves, not their sum: the resumed run sums them in the same order.
            "losses": torch.stack(self._losses).cpu() if self._losses else None,
        }
        # Every rank's generators and losses differ: rank 0 writes them all.
        every_rank = [own] if self._group is None else self._group.gather_on_main(own)
        tensors = {
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            **own,
            "other_ranks": (every_rank or [own])[1:],
            "callbacks": {c.callback_id: c.state_dict() for c in self.callbacks},
        }
        document = {
            "format": STATE_FORMAT,
            "state": snapshot.as_dict(),
            "position": dict(self._position),
            "bus": self.bus.state_dict(),
            "trainer": self._settings(),
            "callbacks": [c.callback_id for c in self.callbacks],
            "world_size": self.placement.world_size,
        }
        path = self._on_main(
            functools.partial(
                checkpoint.save_training_state,
                self.maps,
                name,
                self.model,
                tensors=tensors,
                document=document,
                metadata={
                    "requested_by": request.source,
                    "event": request.event,
                    "reason": getattr(request.command, "reason", ""),
                    "epoch": snapshot.current_epoch,
                    "iteration": snapshot.iteration,
                    "global_step": snapshot.global_step,
                    "in_epoch": in_epoch,
                },
            )
        )
        self._emit("checkpoint", checkpoint=path, tag=name, kind="training")

    # ------------------------------------------------------------------ resume
    def _restarted_before_first_state(self) -> bool:
        """Whether a torchrun restart meets this MAPS as its own failed attempt left it."""
        run = os.environ.get("TORCHELASTIC_RUN_ID")
        if not self.placement.restart_count or not run:
            return False
        try:
            calls = self.maps.read_json(MAPS_FILE).get("calls", [])
        except (OSError, ValueError, AttributeError):
            return False
        return bool(calls) and isinstance(calls[-1], dict) and calls[-1].get("run_id") == run

    def _resume_point(self) -> checkpoint.FoundState | None:
        """The training state to resume from; None to start afresh (no MAPS yet)."""
        if self.maps.created:
            raise ConfigurationError(
                "this Trainer already ran in this process; resume=True is for a new Trainer "
                "(e.g. Trainer.from_maps) after an interruption"
            )
        if not self.maps.is_maps():
            self.maps.check_available()
            return None
        self.maps.check_unlocked()
        found = checkpoint.find_training_state(self.maps)
        if found is None and self._restarted_before_first_state():
            warnings.warn(
                f"torchrun restarted this run (attempt {self.placement.restart_count + 1}) "
                "before it wrote a training state: training starts again from scratch, "
                f"replacing what the failed attempt wrote in {str(self.maps.path)!r}",
                TrainbusWarning,
                stacklevel=3,
            )
            self.maps.overwrite = True
            return None
        if found is None:
            raise CheckpointError(
                f"MAPS {str(self.maps.path)!r} holds no training state to resume from (was "
                "TrainingCheckpointCallback switched off, or did the run stop before its first "
                "save?); pass overwrite=True to train again from scratch"
            )
        if found.skipped:
            warnings.warn(
                f"resuming from {found.path.name}; passed over: " + "; ".join(found.skipped),
                TrainbusWarning,
                stacklevel=3,
            )
        return found

    def _restore(self, found: checkpoint.FoundState, loader: Iterable[Any]) -> None:
        """Load everything a training state holds; random states are restored at the loop."""
        weights, tensors, document = checkpoint.load_training_state(found.path)
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"{found.path / checkpoint.STATE_FILE} has format "
                f"{document.get('format') if isinstance(document, dict) else document!r}; this "
                f"trainbus reads {STATE_FORMAT!r}: resume with the trainbus version that wrote it"
            )
        position = document["position"]
        own = self._own_part(found, tensors, document)
        if position["in_epoch"] and document["state"]["num_batches"] != _length(loader):
            raise CheckpointError(
                f"the training state {found.path.name} stopped after batch "
                f"{position['batches_done']} of an epoch of {document['state']['num_batches']} "
                f"batches, but train_loader has {_length(loader)}; resume with the same "
                "training data and batch size"
            )
        self.model.load_state_dict(weights)
        saved_optimizers = tensors["optimizers"]
        if len(saved_optimizers) != len(self.optimizers):
            raise CheckpointError(
                f"the training state {found.path.name} holds {len(saved_optimizers)} optimizer "
                f"states, but the model built {len(self.optimizers)}; resume with the same "
                "build_optimizers"
            )
        for optimizer, saved in zip(self.optimizers, saved_optimizers, strict=True):
            optimizer.load_state_dict(saved)
        if self.scaler is not None and tensors["scaler"]:
            self.scaler.load_state_dict(tensors["scaler"])
        restored = {
            key: tuple(value) if key == "learning_rates" else value
            for key, value in document["state"].items()
            if key not in {"stage", "max_epochs", "rank", "world_size"}
        }
        if restored.get("stop_resumable"):
            restored.update(stopped_by=None, stop_reason=None, stop_resumable=False)
        self._state.update(**restored)
        self.bus.load_state_dict(document["bus"])
        self._load_callback_states(tensors["callbacks"], found.path.name)
        losses = own["losses"]
        self._losses = [] if losses is None else list(losses.to(self.device).unbind())
        self._position = dict(position)
        self._resume_random = own["random"]
        self._resume_loader_generators = own["loader_generators"]
        if position["in_epoch"]:
            self._epoch_start = EpochStart.from_dict(own["epoch_start"])
        changed = {
            key: (value, self._settings().get(key))
            for key, value in document["trainer"].items()
            if key in _EXACTNESS_SETTINGS and self._settings().get(key) != value
        }
        if changed:
            warnings.warn(
                "resuming with settings that differ from the interrupted run "
                + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                + "; training continues, but not as the interrupted run would have",
                TrainbusWarning,
                stacklevel=4,
            )
        for newer in checkpoint.training_states(self.maps) if self.placement.is_main else ():
            if newer.name > found.path.name:
                # Passed over as unusable: moved aside, so rotation never counts it as kept.
                checkpoint.quarantine(newer)
        self._calls[-1]["resumed_from"] = {
            "state": found.path.name,
            "epoch": document["state"]["current_epoch"],
            "iteration": document["state"]["iteration"],
            "skipped": list(found.skipped),
        }

    def _own_part(
        self, found: checkpoint.FoundState, tensors: Mapping[str, Any], document: Mapping[str, Any]
    ) -> dict[str, Any]:
        """This rank's generators, loader position and losses from a training state.

        The same world size continues exactly. Another one continues from a state written at
        an epoch's end, with a warning: weights, optimizers, schedulers, counters and callback
        states are restored, but this rank's random states are not (they did not exist), and
        the shards and the global batch change. In the middle of an epoch it is refused.
        """
        saved = int(document.get("world_size", 1))
        now = self.placement.world_size
        if saved == now:
            mine: dict[str, Any] = (
                dict(tensors)
                if self.placement.rank == 0
                else tensors["other_ranks"][self.placement.rank - 1]
            )
            return mine
        if document["position"]["in_epoch"]:
            raise CheckpointError(
                f"the training state {found.path.name} was written by {saved} process(es) in "
                f"the middle of an epoch, and this run has {now}; the position inside the epoch "
                f"belongs to {saved} shards: resume with {saved} process(es), or from a state "
                "written at an epoch's end (TrainingCheckpointCallback(every_n_epochs=1))"
            )
        warnings.warn(
            f"resuming {found.path.name}, written by {saved} process(es), with {now}: weights, "
            "optimizers, schedulers, counters and callback states are restored, but the "
            "random states are not, each rank's share of the data and the global batch size "
            "change; the run continues, not as it would have with the same world size",
            TrainbusWarning,
            stacklevel=5,
        )
        return {"random": None, "loader_generators": None, "epoch_start": None, "losses": None}

    def _load_callback_states(self, states: Mapping[str, Any], source: str) -> None:
        current = {c.callback_id: c for c in self.callbacks}
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

    def _restore_random_states(self) -> None:
        """Put every generator back as it was when the resumed state was written."""
        if self._resume_random is not None:
            restore_random_states(self._resume_random)
            self._resume_random = None
        if self._resume_loader_generators is not None:
            restore_loader_generators(self._train_loader, self._resume_loader_generators)
            self._resume_loader_generators = None

    # ------------------------------------------------------------- lifecycle
    @contextlib.contextmanager
    def _distributed(self) -> Iterator[None]:
        """Under torchrun: the process group of one call (the group itself outlives the call)."""
        if not self.placement.distributed:
            yield
            return
        group = dist_tools.ProcessGroup(self.placement, self.device)
        group.open()
        self._group = group
        self._agreed_signal = 0
        try:
            yield
        finally:
            self._group = None
            self._forward = None
            self._unshared = []
            self._agreement_due = False

    def _on_main(self, action: Callable[[], T]) -> T:
        """Run a MAPS write on rank 0 only; every rank gets its result (or its error)."""
        return action() if self._group is None else self._group.on_main(action)

    def _shard(self, loader: L, name: str, *, training: bool) -> L:
        """This rank's share of ``loader`` in a distributed run (the loader itself otherwise)."""
        if self._group is None:
            return loader
        if training:
            seed = self.seed if self.seed is not None else 0
            return dist_tools.shard_training_loader(loader, name, self.placement, seed)  # type: ignore[return-value]
        return dist_tools.shard_evaluation_loader(loader, name, self.placement)  # type: ignore[return-value]

    def _call(self, stage: Stage, *, adopt: bool = False) -> _Call:
        return _Call(self, stage, adopt=adopt or self._adopt_maps)

    def _prepare_model(self) -> None:
        self.model.to(self.device)
        for metric in self.metrics.values():
            metric.to(self.device)
        if self.compile_options is not None and not self._compiled:
            for name in ("forward_step", "evaluation_step", "predict_step"):
                setattr(
                    self.model,
                    name,
                    torch.compile(getattr(self.model, name), **self.compile_options),
                )
            self._compiled = True

    def _prepare_training(self) -> None:
        self._prepare_model()
        if not self.optimizers:
            built = self.model.build_optimizers()
            optimizers = [built] if isinstance(built, torch.optim.Optimizer) else list(built)
            if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
                raise ModelContractError(
                    f"{type(self.model).__name__}.build_optimizers returned {built!r}; return a "
                    "torch.optim.Optimizer or a non-empty list of them"
                )
            self.optimizers = optimizers
            self._tensor_rates = any(
                isinstance(rate, torch.Tensor) for rate in _rates_of(optimizers)
            )
            self.scaler = self.precision.grad_scaler()
            self._state.update(**_learning_rates(self.optimizers, read_tensors=True))
            self._write_maps_config()
        if self._group is not None:
            self._forward = dist_tools.wrap_model(self.model, self.device, self.ddp_options)

    def _begin(self, stage: Stage, *, adopt: bool) -> None:
        stale, recovered = self._on_main(functools.partial(self._open_maps, adopt=adopt))
        self._calls.append(
            {
                "call": stage,
                "started": _now(),
                "status": "running",
                "requests": [],
            }
        )
        if self.placement.distributed:
            self._calls[-1]["world_size"] = self.placement.world_size
            # Names the torchrun job: its restarts know the MAPS as their own.
            self._calls[-1]["run_id"] = os.environ.get("TORCHELASTIC_RUN_ID")
        if stale is not None:
            self._calls[-1]["recovered_lock"] = stale
        if recovered:
            self._calls[-1]["recovered"] = recovered
        self._state.update(stage="train" if stage == "train" else stage, batch_idx=-1)
        self._write_maps_config()

    def _open_maps(self, *, adopt: bool) -> tuple[dict[str, Any] | None, list[str]]:
        """Create or adopt the MAPS and lock it; the stale lock taken over and what was swept."""
        first = not self.maps.created
        if adopt:
            self.maps.adopt()
            if first:
                self._calls = list(self.maps.read_json(MAPS_FILE).get("calls", []))
        else:
            self.maps.create()
            if first:
                self.maps.write_environment()
        stale = self.maps.lock()
        recovered = (
            [
                f"{folder}/: {action}"
                for folder in (CHECKPOINTS_DIR, TRAINING_DIR)
                for action in checkpoint.recover_interrupted(self.maps.file(folder))
            ]
            if adopt
            else []
        )
        return stale, recovered

    def _end(self, error: BaseException | None) -> None:
        record = self._calls[-1]
        snapshot = self._state.snapshot()
        record.update(
            finished=_now(),
            status="failed" if error else ("stopped" if snapshot.stopped_by else "completed"),
            epochs=snapshot.current_epoch + (1 if snapshot.iteration else 0),
            global_step=snapshot.global_step,
            iteration=snapshot.iteration,
            metrics=dict(snapshot.metrics),
            best_metrics=dict(snapshot.best_metrics),
            best_epochs=dict(snapshot.best_epochs),
        )
        if snapshot.stopped_by:
            record["stop"] = {
                "by": snapshot.stopped_by,
                "reason": snapshot.stop_reason,
                "resumable": snapshot.stop_resumable,
            }
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}"
        record["handler_failures"] = [
            {"event": f.event, "subscriber": f.subscriber, "error": f.error}
            for f in self.bus.failures
        ]
        self._write_maps_config()

    def _write_maps_config(self) -> None:
        if not self.maps.created:
            return
        self.maps.write_json(self.describe(), MAPS_FILE)

    def describe(self) -> dict[str, Any]:
        """What ``maps.json`` holds: versions, configuration, dispatch plan and every call."""
        model = self.model
        return {
            "format": "trainbus-maps/1",
            "versions": {
                "trainbus": trainbus.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "command": sys.argv,
            "seed": self.seed,
            "trainer": self._settings(),
            "model": {
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "parameters": sum(p.numel() for p in model.parameters()),
                "trainable_parameters": sum(
                    p.numel() for p in model.parameters() if p.requires_grad
                ),
                "structure": repr(model),
            },
            "optimizers": [
                {"class": type(o).__qualname__, "defaults": _plain_values(o.defaults)}
                for o in self.optimizers
            ],
            "metrics": {
                name: {"class": type(m).__name__, "higher_is_better": m.higher_is_better}
                for name, m in self.metrics.items()
            },
            "callbacks": [
                {
                    "id": c.callback_id,
                    "class": f"{type(c).__module__}.{type(c).__qualname__}",
                    "source": self._sources[c.callback_id],
                    "config": c.config(),
                }
                for c in self.callbacks
            ],
            "plan": self.plan(),
            "plugins": [record.as_dict() for record in self.plugins],
            "calls": self._calls,
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "max_epochs": self.max_epochs,
            "val_every_n_epochs": self.val_every_n_epochs,
            "log_every_n_batches": self.log_every_n_batches,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "gradient_clip_val": self.gradient_clip_val,
            "gradient_clip_algorithm": self.gradient_clip_algorithm,
            "device": str(self.device),
            "precision": self.precision.name,
            "compile": self.compile_options,
            "deterministic": self.deterministic,
            "nonfinite_loss": self.nonfinite_loss,
            "default_callbacks": self._defaults_kept,
        }

    def _check_metric_names(self, callback: Callback) -> None:
        for name in getattr(callback, "metric_names", lambda: ())():
            if name not in self.metrics:
                close = closest_names(name, self.metrics)
                hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise ConfigurationError(
                    f"{callback.callback_id} monitors metric {name!r}, which the Trainer does "
                    f"not compute.{hint} Known metrics: {sorted(self.metrics)}. Add it to "
                    "Trainer(metrics=...) or monitor one of those."
                )


class _Call:
    """One public call: creates the MAPS, records the call, emits exception/teardown."""

    def __init__(self, trainer: Trainer, stage: Stage, *, adopt: bool) -> None:
        self.trainer = trainer
        self.stage = stage
        self.adopt = adopt
        self.deterministic = DeterministicMode(trainer.deterministic)

    def __enter__(self) -> None:
        self.trainer._begin(self.stage, adopt=self.adopt)
        self.deterministic.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: object
    ) -> None:
        trainer = self.trainer
        try:
            if error is not None:
                _deliver_exception(trainer, error)
            try:
                trainer._emit("teardown")
            except Exception as teardown_error:
                if error is None:
                    raise
                error.add_note(
                    "trainbus: while tearing down after this error, "
                    f"{type(teardown_error).__name__}: {teardown_error}"
                )
        finally:
            self.deterministic.__exit__()
            trainer._state.update(stage="idle")
            try:
                trainer._end(error)
            except Exception as end_error:
                if error is None:
                    raise
                # e.g. a full disk refusing maps.json too: the first error is the one to see.
                error.add_note(
                    "trainbus: while recording the call in maps.json, "
                    f"{type(end_error).__name__}: {end_error}"
                )
            finally:
                trainer.maps.unlock()


def _deliver_exception(trainer: Trainer, error: BaseException) -> None:
    """Send ``exception`` to every subscriber; their own failures are attached as notes."""
    subscribers = trainer.bus.dispatch_order("exception")
    payload = {
        "state": trainer._state.snapshot(),
        "model": trainer.model,
        "maps": trainer.maps,
        "exception": error,
    }
    for subscription in subscribers:
        try:
            trainer.bus.dispatch("exception", (subscription,), payload)
        except Exception as handler_error:
            error.add_note(
                f"trainbus: exception handler {subscription.id!r} also raised "
                f"{type(handler_error).__name__}: {handler_error}"
            )


def _load_plugins(
    selection: object, block: object
) -> tuple[list[plugin_loader.PluginRecord], list[plugin_loader.LoadedPlugin]]:
    """Select (without importing) and load the plugins; the report has a row per plugin."""
    plugin_loader.check_selection(selection)
    records = plugin_loader.select(
        plugin_loader.discover(),
        selection,  # type: ignore[arg-type]  # validated just above
        block,  # type: ignore[arg-type]  # validated by select
    )
    loaded = [plugin_loader.load(record) for record in records if record.status == "loaded"]
    return records, loaded


@contextlib.contextmanager
def _registering(plugin: plugin_loader.LoadedPlugin) -> Iterator[None]:
    try:
        yield
    except TrainbusError as exc:
        raise PluginError(f"{plugin.record.info.describe()} failed at registration: {exc}") from exc


def _resolve_callbacks(
    callbacks: Iterable[Callback] | None,
    defaults: bool | Iterable[type[Callback]] | Mapping[type[Callback], bool],
    contributed: Sequence[Callback] = (),
) -> list[Callback]:
    given: list[Any]
    if callbacks is None:
        given = []
    elif isinstance(callbacks, Callback | str | bytes) or not isinstance(callbacks, Iterable):
        raise ConfigurationTypeError(
            f"callbacks={callbacks!r} is not a list of callbacks; pass callbacks=[...]"
        )
    else:
        given = list(callbacks)
    for index, callback in enumerate(given):
        if not isinstance(callback, Callback):
            hint = (
                " (a class was passed: instantiate it, e.g. EarlyStoppingCallback(...))"
                if isinstance(callback, type)
                else ""
            )
            raise ConfigurationTypeError(
                f"callbacks[{index}] is {callback!r}, not a trainbus Callback{hint}; subclass "
                "trainbus.Callback, or subscribe a function with @trainer.on(event)"
            )
    kept = _kept_defaults(defaults)
    chosen = [c for c in _default_callbacks() if type(c) in kept]
    given_types = {type(c) for c in given}
    # A callback given by the user replaces a default or a plugin's callback of its type.
    resolved = [
        *(c for c in chosen if type(c) not in given_types),
        *given,
        *(c for c in contributed if type(c) not in given_types),
    ]
    counts: dict[str, int] = {}
    ids: set[str] = set()
    for callback in resolved:
        base = callback.callback_id
        counts[base] = counts.get(base, 0) + 1
        if counts[base] > 1:
            callback.callback_id = f"{base}#{counts[base]}"
        if callback.callback_id in ids:
            raise SubscriptionError(
                f"two callbacks have the id {callback.callback_id!r}; give each a distinct "
                "callback_id"
            )
        ids.add(callback.callback_id)
    return resolved


NONFINITE_SOURCE = "trainbus.nonfinite_loss"
"""``state.stopped_by`` when a NaN or infinite training loss stopped training."""

SIGNAL_SOURCE = "trainbus.signal"
"""``state.stopped_by`` when SIGTERM or SIGINT stopped training."""

STATE_FORMAT = "trainbus-training-state/1"
"""Format of a training state's ``state.json``."""

_REUSED_SETTINGS = (
    "max_epochs",
    "val_every_n_epochs",
    "log_every_n_batches",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
    "compile",
    "deterministic",
    "nonfinite_loss",
)
"""Settings :meth:`Trainer.from_maps` reads back from ``maps.json`` (not the device)."""

_EXACTNESS_SETTINGS = tuple(s for s in _REUSED_SETTINGS if s not in {"max_epochs", "compile"})
"""Settings that, changed at a resume, make it differ from the interrupted run."""


def _numbered(batches: Iterator[Any], first: int, total: int | None) -> Iterator[tuple[Any, bool]]:
    """Pair each batch with whether it is the epoch's last.

    With a known length nothing is read ahead, so a batch is loaded exactly when the
    uninterrupted loop would load it (random augmentation in the main process stays exact
    across a resume); an iterable of unknown length is read one batch ahead.
    """
    if total is None:
        yield from with_last(batches)
        return
    for index, batch in enumerate(batches, first):
        yield batch, index + 1 == total


def _reliable_length(loader: Iterable[Any]) -> int | None:
    """``len(loader)`` when it is exact (an IterableDataset's length is only an estimate)."""
    if isinstance(loader, torch.utils.data.DataLoader) and isinstance(
        loader.dataset, torch.utils.data.IterableDataset
    ):
        return None
    return _length(loader)


def _kept_defaults(
    defaults: bool | Iterable[type[Callback]] | Mapping[type[Callback], bool],
) -> list[type[Callback]]:
    """The default callback types that ``default_callbacks`` keeps (validated)."""
    names = [t.__name__ for t in DEFAULT_TYPES]
    if defaults is True:
        return list(DEFAULT_TYPES)
    if defaults is False:
        return []
    if isinstance(defaults, Mapping):
        unknown = [t for t in defaults if t not in DEFAULT_TYPES]
        if unknown or not all(isinstance(v, bool) for v in defaults.values()):
            raise ConfigurationError(
                f"default_callbacks={defaults!r} must map default callback types to True or "
                f"False, e.g. {{TrainingCheckpointCallback: False}}; the defaults are {names}"
            )
        return [t for t in DEFAULT_TYPES if defaults.get(t, True)]
    if isinstance(defaults, Iterable):
        wanted = list(defaults)
        unknown = [t for t in wanted if t not in DEFAULT_TYPES]
        if unknown:
            raise ConfigurationError(
                f"default_callbacks lists {unknown}, which are not default callbacks; the "
                f"defaults are {names}"
            )
        return [t for t in DEFAULT_TYPES if t in wanted]
    raise ConfigurationTypeError(
        f"default_callbacks={defaults!r} is not a bool, a list of default callback types or "
        "a {type: bool} mapping"
    )


def _source_of(callback: Callback) -> str:
    module = type(callback).__module__
    return SOURCE_BUILTIN if module.startswith("trainbus.") else SOURCE_USER


def _positive_int(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"{name}={value!r} is not a positive integer; pass e.g. {name}=1")
    return value


def _check_loader(name: str, loader: object) -> None:
    if loader is None or isinstance(loader, str | bytes) or not isinstance(loader, Iterable):
        raise DataError(
            f"{name}={loader!r} is not iterable; pass a torch.utils.data.DataLoader (or any "
            "iterable of batches)"
        )
    if _length(loader) == 0:
        raise DataError(
            f"{name} has no batches (len 0); check that the dataset is not empty and that "
            "batch_size is not larger than the dataset with drop_last=True"
        )


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _loss_of(output: Any) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    losses: Mapping[str, torch.Tensor]
    if isinstance(output, torch.Tensor):
        loss, losses = output, {"loss": output}
    elif isinstance(output, Mapping) and "loss" in output:
        loss, losses = output["loss"], output
    else:
        raise ModelContractError(
            f"forward_step returned {_describe(output)}; return the loss as a scalar tensor, "
            "or a dict of named losses with the one to backpropagate under 'loss'"
        )
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ModelContractError(
            f"forward_step returned a loss that is {_describe(loss)}; the loss must be a scalar "
            "tensor: reduce it, e.g. loss.mean()"
        )
    if not loss.requires_grad:
        raise ModelContractError(
            "forward_step returned a loss that does not require grad; compute it from the "
            "model's parameters, outside torch.no_grad()"
        )
    return loss, losses


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"{type(value).__name__} {value!r}"[:100]


def _detached(loss: torch.Tensor | None) -> torch.Tensor | None:
    return None if loss is None else loss.detach()


def _detached_all(
    losses: Mapping[str, torch.Tensor] | None,
) -> Mapping[str, torch.Tensor] | None:
    if losses is None:
        return None
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in losses.items()}


def _scale_gradients(optimizers: Sequence[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.mul_(factor)


def _rates_of(optimizers: Sequence[torch.optim.Optimizer]) -> tuple[Any, ...]:
    """The learning rate of every parameter group, as the optimizers hold them."""
    return tuple(group["lr"] for optimizer in optimizers for group in optimizer.param_groups)


def _learning_rates(
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    read_tensors: bool,
    rates: Sequence[Any] | None = None,
) -> dict[str, tuple[float, ...]]:
    rates = _rates_of(optimizers) if rates is None else rates
    if any(isinstance(rate, torch.Tensor) for rate in rates) and not read_tensors:
        return {}  # a tensor learning rate is read at log intervals only (host-device sync)
    return {"learning_rates": tuple(float(rate) for rate in rates)}


def _plain_values(values: Mapping[str, Any]) -> dict[str, Any]:
    plain: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str | int | float | bool | None):
            plain[key] = value
        elif isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
            plain[key] = list(value)
        else:
            plain[key] = repr(value)
    return plain


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
