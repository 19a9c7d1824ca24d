"""Plugin packages: discovery through entry points, selection, loading, and the load report.

A distribution declares entry points in the group ``trainbus.plugins``; each names one of:

- a :class:`~trainbus.Callback` subclass (instantiated without arguments) or instance;
- a factory: a callable without arguments returning a callback or a list of callbacks;
- a module: its functions marked with ``@on(...)`` subscribe.

The plugin says which plugin API it supports with ``TRAINBUS_PLUGIN_API`` (an int, or a
collection of ints), on the object or in its module; one that does not support
:data:`PLUGIN_API` is refused. Discovery reads package metadata only: a plugin is imported
when it is enabled, never before, and a blocked one never. Control, in this order:

1. ``block=[names]`` (entry point names, or distribution names) is checked before import;
2. the environment variable ``TRAINBUS_PLUGINS=a,b`` is an allow list (for clusters): a
   plugin not named there is not loaded, however it was selected;
3. ``plugins=False`` loads none, ``plugins=[names]`` exactly those (a name not installed is an
   error), ``plugins="auto"`` every one found, unless ``TRAINBUS_DISABLE_PLUGIN_AUTOLOAD=1``.

A plugin that fails to import, is incompatible, or fails at registration raises
:class:`~trainbus.errors.PluginError` naming the distribution, its version, the entry point
and the group, chained to the cause. :class:`PluginRecord` rows make the load report that goes
into ``maps.json`` and that ``trainbus plugins`` prints.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

from trainbus.errors import ConfigurationError, ConfigurationTypeError, PluginError
from trainbus.events.callback import Callback
from trainbus.events.marker import Options, marks_of

GROUP = "trainbus.plugins"
"""The entry-point group plugins declare."""

PLUGIN_API = 1
"""The plugin API this trainbus offers; plugins declare it as ``TRAINBUS_PLUGIN_API``."""

API_ATTRIBUTE = "TRAINBUS_PLUGIN_API"
ENV_DISABLE_AUTOLOAD = "TRAINBUS_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "TRAINBUS_PLUGINS"

Selection = Literal["auto"] | Sequence[str] | bool
Status = Literal["loaded", "blocked", "not allowed", "disabled", "not selected", "failed"]


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One entry point of the group, as package metadata describes it (nothing imported)."""

    name: str
    value: str
    distribution: str
    version: str

    @property
    def source(self) -> str:
        """The subscriber source shown in plans: ``plugin:<distribution>``."""
        return f"plugin:{self.distribution}"

    def describe(self) -> str:
        """How error messages name the plugin."""
        return (
            f"plugin {self.name!r} (entry point {self.name} = {self.value} in group {GROUP!r}) "
            f"of distribution {self.distribution} {self.version}"
        )


@dataclass(slots=True)
class PluginRecord:
    """One row of the load report."""

    info: PluginInfo
    status: Status
    reason: str = ""
    subscribers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON-ready values."""
        return {
            "name": self.info.name,
            "entry_point": self.info.value,
            "distribution": self.info.distribution,
            "version": self.info.version,
            "status": self.status,
            "reason": self.reason,
            "subscribers": list(self.subscribers),
        }


@dataclass(slots=True)
class LoadedPlugin:
    """What an enabled plugin contributes: callbacks, and marked functions of a module."""

    record: PluginRecord
    callbacks: list[Callback]
    functions: list[tuple[str, Callable[..., Any], Options]]


def discover() -> list[PluginInfo]:
    """Every entry point of the group in the installed distributions, sorted by name."""
    found = []
    for entry_point in metadata.entry_points(group=GROUP):
        distribution = entry_point.dist
        found.append(
            PluginInfo(
                name=entry_point.name,
                value=entry_point.value,
                distribution=distribution.metadata["Name"] if distribution else "?",
                version=distribution.version if distribution else "?",
            )
        )
    return sorted(found, key=lambda info: (info.name, info.distribution))


def select(
    found: Sequence[PluginInfo],
    plugins: Selection = "auto",
    block: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> list[PluginRecord]:
    """Decide, without importing anything, which plugins load: one record per plugin found.

    Records of plugins to load have the status ``"loaded"`` (to be confirmed by :func:`load`).
    """
    environ = os.environ if environ is None else environ
    chosen = check_selection(plugins)
    blocked = _names("block", block)
    allowed = _allow_list(environ)
    autoload_off = environ.get(ENV_DISABLE_AUTOLOAD, "").strip() not in ("", "0")
    if isinstance(chosen, frozenset):
        known = {info.name for info in found} | {info.distribution for info in found}
        missing = sorted(chosen - known)
        if missing:
            raise ConfigurationError(
                f"plugins={sorted(chosen)!r} names {missing}, which no installed distribution "
                f"declares in the entry-point group {GROUP!r}; installed plugins: "
                f"{sorted(info.name for info in found) or 'none'}. Install the plugin's "
                "package, or fix the name (run `trainbus plugins` to list them)"
            )
    records = []
    for info in found:
        names = {info.name, info.distribution}
        if names & blocked:
            records.append(PluginRecord(info, "blocked", "named in block=[...]"))
        elif allowed is not None and not names & allowed:
            records.append(PluginRecord(info, "not allowed", f"not named in ${ENV_ALLOW}"))
        elif chosen is False:
            records.append(PluginRecord(info, "disabled", "plugins=False"))
        elif isinstance(chosen, frozenset):
            if names & chosen:
                records.append(PluginRecord(info, "loaded", "named in plugins=[...]"))
            else:
                records.append(PluginRecord(info, "not selected", "not named in plugins=[...]"))
        elif autoload_off:
            records.append(PluginRecord(info, "disabled", f"${ENV_DISABLE_AUTOLOAD} is set"))
        else:
            records.append(PluginRecord(info, "loaded", 'plugins="auto"'))
    return records


def report(
    plugins: Selection = "auto",
    block: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> list[PluginRecord]:
    """The load report for this environment: every plugin found, loaded where selected.

    Unlike a Trainer, which refuses to start with a broken plugin, the report records a
    failure (status ``"failed"``, with the reason) and goes on with the next plugin.
    """
    from trainbus.events.bus import EventBus  # the bus imports nothing of this module

    records = select(discover(), plugins, block, environ)
    for record in records:
        if record.status != "loaded":
            continue
        bus = EventBus()
        try:
            loaded = load(record)
            for callback in loaded.callbacks:
                subscriptions = bus.attach(callback, source=record.info.source)
                record.subscribers.extend(s.id for s in subscriptions)
            for event, function, options in loaded.functions:
                subscription = bus.add(event, function, options, source=record.info.source)
                record.subscribers.append(subscription.id)
        except Exception as exc:
            record.status = "failed"
            record.reason = f"{type(exc).__name__}: {exc}"
            record.subscribers.clear()
    return records


def check_selection(plugins: object) -> frozenset[str] | Literal["auto", False]:
    """Validate a ``plugins=`` argument: ``"auto"``, ``False`` or a list of names."""
    if plugins == "auto" or plugins is True:
        return "auto"
    if plugins is False or plugins is None:
        return False
    if isinstance(plugins, str) or not isinstance(plugins, Iterable):
        raise ConfigurationTypeError(
            f"plugins={plugins!r} is not 'auto', False or a list of plugin names; pass e.g. "
            "plugins=['tensorboard'], or plugins=False to load none"
        )
    return _names("plugins", plugins)


def _names(argument: str, names: Iterable[Any]) -> frozenset[str]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ConfigurationTypeError(
            f"{argument}={names!r} is not a list of plugin names; pass e.g. "
            f"{argument}=['tensorboard']"
        )
    values = list(names)
    bad = [name for name in values if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ConfigurationTypeError(
            f"{argument} holds {bad!r}, which are not plugin names (entry point or "
            "distribution names, as `trainbus plugins` lists them)"
        )
    return frozenset(name.strip() for name in values)


def _allow_list(environ: Mapping[str, str]) -> frozenset[str] | None:
    raw = environ.get(ENV_ALLOW)
    if raw is None:
        return None
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def load(record: PluginRecord) -> LoadedPlugin:
    """Import a selected plugin, check its API and collect what it subscribes."""
    info = record.info
    try:
        target = _entry_point(info).load()
    except Exception as exc:
        raise PluginError(
            f"{info.describe()} failed to import: {type(exc).__name__}: {exc}. Fix or "
            f"uninstall the distribution, or skip it with block=[{info.name!r}] or "
            f"{ENV_DISABLE_AUTOLOAD}=1"
        ) from exc
    _check_api(info, target)
    try:
        callbacks, functions = _contributions(info, target)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"{info.describe()} failed while building its callbacks: {type(exc).__name__}: {exc}"
        ) from exc
    return LoadedPlugin(record, callbacks, functions)


def _entry_point(info: PluginInfo) -> metadata.EntryPoint:
    for entry_point in metadata.entry_points(group=GROUP, name=info.name):
        if entry_point.value == info.value:
            return entry_point
    raise PluginError(f"{info.describe()} is no longer installed")


def _check_api(info: PluginInfo, target: object) -> None:
    declared = getattr(target, API_ATTRIBUTE, None)
    if declared is None and not isinstance(target, types.ModuleType):
        module = inspect.getmodule(target)
        declared = getattr(module, API_ATTRIBUTE, None)
    supported: Collection[object]
    if declared is None:
        supported = ()
    elif isinstance(declared, int):
        supported = (declared,)
    elif isinstance(declared, Collection) and not isinstance(declared, str):
        supported = declared
    else:
        supported = (declared,)
    # True == 1 in Python: a bool is not an API version, whatever it compares equal to.
    supported = [v for v in supported if isinstance(v, int) and not isinstance(v, bool)]
    if PLUGIN_API not in supported:
        requirement = (
            "declares no plugin API"
            if declared is None
            else f"requires plugin API {declared!r} ({API_ATTRIBUTE})"
        )
        raise PluginError(
            f"{info.describe()} is incompatible with this trainbus: it {requirement}, and "
            f"this trainbus offers plugin API {PLUGIN_API}. Install a version of "
            f"{info.distribution} made for it (setting {API_ATTRIBUTE} = {PLUGIN_API}), or "
            f"skip it with block=[{info.name!r}]"
        )


def _contributions(
    info: PluginInfo, target: object
) -> tuple[list[Callback], list[tuple[str, Callable[..., Any], Options]]]:
    if isinstance(target, types.ModuleType):
        functions = []
        for name, value in sorted(vars(target).items()):
            if name.startswith("_") or not callable(value):
                continue
            for mark in marks_of(value):
                functions.append((mark.event, value, mark.options))
        if not functions:
            raise PluginError(
                f"{info.describe()} names a module with no @on(...)-marked function; mark "
                "its handlers with trainbus.on(event), or point the entry point at a "
                "Callback class or a factory"
            )
        return [], functions
    if isinstance(target, type) and issubclass(target, Callback):
        return [target()], []
    if isinstance(target, Callback):
        return [target], []
    if callable(target):
        built = target()
        produced: object = built
        if isinstance(built, Callback):
            produced = [built]
        elif isinstance(built, Iterable) and not isinstance(built, str | bytes | Mapping):
            produced = list(built)  # a generator is read once, here
        if not isinstance(produced, list) or not all(
            isinstance(item, Callback) for item in produced
        ):
            raise PluginError(
                f"{info.describe()}: its factory returned {built!r}; a factory returns a "
                "trainbus Callback or a list of them"
            )
        return produced, []
    raise PluginError(
        f"{info.describe()} names {target!r}, which is not a Callback class, a factory or a "
        "module; point the entry point at one of those"
    )
