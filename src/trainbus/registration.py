"""Which callbacks a Trainer runs: the defaults, the user's and the plugins', registered once.

The defaults are chosen here, above the engine (which never imports the handlers): a callback
given by the user replaces a default or a plugin's callback of its type, and each callback
gets a unique id (``#n`` for the n-th of a class).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from trainbus.engine.metrics import BoundMetric
from trainbus.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    PluginError,
    SubscriptionError,
    TrainbusError,
)
from trainbus.events import plugins as plugin_loader
from trainbus.events.bus import SOURCE_BUILTIN, SOURCE_USER, EventBus
from trainbus.events.callback import Callback
from trainbus.events.catalog import closest_names
from trainbus.handlers.defaults import DEFAULT_TYPES
from trainbus.handlers.defaults import default_callbacks as fresh_defaults

DefaultsChoice = bool | Iterable[type[Callback]] | Mapping[type[Callback], bool]


def load_plugins(
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


def resolve_callbacks(
    callbacks: Iterable[Callback] | None,
    defaults: DefaultsChoice,
    loaded: Sequence[plugin_loader.LoadedPlugin] = (),
) -> list[Callback]:
    """The callbacks to run, in registration order: kept defaults, the user's, the plugins'."""
    given: list[object]
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
        first = next(i for i, other in enumerate(given) if other is callback)
        if first != index:
            raise ConfigurationError(
                f"callbacks[{first}] and callbacks[{index}] are the same instance {callback!r}; "
                "each of its handlers would run twice: pass it once, or pass two instances"
            )
    users: list[Callback] = [c for c in given if isinstance(c, Callback)]
    contributed = [c for plugin in loaded for c in plugin.callbacks]
    kept = kept_defaults(defaults)
    chosen = [c for c in fresh_defaults() if type(c) in kept]
    given_types = {type(c) for c in users}
    resolved = [
        *(c for c in chosen if type(c) not in given_types),
        *users,
        *(c for c in contributed if type(c) not in given_types),
    ]
    for plugin in loaded:
        replaced = [c for c in plugin.callbacks if type(c) in given_types]
        if replaced:
            names = ", ".join(type(c).__name__ for c in replaced)
            plugin.record.reason += f"; {names} replaced by the one given in callbacks=[...]"
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


def register_callbacks(
    bus: EventBus,
    callbacks: Sequence[Callback],
    loaded: Sequence[plugin_loader.LoadedPlugin],
    check: Callable[[Callback], None],
) -> dict[str, str]:
    """Check and attach every callback and plugin function; returns each callback's source.

    ``check`` validates one callback (a plugin's failure is reported as the plugin's).
    """
    contributed = {id(c): plugin for plugin in loaded for c in plugin.callbacks}
    sources: dict[str, str] = {}
    for callback in callbacks:
        plugin = contributed.get(id(callback))
        if plugin is None:
            check(callback)
            builtin = type(callback).__module__.startswith("trainbus.")
            source = SOURCE_BUILTIN if builtin else SOURCE_USER
            bus.attach(callback, source=source)
            sources[callback.callback_id] = source
            continue
        with _registering(plugin):
            check(callback)
            subscriptions = bus.attach(callback, source=plugin.record.info.source)
        plugin.record.subscribers.extend(s.id for s in subscriptions)
        sources[callback.callback_id] = plugin.record.info.source
    for plugin in loaded:
        for event, function, options in plugin.functions:
            with _registering(plugin):
                subscription = bus.add(event, function, options, source=plugin.record.info.source)
            plugin.record.subscribers.append(subscription.id)
    return sources


@contextlib.contextmanager
def _registering(plugin: plugin_loader.LoadedPlugin) -> Iterator[None]:
    try:
        yield
    except TrainbusError as exc:
        raise PluginError(f"{plugin.record.info.describe()} failed at registration: {exc}") from exc


def default_types_named(names: Sequence[object]) -> list[type[Callback]]:
    """The default callback types among ``names`` (as ``maps.json`` records them)."""
    by_name = {t.__name__: t for t in DEFAULT_TYPES}
    return [by_name[name] for name in names if isinstance(name, str) and name in by_name]


def defaults_choice(default_callbacks: object) -> DefaultsChoice:
    """``default_callbacks`` checked for a string and with an iterable read once into a list."""
    if isinstance(default_callbacks, str | bytes):
        raise ConfigurationTypeError(
            f"default_callbacks={default_callbacks!r} is a string; pass True, False, a list "
            "of default callback types (e.g. [LoggerCallback]) or {Type: False}"
        )
    if not isinstance(default_callbacks, bool | Mapping) and isinstance(
        default_callbacks, Iterable
    ):
        return list(default_callbacks)
    return default_callbacks  # type: ignore[return-value]  # kept_defaults checks the rest


def kept_defaults(defaults: DefaultsChoice) -> list[type[Callback]]:
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


def check_metric_names(callback: Callback, metrics: Mapping[str, BoundMetric]) -> None:
    """Refuse a callback that monitors a metric the Trainer does not compute; describe the rest.

    A callback with a ``resolve_metrics(infos)`` method then receives every metric's
    :class:`~trainbus.engine.metrics.MetricInfo` by name (the built-ins take the monitored
    metric's direction from it), on every rank, before any state is restored.
    """
    for name in getattr(callback, "metric_names", lambda: ())():
        if name not in metrics:
            close = closest_names(name, metrics)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigurationError(
                f"{callback.callback_id} monitors metric {name!r}, which the Trainer does "
                f"not compute.{hint} Known metrics: {sorted(metrics)}. Add it to "
                "Trainer(metrics=...) or monitor one of those."
            )
    resolve = getattr(callback, "resolve_metrics", None)
    if callable(resolve):
        resolve({name: metric.info for name, metric in metrics.items()})
