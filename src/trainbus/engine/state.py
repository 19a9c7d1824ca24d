"""The frozen state snapshot every event carries, and the keeper that builds it once per change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from trainbus.errors import ConfigurationError


class FrozenDict(dict[str, Any]):
    """A dict that refuses mutation; picklable and JSON-serialisable like a plain dict."""

    __slots__ = ()

    def _refuse(self, *_: object, **__: object) -> NoReturn:
        raise TypeError(
            "this mapping belongs to a TrainerState snapshot and is read-only; "
            "copy it with dict(...) to modify a copy"
        )

    __setitem__ = _refuse
    __delitem__ = _refuse
    __ior__ = _refuse
    clear = _refuse
    pop = _refuse
    popitem = _refuse
    setdefault = _refuse
    update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


EMPTY: FrozenDict = FrozenDict()

STAGES = ("idle", "train", "validation", "validate", "test", "predict")


@dataclass(frozen=True, slots=True)
class TrainerState:
    """What the loop knows at one moment, as plain picklable values (never tensors).

    One snapshot is built per change and the same object goes to every subscriber until the
    next change; assigning to a field raises ``FrozenInstanceError``. Counters:

    - ``current_epoch``: 0-based index of the running (or last) training epoch.
    - ``batch_idx``: 0-based index of the batch within the current loader (-1 before the first).
    - ``iteration``: training batches started since the beginning of training (1 at the first).
    - ``global_step``: optimizer steps taken (one per ``accumulate_grad_batches`` batches).
    - ``samples_seen``: training samples of the batches started so far (the current batch
      counts from its ``batch_start``), on every rank together in a distributed run.
    - ``train_loss``: mean training loss over the last log interval (refreshed only then:
      reading it from the device is a host-device sync).
    - ``stopped_by``/``stop_reason``: who asked to stop and why; ``stop_resumable`` whether a
      resume clears that stop (see :class:`~trainbus.Stop`).
    - ``metrics``: the latest validation/test metrics; ``best_metrics``/``best_epochs`` the best
      value of each metric seen during training and the epoch it was seen in.
    - ``rank``/``world_size``: this process's rank and the number of processes (0 and 1 unless
      launched by torchrun); ``batch_idx`` and ``num_batches`` count this rank's share.
    """

    stage: str = "idle"
    current_epoch: int = 0
    max_epochs: int = 0
    batch_idx: int = -1
    num_batches: int | None = None
    iteration: int = 0
    global_step: int = 0
    samples_seen: int = 0
    train_loss: float | None = None
    learning_rates: tuple[float, ...] = ()
    metrics: FrozenDict = field(default=EMPTY)
    best_metrics: FrozenDict = field(default=EMPTY)
    best_epochs: FrozenDict = field(default=EMPTY)
    stop_reason: str | None = None
    stopped_by: str | None = None
    stop_resumable: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def epoch_number(self) -> int:
        """1-based number of the current epoch (the counter ``every=`` uses on epoch events)."""
        return self.current_epoch + 1

    @property
    def should_stop(self) -> bool:
        """Whether a stop was requested (the loop ends at the next boundary)."""
        return self.stopped_by is not None

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-ready values."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, FrozenDict):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


FIELD_NAMES = frozenset(f.name for f in fields(TrainerState))
_DEFAULTS = TrainerState()


class _Building:
    """TrainerState's mutable twin: the same slots, so a built object can become a snapshot.

    A frozen dataclass sets each field through ``object.__setattr__`` (about 3 us for 18
    fields); filling the twin and switching its class costs a sixth of that, and the result
    is a true, frozen, slotted :class:`TrainerState`.
    """

    __slots__ = tuple(f.name for f in fields(TrainerState))


def _snapshot_builder() -> Callable[[dict[str, Any]], TrainerState]:
    names = [f.name for f in fields(TrainerState)]
    lines = ["def build(values):", "    snapshot = new(Building)"]
    lines += [f"    snapshot.{name} = values[{name!r}]" for name in names]
    lines += ["    snapshot.__class__ = TrainerState", "    return snapshot"]
    namespace: dict[str, Any] = {
        "new": object.__new__,
        "Building": _Building,
        "TrainerState": TrainerState,
    }
    exec(compile("\n".join(lines) + "\n", "<trainbus snapshot builder>", "exec"), namespace)
    builder: Callable[[dict[str, Any]], TrainerState] = namespace["build"]
    return builder


_build_snapshot = _snapshot_builder()


class StateKeeper:
    """Holds the loop's current values and builds a :class:`TrainerState` lazily, once per change.

    ``update`` only records values; :meth:`snapshot` builds the frozen object on first use after
    a change and returns the same object until the next one. ``snapshots_built`` counts builds
    (an event nobody listens to must not build one). :meth:`step_done` records an optimizer
    step without the checks of :meth:`update`; the training loop's hot path writes its
    counters into :attr:`values` itself, then sets :attr:`cached` to None (a method call per
    batch is measurable there).
    """

    __slots__ = ("cached", "snapshots_built", "values")

    def __init__(self, **values: Any) -> None:
        self.values: dict[str, Any] = {name: getattr(_DEFAULTS, name) for name in FIELD_NAMES}
        """The current values by field name: written here, and by the loop's hot path."""
        self.cached: TrainerState | None = None
        """The snapshot of the current values, or None: whoever writes ``values`` resets it."""
        self.snapshots_built = 0
        self.update(**values)

    def update(self, **changes: Any) -> None:
        """Record new values; the next snapshot reflects them."""
        if not FIELD_NAMES.issuperset(changes):
            unknown = sorted(changes.keys() - FIELD_NAMES)
            raise ConfigurationError(
                f"TrainerState has no field(s) {unknown}; known: {sorted(FIELD_NAMES)}"
            )
        for key, value in changes.items():
            if type(value) is dict:  # FrozenDict values are kept as they are
                changes[key] = FrozenDict(value)
        self.values.update(changes)
        self.cached = None

    def step_done(self) -> None:
        """An optimizer step was taken: one more global step."""
        self.values["global_step"] += 1
        self.cached = None

    def get(self, name: str) -> Any:
        """The current value of one field, without building a snapshot."""
        return self.values[name]

    def snapshot(self) -> TrainerState:
        """The frozen state for the current values (built at most once per change)."""
        snapshot = self.cached
        if snapshot is None:
            snapshot = _build_snapshot(self.values)
            self.cached = snapshot
            self.snapshots_built += 1
        return snapshot
