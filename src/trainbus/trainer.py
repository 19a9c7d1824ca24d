"""The Trainer: the public facade over the engine.

It validates its arguments, chooses the callbacks (the defaults, the user's, the plugins'),
builds the engine's rooms and offers the four calls. Everything that runs lives below it:
the loop (:mod:`trainbus.engine.loop`), one call's lifecycle (:mod:`trainbus.engine.call`),
the command policy (:mod:`trainbus.engine.policy`), checkpoint writing
(:mod:`trainbus.engine.saving`) and resume (:mod:`trainbus.engine.restore`). See
:mod:`trainbus.events.catalog` for the map of where each event fires.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch

from trainbus.engine import distributed as dist_tools
from trainbus.engine import record
from trainbus.engine.batches import check_loader
from trainbus.engine.call import CallRunner
from trainbus.engine.compute import Precision, resolve_device, resolve_precision
from trainbus.engine.core import Engine
from trainbus.engine.loop import TrainingLoop
from trainbus.engine.maps import MAPS_FILE, Maps
from trainbus.engine.metrics import BoundMetric, MetricSpec, bind_metrics
from trainbus.engine.model import Model
from trainbus.engine.saving import Saver
from trainbus.engine.settings import LoopSettings, loop_settings, positive_int, recorded_settings
from trainbus.engine.sharding import check_strategy
from trainbus.engine.state import TrainerState
from trainbus.engine.training import run_training
from trainbus.engine.weights import load_weights
from trainbus.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    TrainbusError,
)
from trainbus.events.bus import EventBus
from trainbus.events.callback import Callback
from trainbus.events.plugins import PluginRecord
from trainbus.handlers.model_checkpoint import check_tag_conflicts
from trainbus.registration import (
    check_metric_names,
    default_types_named,
    defaults_choice,
    kept_defaults,
    load_plugins,
    register_callbacks,
    resolve_callbacks,
)
from trainbus.subscribing import Subscribing

F = TypeVar("F", bound=Callable[..., Any])


class Trainer(Subscribing):
    """Train, validate, test and predict with a :class:`~trainbus.Model`, announcing every step.

    Arguments (every keyword has a default):

    - ``maps``: the experiment directory; it must not exist yet (or be empty) unless
      ``overwrite=True``. It is created by the first call to train/validate/test/predict.
      A ``{version}`` in its last component names a new run: ``"runs/digits/v{version}"``
      becomes ``runs/digits/v3`` when ``v1`` and ``v2`` exist; the directory is reserved
      (created empty) at once, so two runs started together get different numbers, and the
      path is printed (``trainbus: MAPS runs/digits/v3``). With ``overwrite=True`` it is
      refused (there is nothing to replace); :meth:`from_maps` takes the newest existing one.
    - ``model``: a :class:`~trainbus.Model` (e.g. :class:`~trainbus.SupervisedModel`).
    - ``metrics``: ``{name: LossMetricConfig | torchmetrics.Metric | TorchMetricConfig}``;
      default ``{"loss": LossMetricConfig("loss")}``.
    - ``callbacks``: callbacks to add; an instance of a default callback's type replaces it.
    - ``default_callbacks``: ``True`` (the defaults), ``False`` (none), the default types to
      keep, or ``{DefaultType: False}`` to switch single defaults off.
    - ``max_epochs``, ``val_every_n_epochs``, ``log_every_n_batches``: loop lengths.
      ``max_steps``: optimizer steps (training ends at whichever of ``max_epochs`` and
      ``max_steps`` comes first); ``max_time``: seconds (or a ``timedelta``) of one
      ``train()`` call, ending with a resumable stop and a training state, so that a resume
      continues (with a fresh budget). A limit reached inside an epoch pauses there, as a
      resumable stop does; reached at an epoch's last batch, the epoch ends as usual.
    - ``limit_train_batches`` / ``limit_val_batches``: batches per epoch / per validation,
      as a count (int) or a fraction of the loader's length (float; ``0`` skips validation).
    - ``val_check_interval``: validate every N training batches inside each epoch too (an
      int, or a float fraction of the epoch); ``validate_last_epoch`` (default True): the
      last epoch is validated even when ``val_every_n_epochs`` does not divide its number.
    - ``fast_dev_run=True``: a smoke test of the script: one training batch, one validation
      batch, in a temporary MAPS that is deleted afterwards (nothing is kept).
    - ``accumulate_grad_batches``: batches per optimizer step (a short last group is stepped
      too, with gradients rescaled to a mean over its batches).
    - ``gradient_clip_val`` / ``gradient_clip_algorithm`` (``"norm"`` or ``"value"``):
      clipping after unscaling.
    - ``device`` (``"auto"``, ``"cpu"``, ``"cuda:N"``), ``precision`` (``"32"``, ``"bf16"``,
      ``"16"``), ``compile`` (``False``, ``True`` or ``torch.compile`` keyword arguments).
    - ``seed``: seeds Python, NumPy and torch when given (recorded in ``maps.json``); the
      model's weights only if ``seed_everything(seed)`` came before building it (else a
      warning). ``deterministic``: deterministic algorithms during each call.
    - ``nonfinite_loss``: ``"stop"`` (default) ends training at the log interval where a NaN
      or infinite mean loss shows (no per-step sync), naming the steps; ``"skip"`` checks
      every step (a host-device sync per step) and skips the update of such a batch.
    - ``plugins``: ``"auto"`` (every installed plugin package, unless
      ``TRAINBUS_DISABLE_PLUGIN_AUTOLOAD=1``), ``False``, or the names to load; ``block``:
      names never to load (checked before import). ``TRAINBUS_PLUGINS=a,b`` in the
      environment is an allow list. See :mod:`trainbus.events.plugins`.
    - ``strategy`` under ``torchrun``: ``"ddp"`` replicates the model on every rank
      (``DistributedDataParallel``); ``"fsdp"`` shards its parameters, gradients and
      optimizer states over the ranks (FSDP2's ``fully_shard``; units chosen by
      :meth:`~trainbus.Model.shard`), with training states saved as Distributed Checkpoints;
      ``"auto"`` (default) is ``"ddp"``. In one process both train the whole model.
    - ``ddp_options``: keyword arguments for ``DistributedDataParallel`` in a run launched by
      ``torchrun`` (e.g. ``{"find_unused_parameters": True}``); see
      :mod:`trainbus.engine.distributed`.

    One call runs at a time (another one, from a handler or a thread, is refused). Under
    ``torchrun`` the same script trains data-parallel: rank 0 writes the MAPS and the logs.
    """

    def __init__(
        self,
        maps: str | os.PathLike[str] | Maps,
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
        max_steps: int | None = None,
        max_time: float | datetime.timedelta | None = None,
        limit_train_batches: int | float = 1.0,
        limit_val_batches: int | float = 1.0,
        val_check_interval: int | float | None = None,
        validate_last_epoch: bool = True,
        fast_dev_run: bool = False,
        default_callbacks: bool | Iterable[type[Callback]] | Mapping[type[Callback], bool] = True,
        overwrite: bool = False,
        plugins: Literal["auto"] | Sequence[str] | bool = "auto",
        block: Sequence[str] = (),
        ddp_options: Mapping[str, Any] | None = None,
        strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    ) -> None:
        if not isinstance(model, Model):
            raise ConfigurationTypeError(
                f"model={model!r} is not a trainbus.Model; subclass trainbus.Model (forward_step,"
                " evaluation_step, build_optimizers) or wrap the network in "
                "SupervisedModel(network, loss)"
            )
        settings = loop_settings(
            max_epochs=max_epochs,
            val_every_n_epochs=val_every_n_epochs,
            log_every_n_batches=log_every_n_batches,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            compile=compile,
            deterministic=deterministic,
            nonfinite_loss=nonfinite_loss,
            max_steps=max_steps,
            max_time=max_time,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            val_check_interval=val_check_interval,
            validate_last_epoch=validate_last_epoch,
            fast_dev_run=fast_dev_run,
        )
        placement = dist_tools.detect_placement()
        resolved_device = resolve_device(dist_tools.device_for(placement, device))
        resolved_precision = resolve_precision(precision, resolved_device)
        chosen_strategy = check_strategy(strategy, resolved_precision.name)
        if chosen_strategy == "fsdp" and ddp_options:
            raise ConfigurationError(
                f"ddp_options={ddp_options!r} apply to DistributedDataParallel, but "
                "strategy='fsdp' shards the model with fully_shard; drop ddp_options or use "
                "strategy='ddp'"
            )
        if not isinstance(overwrite, bool):
            raise ConfigurationTypeError(
                f"overwrite={overwrite!r} is not a bool; pass overwrite=True to replace an "
                "existing MAPS, or leave it False"
            )
        default_callbacks = defaults_choice(default_callbacks)
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if settings.fast_dev_run:
            # Nothing of a smoke test is kept: its MAPS is deleted with the Trainer.
            self._scratch = tempfile.TemporaryDirectory(prefix="trainbus-fast-dev-run-")
            handle = Maps(os.path.join(self._scratch.name, "maps"))
            if placement.is_main:
                print(
                    "trainbus: fast_dev_run: 1 training batch and 1 validation batch in a "
                    f"temporary MAPS, deleted afterwards ({str(maps)!r} is not touched)",
                    flush=True,
                )
        else:
            handle = maps if isinstance(maps, Maps) else Maps(maps, overwrite=overwrite)
        chosen_seed, weights_seeded = record.seeding(seed, handle)
        bound_metrics = bind_metrics(metrics)
        bus = EventBus(rank=placement.rank)
        plugin_records, loaded = load_plugins(plugins, block)
        chosen = resolve_callbacks(callbacks, default_callbacks, loaded)
        check_tag_conflicts(chosen)
        sources = register_callbacks(
            bus, chosen, loaded, functools.partial(check_metric_names, metrics=bound_metrics)
        )
        self._engine = Engine(
            settings=settings,
            model=model,
            metrics=bound_metrics,
            callbacks=chosen,
            sources=sources,
            bus=bus,
            maps=handle,
            placement=placement,
            device=resolved_device,
            precision=resolved_precision,
            seed=chosen_seed,
            weights_seeded=weights_seeded,
            plugins=plugin_records,
            defaults_kept=[t.__name__ for t in kept_defaults(default_callbacks)],
            ddp_options=dist_tools.ddp_arguments(ddp_options),
            strategy=chosen_strategy,
        )
        self._saver = Saver(self._engine)
        self._loop = TrainingLoop(self._engine, self._saver.at_boundary)
        self._saver.loop = self._loop
        self._calls = CallRunner(self._engine, self._saver)
        self._engine.dispatcher.emit("trainer_init")

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
        train longer). Nothing read back chooses code: the model, metrics and callbacks are
        objects, passed again, and ``compile``, ``device``, ``plugins`` and ``ddp_options``
        are taken from the arguments only. ``train()`` then resumes from the newest valid
        training state; ``weights`` names a model checkpoint (e.g. ``"best-loss"``) to load
        now, for validate/test/predict. A ``{version}`` in ``maps`` names the newest existing
        run (``"runs/digits/v{version}"``: the highest ``vN`` there).
        """
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
        handle = Maps(maps, version="latest")
        reused = recorded_settings(handle)
        if isinstance(reused.get("default_callbacks"), list):
            reused["default_callbacks"] = default_types_named(reused["default_callbacks"])
        try:
            trainer = cls(handle, model, metrics, callbacks, **{**reused, **overrides})
        except TrainbusError as exc:
            exc.add_note(
                f"trainbus: settings read back from {handle.file(MAPS_FILE)}: "
                f"{ {k: v for k, v in reused.items() if k not in overrides} }"
            )
            raise
        trainer._engine.adopt_maps = True
        if weights is not None:
            load_weights(handle.path, model, tag=weights)
        return trainer

    # ---------------------------------------------------------------- what it holds
    @property
    def state(self) -> TrainerState:
        """The current state snapshot.

        Exact at every event. With no subscriber on a step event, the step counters are
        written in at log steps and boundaries only, so between them they may lag the loop
        by up to one log interval (see the TrainerState reference).
        """
        return self._engine.state.snapshot()

    @property
    def snapshots_built(self) -> int:
        """How many state snapshots were built (one per change that someone observed)."""
        return self._engine.state.snapshots_built

    @property
    def settings(self) -> LoopSettings:
        """The validated loop settings."""
        return self._engine.settings

    @property
    def max_epochs(self) -> int:
        """Epochs to train for; set it between calls to train a finished run longer."""
        return self._engine.settings.max_epochs

    @max_epochs.setter
    def max_epochs(self, value: int) -> None:
        engine = self._engine
        if self._calls.running is not None:
            raise ConfigurationError(
                f"max_epochs cannot change while {self._calls.running}() runs; set it between calls"
            )
        epochs = positive_int("max_epochs", value)
        engine.settings = dataclasses.replace(engine.settings, max_epochs=epochs)
        engine.state.update(max_epochs=epochs)

    @property
    def estimated_stepping_batches(self) -> int:
        """The optimizer steps the running ``train()`` takes in all, for schedules.

        ``max_epochs`` times the steps of one epoch (accumulation, ``limit_train_batches`` and,
        under torchrun, this rank's share of the data included), capped by ``max_steps``;
        a resumed run counts from its start. Known from the start of ``train()``: read it
        in a scheduler factory, which :class:`~trainbus.LRSchedulerCallback` calls at
        ``train_start``, e.g. ``lambda opt: OneCycleLR(opt, 0.1,
        total_steps=trainer.estimated_stepping_batches)``.
        """
        steps = self._engine.stepping_batches
        if steps is None:
            raise ConfigurationError(
                "estimated_stepping_batches is not known: "
                + (
                    "train_loader has no length; pass max_steps=... (or a loader with a length)"
                    if self._engine.stepping_estimated
                    else "train() has not started yet; read it from train_start on (e.g. in "
                    "the scheduler factory given to LRSchedulerCallback)"
                )
            )
        return steps

    @property
    def accumulate_grad_batches(self) -> int:
        """Batches per optimizer step."""
        return self._engine.settings.accumulate_grad_batches

    @property
    def log_every_n_batches(self) -> int:
        """Training batches between two readings of the loss."""
        return self._engine.settings.log_every_n_batches

    @property
    def maps(self) -> Maps:
        """The experiment directory."""
        return self._engine.maps

    @property
    def model(self) -> Model:
        """The model trained."""
        return self._engine.model

    @property
    def metrics(self) -> dict[str, BoundMetric]:
        """The metrics computed at each evaluation, by name."""
        return self._engine.metrics

    @property
    def bus(self) -> EventBus:
        """This Trainer's event bus."""
        return self._engine.bus

    @property
    def callbacks(self) -> list[Callback]:
        """The callbacks subscribed, defaults and plugins' included, in registration order."""
        return list(self._engine.callbacks)

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The optimizers (built at the first ``train()``)."""
        return self._engine.optimizers

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 gradient scaler, if any."""
        return self._engine.scaler

    @property
    def device(self) -> torch.device:
        """Where the model trains."""
        return self._engine.device

    @property
    def precision(self) -> Precision:
        """The arithmetic precision of forward passes."""
        return self._engine.precision

    @property
    def seed(self) -> int | None:
        """The seed given, if any."""
        return self._engine.seed

    @property
    def placement(self) -> dist_tools.Placement:
        """This process's rank and the world size."""
        return self._engine.placement

    @property
    def plugins(self) -> list[PluginRecord]:
        """The plugin load report: one row per plugin found."""
        return self._engine.plugins

    def describe(self) -> dict[str, Any]:
        """What ``maps.json`` holds: versions, configuration, dispatch plan and every call."""
        return record.describe(self._engine)

    # ---------------------------------------------------------------- the four calls
    def train(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        resume: bool | Literal["auto"] | None = None,
    ) -> TrainerState:
        """Train for ``max_epochs`` (or until a handler asks to stop); returns the final state.

        ``resume=True`` continues from the newest valid training state of the MAPS, exactly
        where it was written (mid-epoch included), or starts afresh when the MAPS does not
        exist yet; the default is ``True`` for a Trainer built by :meth:`from_maps`.
        ``resume="auto"`` (for a script run again until it succeeds) does the same, and also
        starts afresh in a MAPS whose every call failed before a training state was written:
        that MAPS is replaced, its failed calls kept in ``maps.json``. A MAPS that holds no
        training state but a call that did not fail is refused, as with ``True``.
        """
        check_loader("train_loader", train_loader)
        if val_loader is not None:
            check_loader("val_loader", val_loader)
        calls = self._calls
        if resume is not None and not (
            isinstance(resume, bool) or (isinstance(resume, str) and resume == "auto")
        ):
            raise ConfigurationTypeError(f"resume={resume!r} is not True, False or 'auto'")
        run_training(calls, self._loop, self._saver, train_loader, val_loader, resume)
        return self.state

    def validate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Compute the metrics on ``loader``; returns them as floats."""
        return self._evaluate("validate", loader)

    def test(self, loader: Iterable[Any]) -> dict[str, float]:
        """Compute the metrics on a held-out ``loader``; returns them as floats."""
        return self._evaluate("test", loader)

    def predict(self, loader: Iterable[Any]) -> list[Any]:
        """Run ``model.predict_step`` on every batch; returns the outputs, moved to the CPU."""
        check_loader("loader", loader)
        calls = self._calls
        with (
            calls.exclusive("predict"),
            calls.distributed(),
            calls.lifecycle("predict", adopt=False),
        ):
            self._engine.prepare_model()
            return self._loop.evaluation.predict(loader)

    def _evaluate(
        self, stage: Literal["validate", "test"], loader: Iterable[Any]
    ) -> dict[str, float]:
        check_loader("loader", loader)
        with self._calls.exclusive(stage), self._calls.distributed():
            loader = self._calls.shard(loader, "loader", training=False)
            with self._calls.lifecycle(stage, adopt=False):
                self._engine.prepare_model()
                return self._loop.evaluation.standalone(stage, loader)
