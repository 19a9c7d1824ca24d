"""Writing a callback: payload by name, commands, state kept across a resume, files.

Run it from any directory: it writes its run under ``runs/goal/`` there.
"""

import functools

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import SupervisedModel, Trainer, seed_everything

seed_everything(0)
inputs = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
target = (inputs[:, :4].sum(dim=1) > 0).long()
train_loader = DataLoader(
    TensorDataset(inputs[:192], target[:192]), batch_size=32, shuffle=True
)
val_loader = DataLoader(TensorDataset(inputs[192:], target[192:]), batch_size=64)
model = SupervisedModel(
    nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
    nn.CrossEntropyLoss(),
    optimizer=functools.partial(torch.optim.SGD, lr=0.5),
)

# --8<-- [start:goal]
from trainbus import Callback, SaveCheckpoint, Stop
from trainbus.errors import ConfigurationError
from trainbus.events import Command


class GoalCallback(Callback):
    """Save the weights when `metric` reaches `goal`; stop `extra_epochs` later."""

    def __init__(self, metric: str, goal: float, extra_epochs: int = 1) -> None:
        if extra_epochs < 0:  # refuse bad arguments when the callback is built
            raise ConfigurationError(f"extra_epochs={extra_epochs!r} is negative")
        self.metric = metric  # plain public attributes go into maps.json (see config())
        self.goal = goal
        self.extra_epochs = extra_epochs
        self.reached_at: int | None = None

    def on_validation_end(self, *, metrics, state) -> list[Command] | None:
        if self.reached_at is None and metrics[self.metric] <= self.goal:
            self.reached_at = state.current_epoch
            return [SaveCheckpoint(f"goal-{self.metric}")]
        return None

    def on_epoch_end(self, *, state) -> Command | None:
        if (
            self.reached_at is not None
            and state.current_epoch >= self.reached_at + self.extra_epochs
        ):
            return Stop(
                f"{self.metric} reached {self.goal} at epoch {self.reached_at + 1}"
            )
        return None

    # What must survive a resume: each training state stores it under the callback's id.
    def state_dict(self) -> dict[str, int | None]:
        return {"reached_at": self.reached_at}

    def load_state_dict(self, state) -> None:
        self.reached_at = state["reached_at"]

    def reset(self) -> None:  # a new run (not a resume) starts from nothing
        self.reached_at = None


# --8<-- [end:goal]


# --8<-- [start:writer]
class EpochTable(Callback):
    """Append one line per epoch to `epochs.txt` in the MAPS."""

    rank_zero_only = True  # under torchrun, only rank 0 writes files
    priority = -100  # after the callbacks at 0 (early stopping, schedulers, ...)

    # `-> None`: this handler never returns a command.
    def on_epoch_end(self, *, maps, state) -> None:
        with open(maps.file("epochs.txt"), "a") as table:
            table.write(
                f"{state.epoch_number}\t{state.global_step}\t{dict(state.metrics)}\n"
            )


# --8<-- [end:writer]


# --8<-- [start:run]
trainer = Trainer(
    "runs/goal",
    model,
    callbacks=[GoalCallback("loss", goal=0.5, extra_epochs=1), EpochTable()],
    max_epochs=20,
    seed=0,
)
state = trainer.train(train_loader, val_loader)
print(f"stopped by {state.stopped_by}: {state.stop_reason}")
print((trainer.maps.path / "epochs.txt").read_text())
assert state.stopped_by == "GoalCallback.on_epoch_end"
assert (trainer.maps.path / "checkpoints" / "goal-loss").is_dir()
# --8<-- [end:run]
