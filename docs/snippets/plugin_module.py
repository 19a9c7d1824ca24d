"""A plugin's module: ``trainbus_epoch_timer/__init__.py`` of ``trainbus-epoch-timer``.

Installed, the package's entry point makes every ``Trainer(plugins="auto")`` load it.
Run as a script, this file trains once with the callback passed by hand, as a user
configuring it would.
"""

# --8<-- [start:plugin]
import time

from trainbus import Callback

TRAINBUS_PLUGIN_API = 1  # the plugin API this package supports


class EpochTimerCallback(Callback):
    """Print how long each training epoch took."""

    rank_zero_only = True
    reverse_end_events = True  # opens early at epoch_start, closes late at epoch_end

    # The plugin loader builds it without arguments: every argument has a default.
    def __init__(self, unit: str = "s") -> None:
        self.unit = unit
        self._started = 0.0

    def on_epoch_start(self, *, state) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, *, state) -> None:
        seconds = time.perf_counter() - self._started
        shown = seconds * 1000 if self.unit == "ms" else seconds
        print(f"epoch {state.epoch_number}: {shown:.1f} {self.unit}")


# --8<-- [end:plugin]


if __name__ == "__main__":
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from trainbus import SupervisedModel, Trainer

    inputs = torch.randn(64, 4)
    loader = DataLoader(
        TensorDataset(inputs, (inputs.sum(dim=1) > 0).long()), batch_size=16
    )
    model = SupervisedModel(nn.Linear(4, 2), nn.CrossEntropyLoss())
    # --8<-- [start:configure]
    trainer = Trainer(
        "runs/timed",
        model,
        callbacks=[EpochTimerCallback(unit="ms")],  # replaces the plugin's own instance
        max_epochs=2,
    )
    # --8<-- [end:configure]
    trainer.train(loader, loader)
