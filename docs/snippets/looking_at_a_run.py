"""Looking at a run: the files of a MAPS, read with the standard library.

Run it from any directory: it writes its run under ``runs/looked-at/`` there.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import MonitorCallback, SupervisedModel, Trainer

inputs = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
target = (inputs[:, :4].sum(dim=1) > 0).long()
loader = DataLoader(TensorDataset(inputs, target), batch_size=32, shuffle=True)
model = SupervisedModel(nn.Linear(8, 2), nn.CrossEntropyLoss())

# --8<-- [start:monitor]
trainer = Trainer(
    "runs/looked-at",
    model,
    callbacks=[MonitorCallback(time_subscribers=1, table=False)],  # time every dispatch
    max_epochs=3,
    log_every_n_batches=4,
)
trainer.train(loader, loader)
# --8<-- [end:monitor]

# --8<-- [start:read]
import csv
import json

maps = trainer.maps.path
record = json.loads((maps / "maps.json").read_text())
summary = record["calls"][-1]["summary"]  # what the training summary printed
print(summary["outcome"], summary["epochs_done"], summary["best"])

with open(maps / "metrics.tsv", newline="") as rows:  # one row per validation
    for row in csv.DictReader(rows, delimiter="\t"):
        print(row["stage"], row["epoch"], row["loss"])

monitor = json.loads((maps / "monitor.json").read_text())
print(f"{monitor['samples_per_second']:.0f} samples/s")
slowest = max(
    monitor["subscribers"]["rows"], key=lambda r: r["estimated_total_seconds"] or 0
)
print("slowest subscriber:", slowest["id"], "at", slowest["event"])

for line in (maps / "logs" / "train.jsonl").read_text().splitlines()[:3]:
    print(json.loads(line)["event"])  # train_start, epoch_start, train_loss, ...
# --8<-- [end:read]
