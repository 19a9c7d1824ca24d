"""A resume that does not fit is refused or reported clearly; nothing read back chooses code."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import make_loader, make_model
from trainbus import SupervisedModel, Trainer, TrainingCheckpointCallback
from trainbus.errors import CheckpointError, ConfigurationError, TrainbusWarning


def trained(path: Path, model: SupervisedModel | None = None, **options: Any) -> None:
    Trainer(
        path,
        model or make_model(),
        callbacks=[TrainingCheckpointCallback()],
        default_callbacks=False,
        max_epochs=1,
        **options,
    ).train(make_loader())


def resumed(path: Path, model: SupervisedModel, **options: Any) -> Trainer:
    return Trainer.from_maps(
        path, model, callbacks=[TrainingCheckpointCallback()], max_epochs=2, **options
    )


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.fault(
    "Compile options planted in maps.json (a compiler to run)",
    outcome="never used: Trainer.from_maps takes compile from its arguments only",
)
def test_compile_options_planted_in_maps_json_are_never_used(maps_path: Path) -> None:
    trained(maps_path)
    document = json.loads((maps_path / "maps.json").read_text())
    # As an attacker would plant it: inductor options that name a compiler to run.
    document["trainer"]["compile"] = {"options": {"cpp.cxx": ["/tmp/planted-compiler"]}}
    (maps_path / "maps.json").write_text(json.dumps(document))
    trainer = resumed(maps_path, make_model())
    assert trainer.settings.compile_options is None
    state = trainer.train(make_loader())
    assert state.current_epoch == 1
    assert not trainer.model.forward_step.__class__.__name__.endswith("OptimizedModule")


def test_a_setting_of_the_wrong_type_in_maps_json_is_named_with_its_source(
    maps_path: Path,
) -> None:
    trained(maps_path)
    document = json.loads((maps_path / "maps.json").read_text())
    document["trainer"]["accumulate_grad_batches"] = "2; rm -rf /"
    (maps_path / "maps.json").write_text(json.dumps(document))
    with pytest.raises(
        ConfigurationError, match=r"accumulate_grad_batches='2; rm -rf /'"
    ) as caught:
        resumed(maps_path, make_model())
    assert any("read back from" in note for note in caught.value.__notes__)


@pytest.mark.fault(
    "Resume with another optimizer class",
    outcome="refused naming both classes; the training states unchanged",
)
def test_resuming_with_another_optimizer_class_is_refused_naming_both(maps_path: Path) -> None:
    trained(maps_path)
    before = tree(maps_path / "training")
    adam = SupervisedModel(make_model().network, nn.CrossEntropyLoss(), optimizer=torch.optim.Adam)
    with pytest.raises(CheckpointError, match=r"optimizers \['torch\.optim\.sgd\.SGD'\].*Adam"):
        resumed(maps_path, adam).train(make_loader())
    assert tree(maps_path / "training") == before


@pytest.mark.fault(
    "Resume with another architecture",
    outcome="refused naming the reshaped weights; the training states unchanged",
)
def test_resuming_with_another_architecture_is_refused_naming_the_differences(
    maps_path: Path,
) -> None:
    trained(maps_path)
    before = tree(maps_path / "training")
    torch.manual_seed(0)
    wider = SupervisedModel(
        nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
        nn.CrossEntropyLoss(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )
    with pytest.raises(
        CheckpointError,
        match=r"the training state state-\S+ do not fit model SupervisedModel \(.*network\.0\."
        r"weight: saved \(8, 4\), model \(16, 4\).*Resume with the model the interrupted run",
    ):
        resumed(maps_path, wider).train(make_loader())
    assert tree(maps_path / "training") == before


def test_a_changed_learning_rate_is_named_and_the_saved_one_is_used(maps_path: Path) -> None:
    trained(maps_path)
    trainer = resumed(maps_path, make_model(lr=0.01))
    with pytest.warns(TrainbusWarning, match=r"optimizer 0 lr: 0\.05 -> 0\.01.*values are used"):
        trainer.train(make_loader())
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05


def test_a_changed_loop_setting_is_named_and_the_given_one_is_used(maps_path: Path) -> None:
    trained(maps_path)
    trainer = resumed(maps_path, make_model(), accumulate_grad_batches=2)
    with pytest.warns(
        TrainbusWarning, match=r"accumulate_grad_batches=2 \(was 1\).*values given now are used"
    ):
        state = trainer.train(make_loader())
    assert state.global_step == 6 + 3


def test_an_unchanged_resume_warns_nothing(maps_path: Path) -> None:
    trained(maps_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed(maps_path, make_model()).train(make_loader())
