"""Handlers that cost nothing per step: no host-device sync, filters, and ``-> None``.

Run it from any directory: it writes its run under ``runs/fast/`` there.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import Callback, Stop, SupervisedModel, Trainer, on

inputs = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
target = (inputs[:, :4].sum(dim=1) > 0).long()
loader = DataLoader(TensorDataset(inputs, target), batch_size=32, shuffle=True)
model = SupervisedModel(nn.Linear(8, 2), nn.CrossEntropyLoss())


# --8<-- [start:fast]
class LossWatch(Callback):
    """Stop when the logged training loss is not finite; keep a short loss history."""

    def __init__(self) -> None:
        self.history: list[float] = []

    # The mean loss of the log interval, already read from the device by the loop:
    # no `.item()` of yours, no extra sync. Returning a command is allowed here.
    def on_loss_logged(self, *, train_loss: float, state):
        self.history.append(train_loss)
        if train_loss != train_loss or abs(train_loss) == float("inf"):
            return Stop(f"training loss {train_loss} at step {state.global_step}")
        return None

    # `-> None` tells the bus this handler never commands: under torchrun the ranks do
    # not have to agree after it. `every=` skips it without even calling it.
    @on("batch_end", every=50)
    def peek(self, *, loss: torch.Tensor, state) -> None:
        # A sync, but one every 50 steps rather than every step.
        print(f"batch {state.iteration}: loss {loss.item():.3f}")


# --8<-- [end:fast]


trainer = Trainer(
    "runs/fast", model, callbacks=[LossWatch()], max_epochs=4, log_every_n_batches=8
)
trainer.train(loader)
watch = next(c for c in trainer.callbacks if isinstance(c, LossWatch))
print(f"{len(watch.history)} losses logged")
assert len(watch.history) == 4 * 16 // 8
