"""The engine's invariants: one call at a time, emit, boundaries, payloads, truthful records."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_loader, make_model
from trainbus import (
    EarlyStoppingCallback,
    EventSpec,
    LossMetricConfig,
    ModelCheckpointCallback,
    SaveCheckpoint,
    SaveTrainingState,
    Stop,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
)
from trainbus.errors import (
    CallInProgressError,
    ConfigurationError,
    DataError,
    ModelContractError,
    TrainbusWarning,
)


def calls_of(maps: Path) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = json.loads((maps / "maps.json").read_text())["calls"]
    return calls


def files_of(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def weights_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# ------------------------------------------------------------------ one call at a time
@pytest.mark.parametrize("call", ["train", "validate", "test", "predict"])
def test_a_call_from_inside_a_handler_is_refused_naming_the_running_call(
    quiet_trainer: Callable[..., Trainer], call: str
) -> None:
    trainer = quiet_trainer(max_epochs=1)
    refused: list[str] = []

    @trainer.on("epoch_end")
    def nested() -> None:
        with pytest.raises(CallInProgressError, match=rf"{call}\(\) was called while train\(\)"):
            getattr(trainer, call)(make_loader())
        refused.append(call)

    trainer.train(make_loader())
    assert refused == [call]
    assert [c["call"] for c in calls_of(trainer.maps.path)] == ["train"]


def test_a_call_from_another_thread_is_refused_while_one_runs(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=1)
    inside, release = threading.Event(), threading.Event()

    @trainer.on("batch_end", once=True)
    def hold() -> None:
        inside.set()
        assert release.wait(30)

    worker = threading.Thread(target=trainer.train, args=(make_loader(),))
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(
            CallInProgressError, match=r"validate\(\) .* while train\(\) is running"
        ):
            trainer.validate(make_loader())
        trainer.bus.declare(EventSpec("ping", payload=()))
        with pytest.raises(ConfigurationError, match="another thread"):
            trainer.emit("ping")
    finally:
        release.set()
        worker.join(60)
    assert trainer.state.iteration == 6
    assert trainer.validate(make_loader())["loss"] > 0  # free again once train() returned


# ------------------------------------------------------------------------------- emit
def test_emit_outside_a_call_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    first = Trainer(maps, make_model(), callbacks=[ModelCheckpointCallback()], max_epochs=1)
    first.train(make_loader())
    before = files_of(maps)
    second = Trainer(maps, make_model(seed=5), default_callbacks=False)
    second.bus.declare(EventSpec("save_now", payload=()))
    second.on("save_now")(lambda: [SaveCheckpoint("last"), SaveTrainingState("outside")])
    with pytest.raises(ConfigurationError, match=r"emit\('save_now'\) was called outside"):
        second.emit("save_now")
    assert files_of(maps) == before


@pytest.mark.fault(
    "A training state asked for mid-step (an event emitted from batch_start)",
    outcome="written at the end of the step; the resume is bit-identical",
)
def test_a_training_state_asked_for_mid_step_is_written_at_the_end_of_the_step(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    def build(path: Path) -> Trainer:
        trainer = quiet_trainer(maps=path, max_epochs=2, callbacks=[TrainingCheckpointCallback()])
        trainer.bus.declare(EventSpec("snapshot_please", payload=()))
        trainer.on("snapshot_please")(lambda: SaveTrainingState("asked at batch_start"))

        @trainer.on("batch_start", when=lambda state: state.iteration == 3)
        def ask() -> None:
            trainer.emit("snapshot_please")

        return trainer

    straight = build(tmp_path / "straight")
    straight.train(make_loader(shuffle=True))
    interrupted = build(tmp_path / "interrupted")
    written: list[tuple[str, int]] = []
    interrupted.on("checkpoint")(
        lambda *, tag, state: (
            written.append((tag, state.iteration)) if tag.startswith("state") else None
        )
    )
    interrupted.on("batch_end", when=lambda state: state.iteration == 3)(
        lambda: Stop("pause", resumable=True)
    )
    interrupted.train(make_loader(shuffle=True))
    assert written[0] == ("state-0000000003", 3)
    document = json.loads(
        (tmp_path / "interrupted" / "training" / "state-0000000003" / "state.json").read_text()
    )
    assert document["state"]["iteration"] == 3
    assert document["position"]["batches_done"] == 3
    assert document["state"]["samples_seen"] == 24

    resumed = Trainer.from_maps(
        tmp_path / "interrupted", make_model(), callbacks=[TrainingCheckpointCallback()]
    )
    resumed.train(make_loader(shuffle=True))
    assert resumed.state.iteration == straight.state.iteration == 12
    for name, tensor in weights_of(straight).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


# ------------------------------------------------------------------------- boundaries
@pytest.mark.fault(
    "A resumable stop inside an accumulation group",
    outcome="training goes on to the group's end; the state written there resumes bit-identically",
)
def test_a_pause_inside_an_accumulation_group_ends_at_the_group_end_and_resumes_exactly(
    quiet_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    options = {"max_epochs": 2, "accumulate_grad_batches": 2}
    straight = quiet_trainer(maps=tmp_path / "straight", **options)
    straight.train(make_loader(shuffle=True))

    paused = quiet_trainer(
        maps=tmp_path / "paused", callbacks=[TrainingCheckpointCallback()], **options
    )
    paused.on("batch_end", when=lambda state: state.iteration == 3)(
        lambda: [Stop("pause", resumable=True), SaveTrainingState("pause")]
    )
    state = paused.train(make_loader(shuffle=True))
    assert (state.iteration, state.global_step) == (4, 2)  # trained on to the group's end
    assert sorted(p.name for p in (tmp_path / "paused" / "training").glob("state-*")) == [
        "state-0000000004"
    ]
    resumed = Trainer.from_maps(
        tmp_path / "paused", make_model(), callbacks=[TrainingCheckpointCallback()]
    )
    resumed.train(make_loader(shuffle=True))
    assert resumed.state.global_step == straight.state.global_step == 6
    for name, tensor in weights_of(straight).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_a_final_stop_inside_an_accumulation_group_drops_it(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2)
    trainer.on("batch_end", when=lambda state: state.iteration == 3)(lambda: Stop("enough"))
    state = trainer.train(make_loader())
    assert (state.iteration, state.global_step) == (3, 1)


# ------------------------------------------------------------------ a call starts clean
def test_a_stop_during_validate_does_not_leak_into_the_next_train(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=2)
    trainer.on("validate_end")(lambda: Stop("only an evaluation"))
    trainer.validate(make_loader())
    assert trainer.state.stopped_by is not None
    state = trainer.train(make_loader())
    assert state.stopped_by is None
    assert state.current_epoch == 1 and state.iteration == 12
    assert [c["status"] for c in calls_of(trainer.maps.path)] == ["stopped", "completed"]


def test_callbacks_reused_in_a_second_trainer_behave_as_fresh_ones(tmp_path: Path) -> None:
    def run(path: Path, callbacks: list[Any], seed: int) -> TrainerState:
        trainer = Trainer(
            path,
            make_model(seed=seed),
            metrics={"loss": LossMetricConfig("loss")},
            callbacks=callbacks,
            default_callbacks=False,
            max_epochs=6,
        )
        return trainer.train(make_loader(), make_loader(seed=1))

    stopping = EarlyStoppingCallback(metric="loss", patience=1, min_delta=10.0)
    best = ModelCheckpointCallback(metric="loss")
    run(tmp_path / "first", [stopping, best], seed=0)
    reused = run(tmp_path / "second", [stopping, best], seed=3)
    fresh = run(
        tmp_path / "fresh",
        [
            EarlyStoppingCallback(metric="loss", patience=1, min_delta=10.0),
            ModelCheckpointCallback(metric="loss"),
        ],
        seed=3,
    )
    assert (reused.current_epoch, reused.stopped_by) == (fresh.current_epoch, fresh.stopped_by)
    assert reused.current_epoch == 1  # patience 1 with an unreachable min_delta: epoch 2 stops
    assert (tmp_path / "second" / "checkpoints" / "best-loss" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- payloads
def test_payloads_are_read_only(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(max_epochs=1)
    refused: list[str] = []

    @trainer.on("metrics_computed")
    def change_metrics(*, metrics: dict[str, float]) -> None:
        with pytest.raises(TypeError):
            metrics["loss"] = -1.0
        refused.append("metrics")

    @trainer.on("train_start")
    def drop_optimizers(*, optimizers: list[Any]) -> None:
        with pytest.raises(AttributeError):
            optimizers.clear()
        refused.append("optimizers")

    @trainer.on("batch_end", once=True)
    def change_losses(*, losses: dict[str, Any]) -> None:
        with pytest.raises(TypeError):
            losses["loss"] = torch.tensor(0.0)
        refused.append("losses")

    before = weights_of(trainer)
    trainer.train(make_loader(), make_loader(seed=1))
    assert refused == ["optimizers", "losses", "metrics"]
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.state.metrics["loss"] > 0
    result = trainer.test(make_loader(seed=1))
    assert result["loss"] > 0 and isinstance(result, dict)


# ------------------------------------------------------------------- truthful records
@pytest.mark.fault(
    "A teardown handler that raises",
    outcome="the error reaches the caller and the call is recorded as failed",
)
def test_a_call_whose_teardown_raised_is_recorded_as_failed(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(max_epochs=1)

    @trainer.on("teardown")
    def broken() -> None:
        raise RuntimeError("could not close the log")

    with pytest.raises(RuntimeError, match="could not close the log"):
        trainer.train(make_loader())
    call = calls_of(trainer.maps.path)[-1]
    assert call["status"] == "failed"
    assert "could not close the log" in call["error"]


@pytest.mark.fault(
    "A training process SIGKILLed: its call record left running",
    outcome="the next call takes over the stale lock and records the killed call as interrupted",
)
def test_a_killed_call_is_recorded_as_interrupted_by_the_next_call(tmp_path: Path) -> None:
    import subprocess
    import sys

    maps = tmp_path / "maps"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from tests.conftest import make_loader, make_model
from trainbus import Trainer, TrainingCheckpointCallback
trainer = Trainer({str(maps)!r}, make_model(), callbacks=[TrainingCheckpointCallback()],
                  default_callbacks=False, max_epochs=3)
trainer.on("batch_end", when=lambda state: state.iteration == 8)(
    lambda: os.kill(os.getpid(), signal.SIGKILL))
trainer.train(make_loader())
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert calls_of(maps)[-1]["status"] == "running"
    resumed = Trainer.from_maps(maps, make_model(), callbacks=[TrainingCheckpointCallback()])
    resumed.train(make_loader())
    calls = calls_of(maps)
    assert [c["status"] for c in calls] == ["interrupted", "completed"]
    assert "recovered_lock" in calls[-1]


# ----------------------------------------------------------------------- clear errors
def test_the_same_callback_instance_twice_is_refused(maps_path: Path) -> None:
    callback = TrainingCheckpointCallback()
    with pytest.raises(ConfigurationError, match=r"callbacks\[0\] and callbacks\[1\] are the same"):
        Trainer(maps_path, make_model(), callbacks=[callback, callback])
    assert not maps_path.exists()


def test_build_optimizers_returning_one_optimizer_twice_is_refused(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.build_optimizers = lambda: [optimizer, optimizer]  # type: ignore[method-assign]
    with pytest.raises(ModelContractError, match=r"same optimizer \(SGD\) at positions 0 and 1"):
        quiet_trainer(model=model).train(make_loader())


def test_a_one_shot_generator_is_named_at_the_second_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    batches = (batch for batch in make_loader())
    trainer = quiet_trainer(max_epochs=2)
    with pytest.raises(DataError, match=r"at epoch 2 .* generator is a one-shot iterator"):
        trainer.train(batches)
    assert trainer.state.iteration == 6


def test_a_loader_whose_len_raises_is_treated_as_unsized(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    class NoLength:
        def __iter__(self) -> Any:
            return iter(make_loader())

        def __len__(self) -> int:
            raise NotImplementedError("length unknown")

    state = quiet_trainer(max_epochs=2).train(NoLength())
    assert (state.iteration, state.num_batches) == (12, None)


def test_a_save_asked_at_teardown_is_named_as_not_written(
    quiet_trainer: Callable[..., Trainer], maps_path: Path
) -> None:
    trainer = quiet_trainer(max_epochs=1)

    @trainer.on("teardown", id="late-saver")
    def late(*, state: TrainerState) -> SaveCheckpoint:
        return SaveCheckpoint("late")

    with pytest.warns(TrainbusWarning, match=r"not written: SaveCheckpoint.* from late-saver at "):
        trainer.train(make_loader())
    assert not (maps_path / "checkpoints" / "late").exists()
    # Asked at train_end, the same save is written at training's last boundary.
    again = quiet_trainer(max_epochs=1, overwrite=True)
    again.on("train_end", id="in-time")(late)
    again.train(make_loader())
    assert (maps_path / "checkpoints" / "late").is_dir()
