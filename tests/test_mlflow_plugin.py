"""The example plugin package examples/plugins/trainbus-mlflow, installed with pip.

The package is installed once into a directory; the runs that load it through its entry point
happen in one subprocess with that directory on ``PYTHONPATH``, so no other test sees it. What
they logged is read back with MLflow's own client from the SQLite store in each MAPS. The
callback's arguments, its failing stores and two Trainers in one process are checked in this
process on the source module, loaded by path without touching ``sys.path``.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import installing
from tests.conftest import rows_of
from trainbus import Trainer, TrainerState
from trainbus.errors import ConfigurationError, ConfigurationTypeError, TrainbusWarning

from .conftest import make_loader, make_model

tracking = pytest.importorskip(
    "mlflow.tracking",
    reason="mlflow is not installed: the MLflow plugin's tests need it (pip install mlflow)",
)
MlflowClient = tracking.MlflowClient

# MLflow's SQLite store warns of an SQLAlchemy 2.1 deprecation of its own on first use.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "examples" / "plugins" / "trainbus-mlflow"
MODULE = "trainbus_mlflow"
SOURCE = "plugin:trainbus-mlflow"
ENV_URI = "TRAINBUS_MLFLOW_TRACKING_URI"
ENV_EXPERIMENT = "TRAINBUS_MLFLOW_EXPERIMENT"
CLOSED_PORT = "http://127.0.0.1:9"
SUBSCRIBERS = sorted(
    f"MlflowCallback.{name}"
    for name in (
        "on_exception",
        "on_loss_logged",
        "on_metrics_computed",
        "on_teardown",
        "on_train_end",
        "on_train_start",
    )
)


def client_of(maps: Path) -> Any:
    """An MLflow client of the default store of ``maps``."""
    return MlflowClient(tracking_uri=f"sqlite:///{maps / 'mlflow.db'}")


def only_run(client: Any, experiment: str) -> Any:
    """The one run of ``experiment`` (a resume must not have started a second one)."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    [run] = client.search_runs([found.experiment_id])
    return run


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in points]


def same_points(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Equal steps, and equal values (MLflow's SQLite store keeps float64)."""
    return [step for step, _ in logged] == [step for step, _ in expected] and all(
        value == pytest.approx(reference, rel=1e-12)
        for (_, value), (_, reference) in zip(logged, expected, strict=True)
    )


def maps_json(maps: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((maps / "maps.json").read_text())
    return document


def artifact_files(client: Any, run_id: str, path: str) -> list[str]:
    return sorted(info.path for info in client.list_artifacts(run_id, path))


# ------------------------------------------------------------------ the installed package


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package installed with pip into a directory (from a copy: builds write in-tree)."""
    base = tmp_path_factory.mktemp("mlflow-plugin")
    target = installing.install_copy(PACKAGE, base)
    assert (target / "trainbus_mlflow-0.1.0.dist-info" / "entry_points.txt").is_file()
    return target


RUNS_SCRIPT = """
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from mlflow.tracking import MlflowClient
from tests.conftest import make_loader, make_model
from trainbus import ModelCheckpointCallback, Stop, Trainer

work = Path(sys.argv[2])
options = {"max_epochs": 3, "log_every_n_batches": 2}
outcome = {}


class CrashError(Exception):
    pass


# A best model is kept: its directory is the artifact.
best = ModelCheckpointCallback("loss")
trainer = Trainer(work / "auto", make_model(), callbacks=[best], **options)
trainer.train(make_loader(), make_loader(seed=1))
trainer.test(make_loader(seed=2))

# Stopped after its second epoch; only `last` is kept.
trainer = Trainer(work / "stopped", make_model(), **options)


@trainer.on("epoch_end")
def enough(*, state) -> Stop | None:
    return Stop("two epochs are enough") if state.epoch_number == 2 else None


trainer.train(make_loader(), make_loader(seed=1))

# A crash in the third epoch, after the training state of the second, then a resume.
trainer = Trainer(work / "resumed", make_model(), **options)


@trainer.on("batch_end")
def crash(*, state) -> None:
    if state.iteration == 16:
        raise CrashError


try:
    trainer.train(make_loader(), make_loader(seed=1))
except CrashError:
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'resumed' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    outcome["crashed"] = {"status": run.info.status, "run_id": run.info.run_id}
Trainer.from_maps(work / "resumed", make_model()).train(make_loader(), make_loader(seed=1))

# The tracking URI from the environment, pointing at a closed port.
import os

os.environ["TRAINBUS_MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    Trainer(work / "unreachable", make_model(), **options).train(
        make_loader(), make_loader(seed=1)
    )
outcome["unreachable"] = [
    {"category": w.category.__name__, "message": str(w.message)}
    for w in caught
    if "mlflow" in str(w.message).lower()
]
(work / "outcome.json").write_text(json.dumps(outcome))
"""


@pytest.fixture(scope="module")
def runs(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One subprocess with the plugin loaded by plugins="auto": a run that keeps its best
    model then tests it, a stopped run, a crashed and resumed run, and a run whose tracking
    URI (from the environment) points at a closed port."""
    work = tmp_path_factory.mktemp("mlflow-runs")
    script = work / "runs.py"
    script.write_text(RUNS_SCRIPT)
    environment = installing.plugin_environment(
        installed, drop=[ENV_URI, ENV_EXPERIMENT, "MLFLOW_TRACKING_URI"]
    )
    installing.run_script(script, work, environment, str(ROOT), str(work))
    return work


def outcome(runs: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((runs / "outcome.json").read_text())
    return document


def test_the_installation_declares_the_entry_point_and_its_dependency(installed: Path) -> None:
    installing.check_installed_plugin(
        installed, "trainbus-mlflow", "mlflow = trainbus_mlflow:MlflowCallback", {"mlflow"}
    )


def test_maps_json_reports_the_plugin_loaded_with_its_subscribers(runs: Path) -> None:
    document = maps_json(runs / "auto")
    [record] = document["plugins"]
    assert {k: record[k] for k in ("name", "distribution", "version", "status")} == {
        "name": "mlflow",
        "distribution": "trainbus-mlflow",
        "version": "0.1.0",
        "status": "loaded",
    }
    assert record["subscribers"] == SUBSCRIBERS
    mine = [row for row in document["plan"] if row["source"] == SOURCE]
    assert sorted(row["id"] for row in mine) == SUBSCRIBERS
    assert all(row["rank_zero_only"] for row in mine)
    configs = [c["config"] for c in document["callbacks"] if c["id"] == "MlflowCallback"]
    assert configs == [{"tracking_uri": None, "experiment": None}]


def test_the_settings_are_the_runs_params(runs: Path) -> None:
    maps = runs / "auto"
    run = only_run(client_of(maps), "auto")
    params = run.data.params
    settings = maps_json(maps)["trainer"]
    assert set(settings) - {"compile"} <= set(params)
    assert params["max_epochs"] == "3"
    assert params["log_every_n_batches"] == "2"
    assert params["precision"] == "32"
    assert params["device"] == "cpu"
    assert json.loads(params["default_callbacks"]) == settings["default_callbacks"]
    assert params["optimizer.class"] == "SGD"
    assert params["optimizer.lr"] == "0.05"
    assert params["model.class"] == "trainbus.engine.model.SupervisedModel"
    assert params["model.parameters"] == "58"
    assert run.data.tags["trainbus.maps"] == str(maps)
    assert run.data.tags["mlflow.runName"] == "auto"


def test_the_training_loss_is_the_one_of_training_loss_tsv(runs: Path) -> None:
    maps = runs / "auto"
    client = client_of(maps)
    run = only_run(client, "auto")
    expected = rows_of(maps / "training_loss.tsv", "train_loss")
    assert [step for step, _ in expected] == list(range(2, 19, 2))
    assert same_points(history(client, run.info.run_id, "train/loss"), expected)


@pytest.mark.parametrize(
    ("key", "stage"), [("validation/loss", "validation"), ("test/loss", "test")]
)
def test_each_pass_logs_the_metrics_of_metrics_tsv(runs: Path, key: str, stage: str) -> None:
    maps = runs / "auto"
    client = client_of(maps)
    run = only_run(client, "auto")
    expected = rows_of(maps / "metrics.tsv", "loss", stage)
    assert len(expected) == (3 if stage == "validation" else 1)
    assert same_points(history(client, run.info.run_id, key), expected)
    assert set(run.data.metrics) == {"train/loss", "validation/loss", "test/loss"}


def test_the_best_weights_are_the_artifact(runs: Path) -> None:
    maps = runs / "auto"
    client = client_of(maps)
    run = only_run(client, "auto")
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainbus.outcome"] == "completed"
    assert "trainbus.stopped_by" not in run.data.tags
    run_id = run.info.run_id
    assert artifact_files(client, run_id, "checkpoints") == ["checkpoints/best-loss"]
    stored = maps / "mlflow-artifacts" / run_id / "artifacts" / "checkpoints" / "best-loss"
    assert run.info.artifact_uri == (maps / "mlflow-artifacts" / run_id / "artifacts").as_uri()
    written = maps / "checkpoints" / "best-loss"
    names = sorted(p.name for p in written.iterdir())
    assert "model.safetensors" in names
    assert artifact_files(client, run_id, "checkpoints/best-loss") == [
        f"checkpoints/best-loss/{name}" for name in names
    ]
    for name in names:
        assert (stored / name).read_bytes() == (written / name).read_bytes()


def test_a_stopped_run_is_tagged_with_who_stopped_it_and_why(runs: Path) -> None:
    maps = runs / "stopped"
    client = client_of(maps)
    run = only_run(client, "stopped")
    summary = maps_json(maps)["calls"][-1]["summary"]
    assert summary["stop_reason"] == "two epochs are enough"
    assert run.data.tags["trainbus.outcome"] == "stopped"
    assert run.data.tags["trainbus.stopped_by"] == summary["stopped_by"]
    assert run.data.tags["trainbus.stop_reason"] == "two epochs are enough"
    assert run.info.status == "FINISHED"
    assert [step for step, _ in history(client, run.info.run_id, "validation/loss")] == [6, 12]
    assert artifact_files(client, run.info.run_id, "checkpoints") == ["checkpoints/last"]


def test_a_resumed_run_continues_the_same_mlflow_run_each_step_once(runs: Path) -> None:
    maps = runs / "resumed"
    client = client_of(maps)
    crashed = outcome(runs)["crashed"]
    assert crashed["status"] == "FAILED"
    run = only_run(client, "resumed")
    assert run.info.run_id == crashed["run_id"]
    assert run.info.status == "FINISHED"
    losses = rows_of(maps / "training_loss.tsv", "train_loss")
    assert [step for step, _ in losses] == list(range(2, 19, 2))
    assert same_points(history(client, run.info.run_id, "train/loss"), losses)
    validation = rows_of(maps / "metrics.tsv", "loss", "validation")
    assert [step for step, _ in validation] == [6, 12, 18]
    assert same_points(history(client, run.info.run_id, "validation/loss"), validation)
    assert artifact_files(client, run.info.run_id, "checkpoints") == ["checkpoints/last"]


def test_an_unreachable_store_warns_once_and_training_completes(runs: Path) -> None:
    caught = outcome(runs)["unreachable"]
    assert len(caught) == 1, caught
    [warning] = caught
    assert warning["category"] == "MlflowTrackingWarning"
    assert f"MLflow tracking at {CLOSED_PORT} failed" in warning["message"]
    assert "Connection refused" in warning["message"]
    maps = runs / "unreachable"
    assert maps_json(maps)["calls"][-1]["status"] == "completed"
    assert [step for step, _ in rows_of(maps / "metrics.tsv", "loss", "validation")] == [6, 12, 18]
    assert not (maps / "mlflow.db").exists()
    configs = [c["config"] for c in maps_json(maps)["callbacks"] if c["id"] == "MlflowCallback"]
    assert configs == [{"tracking_uri": CLOSED_PORT, "experiment": None}]


# ------------------------------------------------------------ the callback, in this process


@pytest.fixture(scope="module")
def plugin() -> Iterator[types.ModuleType]:
    """The package's module from its source tree (its metadata is not installed here)."""
    with installing.source_module(PACKAGE / "src" / MODULE / "__init__.py", MODULE) as module:
        yield module


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URI, raising=False)
    monkeypatch.delenv(ENV_EXPERIMENT, raising=False)


@pytest.mark.usefixtures("clean_environment")
def test_the_callback_keeps_the_plugin_contract(plugin: types.ModuleType) -> None:
    cls = plugin.MlflowCallback
    assert cls.TRAINBUS_PLUGIN_API == 1
    assert plugin.TRAINBUS_PLUGIN_API == 1
    assert cls.rank_zero_only is True
    assert issubclass(plugin.MlflowTrackingWarning, TrainbusWarning)
    callback = cls()
    assert callback.config() == {"tracking_uri": None, "experiment": None}
    assert callback.state_dict() == {}
    assert callback.run_id is None


@pytest.mark.usefixtures("clean_environment")
def test_the_settings_come_from_the_arguments_else_the_environment(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_URI, " http://tracking:5000 ")
    monkeypatch.setenv(ENV_EXPERIMENT, "nightly")
    assert plugin.MlflowCallback().config() == {
        "tracking_uri": "http://tracking:5000",
        "experiment": "nightly",
    }
    given = plugin.MlflowCallback(tracking_uri="sqlite:///x.db", experiment="mine")
    assert (given.tracking_uri, given.experiment) == ("sqlite:///x.db", "mine")
    monkeypatch.setenv(ENV_URI, "  ")
    assert plugin.MlflowCallback().tracking_uri is None


@pytest.mark.usefixtures("clean_environment")
def test_the_recorded_uri_hides_its_password(plugin: types.ModuleType) -> None:
    callback = plugin.MlflowCallback(tracking_uri="https://me:secret@tracking.example:8443/x")
    assert callback.config()["tracking_uri"] == "https://me:***@tracking.example:8443/x"


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"tracking_uri": 5}, ConfigurationTypeError, r"tracking_uri=5 \(int\) is not a str"),
        ({"experiment": b"x"}, ConfigurationTypeError, r"experiment=b'x' \(bytes\) is not a str"),
        ({"tracking_uri": " "}, ConfigurationError, r"tracking_uri=' ' is empty"),
    ],
)
def test_a_bad_argument_is_refused(
    plugin: types.ModuleType, arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=r"MlflowCallback: " + message):
        plugin.MlflowCallback(**arguments)


def test_params_flatten_the_record_and_metric_keys_lose_refused_characters(
    plugin: types.ModuleType,
) -> None:
    params = sys.modules[f"{MODULE}.params"]
    document = {
        "trainer": {"max_epochs": 2, "compile": {"mode": "max-autotune"}, "max_time": None},
        "seed": 7,
        "optimizers": [
            {"class": "SGD", "defaults": {"lr": 0.1}},
            {"class": "Adam", "defaults": {"betas": [0.9, 0.99]}},
        ],
    }
    assert params.run_params(document) == {
        "max_epochs": "2",
        "compile.mode": "max-autotune",
        "max_time": "null",
        "seed": "7",
        "optimizer.0.class": "SGD",
        "optimizer.0.lr": "0.1",
        "optimizer.1.class": "Adam",
        "optimizer.1.betas": "[0.9, 0.99]",
    }
    assert params.metric_key("validation/f1@5 (macro)") == "validation/f1_5 _macro_"


def train_with(callback: Any, maps: Path, **options: Any) -> Trainer:
    trainer = Trainer(
        maps, make_model(), callbacks=[callback], plugins=False, max_epochs=3, **options
    )
    trainer.train(make_loader(), make_loader(seed=1))
    return trainer


@pytest.mark.parametrize("kind", ["closed port", "path under a file", "spoiled after an epoch"])
def test_a_failing_store_warns_once_naming_it_and_training_completes(
    plugin: types.ModuleType, tmp_path: Path, kind: str
) -> None:
    store = tmp_path / "store.db"
    if kind == "closed port":
        uri, shown = "http://me:secret@127.0.0.1:9", "http://me:***@127.0.0.1:9"
    elif kind == "path under a file":
        (tmp_path / "a-file").write_text("")
        uri = shown = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    else:
        uri = shown = f"sqlite:///{store}"
    callback = plugin.MlflowCallback(tracking_uri=uri)
    trainer = Trainer(
        tmp_path / "maps",
        make_model(),
        callbacks=[callback],
        plugins=False,
        max_epochs=3,
        log_every_n_batches=2,
    )

    @trainer.on("epoch_end")
    def spoil(*, state: TrainerState) -> None:
        # The store breaks while the run logs to it: every later call would fail.
        if kind == "spoiled after an epoch" and state.epoch_number == 1:
            with store.open("r+b") as file:
                file.write(b"not a database " * 8)

    with pytest.warns(plugin.MlflowTrackingWarning) as caught:
        trainer.train(make_loader(), make_loader(seed=1))
    mine = [w for w in caught if issubclass(w.category, plugin.MlflowTrackingWarning)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    message = str(mine[0].message)
    assert f"MLflow tracking at {shown} failed (" in message
    assert "secret" not in message
    assert "training goes on" in message
    assert (callback.run_id is not None) == (kind == "spoiled after an epoch")
    assert maps_json(tmp_path / "maps")["calls"][-1]["status"] == "completed"
    validation = rows_of(tmp_path / "maps" / "metrics.tsv", "loss", "validation")
    assert [step for step, _ in validation] == [6, 12, 18]


def test_two_trainers_in_one_process_keep_their_runs_apart(
    plugin: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a store of one's own keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    inner = plugin.MlflowCallback(tracking_uri=uri, experiment="shared")
    outer = plugin.MlflowCallback(tracking_uri=uri, experiment="shared")
    trainer = Trainer(
        tmp_path / "outer", make_model(), callbacks=[outer], plugins=False, max_epochs=3
    )

    @trainer.on("epoch_end")
    def train_another(*, state: TrainerState) -> None:
        # A whole run of a second Trainer in the middle of the first one's.
        if state.epoch_number == 2:
            train_with(inner, tmp_path / "inner", log_every_n_batches=3)

    trainer.train(make_loader(), make_loader(seed=1, samples=24))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("shared")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["inner", "outer"]
    assert (runs["outer"].info.run_id, runs["inner"].info.run_id) == (outer.run_id, inner.run_id)
    for name in ("outer", "inner"):
        maps = tmp_path / name
        run_id = runs[name].info.run_id
        assert runs[name].info.status == "FINISHED"
        assert runs[name].data.tags["trainbus.maps"] == str(maps)
        expected = rows_of(maps / "metrics.tsv", "loss", "validation")
        assert same_points(history(client, run_id, "validation/loss"), expected)
        losses = rows_of(maps / "training_loss.tsv", "train_loss")
        assert same_points(history(client, run_id, "train/loss"), losses)
        assert artifact_files(client, run_id, "checkpoints") == ["checkpoints/last"]
        assert str(tmp_path / "mlruns" / "1" / run_id) in runs[name].info.artifact_uri
    assert runs["inner"].data.params["log_every_n_batches"] == "3"
    assert runs["outer"].data.params["log_every_n_batches"] == "50"


def test_the_readme_documents_the_choices() -> None:
    text = (PACKAGE / "README.md").read_text()
    for needle in (ENV_URI, ENV_EXPERIMENT, "loss_logged", "host-device sync", "MlflowClient"):
        assert needle in text
    assert (
        '[project.entry-points."trainbus.plugins"]\nmlflow = "trainbus_mlflow:MlflowCallback"\n'
        in (PACKAGE / "pyproject.toml").read_text()
    )
