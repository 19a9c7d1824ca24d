"""Events and priorities: a step, priorities, filters, before/after, custom events.

Run it from any directory: it writes its run under ``runs/events/`` there.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import Callback, EventSpec, SupervisedModel, Trainer, on, seed_everything

seed_everything(0)
inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
target = (inputs.sum(dim=1) > 0).long()
loader = DataLoader(TensorDataset(inputs, target), batch_size=16)  # 4 batches per epoch
model = SupervisedModel(nn.Linear(4, 2), nn.CrossEntropyLoss())
seen: list[str] = []


# --8<-- [start:priorities]
class Announce(Callback):
    priority = (
        10  # every handler of this callback: higher runs first (the default is 0)
    )
    priorities = {"train_end": -10}  # except at train_end

    def on_train_start(self, *, state) -> None:
        seen.append("Announce.on_train_start")

    def on_train_end(self, *, state) -> None:
        seen.append("Announce.on_train_end")

    @on("epoch_end", every=2)  # epochs 2 and 4 (epoch events count epochs from 1)
    def every_other_epoch(self, *, state) -> None:
        seen.append(f"every_other_epoch at epoch {state.epoch_number}")

    @on("batch_end", once=3)  # the third training batch of the run only
    def third_batch(self, *, loss, state) -> None:
        seen.append(f"third_batch: iteration {state.iteration}")

    @on("validation_end", when=lambda state: state.current_epoch == 0)
    def first_validation(self, *, metrics) -> None:
        seen.append(f"first_validation: loss {metrics['loss']:.2f}")


# --8<-- [end:priorities]


# --8<-- [start:trainer]
trainer = Trainer(
    "runs/events",
    model,
    seed=0,
    callbacks=[Announce()],
    max_epochs=4,
    log_every_n_batches=1,  # loss_logged at every batch, for this example
)


@trainer.on("train_start", priority=100)  # a plain function, on this trainer only
def opening(*, state) -> None:
    seen.append("opening")


# The lowest priority, but moved before every handler of the callback "Announce".
@trainer.on("train_start", priority=-100, before="Announce")
def setup(*, state) -> None:
    seen.append("setup")


# The checkpoints of the first epoch, each once ModelCheckpointCallback has seen it.
@trainer.on(
    "checkpoint",
    after="ModelCheckpointCallback",
    when=lambda state: state.epoch_number == 1,
)
def written(*, checkpoint, tag, kind) -> None:
    seen.append(f"written: {kind} {tag}")


# --8<-- [end:trainer]


# --8<-- [start:custom]
trainer.bus.declare(
    EventSpec("sample_logged", payload=("value",), doc="A sample was logged.")
)


@trainer.on("sample_logged")
def print_sample(*, value, state) -> None:
    seen.append(f"sample_logged {value} at step {state.global_step}")


@trainer.on("epoch_end", once=True)
def log_a_sample(*, state) -> None:
    trainer.emit("sample_logged", value=42)  # only while a call runs, from its thread


# --8<-- [end:custom]

# --8<-- [start:step]
first_step: list[str] = []


def recorder(event: str):
    """A handler that notes the name of the event it is subscribed to."""

    def record(*, state) -> None:
        first_step.append(event)

    return record


for event in (
    "batch_start",
    "forward_start",
    "backward_start",
    "backward_end",
    "optimizer_step_start",
    "optimizer_step_end",
    "loss_logged",
    "batch_end",
):
    # once=1: the first training batch only
    trainer.on(event, once=1, id=f"first_step.{event}")(recorder(event))
# --8<-- [end:step]

trainer.train(loader, loader)

# --8<-- [start:order]
print(first_step)
assert first_step == [
    "batch_start",
    "forward_start",
    "backward_start",
    "backward_end",
    "optimizer_step_start",
    "optimizer_step_end",
    "loss_logged",  # only at the log interval: every batch here
    "batch_end",
]
# --8<-- [end:order]

# --8<-- [start:seen]
for line in seen:
    print(line)
assert seen == [
    "opening",
    "setup",
    "Announce.on_train_start",
    "third_batch: iteration 3",
    "first_validation: loss 0.62",
    "sample_logged 42 at step 4",
    "written: weights last",
    "written: training state-0000000004-epoch-end",
    "every_other_epoch at epoch 2",
    "every_other_epoch at epoch 4",
    "Announce.on_train_end",
]
# --8<-- [end:seen]
