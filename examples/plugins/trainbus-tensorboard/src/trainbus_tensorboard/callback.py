"""TensorBoardCallback: TensorBoard event files of a trainbus run, under ``<maps>/tensorboard/``.

Scalars written (step: ``state.global_step``, the optimizer steps taken):

- ``<stage>/<metric>`` for every metric of a validation or test pass (``metrics_computed``):
  ``validation/loss`` inside ``train()``, ``validate/loss`` and ``test/loss`` for the calls;
- ``train/loss``: the mean training loss of each log interval (``loss_logged``), the float
  the Trainer already read from the device, so this costs no host-device sync of its own;
- ``train/samples_seen`` and ``train/learning_rate`` (``train/learning_rate/<i>`` with
  several parameter groups) every ``every`` training batches (``batch_end``): host values of
  the state, never a tensor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, ClassVar

from torch.utils.tensorboard import SummaryWriter

from trainbus import Callback, Maps, TrainerState, on
from trainbus.errors import ConfigurationError, ConfigurationTypeError
from trainbus.events import EVENTS, EventSpec, Options

LOG_DIR = "tensorboard"
"""The directory of the event files, inside the MAPS."""

ENV_EVERY = "TRAINBUS_TENSORBOARD_EVERY"
"""Environment variable: write the ``batch_end`` scalars every N training batches."""

DEFAULT_EVERY = 50
"""Batches between two ``batch_end`` scalars when neither ``every`` nor the variable is set."""

_COUNT = re.compile(r"[0-9]+")


def every_from_environment(environ: Mapping[str, str] | None = None) -> int:
    """``every`` as ``TRAINBUS_TENSORBOARD_EVERY`` sets it: a positive integer, default 50.

    An unset or empty variable gives the default; anything else that is not a positive
    decimal integer raises :class:`~trainbus.errors.ConfigurationError`.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_EVERY, "").strip()
    if not raw:
        return DEFAULT_EVERY
    if not _COUNT.fullmatch(raw) or int(raw) < 1:
        raise ConfigurationError(
            f"{ENV_EVERY}={raw!r} is not a positive integer; set it to the number of training "
            f"batches between two TensorBoard progress scalars, e.g. {ENV_EVERY}=100, or unset "
            f"it for the default ({DEFAULT_EVERY})"
        )
    return int(raw)


class TensorBoardCallback(Callback):
    """Write TensorBoard event files of every train/validate/test call into the MAPS.

    - ``every``: training batches between two ``batch_end`` scalars (``train/samples_seen``,
      ``train/learning_rate``); default: ``$TRAINBUS_TENSORBOARD_EVERY``, else 50.

    The writer opens at ``train_start``, ``validate_start`` and ``test_start`` (in
    ``<maps>/tensorboard/``), is flushed at each ``epoch_end`` and closed at ``teardown``, or
    already at ``exception``: a failed run leaves no writer thread behind, its points flushed.
    A resumed run opens its writer with ``purge_step`` one past the restored step: points a
    crashed run wrote after its training state are hidden, so TensorBoard shows each step once.
    Runs on rank 0 only.

    Installed as the plugin ``tensorboard``, it loads with every ``Trainer(plugins="auto")``;
    to configure it in code, build the Trainer with ``block=["tensorboard"]`` and pass
    ``callbacks=[TensorBoardCallback(every=...)]``.
    """

    TRAINBUS_PLUGIN_API: ClassVar[int] = 1
    rank_zero_only = True

    def __init__(self, every: int | None = None) -> None:
        if every is None:
            every = every_from_environment()
        elif type(every) is not int:  # bool is not a count
            raise ConfigurationTypeError(
                f"TensorBoardCallback: every={every!r} ({type(every).__name__}) is not an int; "
                "pass the number of training batches between two progress scalars, e.g. "
                "every=100"
            )
        elif every < 1:
            raise ConfigurationError(
                f"TensorBoardCallback: every={every!r} is not a positive integer; pass e.g. "
                "every=100, or every=1 for every batch"
            )
        self.every = every
        self._writer: SummaryWriter | None = None

    def handlers(
        self, known_events: Mapping[str, EventSpec] = EVENTS
    ) -> Iterator[tuple[str, Any, Options]]:
        """The handlers, with ``batch_end`` filtered by this instance's ``every``."""
        for event, method, options in super().handlers(known_events):
            if event == "batch_end":
                options = replace(options, every=self.every)
            yield event, method, options

    def on_train_start(self, *, state: TrainerState, maps: Maps) -> None:
        # A run that starts with steps already taken continues a MAPS (a resume): whatever
        # an earlier run logged after the restored step is redone, so TensorBoard drops it.
        self._open(maps, purge_step=state.global_step + 1 if state.global_step else None)

    def on_validate_start(self, *, maps: Maps) -> None:
        self._open(maps)

    def on_test_start(self, *, maps: Maps) -> None:
        self._open(maps)

    def on_metrics_computed(
        self, *, state: TrainerState, maps: Maps, metrics: Mapping[str, float]
    ) -> None:
        writer = self._open(maps)
        for name, value in sorted(metrics.items()):
            writer.add_scalar(f"{state.stage}/{name}", value, state.global_step)

    def on_loss_logged(self, *, state: TrainerState, maps: Maps, train_loss: float) -> None:
        self._open(maps).add_scalar("train/loss", train_loss, state.global_step)

    @on("batch_end", every=DEFAULT_EVERY)  # the instance's `every` replaces it (see handlers)
    def on_batch_end(self, *, state: TrainerState, maps: Maps) -> None:
        writer = self._open(maps)
        step = state.global_step
        writer.add_scalar("train/samples_seen", state.samples_seen, step)
        rates = state.learning_rates
        if len(rates) == 1:
            writer.add_scalar("train/learning_rate", rates[0], step)
        else:
            for index, rate in enumerate(rates):
                writer.add_scalar(f"train/learning_rate/{index}", rate, step)

    def on_epoch_end(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def on_exception(self) -> None:
        self._close()

    def on_teardown(self) -> None:
        self._close()

    def _open(self, maps: Maps, *, purge_step: int | None = None) -> SummaryWriter:
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=str(maps.file(LOG_DIR)), purge_step=purge_step)
        return self._writer

    def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
