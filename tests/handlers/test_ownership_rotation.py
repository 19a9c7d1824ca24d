"""Who owns a checkpoint: decided exactly, never by a prefix of the callback id."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_loader, make_model
from trainbus import ModelCheckpointCallback, Trainer, TrainingCheckpointCallback
from trainbus.engine import checkpoint
from trainbus.engine.checkpoint import save_weights
from trainbus.engine.maps import Maps


def states(path: Path) -> list[str]:
    return [p.name for p in checkpoint.training_states(Maps(path))]


def named(callback: TrainingCheckpointCallback, callback_id: str) -> TrainingCheckpointCallback:
    callback.callback_id = callback_id
    return callback


@pytest.mark.fault(
    "Two training-checkpoint callbacks whose ids prefix each other ('ckpt', 'ckpt.steps')",
    outcome="each rotates only its own states; none deleted by the other",
)
@pytest.mark.parametrize("order", ["short-first", "long-first"])
def test_callbacks_whose_ids_prefix_each_other_never_rotate_each_others_states(
    maps_path: Path, order: str
) -> None:
    daily = named(TrainingCheckpointCallback(every_n_epochs=1, keep=1), "ckpt")
    frequent = named(
        TrainingCheckpointCallback(
            every_n_steps=2, every_n_epochs=None, save_on_train_end=False, keep=5
        ),
        "ckpt.steps",
    )
    callbacks = [daily, frequent] if order == "short-first" else [frequent, daily]
    trainer = Trainer(
        maps_path, make_model(), callbacks=callbacks, default_callbacks=False, max_epochs=2
    )
    trainer.train(make_loader())
    # ckpt keeps its newest epoch-end state; ckpt.steps its 5 newest step states.
    assert states(maps_path) == [
        "state-0000000012-epoch-end",
        "state-0000000012",
        "state-0000000010",
        "state-0000000008",
        "state-0000000006",
        "state-0000000004",
    ]


def test_rotation_owns_a_state_only_by_the_exact_handler_id(maps_path: Path) -> None:
    maps = Maps(maps_path)
    maps.create()
    maps.write_json({}, "maps.json")
    model = make_model()
    for iteration, source in [
        (1, "ckpt.on_epoch_end"),
        (2, "ckpt.steps.on_batch_end"),
        (3, "ckpt.on_epoch_end"),
        (4, "ckpt.steps.on_batch_end"),
        (5, "ckpt#2.on_epoch_end"),
        (6, "ckpt.custom-id"),
    ]:
        checkpoint.save_training_state(
            maps,
            checkpoint.training_state_name(iteration, epoch_end=False),
            model,
            tensors={},
            document={},
            metadata={"requested_by": source},
        )
    removed = checkpoint.rotate_training_states(maps, 1, owner="ckpt")
    assert [p.name for p in removed] == ["state-0000000001"]
    assert checkpoint.rotate_training_states(maps, 1, owner="ckpt") == []
    # A handler subscribed under its own id counts once the callback names it.
    removed = checkpoint.rotate_training_states(maps, 1, owner="ckpt", sources={"ckpt.custom-id"})
    assert [p.name for p in removed] == ["state-0000000003"]
    assert states(maps_path) == [
        "state-0000000006",
        "state-0000000005",
        "state-0000000004",
        "state-0000000002",
    ]


def test_a_recorded_owner_decides_over_the_handler_id(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    directory = save_weights(
        maps,
        "best",
        make_model(),
        metadata={"requested_by": "ckpt.on_epoch_end", "owner": "ckpt.steps"},
    )
    assert not checkpoint.owned_by(directory, "ckpt")
    assert checkpoint.owned_by(directory, "ckpt.steps")


def test_model_checkpoint_recognises_only_the_directories_it_wrote(tmp_path: Path) -> None:
    maps = Maps(tmp_path / "maps")
    maps.create()
    callback = ModelCheckpointCallback("loss", top_k=3)
    callback.callback_id = "mc"
    mine = save_weights(
        maps,
        "best-loss-epoch-1",
        make_model(),
        metadata={"requested_by": "mc.on_validation_end", "iteration": 12},
    )
    others = save_weights(
        maps,
        "best-loss-epoch-2",
        make_model(),
        metadata={"requested_by": "mc.second.on_validation_end", "iteration": 18},
    )
    assert callback._written_at(mine) == 12
    assert callback._written_at(others) is None
