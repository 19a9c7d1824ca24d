"""MlflowCallback: a trainbus training run as an MLflow run.

What one ``train()`` call logs (metric step: ``state.global_step``, the optimizer steps):

- params at ``train_start``: the Trainer's settings as ``maps.json`` records them, the seed,
  the model's class and size, the optimizer's class and defaults;
- ``train/loss`` at each log interval (``loss_logged``): the float the Trainer already read
  from the device, so no host-device sync of its own;
- ``validation/<metric>`` for every metric of each validation (``metrics_computed``), and
  ``validate/<metric>``, ``test/<metric>`` for later calls of the same Trainer;
- tags at ``train_end``: ``trainbus.outcome`` and, for a stopped run, ``trainbus.stopped_by``
  and ``trainbus.stop_reason``;
- artifacts at ``teardown``: the best weights' directories (``checkpoints/best-*``), or
  ``checkpoints/last`` when there are none.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainbus import Callback, Maps, TrainerState
from trainbus.engine.maps import CHECKPOINTS_DIR, MAPS_FILE
from trainbus.errors import ConfigurationError, ConfigurationTypeError
from trainbus_mlflow.params import metric_key, run_params
from trainbus_mlflow.tracker import Tracker, redacted

ENV_TRACKING_URI = "TRAINBUS_MLFLOW_TRACKING_URI"
"""Environment variable: the tracking URI (default: a SQLite store inside the MAPS)."""

ENV_EXPERIMENT = "TRAINBUS_MLFLOW_EXPERIMENT"
"""Environment variable: the experiment's name (default: the MAPS directory's name)."""

DATABASE_FILE = "mlflow.db"
"""The SQLite store of the default tracking URI, inside the MAPS."""

ARTIFACTS_DIR = "mlflow-artifacts"
"""Where the default store keeps artifacts, inside the MAPS."""

MAPS_TAG = "trainbus.maps"
VERSION_TAG = "trainbus.version"
OUTCOME_TAG = "trainbus.outcome"
STOP_TAGS = ("trainbus.stopped_by", "trainbus.stop_reason")

_BATCH = 100  # MLflow's limit of params per log_batch call


def default_tracking_uri(maps: Path) -> str:
    """``sqlite:///<maps>/mlflow.db``: the store used when no URI is configured."""
    return f"sqlite:///{maps / DATABASE_FILE}"


def weights_directories(maps: Path) -> list[Path]:
    """The best weights' directories (``checkpoints/best-*``), else ``checkpoints/last``."""
    folder = maps / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    best = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("best-"))
    last = folder / "last"
    return best or ([last] if last.is_dir() else [])


def _setting(name: str, given: object, variable: str) -> str | None:
    if given is None:
        raw = os.environ.get(variable, "").strip()
        return raw or None
    if not isinstance(given, str):
        raise ConfigurationTypeError(
            f"MlflowCallback: {name}={given!r} ({type(given).__name__}) is not a str"
        )
    if not given.strip():
        raise ConfigurationError(
            f"MlflowCallback: {name}={given!r} is empty; pass None for the default"
        )
    return given.strip()


class MlflowCallback(Callback):
    """Log each training run to MLflow as one MLflow run, through an explicit client.

    - ``tracking_uri``: where to log; default ``$TRAINBUS_MLFLOW_TRACKING_URI``, else a
      SQLite store in the MAPS (``sqlite:///<maps>/mlflow.db``, artifacts under
      ``<maps>/mlflow-artifacts``).
    - ``experiment``: the experiment's name, created when missing; default
      ``$TRAINBUS_MLFLOW_EXPERIMENT``, else the MAPS directory's name.

    Every call goes through :class:`~mlflow.tracking.MlflowClient` with the run's id, never
    the global active run of ``mlflow.start_run``, so Trainers in one process keep their runs
    apart. The run's id is part of the callback's state: a resumed run
    (``Trainer.from_maps(...).train(...)``) continues the same MLflow run, and points of a
    metric at steps it already holds are not logged twice. A store that fails (unreachable,
    unwritable) gives one :class:`~trainbus_mlflow.MlflowTrackingWarning`; training goes on
    and the rest of the run is not logged. Runs on rank 0 only.
    """

    TRAINBUS_PLUGIN_API: ClassVar[int] = 1
    rank_zero_only = True

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        self.tracking_uri = _setting("tracking_uri", tracking_uri, ENV_TRACKING_URI)
        self.experiment = _setting("experiment", experiment, ENV_EXPERIMENT)
        self._tracker: Tracker | None = None
        self._run_id: str | None = None
        self._logged_up_to: dict[str, int] = {}
        self._stale_tags: set[str] = set()
        self._training = False
        self._ended = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run this callback logs to, once a training run opened it."""
        return self._run_id

    def config(self) -> dict[str, Any]:
        """``maps.json``'s record of the settings, the URI's password hidden."""
        uri = self.tracking_uri
        return {
            "tracking_uri": None if uri is None else redacted(uri),
            "experiment": self.experiment,
        }

    def reset(self) -> None:
        self._tracker = None
        self._run_id = None
        self._logged_up_to = {}
        self._stale_tags = set()

    def state_dict(self) -> dict[str, Any]:
        return {} if self._run_id is None else {"run_id": self._run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        run_id = state.get("run_id")
        self._run_id = run_id if isinstance(run_id, str) else None

    def on_train_start(self, *, maps: Maps) -> None:
        self._training, self._ended = True, False
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri or default_tracking_uri(maps.path))
        run_id = self._run_id
        if run_id is None:
            self._run_id = self._tracker.call(lambda client: self._start(client, maps))
        else:
            self._tracker.call(lambda client: self._continue(client, run_id, maps))

    def on_loss_logged(self, *, state: TrainerState, train_loss: float) -> None:
        self._log({"train/loss": train_loss}, state.global_step)

    def on_metrics_computed(self, *, state: TrainerState, metrics: Mapping[str, float]) -> None:
        self._log(
            {f"{state.stage}/{name}": value for name, value in metrics.items()}, state.global_step
        )

    def on_train_end(self, *, state: TrainerState) -> None:
        self._ended = True
        tracker, run_id = self._tracker, self._run_id
        if tracker is None or run_id is None:
            return
        stopped = state.stopped_by is not None
        outcome = "completed" if not stopped else "paused" if state.stop_resumable else "stopped"
        tags = {OUTCOME_TAG: outcome}
        if stopped:
            tags.update(
                zip(STOP_TAGS, (str(state.stopped_by), state.stop_reason or ""), strict=True)
            )
        stale = self._stale_tags - tags.keys()

        def tag(client: MlflowClient) -> None:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            for key in sorted(stale):
                client.delete_tag(run_id, key)

        tracker.call(tag)
        self._stale_tags = set()

    def on_exception(self) -> None:
        if self._training:
            self._terminate("FAILED", None)
        self._training = False

    def on_teardown(self, *, state: TrainerState, maps: Maps) -> None:
        # After train_end's own checkpoints are written, so `last` is the final one.
        if self._training and self._ended:
            status = (
                "KILLED" if state.stopped_by is not None and state.stop_resumable else "FINISHED"
            )
            self._terminate(status, maps.path)
        self._training = False

    def _start(self, client: MlflowClient, maps: Maps) -> str:
        document = maps.read_json(MAPS_FILE)
        name = self.experiment or maps.path.name
        artifacts = None if self.tracking_uri else (maps.path / ARTIFACTS_DIR).as_uri()
        tags = {
            MAPS_TAG: str(maps.path),
            VERSION_TAG: str(document.get("versions", {}).get("trainbus")),
        }
        experiment_id = _experiment_id(client, name, artifacts)
        run = client.create_run(experiment_id, tags=tags, run_name=maps.path.name)
        run_id: str = run.info.run_id
        _log_params(client, run_id, run_params(document))
        return run_id

    def _continue(self, client: MlflowClient, run_id: str, maps: Maps) -> None:
        params = run_params(maps.read_json(MAPS_FILE))
        run = client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
        # MLflow keeps every point it was given: the ones a crashed run logged after the
        # training state it resumes from must not be logged a second time.
        self._logged_up_to = {
            key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in run.data.metrics
        }
        self._stale_tags = {key for key in STOP_TAGS if key in run.data.tags}
        # Params cannot change in MLflow: a resume with new settings keeps the first values.
        _log_params(client, run_id, {k: v for k, v in params.items() if k not in run.data.params})

    def _log(self, values: Mapping[str, float], step: int) -> None:
        tracker, run_id = self._tracker, self._run_id
        if tracker is None or run_id is None:
            return
        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), stamp, step)
            for key, value in ((metric_key(name), value) for name, value in values.items())
            if step > self._logged_up_to.get(key, -1)
        ]
        if metrics:
            tracker.call(lambda client: client.log_batch(run_id, metrics=metrics))

    def _terminate(self, status: str, maps: Path | None) -> None:
        tracker, run_id = self._tracker, self._run_id
        if tracker is None or run_id is None:
            return

        def finish(client: MlflowClient) -> None:
            for directory in [] if maps is None else weights_directories(maps):
                client.log_artifacts(
                    run_id, str(directory), artifact_path=f"{CHECKPOINTS_DIR}/{directory.name}"
                )
            client.set_terminated(run_id, status=status)

        tracker.call(finish)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process may have created it since: use it, or report the first error.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    items = [Param(key, value) for key, value in sorted(params.items())]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[start : start + _BATCH])
