"""Sharded training (``strategy="fsdp"``) under real ``torchrun`` with gloo and 2 processes.

FSDP2's ``fully_shard`` runs on the CPU with gloo in this torch version, so these are real
sharded runs: each rank holds half of every parameter, gradients are reduce-scattered and
training states are Distributed Checkpoints. The runs are shared by the tests of the module.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from trainbus import (
    ModelCheckpointCallback,
    Trainer,
    load_weights,
)
from trainbus.engine import checkpoint, sharding
from trainbus.engine.maps import Maps
from trainbus.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    CorruptCheckpointError,
    TrainbusWarning,
)
from trainbus.events.commands import Stop

from .distributed_job import build_model, loader
from .test_distributed import (
    COMMON,
    EXACT_OPTIONS,
    STOP_AND_SKIP,
    Run,
    assert_equal_weights,
    killed_after_state_9,
    launch,
    resume_alone_from_iteration_9,
    shared,
)

FSDP = ("--strategy", "fsdp")
CLIPPED = (*COMMON, "--clip", "0.05")


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    """Launched once for the module, only when a test asks for them."""
    return {}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sharded")


def sharded_run(runs: dict[str, Run], scratch: Path) -> Run:
    return shared(runs, "fsdp", scratch, *CLIPPED, *FSDP, "--best-weights")


def assert_close_weights(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], atol: float = 1e-6
) -> None:
    """The same weights up to the order of float additions (sharded against one process)."""
    assert first.keys() == second.keys()
    for name, tensor in second.items():
        torch.testing.assert_close(first[name], tensor, rtol=0, atol=atol)


def crashed_sharded_run(runs: dict[str, Run], scratch: Path) -> Run:
    crash = ("--crash-rank", "1", "--crash-at-iteration", "11")
    return shared(runs, "fsdp-crashed", scratch, *EXACT_OPTIONS, *FSDP, *crash, max_restarts=1)


# --------------------------------------------------------------------------- training
@pytest.mark.slow
def test_sharded_training_with_clipping_ends_with_the_weights_of_one_process(
    runs: dict[str, Run], scratch: Path
) -> None:
    sharded = sharded_run(runs, scratch)
    alone = shared(runs, "alone-clipped", scratch, *CLIPPED, "--batch-size", "16", processes=1)
    unclipped = shared(runs, "alone", scratch, *COMMON, "--batch-size", "16", processes=1)
    rank0, rank1, single = sharded.summary(0), sharded.summary(1), alone.summary(0)
    assert (rank0["world_size"], rank0["global_step"]) == (2, 24)
    # 8 samples per rank and step, the total norm clipped across the shards: the maths of
    # 16 samples per step in one process, up to the order of float additions.
    assert_close_weights(sharded.weights(0), alone.weights(0))
    # Clipping was active: without it the weights differ by far more than that.
    moved = max(
        (unclipped.weights(0)[name] - tensor).abs().max().item()
        for name, tensor in alone.weights(0).items()
    )
    assert moved > 1e-3
    assert rank0["metrics"] == rank1["metrics"]
    assert rank0["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], abs=1e-6)
    assert rank0["test_metrics"] == rank1["test_metrics"]


@pytest.mark.slow
def test_a_compiled_model_trains_under_fsdp_as_in_one_process(
    runs: dict[str, Run], scratch: Path
) -> None:
    # compile=True replaces the model's steps with compiled ones; FSDP's root still runs them
    # between its gathers. The eager backend traces with TorchDynamo without a C++ compiler.
    compiled = ("--compile-backend", "eager")
    sharded = shared(runs, "fsdp-compiled", scratch, *CLIPPED, *FSDP, *compiled)
    alone = shared(runs, "alone-clipped", scratch, *CLIPPED, "--batch-size", "16", processes=1)
    recorded = json.loads((sharded.maps / "maps.json").read_text())
    assert recorded["trainer"]["compile"] == {"backend": "eager"}
    assert sharded.summary(0)["global_step"] == 24
    assert_close_weights(sharded.weights(0), alone.weights(0))


@pytest.mark.slow
def test_accumulation_under_fsdp_matches_one_process(runs: dict[str, Run], scratch: Path) -> None:
    options = (*COMMON, "--accumulate", "3")
    sharded = shared(runs, "fsdp-accumulate", scratch, *options, *FSDP)
    alone = shared(runs, "alone-accumulate", scratch, *options, "--batch-size", "16", processes=1)
    # 8 batches per epoch in groups of 3: the short last group (2 batches) is stepped too.
    assert sharded.summary(0)["global_step"] == alone.summary(0)["global_step"] == 3 * 3
    assert_close_weights(sharded.weights(0), alone.weights(0))


@pytest.mark.slow
def test_bf16_under_fsdp_trains_through_the_mixed_precision_policy(
    runs: dict[str, Run], scratch: Path
) -> None:
    sharded = shared(runs, "fsdp-bf16", scratch, *COMMON, *FSDP, "--precision", "bf16")
    alone = shared(
        runs,
        "alone-bf16",
        scratch,
        *COMMON,
        "--batch-size",
        "16",
        "--precision",
        "bf16",
        processes=1,
    )
    summary = sharded.summary(0)
    assert summary["global_step"] == 24
    assert summary["param_dtype"] == "torch.bfloat16"
    # Parameters gathered in bf16 (not only autocast): close to one process, not equal.
    weights = sharded.weights(0)
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # the masters
    assert_close_weights(weights, alone.weights(0), atol=5e-2)


@pytest.mark.slow
def test_a_skip_and_a_stop_asked_on_one_rank_under_fsdp_end_as_under_ddp(
    runs: dict[str, Run], scratch: Path
) -> None:
    ddp = shared(runs, "ddp-stop-and-skip", scratch, *STOP_AND_SKIP)
    sharded = shared(runs, "fsdp-stop-and-skip", scratch, *STOP_AND_SKIP, *FSDP)
    for summary in (sharded.summary(0), sharded.summary(1)):
        # The skipped backward (the end of an accumulation group) and the stop: as under DDP.
        assert (summary["iteration"], summary["global_step"]) == (6, 2)
        assert summary["stopped_by"] == "OneRankDecides.on_batch_end@rank1"
    assert_close_weights(sharded.weights(0), ddp.weights(0))


@pytest.mark.slow
def test_early_stopping_under_fsdp_stops_where_it_does_under_ddp(
    runs: dict[str, Run], scratch: Path
) -> None:
    ddp = shared(runs, "ddp-early", scratch, *COMMON, "--early-stopping")
    sharded = shared(runs, "fsdp-early", scratch, *COMMON, "--early-stopping", *FSDP)
    expected = ddp.summary(0)
    assert str(expected["stopped_by"]).startswith("EarlyStoppingCallback")
    for rank in (0, 1):
        summary = sharded.summary(rank)
        assert summary["stopped_by"] == expected["stopped_by"]
        assert summary["global_step"] == expected["global_step"] < 24
        assert summary["metrics"]["loss"] == pytest.approx(expected["metrics"]["loss"], abs=1e-6)


# ---------------------------------------------------------------------------- files
@pytest.mark.slow
def test_the_weights_checkpoint_is_whole_and_loads_in_one_process(
    runs: dict[str, Run], scratch: Path
) -> None:
    run = sharded_run(runs, scratch)
    for tag in ("last", "best-loss"):
        assert sorted(p.name for p in (run.maps / "checkpoints" / tag).iterdir()) == [
            "manifest.json",
            "model.safetensors",
        ]
    model = build_model(0.0)
    load_weights(run.maps, model, tag="last")  # no process group in this process
    assert not torch.distributed.is_initialized()
    assert_equal_weights(dict(model.state_dict()), run.weights(0))


@pytest.mark.slow
def test_a_sharded_training_state_is_a_distributed_checkpoint_with_a_manifest(
    runs: dict[str, Run], scratch: Path
) -> None:
    run = sharded_run(runs, scratch)
    found = checkpoint.find_training_state(Maps(run.maps))
    assert found is not None and found.path.name == "state-0000000024-epoch-end"
    assert sorted(p.name for p in found.path.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "manifest.json",
        "state.json",
        "trainer.pt",
    ]
    manifest = checkpoint.read_manifest(found.path)  # every file's sha256 verifies
    assert sorted(manifest["files"]) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "state.json",
        "trainer.pt",
    ]
    document = json.loads((found.path / "state.json").read_text())
    assert document["sharded"] is True and document["world_size"] == 2
    assert document["trainer"]["strategy"] == "fsdp"
    # Each rank wrote its half of the weights: the shards together are the whole model.
    assert checkpoint.is_sharded(found.path)
    assert (run.maps / "training" / "latest").read_text().strip() == found.path.name
    # Rank 0 alone wrote the MAPS: no staging directory or second copy left behind.
    assert not [p for p in (run.maps / "training").iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.fault(
    "A worker of a 2-process FSDP torchrun crashes (--max-restarts=1)",
    outcome="torchrun restarts both; they reload the sharded state, bit-identical weights",
)
def test_a_crashed_sharded_run_resumes_bit_identically(runs: dict[str, Run], scratch: Path) -> None:
    straight = shared(runs, "fsdp-straight", scratch, *EXACT_OPTIONS, *FSDP)
    crashed = crashed_sharded_run(runs, scratch)
    assert crashed.summary(0)["restart_count"] == 1
    assert_equal_weights(crashed.weights(0), straight.weights(0))
    assert crashed.summary(0)["metrics"] == straight.summary(0)["metrics"]
    assert crashed.summary(0)["train_loss"] == straight.summary(0)["train_loss"]
    recorded = json.loads((crashed.maps / "maps.json").read_text())
    resumed = [c["resumed_from"] for c in recorded["calls"] if "resumed_from" in c]
    assert [r["state"] for r in resumed] == ["state-0000000009"]
    assert Maps(crashed.maps).read_rows("metrics.tsv") == Maps(straight.maps).read_rows(
        "metrics.tsv"
    )


@pytest.mark.slow
@pytest.mark.fault(
    "A worker of a 2-process torchrun crashes while asynchronous saves are in flight",
    outcome="FSDP (DCP async_save) and DDP (rank 0's writer) resume bit-identically",
)
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_asynchronous_saves_under_torchrun_resume_bit_identically(
    runs: dict[str, Run], scratch: Path, strategy: str
) -> None:
    options = (*EXACT_OPTIONS, "--strategy", strategy, "--best-weights")
    straight = shared(runs, f"{strategy}-straight-best", scratch, *options)
    crashed = shared(
        runs,
        f"{strategy}-async-crashed",
        scratch,
        *options,
        "--asynchronous",
        "--crash-rank",
        "1",
        "--crash-at-iteration",
        "11",
        max_restarts=1,
    )
    assert crashed.summary(0)["restart_count"] == 1
    assert_equal_weights(crashed.weights(0), straight.weights(0))
    assert crashed.summary(0)["metrics"] == straight.summary(0)["metrics"]
    recorded = json.loads((crashed.maps / "maps.json").read_text())
    resumed = [c["resumed_from"]["state"] for c in recorded["calls"] if "resumed_from" in c]
    # The state of iteration 9 was committed in the background unless the crash came first;
    # then the epoch's end before it (collected when state 9 was asked for) is the newest.
    assert resumed in (["state-0000000009"], ["state-0000000008-epoch-end"])
    found = checkpoint.find_training_state(Maps(crashed.maps))
    assert found is not None and found.path.name == "state-0000000024-epoch-end"
    assert checkpoint.is_sharded(found.path) is (strategy == "fsdp")
    # Flushed before train() returned: the weights checkpoints are committed and whole.
    model = build_model(0.0)
    load_weights(crashed.maps, model, tag="last")
    assert_equal_weights(dict(model.state_dict()), crashed.weights(0))
    assert not [p for p in (crashed.maps / "training").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.fault(
    "Resume a 2-process sharded state with another number of processes",
    outcome="resharded by DCP: weights and optimizers restored, the epoch restarts",
)
def test_a_sharded_state_resumes_in_one_process_and_restarts_the_epoch(
    runs: dict[str, Run], scratch: Path, tmp_path: Path
) -> None:
    copy = resume_alone_from_iteration_9(crashed_sharded_run(runs, scratch), tmp_path)
    resumed = copy / "training" / "state-0000000009"
    assert checkpoint.is_sharded(resumed)  # gathered whole into this process's model
    assert not checkpoint.is_sharded(copy / "training" / "state-0000000025-epoch-end")


@pytest.mark.slow
def test_a_sharded_state_is_resharded_for_one_sharded_process(
    runs: dict[str, Run], scratch: Path, tmp_path: Path
) -> None:
    (tmp_path / "run").mkdir()
    copy = killed_after_state_9(crashed_sharded_run(runs, scratch), tmp_path / "run" / "maps")
    resumed = launch(
        tmp_path, *EXACT_OPTIONS, *FSDP, "--resume", processes=1, torchrun=True, name="run"
    )
    assert re.search(r"written by 2 process\(es\), with 1.*starts again", resumed.output)
    summary = resumed.summary(0)
    # One rank holds every shard now (DCP resharded 2 into 1); 8 samples a batch, so the
    # restarted second epoch and the third have 16 batches each.
    assert (summary["world_size"], summary["sharded"]) == (1, True)
    assert summary["iteration"] == 9 + 16 + 16
    recorded = json.loads((copy / "maps.json").read_text())
    assert recorded["calls"][-2]["resumed_from"]["state"] == "state-0000000009"


@pytest.mark.slow
@pytest.mark.fault(
    "A sharded state's .metadata replaced by a pickle that runs code (manifest forged)",
    outcome="refused as not trustworthy, nothing executed; an older state is used",
)
def test_a_forged_dcp_metadata_is_refused_without_running_it(
    runs: dict[str, Run], scratch: Path, tmp_path: Path
) -> None:
    run = sharded_run(runs, scratch)
    copy = tmp_path / "maps"
    shutil.copytree(run.maps, copy)
    newest = copy / "training" / "state-0000000024-epoch-end"
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Payload(str(marker)))
    (newest / ".metadata").write_bytes(payload)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"][".metadata"] = checkpoint._digest(newest / ".metadata")
    (newest / "manifest.json").write_text(json.dumps(manifest))
    found = checkpoint.find_training_state(Maps(copy))
    assert found is not None and found.path.name == "state-0000000016-epoch-end"
    assert "not trustworthy" in found.skipped[0] and "posix.system" in found.skipped[0]
    assert not marker.exists()


class _Payload:
    """Unpickled by an unrestricted reader, it would run a shell command."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.path}",))


def test_a_value_that_runs_code_in_a_shard_is_refused() -> None:
    _, planner_class = sharding._restricted()
    planner = planner_class()
    buffer = io.BytesIO()
    torch.save({"lr": Stop("not a plain value")}, buffer)
    buffer.seek(0)
    item = type("Item", (), {"dest_index": type("Index", (), {"fqn": "optimizers.0"})()})()
    with pytest.raises(CorruptCheckpointError, match=r"'optimizers\.0'.*not trustworthy"):
        planner.load_bytes(item, buffer)


# ------------------------------------------------------------------------- arguments
def test_the_strategy_is_checked() -> None:
    with pytest.raises(ConfigurationError, match=r"strategy='zero'.*'ddp', 'fsdp'"):
        Trainer("unused", build_model(0.0), strategy="zero")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationTypeError, match="strategy=2 is not a string"):
        Trainer("unused", build_model(0.0), strategy=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"ddp_options=.*strategy='fsdp'"):
        Trainer(
            "unused",
            build_model(0.0),
            strategy="fsdp",
            ddp_options={"find_unused_parameters": True},
        )
    assert not Path("unused").exists()


def test_the_default_units_are_the_elements_of_layer_stacks() -> None:
    model = build_model(0.0)
    units = sharding_units_of(model)
    # Linear, ReLU, Dropout, Linear: the two layers with parameters.
    assert units == [model.network[0], model.network[3]]


def sharding_units_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    chosen: list[torch.nn.Module] = []
    model.shard(chosen.append)  # type: ignore[operator]
    return chosen


def test_fsdp_in_one_process_trains_the_whole_model(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainbusWarning)
        trainer = Trainer(
            tmp_path / "maps",
            build_model(0.0),
            callbacks=[ModelCheckpointCallback()],
            strategy="fsdp",
            max_epochs=1,
            plugins=False,
        )
        trainer.train(loader(32, 8, shuffle=False, seed=1))
    record = json.loads((tmp_path / "maps" / "maps.json").read_text())
    assert record["trainer"]["strategy"] == "fsdp"
    found = checkpoint.find_training_state(Maps(tmp_path / "maps"))
    assert found is not None and not checkpoint.is_sharded(found.path)
