"""A small data-parallel training job, run by the tests under real ``torchrun`` (and alone).

Every rank writes ``<out>/rank<N>.json`` (its final state, the agreements it took part in)
and ``<out>/rank<N>.pt`` (its final weights). Options inject what the tests need: a stop or a
skipped step requested on one rank only, a crash of one worker on the first attempt, a
worker that stops at an iteration of the first attempt and waits to be killed (its pid in a
file), and a record of every write this process made under the MAPS.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import (
    Callback,
    EarlyStoppingCallback,
    ModelCheckpointCallback,
    SkipStep,
    Stop,
    SupervisedModel,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.engine import distributed, sharding


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("maps", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--every-n-steps", type=int, default=None)
    parser.add_argument("--early-stopping", action="store_true")
    parser.add_argument("--stop-rank", type=int, default=None)
    parser.add_argument("--stop-at-iteration", type=int, default=None)
    parser.add_argument("--skip-rank", type=int, default=None)
    parser.add_argument("--skip-at-iteration", type=int, default=None)
    parser.add_argument("--crash-rank", type=int, default=None)
    parser.add_argument("--crash-at-iteration", type=int, default=None)
    parser.add_argument("--hang-rank", type=int, default=None)
    parser.add_argument("--hang-at-iteration", type=int, default=None)
    parser.add_argument("--pid-file", type=Path, default=None, help="where the hanging rank says")
    parser.add_argument("--audit-writes", action="store_true", help="<out>/writes<N>.json")
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--rank-seeds", action="store_true", help="a different RNG per rank")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="slow each step down")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--strategy", default="auto", help="auto, ddp or fsdp")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val")
    parser.add_argument("--precision", default="32")
    parser.add_argument("--asynchronous", action="store_true", help="asynchronous saves")
    parser.add_argument("--best-weights", action="store_true", help="ModelCheckpointCallback")
    parser.add_argument("--compile-backend", default=None, help="compile={'backend': ...}")
    parser.add_argument(
        "--fill-disk", type=Path, default=None, help="rank 0 fills the disk with this file"
    )
    parser.add_argument("--fill-after", default=None, help="... at the next epoch end after it")
    return parser.parse_args()


def loader(samples: int, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 6, generator=generator)
    target = (inputs[:, :3].sum(dim=1) > inputs[:, 3:].sum(dim=1)).long()
    return DataLoader(TensorDataset(inputs, target), batch_size=batch_size, shuffle=shuffle)


def build_model(dropout: float) -> SupervisedModel:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))
    return SupervisedModel(
        network, nn.CrossEntropyLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )


class OneRankDecides(Callback):
    """Asks for a stop or a skipped step on one rank only (the others ask for nothing)."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options

    def on_backward_start(self, *, state: TrainerState) -> SkipStep | None:
        if state.rank == self.options.skip_rank and state.iteration == self.options.skip_at:
            return SkipStep(f"rank {state.rank} skips iteration {state.iteration}")
        return None

    def on_batch_end(self, *, state: TrainerState) -> Stop | None:
        if state.rank == self.options.stop_rank and state.iteration == self.options.stop_at:
            return Stop(f"rank {state.rank} stops at iteration {state.iteration}")
        return None


class Slow(Callback):
    """Makes each step last a while, so that a signal arrives in the middle of training."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_batch_end(self) -> None:
        time.sleep(self.seconds)


class Crash(Callback):
    """Kills this worker at one iteration, on the first attempt only."""

    def __init__(self, rank: int, iteration: int) -> None:
        self.rank, self.iteration = rank, iteration

    def on_batch_end(self, *, state: TrainerState) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and state.rank == self.rank and state.iteration == self.iteration:
            sys.stdout.flush()
            os._exit(3)


class Hang(Callback):
    """Writes this worker's pid at one iteration of the first attempt, then waits to be killed."""

    def __init__(self, rank: int, iteration: int, pid_file: Path) -> None:
        self.rank, self.iteration, self.pid_file = rank, iteration, pid_file

    def on_batch_end(self, *, state: TrainerState) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and state.rank == self.rank and state.iteration == self.iteration:
            written = self.pid_file.with_name(self.pid_file.name + ".tmp")
            written.write_text(str(os.getpid()))
            written.rename(self.pid_file)  # the test never reads a half-written pid
            time.sleep(120)
            os._exit(4)  # the test failed to kill it: this attempt fails another way


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITE_EVENTS = {
    "os.rename": 2,
    "os.remove": 1,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.link": 2,
    "os.symlink": 2,
    "os.truncate": 1,
    "os.chmod": 1,
    "os.utime": 1,
    "shutil.copyfile": 2,
    "shutil.rmtree": 1,
    "shutil.move": 2,
}
"""Audit events that change the file system, with how many of their arguments are paths."""


def audit_writes(maps: Path) -> list[str]:
    """Records every change this process makes under ``maps`` (Python's audit hooks see them)."""
    root = os.path.realpath(maps)
    seen: list[str] = []

    def inside(path: object) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):
            return False
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved == root or resolved.startswith(root + os.sep)

    def hook(event: str, arguments: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = arguments
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else False
            writes = writes or bool(isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and inside(path):
                seen.append(f"open {os.fsdecode(path)}")
        elif event in WRITE_EVENTS:
            paths = arguments[: WRITE_EVENTS[event]]
            if any(inside(path) for path in paths):
                seen.append(f"{event} {os.fsdecode(paths[-1])}")

    sys.addaudithook(hook)
    return seen


def summary_of(state: TrainerState) -> dict[str, Any]:
    return {
        "rank": state.rank,
        "world_size": state.world_size,
        "global_step": state.global_step,
        "iteration": state.iteration,
        "samples_seen": state.samples_seen,
        "stopped_by": state.stopped_by,
        "stop_reason": state.stop_reason,
        "metrics": dict(state.metrics),
    }


def param_dtype(trainer: Trainer) -> str | None:
    """The dtype FSDP gathers the parameters in (None when the model is not sharded)."""
    root = trainer._engine.sharded
    if root is None:
        return None
    return str(root._get_fsdp_state()._mp_policy.param_dtype)  # type: ignore[operator]


def main() -> None:
    options = arguments()
    writes = audit_writes(options.maps) if options.audit_writes else None
    options.skip_at = options.skip_at_iteration
    options.stop_at = options.stop_at_iteration
    agreements = [0]
    real_agree = distributed.ProcessGroup.agree

    def counted(self: distributed.ProcessGroup, *args: Any) -> Any:
        agreements[0] += 1
        return real_agree(self, *args)

    distributed.ProcessGroup.agree = counted  # type: ignore[method-assign]

    callbacks: list[Callback] = [
        TrainingCheckpointCallback(
            every_n_steps=options.every_n_steps, keep=100, asynchronous=options.asynchronous
        )
    ]
    if options.best_weights:
        callbacks.append(ModelCheckpointCallback("loss", asynchronous=options.asynchronous))
    if options.fill_disk is not None and os.environ.get("RANK", "0") == "0":
        from tests.engine.test_async_checkpoints import FillerAfterCommit

        callbacks.append(FillerAfterCommit(options.fill_disk, committed=options.fill_after))
    if options.stop_rank is not None or options.skip_rank is not None:
        callbacks.append(OneRankDecides(options))
    if options.crash_rank is not None:
        callbacks.append(Crash(options.crash_rank, options.crash_at_iteration))
    if options.hang_rank is not None:
        callbacks.append(Hang(options.hang_rank, options.hang_at_iteration, options.pid_file))
    if options.step_seconds:
        callbacks.append(Slow(options.step_seconds))
    if options.early_stopping:
        callbacks.append(EarlyStoppingCallback("loss", patience=1, min_delta=10.0))
    trainer = Trainer(
        options.maps,
        build_model(options.dropout),
        callbacks=callbacks,
        max_epochs=options.epochs,
        accumulate_grad_batches=options.accumulate,
        log_every_n_batches=options.log_every,
        seed=7,
        plugins=False,
        strategy=options.strategy,
        gradient_clip_val=options.clip,
        precision=options.precision,
        compile=False if options.compile_backend is None else {"backend": options.compile_backend},
    )
    if options.rank_seeds:
        # Each rank draws its own dropout masks: an exact resume must restore every rank's.
        torch.manual_seed(100 + trainer.state.rank)
    train = loader(options.samples, options.batch_size, shuffle=options.shuffle, seed=1)
    validation = loader(options.samples // 2 + 3, options.batch_size, shuffle=False, seed=2)
    try:
        state = trainer.train(train, validation, resume=True if options.resume else None)
    except SystemExit as stopped:
        options.out.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.state.rank, "exit": stopped.code, **summary_of(trainer.state)}
        (options.out / f"signalled{trainer.state.rank}.json").write_text(json.dumps(record))
        raise
    test_metrics = trainer.test(validation)
    rank = state.rank
    options.out.mkdir(parents=True, exist_ok=True)
    if writes is not None:
        (options.out / f"writes{rank}.json").write_text(json.dumps(writes, indent=2))
    if options.strategy == "fsdp" and trainer.placement.distributed:
        # Sharded parameters: the full weights are gathered (every rank takes part) on rank 0.
        weights = sharding.full_weights(trainer.model)
        if rank == 0:
            torch.save(weights, options.out / "rank0.pt")
    else:
        torch.save(trainer.model.state_dict(), options.out / f"rank{rank}.pt")
    summary = {
        **summary_of(state),
        "test_metrics": test_metrics,
        "train_loss": state.train_loss,
        "agreements": agreements[0],
        "restart_count": trainer.placement.restart_count,  # as the ranks agreed on it
        "group_initialised": torch.distributed.is_initialized(),
        "param_dtype": param_dtype(trainer),
        "sharded": trainer._engine.sharded is not None,
    }
    (options.out / f"rank{rank}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
