"""Plugin packages end to end: real distributions, installed into a directory with pip, found
through their entry points, selected, loaded into real Trainers and reported by the command line.

The distributions are built and installed once per test session; each test that needs them
puts the installation directory on ``sys.path`` for itself only, so no other test sees them.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.installing import pip_install
from trainbus import Callback, Trainer
from trainbus.cli import main
from trainbus.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    PluginError,
    SubscriptionError,
)
from trainbus.events import plugins as plugin_loader

from ..conftest import make_loader, make_model

GROUP = "trainbus.plugins"
MARKER_VARIABLE = "TBP_MARKER_FILE"
"""The marker distribution writes a file at this environment variable's path when imported."""


@pytest.fixture(scope="session")
def plugin_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build every test distribution and install them with one pip call; the target dir."""
    sources = tmp_path_factory.mktemp("plugin-sources")
    target = tmp_path_factory.mktemp("plugin-target")
    for distribution in DISTRIBUTIONS:
        _write_distribution(sources / distribution.name, distribution)
    pip_install(target, *(sources / distribution.name for distribution in DISTRIBUTIONS))
    return target


class Distribution:
    """A test distribution: its modules and its entry points in the group."""

    def __init__(
        self, name: str, version: str, modules: dict[str, str], entry_points: dict[str, str]
    ) -> None:
        self.name = name
        self.version = version
        self.modules = {module: textwrap.dedent(source) for module, source in modules.items()}
        self.entry_points = entry_points


def _write_distribution(directory: Path, distribution: Distribution) -> None:
    """A source tree: ``pyproject.toml`` (setuptools backend) and one file per module."""
    directory.mkdir()
    lines = [
        "[build-system]",
        'requires = ["setuptools>=77"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f"name = {json.dumps(distribution.name)}",
        f"version = {json.dumps(distribution.version)}",
        "",
        f'[project.entry-points."{GROUP}"]',
        *(f"{name} = {json.dumps(value)}" for name, value in distribution.entry_points.items()),
        "",
        "[tool.setuptools]",
        f"py-modules = {json.dumps(sorted(distribution.modules))}",
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    for module, source in distribution.modules.items():
        (directory / f"{module}.py").write_text(source)


DISTRIBUTIONS = [
    Distribution(
        "tb-class-plugin",
        "1.0.0",
        {
            "tbp_classy": """\
                from trainbus import Callback


                class ClassyCallback(Callback):
                    TRAINBUS_PLUGIN_API = 1
                    priority = 7

                    def __init__(self):
                        self.epochs_seen = []

                    def on_epoch_end(self, *, state):
                        self.epochs_seen.append(state.epoch_number)
                """
        },
        {"classy": "tbp_classy:ClassyCallback"},
    ),
    Distribution(
        "tb-factory-plugin",
        "2.1.0",
        {
            "tbp_factory": """\
                from trainbus import Callback

                TRAINBUS_PLUGIN_API = 1


                class FirstCallback(Callback):
                    def __init__(self):
                        self.started = 0

                    def on_train_start(self, *, state):
                        self.started += 1


                class SecondCallback(Callback):
                    priority = -3

                    def __init__(self):
                        self.ended = 0

                    def on_train_end(self, *, state):
                        self.ended += 1


                def make_callbacks():
                    return [FirstCallback(), SecondCallback()]
                """
        },
        {"factory": "tbp_factory:make_callbacks"},
    ),
    Distribution(
        "tb-module-plugin",
        "0.3.0",
        {
            "tbp_marked": """\
                from trainbus import on

                TRAINBUS_PLUGIN_API = (1, 2)
                CALLS = []


                @on("epoch_end", every=2)
                def every_other_epoch(*, state):
                    CALLS.append(("epoch_end", state.epoch_number))


                @on("train_end", priority=-20)
                def finished(*, state):
                    CALLS.append(("train_end", state.epoch_number))


                def helper():
                    raise AssertionError("an unmarked function is not subscribed")
                """
        },
        {"marked": "tbp_marked"},
    ),
    Distribution(
        "tb-broken-import",
        "0.1.0",
        {
            "tbp_broken": """\
                raise ImportError("tbp_broken needs the package 'tbp-missing-dependency'")
                """
        },
        {"broken": "tbp_broken:BrokenCallback"},
    ),
    Distribution(
        "tb-misspelt",
        "0.2.0",
        {
            "tbp_misspelt": """\
                from trainbus import Callback


                class MisspeltCallback(Callback):
                    TRAINBUS_PLUGIN_API = 1

                    def on_epoch_ends(self, *, state):
                        pass
                """
        },
        {"misspelt": "tbp_misspelt:MisspeltCallback"},
    ),
    Distribution(
        "tb-future-api",
        "3.0.0",
        {
            "tbp_future": """\
                from trainbus import Callback


                class FutureCallback(Callback):
                    TRAINBUS_PLUGIN_API = 99

                    def on_epoch_end(self, *, state):
                        pass
                """
        },
        {"future": "tbp_future:FutureCallback"},
    ),
    Distribution(
        "tb-no-api",
        "0.0.1",
        {
            "tbp_undeclared": """\
                from trainbus import Callback


                class PlainCallback(Callback):
                    def on_epoch_end(self, *, state):
                        pass
                """
        },
        {"undeclared": "tbp_undeclared:PlainCallback"},
    ),
    Distribution(
        "tb-marker",
        "1.2.3",
        {
            "tbp_marker": """\
                import os
                import pathlib

                from trainbus import Callback

                if os.environ.get("TBP_MARKER_FILE"):
                    pathlib.Path(os.environ["TBP_MARKER_FILE"]).write_text("imported")


                class MarkerCallback(Callback):
                    TRAINBUS_PLUGIN_API = 1

                    def on_train_start(self, *, state):
                        pass
                """
        },
        {"marker": "tbp_marker:MarkerCallback"},
    ),
    Distribution(
        "tb-bad-factory",
        "0.4.0",
        {
            "tbp_badfactory": """\
                TRAINBUS_PLUGIN_API = 1


                def make():
                    return {"epoch_end": print}
                """
        },
        {"badfactory": "tbp_badfactory:make"},
    ),
    Distribution(
        "tb-quirks",
        "0.9.0",
        {
            "tbp_raising": """\
                TRAINBUS_PLUGIN_API = 1


                def make():
                    raise RuntimeError("the factory cannot reach its configuration")
                """,
            "tbp_generated": """\
                from trainbus import Callback

                TRAINBUS_PLUGIN_API = 1


                class GeneratedCallback(Callback):
                    def on_epoch_end(self, *, state):
                        pass


                def make():
                    yield GeneratedCallback()
                """,
            "tbp_boolapi": """\
                from trainbus import Callback


                class BoolApiCallback(Callback):
                    TRAINBUS_PLUGIN_API = True

                    def on_epoch_end(self, *, state):
                        pass
                """,
            "tbp_watcher": """\
                from trainbus import Callback


                class WatcherCallback(Callback):
                    TRAINBUS_PLUGIN_API = 1

                    def metric_names(self):
                        return ["accuracy"]

                    def on_epoch_end(self, *, state):
                        pass
                """,
        },
        {
            "raising": "tbp_raising:make",
            "generated": "tbp_generated:make",
            "boolapi": "tbp_boolapi:BoolApiCallback",
            "watcher": "tbp_watcher:WatcherCallback",
        },
    ),
]

INSTALLED = {
    name: (distribution.name, distribution.version, value)
    for distribution in DISTRIBUTIONS
    for name, value in distribution.entry_points.items()
}
"""Entry point name -> (distribution, version, entry point value) of every test plugin."""
MODULES = {module for distribution in DISTRIBUTIONS for module in distribution.modules}
GOOD = ("classy", "factory", "marked")


@pytest.fixture
def marker(plugin_target: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Put the test plugins on the path for this test; the path the marker plugin writes."""
    monkeypatch.syspath_prepend(str(plugin_target))
    importlib.invalidate_caches()
    monkeypatch.delenv(plugin_loader.ENV_ALLOW, raising=False)
    monkeypatch.delenv(plugin_loader.ENV_DISABLE_AUTOLOAD, raising=False)
    path = tmp_path / "marker-imported"
    monkeypatch.setenv(MARKER_VARIABLE, str(path))
    # A module imported by an earlier test would not run again, hiding an import.
    _forget_plugin_modules()
    yield path
    _forget_plugin_modules()
    importlib.invalidate_caches()


def _forget_plugin_modules() -> None:
    for module in MODULES:
        sys.modules.pop(module, None)


def _imported_plugin_modules() -> set[str]:
    return MODULES & set(sys.modules)


def _mine(records: list[Any]) -> dict[str, Any]:
    """The rows of the test plugins, by entry point name (other installed plugins left out)."""
    rows = {}
    for record in records:
        row = record if isinstance(record, dict) else record.as_dict()
        if row["name"] in INSTALLED:
            rows[row["name"]] = row
    return rows


def test_discovery_and_selection_read_metadata_only(marker: Path) -> None:
    found = {info.name: info for info in plugin_loader.discover() if info.name in INSTALLED}
    assert {
        name: (info.distribution, info.version, info.value) for name, info in found.items()
    } == INSTALLED
    assert found["classy"].source == "plugin:tb-class-plugin"
    records = plugin_loader.select(list(found.values()), "auto", environ={})
    assert {record.info.name: record.status for record in records} == dict.fromkeys(
        INSTALLED, "loaded"
    )
    assert not marker.exists()
    assert _imported_plugin_modules() == set()


def build(maps: Path, **options: Any) -> Trainer:
    """A real Trainer on the tiny model, without default callbacks."""
    settings: dict[str, Any] = {"default_callbacks": False, "max_epochs": 2}
    settings.update(options)
    return Trainer(maps, make_model(), **settings)


def statuses(trainer: Trainer) -> dict[str, str]:
    return {name: row["status"] for name, row in _mine(trainer.plugins).items()}


def plugin_sources(trainer: Trainer) -> set[str]:
    return {row["source"] for row in trainer.plan() if row["source"].startswith("plugin:")}


def instance(trainer: Trainer, class_name: str) -> Any:
    (found,) = [c for c in trainer.callbacks if type(c).__name__ == class_name]
    return found


class UserCallback(Callback):
    """A user callback next to the plugins."""

    priority = 3

    def __init__(self) -> None:
        self.ended = 0

    def on_epoch_end(self, *, state: Any) -> None:
        self.ended += 1


# ------------------------------------------------------------------------------- selection


def test_auto_loads_every_allowed_plugin_and_they_run(
    marker: Path, maps_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINBUS_PLUGINS", ",".join(GOOD))
    trainer = build(maps_path, plugins="auto")
    trainer.train(make_loader())
    expected = dict.fromkeys(INSTALLED, "not allowed") | dict.fromkeys(GOOD, "loaded")
    assert statuses(trainer) == expected
    assert instance(trainer, "ClassyCallback").epochs_seen == [1, 2]
    assert instance(trainer, "FirstCallback").started == 1
    assert instance(trainer, "SecondCallback").ended == 1
    assert sys.modules["tbp_marked"].CALLS == [("epoch_end", 2), ("train_end", 2)]
    assert _imported_plugin_modules() == {"tbp_classy", "tbp_factory", "tbp_marked"}
    assert not marker.exists()


@pytest.mark.parametrize(
    ("names", "loaded", "classes"),
    [
        (["classy"], {"classy"}, ["ClassyCallback"]),
        (["factory", "marked"], {"factory", "marked"}, ["FirstCallback", "SecondCallback"]),
        (["tb-class-plugin"], {"classy"}, ["ClassyCallback"]),
        ([], set(), []),
    ],
    ids=["one", "two", "by-distribution", "empty"],
)
def test_named_plugins_load_exactly_those(
    marker: Path, maps_path: Path, names: list[str], loaded: set[str], classes: list[str]
) -> None:
    trainer = build(maps_path, plugins=names)
    expected = dict.fromkeys(INSTALLED, "not selected") | dict.fromkeys(loaded, "loaded")
    assert statuses(trainer) == expected
    assert sorted(type(c).__name__ for c in trainer.callbacks) == classes
    assert _imported_plugin_modules() == {INSTALLED[name][2].split(":")[0] for name in loaded}
    assert not marker.exists()


def test_an_unknown_name_is_an_error_naming_the_installed_plugins(
    marker: Path, maps_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=r"names \['tensorbord'\]") as caught:
        build(maps_path, plugins=["classy", "tensorbord"])
    message = str(caught.value)
    assert "installed plugins: [" in message
    assert all(repr(name) in message for name in INSTALLED)
    assert "trainbus plugins" in message
    assert _imported_plugin_modules() == set()
    assert not maps_path.exists()


def test_plugins_false_loads_none(marker: Path, maps_path: Path) -> None:
    trainer = build(maps_path, plugins=False)
    assert statuses(trainer) == dict.fromkeys(INSTALLED, "disabled")
    assert plugin_sources(trainer) == set()
    assert trainer.callbacks == []
    assert _imported_plugin_modules() == set()
    assert not marker.exists()


def test_a_selected_marker_plugin_is_imported(marker: Path, maps_path: Path) -> None:
    """The control of the tests below: selecting the marker plugin does write the marker."""
    trainer = build(maps_path, plugins=["marker"])
    assert statuses(trainer)["marker"] == "loaded"
    assert marker.read_text() == "imported"


@pytest.mark.parametrize("blocked", ["marker", "tb-marker"], ids=["entry-point", "distribution"])
@pytest.mark.parametrize("selection", ["auto", "named"])
def test_block_is_checked_before_import(
    marker: Path,
    maps_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    blocked: str,
    selection: str,
) -> None:
    if selection == "auto":
        # The allow list keeps the broken test plugins out of plugins="auto".
        monkeypatch.setenv("TRAINBUS_PLUGINS", "marker,classy")
        trainer = build(maps_path, plugins="auto", block=[blocked])
    else:
        trainer = build(maps_path, plugins=["marker", "classy"], block=[blocked])
    assert statuses(trainer)["marker"] == "blocked"
    assert statuses(trainer)["classy"] == "loaded"
    assert _mine(trainer.plugins)["marker"]["reason"] == "named in block=[...]"
    assert plugin_sources(trainer) == {"plugin:tb-class-plugin"}
    assert not marker.exists()
    assert "tbp_marker" not in sys.modules


def test_disable_autoload_stops_auto_but_not_explicit_names(
    marker: Path, maps_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINBUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    automatic = build(maps_path, plugins="auto")
    assert statuses(automatic) == dict.fromkeys(INSTALLED, "disabled")
    assert "TRAINBUS_DISABLE_PLUGIN_AUTOLOAD" in _mine(automatic.plugins)["classy"]["reason"]
    assert automatic.callbacks == []
    assert _imported_plugin_modules() == set()
    explicit = build(maps_path, plugins=["classy", "marker"])
    assert statuses(explicit)["classy"] == "loaded"
    assert statuses(explicit)["marker"] == "loaded"
    assert marker.exists()


@pytest.mark.parametrize(
    "allow", ["classy, factory", "tb-class-plugin,factory"], ids=["names", "distribution"]
)
def test_the_environment_allow_list_keeps_out_every_other_plugin(
    marker: Path, maps_path: Path, monkeypatch: pytest.MonkeyPatch, allow: str
) -> None:
    monkeypatch.setenv("TRAINBUS_PLUGINS", allow)
    trainer = build(maps_path, plugins=["classy", "marker"])
    expected = dict.fromkeys(INSTALLED, "not allowed") | {
        "classy": "loaded",
        "factory": "not selected",
    }
    assert statuses(trainer) == expected
    assert _mine(trainer.plugins)["marker"]["reason"] == "not named in $TRAINBUS_PLUGINS"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"plugins": "tensorboard"}, r"plugins='tensorboard' is not 'auto', False or a list"),
        ({"plugins": 3}, r"plugins=3 is not 'auto', False or a list of plugin names"),
        ({"plugins": ["classy", 3]}, r"plugins holds \[3\], which are not plugin names"),
        ({"plugins": ["classy", " "]}, r"plugins holds \[' '\], which are not plugin names"),
        ({"block": 3}, r"block=3 is not a list of plugin names; pass e\.g\. block=\["),
        ({"block": "marker"}, r"block='marker' is not a list of plugin names"),
        ({"block": [None]}, r"block holds \[None\], which are not plugin names"),
    ],
    ids=[
        "plugins-string",
        "plugins-int",
        "plugins-int-name",
        "plugins-blank",
        "block-int",
        "block-string",
        "block-none",
    ],
)
def test_bad_plugin_arguments_are_rejected(
    marker: Path, maps_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationTypeError, match=message):
        build(maps_path, **options)
    assert _imported_plugin_modules() == set()
    assert not marker.exists()


# ------------------------------------------------------------------- plan and load report

PLAN = [
    ("train_start", "FirstCallback.on_train_start", 0, "plugin:tb-factory-plugin"),
    ("epoch_end", "ClassyCallback.on_epoch_end", 7, "plugin:tb-class-plugin"),
    ("epoch_end", "UserCallback.on_epoch_end", 3, "user"),
    ("epoch_end", "tbp_marked.every_other_epoch", 0, "plugin:tb-module-plugin"),
    ("train_end", "SecondCallback.on_train_end", -3, "plugin:tb-factory-plugin"),
    ("train_end", "tbp_marked.finished", -20, "plugin:tb-module-plugin"),
]
"""The plan of a user callback with the three good plugins: (event, id, priority, source)."""

REPORT = {
    "classy": {
        "name": "classy",
        "entry_point": "tbp_classy:ClassyCallback",
        "distribution": "tb-class-plugin",
        "version": "1.0.0",
        "status": "loaded",
        "reason": "named in plugins=[...]",
        "subscribers": ["ClassyCallback.on_epoch_end"],
    },
    "factory": {
        "name": "factory",
        "entry_point": "tbp_factory:make_callbacks",
        "distribution": "tb-factory-plugin",
        "version": "2.1.0",
        "status": "loaded",
        "reason": "named in plugins=[...]",
        "subscribers": ["FirstCallback.on_train_start", "SecondCallback.on_train_end"],
    },
    "marked": {
        "name": "marked",
        "entry_point": "tbp_marked",
        "distribution": "tb-module-plugin",
        "version": "0.3.0",
        "status": "loaded",
        "reason": "named in plugins=[...]",
        "subscribers": ["tbp_marked.every_other_epoch", "tbp_marked.finished"],
    },
    "marker": {
        "name": "marker",
        "entry_point": "tbp_marker:MarkerCallback",
        "distribution": "tb-marker",
        "version": "1.2.3",
        "status": "not selected",
        "reason": "not named in plugins=[...]",
        "subscribers": [],
    },
}
"""Load report rows of the good plugins selected by name, and of one left out."""


def plan_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    return [(row["event"], row["id"], row["priority"], row["source"]) for row in rows]


def test_the_plan_shows_plugin_subscribers_with_their_distribution(
    marker: Path, maps_path: Path
) -> None:
    trainer = build(maps_path, callbacks=[UserCallback()], plugins=list(GOOD))
    assert plan_rows(trainer.plan()) == PLAN
    filters = {row["id"]: row["filter"] for row in trainer.plan()}
    assert filters["tbp_marked.every_other_epoch"] == "every=2"


def test_the_load_report_is_in_the_trainer_and_in_maps_json(marker: Path, maps_path: Path) -> None:
    user = UserCallback()
    trainer = build(maps_path, callbacks=[user], plugins=list(GOOD))
    trainer.train(make_loader())
    assert user.ended == 2
    report = _mine(trainer.plugins)
    assert {name: report[name] for name in REPORT} == REPORT
    recorded = json.loads((maps_path / "maps.json").read_text())
    assert recorded["plugins"] == [record.as_dict() for record in trainer.plugins]
    assert {name: _mine(recorded["plugins"])[name] for name in REPORT} == REPORT
    assert plan_rows(recorded["plan"]) == PLAN


def test_maps_json_gives_plugin_callbacks_their_plugin_source(
    marker: Path, maps_path: Path
) -> None:
    trainer = build(maps_path, callbacks=[UserCallback()], plugins=["classy"])
    trainer.train(make_loader())
    recorded = json.loads((maps_path / "maps.json").read_text())
    sources = {entry["id"]: entry["source"] for entry in recorded["callbacks"]}
    assert sources == {"UserCallback": "user", "ClassyCallback": "plugin:tb-class-plugin"}


# ------------------------------------------------------------------------------- failures

FAILURES = [
    ("broken", r"failed to import: ImportError: tbp_broken needs the package", ImportError),
    (
        "misspelt",
        r"failed at registration: MisspeltCallback\.on_epoch_ends refers to event 'epoch_ends'"
        r", which is not declared\. Did you mean 'epoch_end'",
        SubscriptionError,
    ),
    ("future", r"incompatible with this trainbus: it requires plugin API 99", None),
    ("undeclared", r"incompatible with this trainbus: it declares no plugin API", None),
    ("badfactory", r"its factory returned \{'epoch_end': <built-in function print>\}", None),
    (
        "raising",
        r"failed while building its callbacks: RuntimeError: the factory cannot reach",
        RuntimeError,
    ),
]


@pytest.mark.parametrize(("name", "message", "cause"), FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failing_plugin_raises_plugin_error_naming_it(
    marker: Path, maps_path: Path, name: str, message: str, cause: type[BaseException] | None
) -> None:
    distribution, version, value = INSTALLED[name]
    with pytest.raises(PluginError, match=message) as caught:
        build(maps_path, callbacks=[UserCallback()], plugins=["classy", name])
    text = str(caught.value)
    assert f"of distribution {distribution} {version}" in text
    assert f"(entry point {name} = {value} in group 'trainbus.plugins')" in text
    if cause is None:
        assert caught.value.__cause__ is None
    else:
        assert isinstance(caught.value.__cause__, cause)
    assert not maps_path.exists()


def test_a_factory_returning_a_generator_contributes_its_callbacks(
    marker: Path, maps_path: Path
) -> None:
    try:
        trainer = build(maps_path, plugins=["generated"])
    except PluginError:
        return  # refusing a generator clearly is a fix too
    assert [type(c).__name__ for c in trainer.callbacks] == ["GeneratedCallback"]


def test_a_bool_plugin_api_is_refused(marker: Path, maps_path: Path) -> None:
    with pytest.raises(PluginError, match="TRAINBUS_PLUGIN_API"):
        build(maps_path, plugins=["boolapi"])


def test_a_plugin_monitoring_an_unknown_metric_is_named(marker: Path, maps_path: Path) -> None:
    with pytest.raises(PluginError, match=r"distribution tb-quirks 0\.9\.0") as caught:
        build(maps_path, plugins=["watcher"])
    assert "monitors metric 'accuracy'" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConfigurationError)


# ------------------------------------------------------------------- `trainbus plugins`

CLI_STATUSES = {
    "classy": ("loaded", 'plugins="auto"', ["ClassyCallback.on_epoch_end"]),
    "factory": (
        "loaded",
        'plugins="auto"',
        ["FirstCallback.on_train_start", "SecondCallback.on_train_end"],
    ),
    "marked": ("loaded", 'plugins="auto"', ["tbp_marked.every_other_epoch", "tbp_marked.finished"]),
    "marker": ("loaded", 'plugins="auto"', ["MarkerCallback.on_train_start"]),
    "broken": ("failed", "PluginError: ", []),
    "misspelt": ("failed", "SubscriptionError: MisspeltCallback.on_epoch_ends refers to", []),
    "future": ("failed", "PluginError: ", []),
    "undeclared": ("failed", "PluginError: ", []),
    "badfactory": ("failed", "PluginError: ", []),
    "raising": ("failed", "PluginError: ", []),
}
"""What `trainbus plugins` reports per test plugin: status, reason start, subscribers."""

FAILURE_REASONS = {
    "broken": "failed to import: ImportError: tbp_broken needs the package",
    "future": "requires plugin API 99",
    "undeclared": "declares no plugin API",
    "badfactory": "its factory returned {'epoch_end'",
    "raising": "failed while building its callbacks: RuntimeError",
}


def parse_plugins_output(text: str) -> dict[str, tuple[str, list[str]]]:
    """`trainbus plugins` lines by entry point name: (header line, subscriber lines)."""
    blocks: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("    "):
            current.append(line.strip())
        else:
            current = []
            blocks[line.split("  ", 1)[0]] = (line, current)
    return blocks


def test_the_plugins_command_lists_versions_statuses_and_failures(
    marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugins"]) == 0
    blocks = parse_plugins_output(capsys.readouterr().out)
    for name, (status, reason, subscribers) in CLI_STATUSES.items():
        distribution, version, value = INSTALLED[name]
        header, listed = blocks[name]
        assert header.startswith(f"{name}  {distribution} {version}  ({value})  {status}: {reason}")
        assert listed == subscribers
    for name, fragment in FAILURE_REASONS.items():
        distribution, version, value = INSTALLED[name]
        header = blocks[name][0]
        assert fragment in header
        assert f"of distribution {distribution} {version}" in header


def test_the_plugins_command_prints_valid_json(
    marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = _mine(json.loads(capsys.readouterr().out))
    for name, (status, reason, subscribers) in CLI_STATUSES.items():
        distribution, version, value = INSTALLED[name]
        assert rows[name]["distribution"] == distribution
        assert rows[name]["version"] == version
        assert rows[name]["entry_point"] == value
        assert rows[name]["status"] == status
        assert rows[name]["reason"].startswith(reason)
        assert rows[name]["subscribers"] == subscribers


def test_the_plugins_command_honours_block_before_import(
    marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugins", "--json", "--block", "marker", "--block", "tb-future-api"]) == 0
    rows = _mine(json.loads(capsys.readouterr().out))
    assert rows["marker"]["status"] == "blocked"
    assert rows["future"]["status"] == "blocked"
    assert rows["classy"]["status"] == "loaded"
    assert not marker.exists()
    assert "tbp_marker" not in sys.modules
    assert "tbp_future" not in sys.modules


def test_the_plugins_command_honours_disabled_autoload(
    marker: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRAINBUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["plugins", "--json"]) == 0
    rows = _mine(json.loads(capsys.readouterr().out))
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(
        INSTALLED, "disabled"
    )
    assert _imported_plugin_modules() == set()


# ---------------------------------------------------------------------- `trainbus plan FILE`

SCRIPT = """\
import functools
import pathlib
import sys

import torch
from torch import nn

from trainbus import Callback, SupervisedModel, Trainer


class UserCallback(Callback):
    priority = 3

    def on_epoch_end(self, *, state):
        pass


maps = sys.argv[1]
model = SupervisedModel(
    nn.Linear(4, 2), nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.1)
)
trainer = Trainer(
    maps, model, callbacks=[UserCallback()], default_callbacks=False, plugins=PLUGINS
)
trainer.train([(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))])
pathlib.Path(maps + ".after-train").write_text("the script went on after train()")
"""


def write_script(tmp_path: Path, plugins: list[str]) -> Path:
    script = tmp_path / "experiment.py"
    script.write_text(SCRIPT.replace("PLUGINS", repr(plugins)))
    return script


def test_plan_of_a_file_shows_user_and_plugin_subscribers_without_training(
    marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_script(tmp_path, list(GOOD))
    maps = tmp_path / "experiment-maps"
    assert main(["plan", str(script), str(maps)]) == 0
    table = capsys.readouterr().out
    settings, plan = table.split("\n\n", 2)[1:]
    assert settings.startswith("loop settings\n  max_epochs ")
    lines = [*table.split("\n\n", 1)[0].splitlines(), *plan.splitlines()]
    assert [line for line in lines if line and not line.startswith(" ")] == [
        "dispatch plan of rank 0 of 1",
        "train_start",
        "epoch_end",
        "train_end",
    ]
    rows = [line.split() for line in lines if line.startswith("  ") and "#" not in line]
    assert [(cells[1], int(cells[2]), cells[5]) for cells in rows] == [
        (subscriber, priority, source) for _, subscriber, priority, source in PLAN
    ]
    filters = {cells[1]: cells[3] for cells in rows}
    assert filters["tbp_marked.every_other_epoch"] == "every=2"
    assert not maps.exists()
    assert not Path(str(maps) + ".after-train").exists()

    assert main(["plan", "--json", str(script), str(maps)]) == 0
    assert plan_rows(json.loads(capsys.readouterr().out)) == PLAN
    assert main(["plan", "--json", "--event", "epoch_end", str(script), str(maps)]) == 0
    assert plan_rows(json.loads(capsys.readouterr().out)) == [
        r for r in PLAN if r[0] == "epoch_end"
    ]
    assert not maps.exists()


def test_plan_of_a_file_with_a_failing_plugin_reports_it(
    marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = write_script(tmp_path, ["classy", "future"])
    maps = tmp_path / "experiment-maps"
    assert main(["plan", str(script), str(maps)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("trainbus: error: plugin 'future' (entry point future = ")
    assert "of distribution tb-future-api 3.0.0 is incompatible" in error
    assert not maps.exists()


def test_plan_of_a_file_that_builds_no_trainer_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "no_trainer.py"
    script.write_text("import trainbus\nprint('nothing to train')\n")
    assert main(["plan", str(script)]) == 2
    captured = capsys.readouterr()
    assert "nothing to train" in captured.out
    assert captured.err == (
        f"trainbus: error: {str(script)!r} ran to its end without building a trainbus Trainer; "
        "pass a file that builds one (at top level or under `if __name__ == '__main__':`)\n"
    )


# ----------------------------------------------------------------------------- import side


def test_importing_trainbus_imports_no_plugin(plugin_target: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker-imported"
    program = (
        "import json, sys\n"
        "from importlib import metadata\n"
        "import trainbus\n"
        "modules = sorted(m for m in sys.modules if m.startswith('tbp_'))\n"
        "found = sorted(e.name for e in metadata.entry_points(group='trainbus.plugins'))\n"
        "print(json.dumps({'modules': modules, 'found': found}))\n"
    )
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("TRAINBUS_")
    }
    environment |= {"PYTHONPATH": str(plugin_target), MARKER_VARIABLE: str(marker)}
    result = subprocess.run(
        [sys.executable, "-c", program],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert set(INSTALLED) <= set(seen["found"])  # the plugins were on the path
    assert seen["modules"] == []
    assert not marker.exists()


def test_a_callback_given_by_the_user_replaces_the_plugins_own_of_its_type(
    marker: Path, maps_path: Path
) -> None:
    import importlib

    classy = importlib.import_module("tbp_classy").ClassyCallback()
    trainer = build(maps_path, plugins=["classy"], callbacks=[classy])
    assert [c for c in trainer.callbacks if type(c).__name__ == "ClassyCallback"] == [classy]
    row = _mine(trainer.plugins)["classy"]
    assert row["status"] == "loaded"
    assert "ClassyCallback replaced by the one given in callbacks=[...]" in row["reason"]
    assert row["subscribers"] == []
    assert [r["source"] for r in trainer.plan("epoch_end")] == ["user"]
