"""ModelCheckpointCallback: keep the weights of the best models, of chosen epochs, and the last."""

from __future__ import annotations

import math
import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainbus.engine import checkpoint as checkpoints
from trainbus.engine.maps import CHECKPOINTS_DIR, Maps
from trainbus.engine.metrics import MetricInfo
from trainbus.engine.state import TrainerState
from trainbus.errors import CheckpointError, ConfigurationError, ConfigurationTypeError
from trainbus.events.callback import Callback
from trainbus.events.commands import SaveCheckpoint
from trainbus.handlers import priorities
from trainbus.handlers.checkpoint_tags import check_epochs, check_tag_conflicts
from trainbus.handlers.monitored import (
    Mode,
    check_mode,
    known_mode,
    mode_from_name,
    resolve_mode,
    warn_never_computed,
)

__all__ = ["KEEP_ALL", "Metadata", "ModelCheckpointCallback", "Ranked", "check_tag_conflicts"]

KEEP_ALL = -1
"""``top_k`` value that keeps the model of every validation (none deleted; NaN still skipped)."""

Metadata = tuple[tuple[str, str | int | float | bool | None], ...]

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
_LONGEST_EPOCH = 999_999


@dataclass(frozen=True, slots=True)
class Ranked:
    """One kept model of the ranking: its metric value, the epoch it was seen in, its tag."""

    value: float
    epoch: int
    tag: str


@dataclass(frozen=True, slots=True)
class _Pending:
    """A save asked for but not yet announced by the ``checkpoint`` event."""

    iteration: int
    metadata: Metadata
    evict: tuple[str, ...]


class ModelCheckpointCallback(Callback):
    """Save model weights under ``checkpoints/``: the best ones, chosen epochs, and the last.

    - ``metric``: rank models by this metric, computed at each validation (a ``train()`` call
      that never validates gives a :class:`~trainbus.errors.TrainbusWarning` at its start:
      only ``last`` and the chosen epochs are then kept). ``mode`` (``"min"`` or ``"max"``),
      left out, is taken from the metric when the Trainer is built, as
      :class:`~trainbus.EarlyStoppingCallback` does (torchmetrics' ``higher_is_better``; a
      :class:`~trainbus.LossMetricConfig` or a loss's name goes down; refused when nothing
      tells). ``top_k=1`` keeps the best under ``{prefix}best-{metric}``;
      ``top_k=k > 1`` keeps each of the k best under ``{prefix}best-{metric}-epoch-{n}`` and,
      in addition, the single best under ``{prefix}best-{metric}``; ``top_k=-1`` keeps the model
      of every validation under its ranked tag (nothing is deleted). A model must be strictly
      better than the worst kept one to enter (ties keep the earlier); NaN never enters.
    - ``epochs``: the epochs (``state.current_epoch``, 0-based) to keep as ``{prefix}epoch-{n}``,
      any container of ints, e.g. ``range(1, 100, 10)`` or ``{0, 5}``.
    - ``every_n_epochs``: also keep every n-th epoch (by ``state.epoch_number``, 1-based), as
      ``{prefix}epoch-{current_epoch}``.
    - ``save_last``: keep the weights after every epoch (and at the end of training) as
      ``{prefix}last``.
    - ``prefix``: prepended to every tag, so several instances share one MAPS without writing
      the same directories; :func:`check_tag_conflicts` reports instances that would.
    - ``asynchronous``: write in the background (default False; single-process runs, see
      :class:`~trainbus.TrainingCheckpointCallback`): the step waits only for a host copy of
      the weights; a replaced model is deleted when the ``checkpoint`` event of its
      replacement comes (at the next save, the end of the epoch, or of training).

    The callback decides and the Trainer writes (atomically, with a manifest whose metadata
    holds ``metric``, ``value``, ``mode`` and ``epoch``). A model that falls out of the top k
    is deleted only once the model replacing it is committed, and only if this instance wrote
    it. The ranking, the tags written and the saves not yet committed are part of
    :meth:`state_dict`. On resume, ranked directories this callback wrote after the restored
    state (in epochs the resumed run replays) are deleted, kept models whose directory is gone
    leave the ranking, and a save asked at the restored state's own boundary but never
    committed is asked again (the restored weights are the ones it was asked for). The replay
    then writes the replayed epochs again; when it diverges from the interrupted run (other
    data or settings), ``{prefix}best-{metric}`` and ``{prefix}last`` may hold a model of the
    discarded epochs until the replay writes them.

    In a distributed run it decides and deletes on rank 0 only; the metrics it ranks by are
    reduced over every rank, and the weights (the same on every rank) are written once.
    """

    priority = priorities.CHECKPOINT
    rank_zero_only = True

    def __init__(
        self,
        metric: str | None = None,
        epochs: Container[int] | None = None,
        *,
        save_last: bool = True,
        top_k: int = 1,
        mode: Mode | None = None,
        every_n_epochs: int | None = None,
        prefix: str = "",
        asynchronous: bool = False,
    ) -> None:
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ConfigurationError(
                f"ModelCheckpointCallback: metric={metric!r} is not a metric name or None; pass "
                "the name of a metric given to Trainer(metrics=...), e.g. metric='loss'"
            )
        self._epoch_set = check_epochs(epochs)
        if not isinstance(save_last, bool):
            raise ConfigurationError(
                f"ModelCheckpointCallback: save_last={save_last!r} is not a bool"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < KEEP_ALL:
            raise ConfigurationError(
                f"ModelCheckpointCallback: top_k={top_k!r} is not a positive integer or -1; pass "
                "the number of best models to keep, or -1 to keep all"
            )
        if top_k == 0:
            raise ConfigurationError(
                "ModelCheckpointCallback: top_k=0 would keep no model; pass top_k=1 (the best), "
                "top_k=k (the k best) or top_k=-1 (all), or metric=None for no ranking"
            )
        if metric is None and top_k != 1:
            raise ConfigurationError(
                f"ModelCheckpointCallback: top_k={top_k!r} ranks models by a metric, but metric "
                "is None; pass metric=..., e.g. metric='loss'"
            )
        given_mode = check_mode(mode, "ModelCheckpointCallback")
        if metric is None and mode is not None:
            raise ConfigurationError(
                f"ModelCheckpointCallback: mode={mode!r} is given without a metric; pass "
                "metric=... or leave mode out"
            )
        if every_n_epochs is not None and (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 1
        ):
            raise ConfigurationError(
                f"ModelCheckpointCallback: every_n_epochs={every_n_epochs!r} is not a positive "
                "integer or None; pass e.g. every_n_epochs=5"
            )
        if not isinstance(prefix, str) or (
            prefix and (not _PREFIX.fullmatch(prefix) or ".." in prefix)
        ):
            raise ConfigurationError(
                f"ModelCheckpointCallback: prefix={prefix!r} is not a safe tag prefix; use "
                "letters, digits and '._=-', starting with a letter or digit and without '..', "
                "e.g. prefix='fold1-' (or '' for none)"
            )
        if not isinstance(asynchronous, bool):
            raise ConfigurationTypeError(
                f"ModelCheckpointCallback: asynchronous={asynchronous!r} is not a bool; pass "
                "True to write the weights in the background, else False"
            )
        self.asynchronous = asynchronous
        self.metric = metric
        self.epochs = epochs
        self.every_n_epochs = every_n_epochs
        self.save_last = save_last
        self.top_k = top_k
        self.prefix = prefix
        self._given_mode = given_mode
        # None without a metric, or until the Trainer tells the metric's direction.
        self.mode: Mode | None = (given_mode or mode_from_name(metric)) if metric else None
        self._check_tags()
        self._clear_run()

    def reset(self) -> None:
        """Forget an earlier run's best value, ranking and checkpoints (its files stay)."""
        self._clear_run()

    def _clear_run(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.top: list[Ranked] = []
        self.created: set[str] = set()
        self.last_iteration: int | None = None
        self._pending: dict[str, _Pending] = {}
        # Saves of a tag asked again before their `checkpoint` event (asynchronous writes):
        # those events find the newer request pending and leave it be.
        self._superseded: dict[str, int] = {}
        self._value: float | None = None

    # ------------------------------------------------------------------ tags
    @property
    def best_tag(self) -> str | None:
        """``{prefix}best-{metric}``: the single best model (``None`` without a metric)."""
        return None if self.metric is None else f"{self.prefix}best-{self.metric}"

    @property
    def last_tag(self) -> str:
        """``{prefix}last``: the weights after the latest epoch."""
        return f"{self.prefix}last"

    def epoch_tag(self, epoch: int) -> str:
        """``{prefix}epoch-{epoch}``: the weights kept for one selected epoch (0-based)."""
        return f"{self.prefix}epoch-{epoch}"

    def ranked_tag(self, epoch: int) -> str:
        """The tag a ranked model of ``epoch`` is kept under (``best_tag`` when ``top_k=1``)."""
        best = self.best_tag
        if best is None:
            raise ConfigurationError("ModelCheckpointCallback: ranked_tag needs a metric")
        return best if self.top_k == 1 else f"{best}-epoch-{epoch}"

    def _check_tags(self) -> None:
        tags = [self.last_tag, self.epoch_tag(_LONGEST_EPOCH)]
        if self.metric is not None:
            tags.append(self.ranked_tag(_LONGEST_EPOCH))
        for tag in tags:
            try:
                SaveCheckpoint(tag)
            except ConfigurationError:
                raise ConfigurationError(
                    f"ModelCheckpointCallback: prefix={self.prefix!r} and metric={self.metric!r} "
                    f"make checkpoint tags such as {tag!r}, which is not a safe directory name "
                    "(letters, digits and '._=-', at most 128 characters); use a shorter prefix "
                    "or rename the metric in Trainer(metrics=...)"
                ) from None

    def _is_ranked_tag(self, name: str) -> bool:
        if self.metric is None or self.top_k == 1:
            return False
        head = f"{self.best_tag}-epoch-"
        rest = name[len(head) :]
        return name.startswith(head) and rest.isascii() and rest.isdigit()

    # ------------------------------------------------------------- handlers
    def metric_names(self) -> tuple[str, ...]:
        """Metrics this callback reads (checked against the Trainer's metrics)."""
        return (self.metric,) if self.metric else ()

    def resolve_metrics(self, metrics: Mapping[str, MetricInfo]) -> None:
        """Take ``mode`` from the ranking metric (called when a Trainer registers the callback).

        Raises :class:`~trainbus.errors.ConfigurationError` when neither ``mode``, the metric
        nor its name tells the direction.
        """
        if self.metric is not None:
            self.mode = resolve_mode(
                self.callback_id, self.metric, self._given_mode, metrics.get(self.metric)
            )

    def _direction(self) -> Mode:
        return known_mode(self.callback_id, str(self.metric), self.mode)

    def on_train_start(self, *, validates: bool) -> None:
        if self.metric is None or validates:
            return
        kept = [repr(self.last_tag)] if self.save_last else []
        if self.epochs is not None or self.every_n_epochs is not None:
            kept.append("the chosen epochs")
        consequence = f"no {self.best_tag!r} checkpoint is written"
        if kept:
            consequence += f" (only {' and '.join(kept)})"
        warn_never_computed(self.callback_id, self.metric, consequence)

    def on_validation_end(self, *, metrics: Mapping[str, float]) -> None:
        if self.metric is not None:
            self._value = metrics[self.metric]

    def on_epoch_end(self, *, state: TrainerState) -> list[SaveCheckpoint]:
        epoch = state.current_epoch
        value, self._value = self._value, None
        saves: dict[str, tuple[Metadata, tuple[str, ...]]] = {}
        if value is not None:
            for tag, evict in self._rank(value, epoch):
                saves[tag] = (self._metadata(epoch, value), evict)
        if (self._epoch_set is not None and epoch in self._epoch_set) or (
            self.every_n_epochs is not None and state.epoch_number % self.every_n_epochs == 0
        ):
            saves[self.epoch_tag(epoch)] = (self._metadata(epoch, value), ())
        if self.save_last:
            saves[self.last_tag] = (self._metadata(epoch, value), ())
            self.last_iteration = state.iteration
        return self._request(saves, state.iteration)

    def on_train_end(self, *, state: TrainerState) -> list[SaveCheckpoint]:
        if not self.save_last or state.iteration == 0 or state.iteration == self.last_iteration:
            return []
        self.last_iteration = state.iteration
        metadata = self._metadata(state.current_epoch, None)
        return self._request({self.last_tag: (metadata, ())}, state.iteration)

    def on_checkpoint(self, *, checkpoint: Path, tag: str, kind: str) -> None:
        if kind != "weights":
            return
        if self._superseded.get(tag):
            self._superseded[tag] -= 1
            self.created.add(tag)
            return
        pending = self._pending.pop(tag, None)
        if pending is None:
            return
        self.created.add(tag)
        self._evict(checkpoint.parent, pending.evict)

    def on_resume(self, *, state: TrainerState, maps: Maps) -> list[SaveCheckpoint]:
        root = maps.file(CHECKPOINTS_DIR)
        evict: list[str] = []
        for tag, pending in list(self._pending.items()):
            written = self._written_at(root / tag)
            if written == pending.iteration or pending.iteration != state.iteration:
                # Committed before the interruption; or asked at another boundary, so the
                # restored weights are not the ones it was asked for.
                del self._pending[tag]
                if written == pending.iteration:
                    self.created.add(tag)
                    evict.extend(pending.evict)
        # A kept model deleted by the discarded part of the interrupted run cannot be restored.
        self.top = [e for e in self.top if e.tag in self._pending or (root / e.tag).is_dir()]
        self.created = {t for t in self.created if t in self._pending or (root / t).is_dir()}
        ranked = {e.tag for e in self.top}
        if root.is_dir():
            for path in sorted(root.iterdir()):
                if not self._is_ranked_tag(path.name) or path.name in ranked:
                    continue
                written = self._written_at(path)
                if written is not None and written > state.iteration:
                    checkpoints.remove_checkpoint(path)
                    self.created.discard(path.name)
        self._evict(root, evict)
        return [SaveCheckpoint(tag, p.metadata) for tag, p in self._pending.items()]

    # ------------------------------------------------------------- ranking
    def _better(self, value: float, than: float) -> bool:
        return value < than if self._direction() == "min" else value > than

    def _rank_key(self, entry: Ranked) -> tuple[float, int]:
        return (entry.value if self._direction() == "min" else -entry.value, entry.epoch)

    def _rank(self, value: float, epoch: int) -> list[tuple[str, tuple[str, ...]]]:
        """Update the ranking with ``value`` seen at ``epoch``; the tags to save, with evictions."""
        best_tag = self.best_tag
        if best_tag is None or math.isnan(value):
            return []
        self._direction()  # refuse to rank before the direction is known, even the first
        saves: list[tuple[str, tuple[str, ...]]] = []
        improved = self.best is None or self._better(value, self.best)
        if self.top_k == 1:
            if improved:
                self.top = [Ranked(value, epoch, best_tag)]
        else:
            tag = self.ranked_tag(epoch)
            entries = [e for e in self.top if e.tag != tag]
            if (
                self.top_k == KEEP_ALL
                or len(entries) < self.top_k
                or self._better(value, entries[-1].value)
            ):
                entries.append(Ranked(value, epoch, tag))
                entries.sort(key=self._rank_key)
                keep = len(entries) if self.top_k == KEEP_ALL else self.top_k
                self.top = entries[:keep]
                saves.append((tag, tuple(e.tag for e in entries[keep:])))
        if improved:
            self.best, self.best_epoch = value, epoch
            saves.append((best_tag, ()))
        return saves

    def _metadata(self, epoch: int, value: float | None) -> Metadata:
        if self.metric is None:
            return (("epoch", epoch),)
        return (("metric", self.metric), ("value", value), ("mode", self.mode), ("epoch", epoch))

    def _request(
        self, saves: Mapping[str, tuple[Metadata, tuple[str, ...]]], iteration: int
    ) -> list[SaveCheckpoint]:
        for tag, (metadata, evict) in saves.items():
            earlier = self._pending.get(tag)
            if earlier is not None:
                self._superseded[tag] = self._superseded.get(tag, 0) + 1
                evict = tuple(dict.fromkeys((*earlier.evict, *evict)))
            self._pending[tag] = _Pending(iteration, metadata, evict)
        return [
            SaveCheckpoint(tag, metadata, self.asynchronous) for tag, (metadata, _) in saves.items()
        ]

    def _evict(self, root: Path, tags: Iterable[str]) -> None:
        kept = {e.tag for e in self.top}
        for tag in tags:
            if tag in self.created and tag not in kept and tag not in self._pending:
                checkpoints.remove_checkpoint(root / tag)
                self.created.discard(tag)

    def _written_at(self, directory: Path) -> int | None:
        """The iteration this callback wrote ``directory`` at; None if not its, or unreadable."""
        if not directory.is_dir():
            return None
        try:
            # Verifies the weights' hash: a resume-time cost, once per directory examined.
            metadata = checkpoints.read_manifest(directory).get("metadata", {})
        except CheckpointError:
            return None
        iteration = metadata.get("iteration")
        sources = {options.id for _, _, options in self.handlers() if options.id}
        if not checkpoints.metadata_owned_by(metadata, self.callback_id, sources):
            return None
        return iteration if isinstance(iteration, int) else None

    # ---------------------------------------------------------------- state
    def config(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "epochs": None if self.epochs is None else repr(self.epochs),
            "every_n_epochs": self.every_n_epochs,
            "save_last": self.save_last,
            "top_k": self.top_k,
            "mode": self.mode,
            "prefix": self.prefix,
        }

    def _ranking_config(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "top_k": self.top_k,
            "prefix": self.prefix,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self._ranking_config(),
            "best": self.best,
            "best_epoch": self.best_epoch,
            "top": [{"value": e.value, "epoch": e.epoch, "tag": e.tag} for e in self.top],
            "created": sorted(self.created),
            "pending": [
                {
                    "tag": tag,
                    "iteration": p.iteration,
                    "metadata": [[key, value] for key, value in p.metadata],
                    "evict": list(p.evict),
                }
                for tag, p in self._pending.items()
            ],
            "last_iteration": self.last_iteration,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("config")
        if saved is not None and dict(saved) != self._ranking_config():
            raise ConfigurationError(
                f"{self.callback_id}: the saved state ranks with {dict(saved)!r}, but this "
                f"callback is configured with {self._ranking_config()!r}; resume with the same "
                "metric, mode, top_k and prefix, or train into a new MAPS"
            )
        best = state.get("best")
        self.best = None if best is None else float(best)
        best_epoch = state.get("best_epoch")
        self.best_epoch = None if best_epoch is None else int(best_epoch)
        self.top = [
            Ranked(float(e["value"]), int(e["epoch"]), str(e["tag"])) for e in state.get("top", ())
        ]
        self.created = {str(tag) for tag in state.get("created", ())}
        self._pending = {
            str(p["tag"]): _Pending(
                int(p["iteration"]),
                tuple((str(key), value) for key, value in p["metadata"]),
                tuple(str(tag) for tag in p["evict"]),
            )
            for p in state.get("pending", ())
        }
        last = state.get("last_iteration")
        self.last_iteration = None if last is None else int(last)
        self._superseded = {}
        self._value = None
