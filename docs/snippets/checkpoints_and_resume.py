"""Checkpoints and resume: a run paused mid-epoch continues bit-identically.

Run it from any directory: it writes its runs under ``runs/`` there.
"""

import functools

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import (
    ModelCheckpointCallback,
    Stop,
    SupervisedModel,
    Trainer,
    TrainingCheckpointCallback,
    load_weights,
    seed_everything,
)

inputs = torch.randn(320, 8, generator=torch.Generator().manual_seed(0))
target = (inputs[:, :4].sum(dim=1) > 0).long()
train_loader = DataLoader(
    TensorDataset(inputs[:256], target[:256]), batch_size=32, shuffle=True
)
val_loader = DataLoader(TensorDataset(inputs[256:], target[256:]), batch_size=64)


def make_network() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))


def make_model() -> SupervisedModel:
    seed_everything(0)  # the same initial weights at every attempt
    return SupervisedModel(
        make_network(),
        nn.CrossEntropyLoss(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )


# --8<-- [start:script]
def make_callbacks() -> list:
    return [
        TrainingCheckpointCallback(every_n_steps=5, keep=2),  # and at every epoch's end
        ModelCheckpointCallback(
            metric="loss", top_k=2
        ),  # best-loss, best-loss-epoch-<n>
    ]


def train(maps: str, max_epochs: int, pause_at_step: int | None = None) -> Trainer:
    trainer = Trainer(
        maps,
        make_model(),
        seed=0,
        max_epochs=max_epochs,
        callbacks=make_callbacks(),
    )
    if pause_at_step is not None:  # stands in for a preemption or a wall-clock limit

        @trainer.on("batch_end", when=lambda state: state.global_step == pause_at_step)
        def pause(*, state):
            return Stop("paused for the example", resumable=True)

    trainer.train(train_loader, val_loader, resume="auto")  # resumes when it can
    return trainer


# --8<-- [end:script]


# --8<-- [start:pause]
paused = train("runs/paused", max_epochs=3, pause_at_step=13)  # stops inside epoch 2
print(paused.state.global_step, paused.state.stop_reason)  # 13 paused for the example
resumed = train("runs/paused", max_epochs=3)  # the same script again: it continues
straight = train("runs/straight", max_epochs=3)  # never interrupted

for name, weight in resumed.model.state_dict().items():
    assert torch.equal(weight, straight.model.state_dict()[name]), name
same = (resumed.maps.path / "metrics.tsv").read_text() == (
    straight.maps.path / "metrics.tsv"
).read_text()
print("bit-identical weights; same metrics.tsv:", same)
assert same
# --8<-- [end:pause]

# --8<-- [start:longer]
# Loop settings come from maps.json; the model and callbacks are objects, passed again.
longer = Trainer.from_maps(
    "runs/straight", make_model(), callbacks=make_callbacks(), max_epochs=5
)
state = longer.train(train_loader, val_loader)  # resumes at epoch 4 of 5
print(f"{state.current_epoch + 1} epochs, {state.global_step} optimizer steps")
# --8<-- [end:longer]

# --8<-- [start:files]
for path in sorted((longer.maps.path / "training").iterdir()):
    print(path.name)  # the states kept by rotation, and `latest` naming the newest
for path in sorted((longer.maps.path / "checkpoints").iterdir()):
    print(path.name)  # best-loss, best-loss-epoch-<n> (the two best), last
# --8<-- [end:files]

# --8<-- [start:inference]
network = make_network()
load_weights("runs/straight", network, tag="best-loss")  # verified against its manifest
network.eval()
with torch.no_grad():
    accuracy = (network(inputs[256:]).argmax(dim=1) == target[256:]).float().mean()
print(f"best weights: validation accuracy {accuracy:.2f}")
# --8<-- [end:inference]
