"""The example plugin package examples/plugins/trainbus-tensorboard, installed with pip.

The package is installed once into a directory; the runs that load it through its entry point
happen in one subprocess with that directory on ``PYTHONPATH``, so no other test sees it. The
callback's own behaviour (arguments, the ``batch_end`` filter, crash and resume) is checked in
this process on the source module, loaded by path without touching ``sys.path``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
    EventAccumulator,  # tensorboard ships no annotations
)

from tests import installing
from tests.conftest import rows_of
from trainbus import Trainer, TrainerState
from trainbus.errors import ConfigurationError, ConfigurationTypeError

from .conftest import make_loader, make_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "examples" / "plugins" / "trainbus-tensorboard"
MODULE = "trainbus_tensorboard"
SOURCE = "plugin:trainbus-tensorboard"
ENV_EVERY = "TRAINBUS_TENSORBOARD_EVERY"
SUBSCRIBERS = sorted(
    f"TensorBoardCallback.{name}"
    for name in (
        "on_batch_end",
        "on_epoch_end",
        "on_exception",
        "on_loss_logged",
        "on_metrics_computed",
        "on_teardown",
        "on_test_start",
        "on_train_start",
        "on_validate_start",
    )
)


def scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` as TensorBoard's own reader sees the directory."""
    accumulator = EventAccumulator(str(directory)).Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def tags(directory: Path) -> set[str]:
    return set(EventAccumulator(str(directory)).Reload().Tags()["scalars"])


def live_writers() -> int:
    """Event-file writer threads still running (a writer that is not closed keeps one)."""
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


def same_points(written: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Equal steps, and values equal up to float32 storage."""
    return [step for step, _ in written] == [step for step, _ in expected] and all(
        value == pytest.approx(reference, rel=1e-6, abs=1e-6)
        for (_, value), (_, reference) in zip(written, expected, strict=True)
    )


# ------------------------------------------------------------------ the installed package


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package installed with pip into a directory (from a copy: builds write in-tree)."""
    base = tmp_path_factory.mktemp("tensorboard-plugin")
    target = installing.install_copy(PACKAGE, base)
    assert (target / "trainbus_tensorboard-0.1.0.dist-info" / "entry_points.txt").is_file()
    return target


def plugin_environment(target: Path, **variables: str) -> dict[str, str]:
    """This environment, with ``target`` first on PYTHONPATH and no plugin control set."""
    return installing.plugin_environment(target, drop=[ENV_EVERY], **variables)


RUNS_SCRIPT = """
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from tests.conftest import make_loader, make_model
from trainbus import Trainer
from trainbus.errors import PluginError

work = Path(sys.argv[2])


def train(name, epochs, **options):
    trainer = Trainer(
        work / name, make_model(), max_epochs=epochs, log_every_n_batches=2, **options
    )
    trainer.train(make_loader(), make_loader(seed=1))
    return trainer


train("auto", 3).test(make_loader(seed=2))
from trainbus_tensorboard import TensorBoardCallback

train("given", 1, callbacks=[TensorBoardCallback(every=3)])
os.environ["TRAINBUS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
train("disabled", 1)
del os.environ["TRAINBUS_DISABLE_PLUGIN_AUTOLOAD"]
train("blocked", 1, block=["tensorboard"])
os.environ["TRAINBUS_TENSORBOARD_EVERY"] = "0"
try:
    Trainer(work / "refused", make_model())
except PluginError as error:
    refused = {"message": str(error), "cause": type(error.__cause__).__name__}
else:
    refused = None
(work / "refused.json").write_text(json.dumps(refused))
"""


@pytest.fixture(scope="module")
def runs(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One subprocess: a run with plugins="auto" (train, then test), one given its own
    TensorBoardCallback, a run with autoload disabled, one with the plugin blocked, and a
    Trainer refused for a bad variable."""
    work = tmp_path_factory.mktemp("tensorboard-runs")
    script = work / "runs.py"
    script.write_text(RUNS_SCRIPT)
    environment = plugin_environment(installed, **{ENV_EVERY: "2"})
    installing.run_script(script, work, environment, str(ROOT), str(work))
    return work


def maps_json(work: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((work / name / "maps.json").read_text())
    return document


def test_the_installation_declares_the_entry_point_and_the_package(installed: Path) -> None:
    installing.check_installed_plugin(
        installed,
        "trainbus-tensorboard",
        "tensorboard = trainbus_tensorboard:TensorBoardCallback",
        {"tensorboard"},
    )
    metadata = Parser().parsestr(
        (installed / "trainbus_tensorboard-0.1.0.dist-info" / "METADATA").read_text()
    )
    assert metadata["Requires-Python"] == ">=3.11"
    assert (installed / MODULE / "callback.py").is_file()


def test_the_plan_shows_its_handlers_with_the_plugin_source(runs: Path) -> None:
    plan = maps_json(runs, "auto")["plan"]
    mine = {row["id"]: row for row in plan if row["id"].startswith("TensorBoardCallback.")}
    assert sorted(mine) == SUBSCRIBERS
    assert {row["source"] for row in mine.values()} == {SOURCE}
    assert all(row["rank_zero_only"] for row in mine.values())
    assert mine["TensorBoardCallback.on_metrics_computed"]["event"] == "metrics_computed"
    assert mine["TensorBoardCallback.on_metrics_computed"]["filter"] == "-"
    batch_end = mine["TensorBoardCallback.on_batch_end"]
    assert (batch_end["event"], batch_end["filter"]) == ("batch_end", f"every={2}")
    assert mine["TensorBoardCallback.on_loss_logged"]["event"] == "loss_logged"
    others = [row for row in plan if row["source"] == SOURCE and row["id"] not in mine]
    assert others == []


def test_maps_json_reports_the_plugin_loaded_with_its_subscribers(runs: Path) -> None:
    document = maps_json(runs, "auto")
    assert document["plugins"] == [
        {
            "name": "tensorboard",
            "entry_point": "trainbus_tensorboard:TensorBoardCallback",
            "distribution": "trainbus-tensorboard",
            "version": "0.1.0",
            "status": "loaded",
            "reason": 'plugins="auto"',
            "subscribers": SUBSCRIBERS,
        }
    ]
    configs = [c["config"] for c in document["callbacks"] if c["id"] == "TensorBoardCallback"]
    assert configs == [{"every": 2}]


@pytest.mark.parametrize(
    ("tag", "stage"), [("validation/loss", "validation"), ("test/loss", "test")]
)
def test_the_event_files_hold_the_metrics_of_metrics_tsv(runs: Path, tag: str, stage: str) -> None:
    maps = runs / "auto"
    expected = rows_of(maps / "metrics.tsv", "loss", stage)
    assert len(expected) == (3 if stage == "validation" else 1)
    written = scalars(maps / "tensorboard", tag)
    assert same_points(written, expected), (written, expected)


def test_the_training_loss_is_the_one_of_training_loss_tsv(runs: Path) -> None:
    maps = runs / "auto"
    expected = rows_of(maps / "training_loss.tsv", "train_loss")
    assert [step for step, _ in expected] == list(range(2, 19, 2))
    assert same_points(scalars(maps / "tensorboard", "train/loss"), expected)


def test_batch_end_writes_progress_every_n_batches_from_the_environment(runs: Path) -> None:
    directory = runs / "auto" / "tensorboard"
    assert tags(directory) == {
        "validation/loss",
        "test/loss",
        "train/loss",
        "train/samples_seen",
        "train/learning_rate",
    }
    # 6 batches of 8 samples per epoch, 3 epochs, TRAINBUS_TENSORBOARD_EVERY=2.
    assert scalars(directory, "train/samples_seen") == [(i, 8.0 * i) for i in range(2, 19, 2)]
    assert same_points(
        scalars(directory, "train/learning_rate"), [(i, 0.05) for i in range(2, 19, 2)]
    )
    # train() and test() each opened and closed a writer: one event file per call.
    assert len(list(directory.glob("events.out.tfevents.*"))) == 2


def test_a_callback_given_by_the_user_replaces_the_plugins_instance(runs: Path) -> None:
    document = maps_json(runs, "given")
    mine = [c for c in document["callbacks"] if c["class"].endswith(".TensorBoardCallback")]
    assert [(c["source"], c["config"]) for c in mine] == [("user", {"every": 3})]
    [record] = document["plugins"]
    assert record["status"] == "loaded"
    assert "TensorBoardCallback replaced by the one given in callbacks=[...]" in record["reason"]
    assert record["subscribers"] == []
    assert [row for row in document["plan"] if row["source"] == SOURCE] == []
    # One writer, with the user's every=3 (not the environment's 2): each step written once.
    directory = runs / "given" / "tensorboard"
    assert scalars(directory, "train/samples_seen") == [(3, 24.0), (6, 48.0)]


@pytest.mark.parametrize(
    ("run", "status", "reason"),
    [
        ("disabled", "disabled", "$TRAINBUS_DISABLE_PLUGIN_AUTOLOAD is set"),
        ("blocked", "blocked", "named in block=[...]"),
    ],
)
def test_a_plugin_that_is_not_loaded_writes_nothing(
    runs: Path, run: str, status: str, reason: str
) -> None:
    document = maps_json(runs, run)
    [record] = document["plugins"]
    assert (record["name"], record["version"]) == ("tensorboard", "0.1.0")
    assert (record["status"], record["reason"], record["subscribers"]) == (status, reason, [])
    assert [row for row in document["plan"] if row["source"] == SOURCE] == []
    assert (runs / run / "metrics.tsv").is_file()
    assert not (runs / run / "tensorboard").exists()


def test_an_invalid_every_variable_refuses_the_trainer_naming_the_plugin(runs: Path) -> None:
    refused = json.loads((runs / "refused.json").read_text())
    assert refused is not None, "the Trainer started with TRAINBUS_TENSORBOARD_EVERY=0"
    assert refused["cause"] == "ConfigurationError"
    message = refused["message"]
    assert "plugin 'tensorboard'" in message
    assert "of distribution trainbus-tensorboard 0.1.0" in message
    assert "failed while building its callbacks" in message
    assert "TRAINBUS_TENSORBOARD_EVERY='0' is not a positive integer" in message
    assert not (runs / "refused").exists()


def test_the_command_line_lists_the_plugin_and_its_subscribers(installed: Path) -> None:
    script = Path(sys.executable).with_name("trainbus")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "trainbus.cli"]
    result = subprocess.run(
        [*command, "plugins"],
        env=plugin_environment(installed),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = (
        "tensorboard  trainbus-tensorboard 0.1.0  (trainbus_tensorboard:TensorBoardCallback)  "
        'loaded: plugins="auto"'
    )
    assert header in lines
    start = lines.index(header) + 1
    assert [line.strip() for line in lines[start : start + len(SUBSCRIBERS)]] == SUBSCRIBERS


# ------------------------------------------------------------ the callback, in this process


@pytest.fixture(scope="module")
def plugin() -> Iterator[types.ModuleType]:
    """The package's module from its source tree (its metadata is not installed here)."""
    with installing.source_module(PACKAGE / "src" / MODULE / "__init__.py", MODULE) as module:
        yield module


def test_the_callback_keeps_the_plugin_contract(plugin: types.ModuleType) -> None:
    cls = plugin.TensorBoardCallback
    assert cls.TRAINBUS_PLUGIN_API == 1
    assert plugin.TRAINBUS_PLUGIN_API == 1
    assert cls.rank_zero_only is True
    callback = cls()
    assert callback.every == 50
    assert callback.config() == {"every": 50}
    assert callback.state_dict() == {}


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 50), ("", 50), ("   ", 50), ("1", 1), ("7", 7), (" 12 ", 12)]
)
def test_every_comes_from_the_environment(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: int
) -> None:
    if raw is None:
        monkeypatch.delenv(ENV_EVERY, raising=False)
    else:
        monkeypatch.setenv(ENV_EVERY, raw)
    assert plugin.TensorBoardCallback().every == expected
    assert plugin.every_from_environment({} if raw is None else {ENV_EVERY: raw}) == expected


@pytest.mark.parametrize("raw", ["0", "-3", "abc", "1.5", "1e3", "+5", "0x10", "\u0663", "2 0"])
def test_an_invalid_environment_value_is_refused(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv(ENV_EVERY, raw)
    message = re.escape(f"{ENV_EVERY}={raw!r} is not a positive integer")
    with pytest.raises(ConfigurationError, match=message + r".*unset it for the default \(50\)"):
        plugin.TensorBoardCallback()


@pytest.mark.parametrize(
    ("every", "error", "message"),
    [
        (True, ConfigurationTypeError, r"every=True \(bool\) is not an int"),
        (2.0, ConfigurationTypeError, r"every=2\.0 \(float\) is not an int"),
        ("5", ConfigurationTypeError, r"every='5' \(str\) is not an int"),
        (0, ConfigurationError, r"every=0 is not a positive integer"),
        (-4, ConfigurationError, r"every=-4 is not a positive integer"),
    ],
)
def test_a_bad_every_argument_is_refused(
    plugin: types.ModuleType, every: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=r"TensorBoardCallback: " + message):
        plugin.TensorBoardCallback(every=every)


def test_the_every_argument_wins_over_the_environment(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_EVERY, "not a number")
    assert plugin.TensorBoardCallback(every=3).every == 3


@pytest.mark.parametrize("every", [1, 4, 5])
def test_batch_end_runs_every_n_batches(
    plugin: types.ModuleType, maps_path: Path, every: int
) -> None:
    callback = plugin.TensorBoardCallback(every=every)
    trainer = Trainer(
        maps_path,
        make_model(),
        callbacks=[callback],
        default_callbacks=False,
        plugins=False,
        max_epochs=2,
    )
    [row] = trainer.plan("batch_end")
    assert (row["id"], row["filter"]) == ("TensorBoardCallback.on_batch_end", f"every={every}")
    before = live_writers()
    trainer.train(make_loader())
    assert live_writers() == before
    directory = maps_path / "tensorboard"
    steps = [i for i in range(1, 13) if i % every == 0]
    assert scalars(directory, "train/samples_seen") == [(i, 8.0 * i) for i in steps]
    assert [step for step, _ in scalars(directory, "train/learning_rate")] == steps


def test_validate_writes_its_metrics_under_its_stage(
    plugin: types.ModuleType, maps_path: Path
) -> None:
    trainer = Trainer(
        maps_path,
        make_model(),
        callbacks=[plugin.TensorBoardCallback()],
        default_callbacks=False,
        plugins=False,
    )
    metrics = trainer.validate(make_loader(seed=3))
    directory = maps_path / "tensorboard"
    assert tags(directory) == {"validate/loss"}
    assert same_points(scalars(directory, "validate/loss"), [(0, metrics["loss"])])


class CrashError(Exception):
    """Stands for a crash in the middle of training."""


def test_a_crash_keeps_what_was_written_and_a_resume_writes_each_step_once(
    plugin: types.ModuleType, maps_path: Path
) -> None:
    options: dict[str, Any] = {"max_epochs": 3, "log_every_n_batches": 2, "plugins": False}
    trainer = Trainer(
        maps_path, make_model(), callbacks=[plugin.TensorBoardCallback(every=2)], **options
    )

    @trainer.on("batch_end")
    def crash(*, state: TrainerState) -> None:
        if state.iteration == 16:  # in the third epoch, after the state of the second
            raise CrashError

    before = live_writers()
    with pytest.raises(CrashError):
        trainer.train(make_loader(), make_loader(seed=1))
    assert live_writers() == before
    directory = maps_path / "tensorboard"
    assert [step for step, _ in scalars(directory, "train/loss")] == list(range(2, 17, 2))
    assert [step for step, _ in scalars(directory, "validation/loss")] == [6, 12]

    resumed = Trainer.from_maps(
        maps_path, make_model(), callbacks=[plugin.TensorBoardCallback(every=2)], plugins=False
    )
    resumed.train(make_loader(), make_loader(seed=1))
    assert len(list(directory.glob("events.out.tfevents.*"))) == 2
    losses = rows_of(maps_path / "training_loss.tsv", "train_loss")
    assert [step for step, _ in losses] == list(range(2, 19, 2))
    assert same_points(scalars(directory, "train/loss"), losses)
    validation = rows_of(maps_path / "metrics.tsv", "loss", "validation")
    assert [step for step, _ in validation] == [6, 12, 18]
    assert same_points(scalars(directory, "validation/loss"), validation)
    assert scalars(directory, "train/samples_seen") == [(i, 8.0 * i) for i in range(2, 19, 2)]


def test_the_readme_documents_the_batch_end_choice() -> None:
    text = (PACKAGE / "README.md").read_text()
    assert ENV_EVERY in text
    assert "loss_logged" in text
    assert "host-device sync" in text
    assert (
        textwrap.dedent(
            """\
        [project.entry-points."trainbus.plugins"]
        tensorboard = "trainbus_tensorboard:TensorBoardCallback"
        """
        )
        in (PACKAGE / "pyproject.toml").read_text()
    )
