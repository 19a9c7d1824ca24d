"""The callbacks chapter's examples, run as printed with only the import lines changed.

Run from any directory: it creates ``maps_directory`` there (and refuses to overwrite it).
"""

import functools

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# The chapter's imports were `from clinicadl.train import Trainer` and
# `from clinicadl.callbacks import ...`: these lines are the only change.
from trainbus import (
    Callback,
    EarlyStoppingCallback,
    LossMetricConfig,
    ModelCheckpointCallback,
    SupervisedModel,
    Trainer,
)

# The model and the data come from the chapter "Defining a model"; any Model does.
torch.manual_seed(0)
inputs = torch.randn(320, 16)
noisy = inputs[:, :8].sum(dim=1) + 2 * torch.randn(320)
target = (noisy > inputs[:, 8:].sum(dim=1)).long()
train_loader = DataLoader(TensorDataset(inputs[:128], target[:128]), batch_size=32, shuffle=True)
val_loader = DataLoader(TensorDataset(inputs[128:], target[128:]), batch_size=64)
model = SupervisedModel(
    nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2)),
    nn.CrossEntropyLoss(),
    optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
)

# --- 2.4. Callbacks: the chapter's Trainer, as printed ---------------------------------
trainer = Trainer(
    maps="maps_directory",
    model=model,
    metrics={"loss": LossMetricConfig(loss_name="loss")},
    callbacks=[
        EarlyStoppingCallback(metric="loss", patience=10),
        ModelCheckpointCallback(metric="loss", epochs=range(1, 100, 10)),
    ],
)


# --- 2.4.2. Writing your own callback, as printed --------------------------------------
class PrintEpochCallback(Callback):
    def on_epoch_start(self, *, model, maps, state) -> None:
        print(f"Starting epoch {state.current_epoch}")


if __name__ == "__main__":
    trainer.bus.attach(PrintEpochCallback())
    state = trainer.train(train_loader, val_loader)
    print(f"stopped by: {state.stopped_by}: {state.stop_reason}")
    print(f"best loss {state.best_metrics['loss']:.4f} at epoch {state.best_epochs['loss']}")
