"""Getting started: train a small CNN on the digits, evaluate it, reload its weights.

Run it from any directory: it writes its runs under ``runs/digits/`` there.
"""

# --8<-- [start:data]
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset, random_split

digits = load_digits()  # 1,797 grey 8x8 images, shipped inside scikit-learn
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
labels = torch.tensor(digits.target)
dataset = TensorDataset(images, labels)
train_set, val_set, test_set = random_split(
    dataset, [0.7, 0.15, 0.15], generator=torch.Generator().manual_seed(0)
)
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
val_loader = DataLoader(val_set, batch_size=256)
test_loader = DataLoader(test_set, batch_size=256)
# --8<-- [end:data]

# --8<-- [start:model]
import functools

from torch import nn

import trainbus
from trainbus import SupervisedModel


def make_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


# First: the initial weights are drawn when the network is built.
trainbus.seed_everything(0)
model = SupervisedModel(
    make_network(),
    nn.CrossEntropyLoss(),
    optimizer=functools.partial(torch.optim.Adam, lr=0.01),  # default: Adam(lr=1e-3)
)
# --8<-- [end:model]

# --8<-- [start:trainer]
from torchmetrics.classification import MulticlassAccuracy

from trainbus import (
    EarlyStoppingCallback,
    LossMetricConfig,
    ModelCheckpointCallback,
    Trainer,
)

trainer = Trainer(
    maps="runs/digits/v{version}",  # v1, then v2, ...: a new directory for every run
    model=model,
    seed=0,
    metrics={
        "loss": LossMetricConfig(),
        "accuracy": MulticlassAccuracy(num_classes=10),
    },
    callbacks=[
        EarlyStoppingCallback(metric="accuracy", patience=3),
        ModelCheckpointCallback(metric="accuracy"),
    ],
    max_epochs=4,
)
state = trainer.train(train_loader, val_loader)
# --8<-- [end:trainer]

# --8<-- [start:results]
print(f"trained into {trainer.maps.path}")
# The state counts epochs from 0; people count them from 1.
best = state.best_epochs["accuracy"] + 1
print(f"best accuracy {state.best_metrics['accuracy']:.3f} in epoch {best}")
print("test:", trainer.test(test_loader))  # {'loss': ..., 'accuracy': ...}
# The network's outputs, one tensor per batch.
predictions = trainer.predict(test_loader)
print("predicted classes:", predictions[0].argmax(dim=1)[:10].tolist())
# --8<-- [end:results]

# --8<-- [start:reload]
network = make_network()
trainbus.load_weights(trainer.maps.path, network, tag="best-accuracy")
network.eval()
with torch.no_grad():
    correct = sum((network(x).argmax(dim=1) == y).sum().item() for x, y in test_loader)
print(f"reloaded best weights: test accuracy {correct / len(test_set):.3f}")
# --8<-- [end:reload]
