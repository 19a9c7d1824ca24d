"""Data-parallel training under real ``torchrun`` with gloo and 2 processes, on the CPU.

The runs are shared by the tests of this module (each costs a few seconds on a 2-core
machine): a 2-rank run and the same job in one process with the same global batch; a run
where one rank alone asks to skip a step and then to stop; a run whose worker crashes once
and is restarted by torchrun, and the same run uninterrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from trainbus import Trainer, TrainingCheckpointCallback
from trainbus.cli import main
from trainbus.engine import checkpoint, distributed
from trainbus.engine.maps import Maps
from trainbus.errors import ConfigurationError, TrainbusWarning

from .distributed_job import build_model, loader

JOB = Path(__file__).with_name("distributed_job.py")
ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Run:
    maps: Path
    out: Path
    output: str
    seconds: float

    def summary(self, rank: int) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.out / f"rank{rank}.json").read_text())
        return loaded

    def weights(self, rank: int) -> dict[str, torch.Tensor]:
        loaded: dict[str, torch.Tensor] = torch.load(self.out / f"rank{rank}.pt")
        return loaded


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["TRAINBUS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


def launch(
    directory: Path,
    *options: str,
    processes: int = 2,
    max_restarts: int = 0,
    name: str = "run",
    torchrun: bool | None = None,
) -> Run:
    """Run the job under torchrun (by default when ``processes`` > 1) or as a plain script."""
    maps, out = directory / name / "maps", directory / name / "out"
    command = job_command(
        maps, out, *options, processes=processes, max_restarts=max_restarts, torchrun=torchrun
    )
    started = time.perf_counter()
    returncode, output = run_group(command)
    assert returncode == 0, output[-6000:]
    return Run(maps, out, output, time.perf_counter() - started)


def job_command(
    maps: Path,
    out: Path,
    *options: str,
    processes: int = 2,
    max_restarts: int = 0,
    torchrun: bool | None = None,
) -> list[str]:
    """The command line of the job: under torchrun, or a plain script for one process."""
    job = [str(JOB), str(maps), str(out), *options]
    if not (processes > 1 if torchrun is None else torchrun):
        return [sys.executable, *job]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        *job,
    ]


def run_group(command: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run ``command`` in its own session; on a timeout, kill it with every worker it started."""
    process = subprocess.Popen(
        command,
        env=environment(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command} did not end within {timeout} s:\n{output[-6000:]}")
    return process.returncode, output


def assert_equal_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def jsonl(maps: Path) -> list[dict[str, Any]]:
    lines = (maps / "logs" / "train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# ------------------------------------------------------------------------- shared runs
COMMON = ("--epochs", "3", "--samples", "128", "--log-every", "4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Launched once for the module, only when a slow test asks for them."""
    return {}


def shared(runs: dict[str, Run], name: str, directory: Path, *args: str, **kwargs: Any) -> Run:
    if name not in runs:
        runs[name] = launch(directory, *args, name=name, **kwargs)
    return runs[name]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


def two_ranks(runs: dict[str, Run], scratch: Path) -> Run:
    return shared(runs, "two-ranks", scratch, *COMMON, "--batch-size", "8")


def one_process(runs: dict[str, Run], scratch: Path) -> Run:
    return shared(runs, "one-process", scratch, *COMMON, "--batch-size", "16", processes=1)


STOP_AND_SKIP = (
    "--epochs",
    "3",
    "--samples",
    "128",
    "--accumulate",
    "2",
    "--skip-rank",
    "0",
    "--skip-at-iteration",
    "4",
    "--stop-rank",
    "1",
    "--stop-at-iteration",
    "6",
)


EXACT_OPTIONS = (
    *COMMON, "--shuffle", "--dropout", "0.3", "--rank-seeds", "--every-n-steps", "3",
)  # fmt: skip


def crashed_run(runs: dict[str, Run], scratch: Path) -> Run:
    crash = ("--crash-rank", "1", "--crash-at-iteration", "11")
    return shared(runs, "crashed", scratch, *EXACT_OPTIONS, *crash, max_restarts=1)


# --------------------------------------------------------------------------- the tests
@pytest.mark.slow
def test_two_ranks_end_with_the_weights_of_one_process_with_the_same_global_batch(
    runs: dict[str, Run], scratch: Path
) -> None:
    parallel, alone = two_ranks(runs, scratch), one_process(runs, scratch)
    rank0, rank1, single = parallel.summary(0), parallel.summary(1), alone.summary(0)
    assert (rank0["rank"], rank0["world_size"], rank1["rank"], rank1["world_size"]) == (0, 2, 1, 2)
    assert single["world_size"] == 1
    # Identical weights on both ranks, bit for bit.
    assert_equal_weights(parallel.weights(0), parallel.weights(1))
    # 8 samples per rank and step is the maths of 16 per step in one process: the same
    # optimizer steps and, up to the order of float additions, the same weights.
    for key in ("global_step", "iteration", "samples_seen"):
        assert rank0[key] == rank1[key] == single[key], key
    assert rank0["global_step"] == 3 * 8
    for name, tensor in alone.weights(0).items():
        torch.testing.assert_close(parallel.weights(0)[name], tensor, rtol=0, atol=1e-6)
    # Metrics are reduced over the ranks: both see the whole dataset's values.
    assert rank0["metrics"] == rank1["metrics"]
    assert rank0["test_metrics"] == rank1["test_metrics"]
    assert rank0["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], abs=1e-6)
    assert rank0["test_metrics"]["loss"] == pytest.approx(single["test_metrics"]["loss"], abs=1e-6)
    assert rank0["train_loss"] == rank1["train_loss"]
    assert rank0["train_loss"] == pytest.approx(single["train_loss"], abs=1e-6)
    # Initialised by trainbus for train(), kept for test(), destroyed at exit (no warning).
    assert rank0["group_initialised"] is True and rank1["group_initialised"] is True
    assert "destroy_process_group" not in parallel.output


@pytest.mark.slow
def test_the_maps_is_written_once_by_rank_zero(runs: dict[str, Run], scratch: Path) -> None:
    run = two_ranks(runs, scratch)
    entries = jsonl(run.maps)
    assert [e["event"] for e in entries].count("train_start") == 1
    assert [e["event"] for e in entries].count("train_end") == 1
    rows = Maps(run.maps).read_rows("metrics.tsv")
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("validation", "0"),
        ("validation", "1"),
        ("validation", "2"),
        ("test", ""),
    ]
    # One row per log interval (every 4 of the 8 steps of an epoch), not one per rank.
    assert len(Maps(run.maps).read_rows("training_loss.tsv")) == 6
    recorded = json.loads((run.maps / "maps.json").read_text())
    assert [call["call"] for call in recorded["calls"]] == ["train", "test"]
    assert {call["world_size"] for call in recorded["calls"]} == {2}
    states = [p.name for p in checkpoint.training_states(Maps(run.maps))]
    assert states == [f"state-{n:010d}-epoch-end" for n in (24, 16, 8)]
    # Printed once: by rank 0.
    assert run.output.count("train_start") == 1


@pytest.mark.slow
def test_ranks_agree_only_at_boundaries_when_no_step_handler_can_command(
    runs: dict[str, Run], scratch: Path
) -> None:
    run = two_ranks(runs, scratch)
    # After train_start; per epoch at its 2 log intervals and at its end; after train_end.
    # Nothing per step: no subscriber of a step event may return a command.
    expected = 1 + 3 * (2 + 1) + 1
    assert run.summary(0)["agreements"] == run.summary(1)["agreements"] == expected
    assert expected < run.summary(0)["global_step"]


@pytest.mark.slow
@pytest.mark.fault(
    "A stop and a skipped step asked on one rank only",
    outcome="both ranks skip and stop at the same step, no hang, identical weights",
)
def test_a_skip_and_a_stop_asked_on_one_rank_happen_on_both_at_the_same_step(
    runs: dict[str, Run], scratch: Path
) -> None:
    run = shared(runs, "stop-and-skip", scratch, *STOP_AND_SKIP)
    rank0, rank1 = run.summary(0), run.summary(1)
    # Iteration 4 closes an accumulation group and was skipped on both ranks: its group is
    # stepped with iteration 5; iteration 6 is the last one, stopped by rank 1's request.
    for summary in (rank0, rank1):
        assert summary["iteration"] == 6
        assert summary["global_step"] == 2
        assert summary["stopped_by"] == "OneRankDecides.on_batch_end@rank1"
        assert summary["stop_reason"] == "rank 1 stops at iteration 6"
    assert_equal_weights(run.weights(0), run.weights(1))
    # One agreement per step: the skip handler's backward_start carries the step's requests.
    assert rank0["agreements"] == rank1["agreements"] >= 6
    assert run.seconds < 120


@pytest.mark.slow
@pytest.mark.fault(
    "A worker of a 2-process torchrun crashes (--max-restarts=1)",
    outcome="torchrun restarts both; they resume from the last state, bit-identical weights",
)
def test_a_crashed_worker_is_restarted_by_torchrun_and_resumes_exactly(
    runs: dict[str, Run], scratch: Path
) -> None:
    straight = shared(runs, "straight", scratch, *EXACT_OPTIONS)
    crashed = crashed_run(runs, scratch)
    assert crashed.summary(0)["restart_count"] == crashed.summary(1)["restart_count"] == 1
    assert straight.summary(0)["restart_count"] == 0
    assert_equal_weights(crashed.weights(0), crashed.weights(1))
    assert_equal_weights(crashed.weights(0), straight.weights(0))
    assert crashed.summary(0)["metrics"] == straight.summary(0)["metrics"]
    recorded = json.loads((crashed.maps / "maps.json").read_text())
    resumed = [c["resumed_from"] for c in recorded["calls"] if "resumed_from" in c]
    assert [r["state"] for r in resumed] == ["state-0000000009"]
    rows = Maps(crashed.maps).read_rows("metrics.tsv")
    assert rows == Maps(straight.maps).read_rows("metrics.tsv")


@pytest.mark.slow
@pytest.mark.fault(
    "Resume a 2-process training state with another number of processes",
    outcome="a warning; a state from the middle of an epoch restarts that epoch",
)
def test_resuming_with_another_world_size_warns_at_an_epoch_end(
    runs: dict[str, Run], scratch: Path, tmp_path: Path
) -> None:
    run = two_ranks(runs, scratch)
    copy = tmp_path / "maps"
    subprocess.run(["cp", "-a", str(run.maps), str(copy)], check=True)
    trainer = Trainer.from_maps(
        copy, build_model(0.0), callbacks=[TrainingCheckpointCallback()], max_epochs=4
    )
    with pytest.warns(TrainbusWarning, match=r"written by 2 process\(es\), with 1"):
        state = trainer.train(loader(128, 16, shuffle=False, seed=1))
    assert (state.world_size, state.global_step) == (1, 24 + 8)


@pytest.mark.slow
@pytest.mark.fault(
    "Resume a 2-process training state with another number of processes",
    outcome="a warning; a state from the middle of an epoch restarts that epoch",
)
def test_resuming_with_another_world_size_mid_epoch_restarts_the_epoch(
    runs: dict[str, Run], scratch: Path, tmp_path: Path
) -> None:
    resume_alone_from_iteration_9(crashed_run(runs, scratch), tmp_path)


def killed_after_state_9(run: Run, copy: Path) -> Path:
    """A copy of ``run``'s MAPS as if it had been killed for good after its state 9.

    State 9 is mid-epoch (batch 1 of 8 of the second epoch); the later states go.
    """
    subprocess.run(["cp", "-a", str(run.maps), str(copy)], check=True)
    for state in (copy / "training").iterdir():
        if state.name > "state-0000000009":
            subprocess.run(["rm", "-rf", str(state)], check=True)
    return copy


def resume_alone_from_iteration_9(run: Run, tmp_path: Path) -> Path:
    """Resume a copy of ``run`` (2 processes) in this one, from its mid-epoch state 9."""
    copy = killed_after_state_9(run, tmp_path / "maps")
    trainer = Trainer.from_maps(
        copy, build_model(0.3), callbacks=[TrainingCheckpointCallback(every_n_steps=3, keep=100)]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainbusWarning)
        state = trainer.train(loader(128, 16, shuffle=True, seed=1))
    messages = [str(w.message) for w in caught]
    assert any(
        re.search(r"written by 2 process\(es\), with 1.*batch 1 of epoch 2.*starts again", m)
        for m in messages
    ), messages
    # The second epoch starts again from its first batch (8 of 16 samples), then the third.
    assert (state.world_size, state.current_epoch) == (1, 2)  # 0-based: the third
    assert (state.iteration, state.global_step) == (9 + 8 + 8, 9 + 16)
    recorded = json.loads((copy / "maps.json").read_text())
    assert recorded["calls"][-1]["resumed_from"]["state"] == "state-0000000009"
    return copy


# ------------------------------------------------------------- placement, plan and data
def torchrun_environment(rank: int, world_size: int = 2) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}


def test_the_placement_comes_from_torchruns_environment() -> None:
    assert distributed.detect_placement({}) == distributed.Placement(0, 1, 0, 0)
    found = distributed.detect_placement(
        {**torchrun_environment(1, 4), "TORCHELASTIC_RESTART_COUNT": "2"}
    )
    assert found == distributed.Placement(1, 4, 1, 2, launched=True)
    assert found.distributed and not found.is_main
    alone = distributed.detect_placement(torchrun_environment(0, 1))
    assert alone.distributed and alone.is_main  # torchrun with one process: a group of one


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0"}, "sets RANK but not WORLD_SIZE, LOCAL_RANK"),
        ({**torchrun_environment(0), "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({**torchrun_environment(0), "RANK": "-1"}, "RANK='-1'"),
        ({**torchrun_environment(0), "RANK": "2"}, "RANK=2 and WORLD_SIZE=2"),
    ],
)
def test_an_inconsistent_torchrun_environment_is_refused(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        distributed.detect_placement(environ)


def test_the_state_and_the_plan_show_rank_and_world_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in torchrun_environment(1).items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(tmp_path / "maps", build_model(0.0), plugins=False)
    assert (trainer.state.rank, trainer.state.world_size) == (1, 2)
    rows = {row["id"]: row for row in trainer.plan("epoch_end")}
    # Rank 0 only: in the plan of every rank, not called on rank 1.
    assert rows["LoggerCallback.on_epoch_end"]["rank_zero_only"] is True
    assert rows["LoggerCallback.on_epoch_end"]["active"] is False
    assert rows["TrainingCheckpointCallback.on_epoch_end"]["commands"] is True
    assert main(["plan", "--event", "epoch_end"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "dispatch plan of rank 1 of 2"
    assert not (tmp_path / "maps").exists()


def dataset(size: int) -> TensorDataset:
    return TensorDataset(torch.arange(size, dtype=torch.float32).unsqueeze(1))


def indices_of(loader_: Any) -> list[int]:
    return [int(value) for (batch,) in loader_ for value in batch.flatten()]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_a_training_loader_is_sharded_with_a_distributed_sampler(
    shuffle: bool, drop_last: bool
) -> None:
    source = DataLoader(dataset(22), batch_size=4, shuffle=shuffle, drop_last=drop_last)
    shards = [
        distributed.shard_training_loader(source, "train_loader", placement, seed=3)
        for placement in (distributed.Placement(0, 2), distributed.Placement(1, 2))
    ]
    for shard in shards:
        assert isinstance(shard, DataLoader)
        assert isinstance(shard.sampler, DistributedSampler)
        assert shard.sampler.shuffle is shuffle
        assert (shard.batch_size, shard.drop_last) == (4, drop_last)
    first, second = (indices_of(shard) for shard in shards)
    # 11 indices per rank; with drop_last the short last batch (3 of them) is dropped.
    assert len(first) == len(second) == (8 if drop_last else 11)
    assert not set(first) & set(second)
    if not drop_last:
        assert set(first) | set(second) == set(range(22))
    # set_epoch reshuffles a shuffled shard, and nothing else.
    distributed.set_epoch(shards[0], 1)
    assert (indices_of(shards[0]) != first) is shuffle


def test_an_evaluation_loader_is_split_exactly_with_no_sample_repeated() -> None:
    source = DataLoader(dataset(23), batch_size=4)
    shards = [
        distributed.shard_evaluation_loader(source, "val_loader", distributed.Placement(r, 3))
        for r in range(3)
    ]
    seen = [indices_of(shard) for shard in shards]
    assert sorted(i for part in seen for i in part) == list(range(23))
    assert [len(part) for part in seen] == [8, 8, 7]


def test_a_sampler_made_for_distributed_runs_is_kept() -> None:
    data = dataset(10)
    own = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1))
    placement = distributed.Placement(1, 2)
    assert distributed.shard_training_loader(own, "train_loader", placement, seed=0) is own
    assert distributed.shard_evaluation_loader(own, "val_loader", placement) is own


def test_a_sampler_that_would_repeat_the_data_on_every_rank_is_refused() -> None:
    data = dataset(10)
    weighted = DataLoader(data, sampler=WeightedRandomSampler([1.0] * 10, 10))
    with pytest.raises(ConfigurationError, match="train_loader uses WeightedRandomSampler"):
        distributed.shard_training_loader(weighted, "train_loader", distributed.Placement(0, 2), 0)
    plain = [RandomSampler(data), SequentialSampler(data)]
    for sampler in plain:
        shard = distributed.shard_training_loader(
            DataLoader(data, sampler=sampler), "train_loader", distributed.Placement(0, 2), 0
        )
        assert isinstance(shard, DataLoader) and isinstance(shard.sampler, DistributedSampler)


def test_a_handler_annotated_to_return_none_may_not_return_a_command(tmp_path: Path) -> None:
    from trainbus import Stop
    from trainbus.errors import CommandError

    trainer = Trainer(tmp_path / "maps", build_model(0.0), default_callbacks=False, plugins=False)

    @trainer.on("epoch_end")
    def undeclared() -> None:
        return Stop("no")  # type: ignore[return-value]

    with pytest.raises(CommandError, match="annotated to return None but returned Stop"):
        trainer.train(loader(16, 8, shuffle=False, seed=1))
    assert not trainer.bus.may_command("batch_end")
    assert trainer.bus.may_command("epoch_end") is False


def test_subscribers_that_may_command_are_known_per_event() -> None:
    from trainbus import EventBus, Stop

    bus = EventBus()

    def quiet(*, state: Any) -> None:
        return None

    def loud(*, state: Any) -> Stop | None:
        return None

    bus.subscribe("batch_end", quiet)
    assert not bus.may_command("batch_end")
    subscription = bus.subscribe("batch_end", loud, rank_zero_only=True)
    assert bus.may_command("batch_end")
    bus.unsubscribe(subscription)
    assert not bus.may_command("batch_end")
    bus.subscribe("epoch_end", lambda state: None)
    assert bus.may_command("epoch_end")  # unannotated: it may


def test_a_model_is_wrapped_so_that_ddp_and_fsdp_see_its_steps() -> None:
    model = build_model(0.0)
    wrapper = distributed.Routed(model)
    batch = (torch.randn(4, 6), torch.tensor([0, 1, 0, 1]))
    assert torch.equal(wrapper(batch), model.forward_step(batch))
    routed, direct = wrapper(batch, step="evaluation_step"), model.evaluation_step(batch)
    assert routed.keys() == direct.keys()
    assert all(torch.equal(routed[k], direct[k]) for k in direct)
    assert torch.equal(wrapper(batch, step="predict_step"), model.predict_step(batch))
    shared_parameters = zip(wrapper.parameters(), model.parameters(), strict=True)
    assert all(p is q for p, q in shared_parameters)
    assert isinstance(wrapper.model, nn.Module)


@pytest.mark.slow
@pytest.mark.fault(
    "SIGTERM to torchrun during a 2-process training",
    outcome="both ranks save at the same step and exit 143; the resume is bit-identical",
)
def test_sigterm_to_torchrun_saves_on_every_rank_and_the_resume_is_exact(
    runs: dict[str, Run], scratch: Path, tmp_path: Path
) -> None:
    options = ("--epochs", "6", "--samples", "64", "--log-every", "1", "--shuffle")
    straight = shared(runs, "signal-straight", scratch, *options)
    maps, out = tmp_path / "maps", tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(JOB),
        str(maps),
        str(out),
        *options,
        "--step-seconds",
        "0.05",
    ]
    agent = subprocess.Popen(
        command,
        env=environment(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        losses = maps / "training_loss.tsv"
        while not (losses.exists() and losses.read_text().count("\n") >= 4):
            assert agent.poll() is None and time.monotonic() < deadline, "training ended early"
            time.sleep(0.05)
        agent.send_signal(signal.SIGTERM)
        agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    # torchrun forwards SIGTERM to each worker: each stopped at the same step, saved, and
    # exited with 128 + 15.
    signalled = [json.loads((out / f"signalled{r}.json").read_text()) for r in (0, 1)]
    assert [s["exit"] for s in signalled] == [143, 143]
    assert signalled[0]["iteration"] == signalled[1]["iteration"] < 24
    assert {s["stopped_by"] for s in signalled} == {"trainbus.signal"}
    found = checkpoint.find_training_state(Maps(maps))
    assert found is not None
    assert found.path.name.startswith(f"state-{signalled[0]['iteration']:010d}")
    returncode, output = run_group([*command[:-2], "--resume"])
    assert returncode == 0, output[-6000:]
    final = torch.load(out / "rank0.pt")
    assert_equal_weights(final, torch.load(out / "rank1.pt"))
    assert_equal_weights(final, straight.weights(0))


@pytest.mark.slow
@pytest.mark.fault(
    "A worker of a 2-process torchrun crashes before the first training state",
    outcome="torchrun restarts both; training starts again in the same MAPS, with a warning",
)
def test_a_restart_before_the_first_training_state_trains_again_from_scratch(
    runs: dict[str, Run], scratch: Path
) -> None:
    straight = two_ranks(runs, scratch)
    crashed = shared(
        runs,
        "crashed-early",
        scratch,
        *COMMON,
        "--batch-size",
        "8",
        "--crash-rank",
        "0",
        "--crash-at-iteration",
        "2",
        max_restarts=1,
    )
    assert crashed.summary(0)["restart_count"] == 1
    assert "before it wrote a training state: training starts again from scratch" in (
        crashed.output
    )
    assert_equal_weights(crashed.weights(0), straight.weights(0))
    recorded = json.loads((crashed.maps / "maps.json").read_text())
    assert [call["call"] for call in recorded["calls"]] == ["train", "test"]
    assert len({call["run_id"] for call in recorded["calls"]}) == 1
    assert recorded["calls"][0]["run_id"]
