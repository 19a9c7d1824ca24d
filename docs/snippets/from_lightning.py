"""The trainbus side of a small Lightning training (the guide shows both, side by side).

Run it from any directory: it writes its run under ``runs/from-lightning/`` there.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

inputs = torch.randn(320, 8, generator=torch.Generator().manual_seed(0))
target = (inputs[:, :4].sum(dim=1) > 0).long()
train_loader = DataLoader(
    TensorDataset(inputs[:256], target[:256]), batch_size=32, shuffle=True
)
val_loader = DataLoader(TensorDataset(inputs[256:], target[256:]), batch_size=64)

# --8<-- [start:trainbus]
from trainbus import (
    Callback,
    EarlyStoppingCallback,
    LossMetricConfig,
    Model,
    ModelCheckpointCallback,
    Trainer,
    seed_everything,
)


class Classifier(Model):
    def __init__(self) -> None:
        super().__init__()
        self.network = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.loss = nn.CrossEntropyLoss()

    def forward_step(self, batch):  # training_step
        inputs, target = batch
        return self.loss(self.network(inputs), target)

    def evaluation_step(self, batch):  # validation_step: outputs the metrics read
        inputs, target = batch
        return {"loss": self.loss(self.network(inputs), target)}

    def build_optimizers(self):  # configure_optimizers
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PrintEpoch(Callback):
    def on_epoch_start(self, *, state) -> None:  # on_train_epoch_start
        print(f"Starting epoch {state.current_epoch}")


seed_everything(0)
trainer = Trainer(
    "runs/from-lightning",  # default_root_dir: one directory per run
    Classifier(),
    seed=0,
    max_epochs=10,
    metrics={"loss": LossMetricConfig()},  # the validation loss, batch-size weighted
    callbacks=[
        EarlyStoppingCallback("loss", patience=3),
        ModelCheckpointCallback(metric="loss"),
        PrintEpoch(),
    ],
    accumulate_grad_batches=2,
    gradient_clip_val=1.0,
)
trainer.train(train_loader, val_loader)  # fit
# --8<-- [end:trainbus]
