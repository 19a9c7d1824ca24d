from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus import (
    Callback,
    EarlyStoppingCallback,
    LossMetricConfig,
    MetricsWriterCallback,
    ModelCheckpointCallback,
    SupervisedModel,
    Trainer,
    TrainerState,
    TrainingCheckpointCallback,
    load_weights,
)
from trainbus.engine.checkpoint import read_manifest, save_weights
from trainbus.engine.maps import Maps
from trainbus.errors import ConfigurationError, TrainbusWarning
from trainbus.handlers.model_checkpoint import check_tag_conflicts

from ..conftest import make_dataset, make_loader, make_model


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def stored_weights(directory: Path) -> dict[str, torch.Tensor]:
    model = make_model(seed=123)
    load_weights(directory, model)
    return weights_of(model)


def flipped_loader() -> DataLoader[Any]:
    inputs, target = make_dataset(16, seed=1).tensors
    return DataLoader(TensorDataset(inputs, 1 - target), batch_size=8)


def train_with_copies(
    trainer: Trainer, val_loader: DataLoader[Any]
) -> tuple[TrainerState, list[dict[str, torch.Tensor]]]:
    copies: list[dict[str, torch.Tensor]] = []

    @trainer.on("epoch_end")
    def copy(*, model: nn.Module) -> None:
        copies.append(weights_of(model))

    state = trainer.train(make_loader(), val_loader)
    return state, copies


def checkpoint_tags(trainer: Trainer) -> list[str]:
    return sorted(p.name for p in (trainer.maps.path / "checkpoints").iterdir())


def test_best_epoch_and_last_checkpoints_hold_the_right_weights(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        model=make_model(lr=0.5),
        callbacks=[ModelCheckpointCallback(metric="loss", epochs={0, 2})],
        max_epochs=4,
    )
    state, copies = train_with_copies(trainer, flipped_loader())
    best_epoch = state.best_epochs["loss"]
    assert best_epoch != 3
    assert checkpoint_tags(trainer) == ["best-loss", "epoch-0", "epoch-2", "last"]
    root = trainer.maps.path / "checkpoints"
    assert same_weights(stored_weights(root / "best-loss"), copies[best_epoch])
    assert not same_weights(stored_weights(root / "best-loss"), copies[-1])
    assert same_weights(stored_weights(root / "epoch-0"), copies[0])
    assert same_weights(stored_weights(root / "epoch-2"), copies[2])
    assert same_weights(stored_weights(root / "last"), copies[-1])
    manifest = json.loads((root / "best-loss" / "manifest.json").read_text())
    assert manifest["metadata"]["metric"] == "loss"
    assert manifest["metadata"]["value"] == state.best_metrics["loss"]
    assert manifest["metadata"]["epoch"] == best_epoch
    assert manifest["metadata"]["requested_by"] == "ModelCheckpointCallback.on_epoch_end"


def test_best_checkpoint_follows_an_improving_metric_to_the_last_epoch(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[ModelCheckpointCallback(metric="loss", save_last=False)],
        max_epochs=3,
    )
    state, copies = train_with_copies(trainer, make_loader(16))
    assert state.best_epochs["loss"] == 2
    assert checkpoint_tags(trainer) == ["best-loss"]
    best = stored_weights(trainer.maps.path / "checkpoints" / "best-loss")
    assert same_weights(best, copies[2])
    assert not same_weights(best, copies[0])


def test_best_checkpoint_with_mode_max_keeps_the_highest_value(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        model=make_model(lr=0.5),
        metrics={
            "loss": LossMetricConfig(),
            "accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=2),
        },
        callbacks=[ModelCheckpointCallback(metric="accuracy", mode="max", save_last=False)],
        max_epochs=4,
    )
    accuracies: list[float] = []

    @trainer.on("validation_end")
    def record(*, metrics: dict[str, float]) -> None:
        accuracies.append(metrics["accuracy"])

    state, copies = train_with_copies(trainer, flipped_loader())
    best_epoch = accuracies.index(max(accuracies))
    assert best_epoch != accuracies.index(min(accuracies))
    assert state.best_epochs["accuracy"] == best_epoch
    best = stored_weights(trainer.maps.path / "checkpoints" / "best-accuracy")
    assert same_weights(best, copies[best_epoch])


def test_epochs_select_zero_based_epoch_checkpoints(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        callbacks=[ModelCheckpointCallback(epochs=range(0, 10, 2), save_last=False)],
        max_epochs=5,
    )
    trainer.train(make_loader(16))
    assert checkpoint_tags(trainer) == ["epoch-0", "epoch-2", "epoch-4"]


def test_nothing_is_saved_without_metric_epochs_or_last(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", callbacks=[ModelCheckpointCallback(save_last=False)])
    trainer.train(make_loader(16), make_loader(16))
    assert checkpoint_tags(trainer) == []


def test_the_default_callback_keeps_only_the_last_weights(maps_path: Path) -> None:
    trainer = Trainer(
        maps_path, make_model(), default_callbacks=[ModelCheckpointCallback], max_epochs=2
    )
    trainer.train(make_loader(16), make_loader(16))
    assert checkpoint_tags(trainer) == ["last"]
    last = stored_weights(maps_path / "checkpoints" / "last")
    assert same_weights(last, weights_of(trainer.model))


def test_a_monitored_metric_the_trainer_lacks_is_refused(maps_path: Path) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"ModelCheckpointCallback monitors metric 'acc', which the Trainer does not "
        r"compute\. .*Known metrics: \['loss'\]",
    ):
        Trainer(maps_path, make_model(), callbacks=[ModelCheckpointCallback("acc", mode="max")])
    assert not maps_path.exists()


# ----------------------------------------------------------------------------- scripted scores
nan = math.nan
SCORES = (1.0, 3.0, 2.0, 5.0, 4.0)
Weights = dict[str, torch.Tensor]


class ScriptedScoreModel(SupervisedModel):
    """Trains the tiny network; each validation of epoch e reports ``scores[e]`` as ``score``."""

    def __init__(self, scores: Sequence[float]) -> None:
        base = make_model()
        super().__init__(base.network, nn.CrossEntropyLoss(), optimizer=base.optimizer_factory)
        self.scores = list(scores)
        self.epoch = 0

    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        outputs = dict(super().evaluation_step(batch))
        outputs["score"] = torch.tensor(self.scores[self.epoch])
        return outputs


def score_metrics() -> dict[str, LossMetricConfig]:
    return {"loss": LossMetricConfig(), "score": LossMetricConfig(loss_name="score")}


def scripted_trainer(
    maps: Path,
    scores: Sequence[float],
    callbacks: Sequence[Callback],
    *,
    resume: bool = False,
) -> tuple[Trainer, dict[int, Weights]]:
    """A Trainer (or one rebuilt on ``maps``) whose epochs report ``scores``; copies per epoch."""
    model = ScriptedScoreModel(scores)
    if resume:
        trainer = Trainer.from_maps(
            maps, model, score_metrics(), callbacks, default_callbacks=False
        )
    else:
        trainer = Trainer(
            maps,
            model,
            score_metrics(),
            callbacks,
            default_callbacks=False,
            max_epochs=len(scores),
        )
    copies: dict[int, Weights] = {}

    @trainer.on("validation_start", priority=100)
    def follow(*, state: TrainerState) -> None:
        model.epoch = state.current_epoch

    @trainer.on("epoch_end")
    def copy(*, state: TrainerState, model: nn.Module) -> None:
        copies[state.current_epoch] = weights_of(model)

    return trainer, copies


def tags_in(maps: Path) -> list[str]:
    root = maps / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def metadata_of(maps: Path, tag: str) -> dict[str, Any]:
    metadata: dict[str, Any] = read_manifest(maps / "checkpoints" / tag)["metadata"]
    return metadata


def validation_values(maps: Path, metric: str) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` from the validation rows of metrics.tsv."""
    rows = Maps(maps).read_rows("metrics.tsv")
    return {int(r["epoch"]): float(r[metric]) for r in rows if r["stage"] == "validation"}


def k_best(values: Mapping[int, float], k: int, mode: str) -> list[int]:
    """Epochs of the k best finite values, best first (earlier epoch first on ties)."""
    ranked = sorted(
        (e for e, v in values.items() if not math.isnan(v)),
        key=lambda e: (values[e] if mode == "min" else -values[e], e),
    )
    return ranked if k == -1 else ranked[:k]


def same_value(left: float | None, right: float | None) -> bool:
    if left is None or right is None:
        return left is right
    return left == right or (math.isnan(left) and math.isnan(right))


def named(callback: ModelCheckpointCallback, callback_id: str) -> ModelCheckpointCallback:
    callback.callback_id = callback_id
    return callback


# ------------------------------------------------------------------------------------ options
OPTION_CASES = [
    pytest.param(
        {"metric": "score", "mode": "max", "save_last": False},
        SCORES,
        {"best-score": 3},
        id="best-max",
    ),
    pytest.param(
        {"metric": "score", "mode": "min", "save_last": False},
        SCORES,
        {"best-score": 0},
        id="best-min",
    ),
    pytest.param(
        {"metric": "score", "mode": "max", "top_k": 2, "save_last": False},
        SCORES,
        {"best-score": 3, "best-score-epoch-3": 3, "best-score-epoch-4": 4},
        id="top-2-max",
    ),
    pytest.param(
        {"metric": "score", "mode": "min", "top_k": 3, "save_last": False},
        SCORES,
        {
            "best-score": 0,
            "best-score-epoch-0": 0,
            "best-score-epoch-1": 1,
            "best-score-epoch-2": 2,
        },
        id="top-3-min",
    ),
    pytest.param(
        {"metric": "score", "mode": "max", "top_k": -1, "save_last": False},
        SCORES,
        {"best-score": 3, **{f"best-score-epoch-{e}": e for e in range(5)}},
        id="top-all",
    ),
    pytest.param(
        {"metric": "score", "mode": "max", "top_k": 2, "save_last": False},
        (nan, 2.0, nan, 1.0, nan),
        {"best-score": 1, "best-score-epoch-1": 1, "best-score-epoch-3": 3},
        id="nan-never-ranked",
    ),
    pytest.param(
        {"epochs": [0, 3], "save_last": False}, SCORES, {"epoch-0": 0, "epoch-3": 3}, id="epochs"
    ),
    pytest.param(
        {"epochs": range(1, 100, 2), "save_last": False},
        SCORES,
        {"epoch-1": 1, "epoch-3": 3},
        id="epochs-range",
    ),
    pytest.param(
        {"every_n_epochs": 2, "save_last": False},
        SCORES,
        {"epoch-1": 1, "epoch-3": 3},
        id="every-2-epochs",
    ),
    pytest.param(
        {"epochs": {0}, "every_n_epochs": 2, "save_last": False},
        SCORES,
        {"epoch-0": 0, "epoch-1": 1, "epoch-3": 3},
        id="epochs-and-every",
    ),
    pytest.param({}, SCORES, {"last": 4}, id="last"),
    pytest.param(
        {"metric": "score", "mode": "max", "top_k": 2, "epochs": [1], "prefix": "a-"},
        SCORES,
        {
            "a-best-score": 3,
            "a-best-score-epoch-3": 3,
            "a-best-score-epoch-4": 4,
            "a-epoch-1": 1,
            "a-last": 4,
        },
        id="prefix-everything",
    ),
]


@pytest.mark.parametrize(("arguments", "scores", "expected"), OPTION_CASES)
def test_each_option_keeps_its_checkpoints_with_metric_value_and_epoch(
    maps_path: Path, arguments: dict[str, Any], scores: Sequence[float], expected: dict[str, int]
) -> None:
    callback = ModelCheckpointCallback(**arguments)
    trainer, copies = scripted_trainer(maps_path, scores, [MetricsWriterCallback(), callback])
    trainer.train(make_loader(), make_loader(16))
    assert tags_in(maps_path) == sorted(expected)
    values = validation_values(maps_path, "score")
    for tag, epoch in expected.items():
        metadata = metadata_of(maps_path, tag)
        assert metadata["epoch"] == epoch
        assert same_weights(stored_weights(maps_path / "checkpoints" / tag), copies[epoch])
        if callback.metric is None:
            assert "metric" not in metadata
        else:
            assert metadata["metric"] == "score"
            assert metadata["mode"] == arguments["mode"]
            assert same_value(metadata["value"], values[epoch])
    assert callback.created == set(expected)


TOP_K_CASES = [
    pytest.param("score", 2, "max", (1.0, 3.0, 2.0, 5.0, 4.0, 0.0, 6.0), id="top-2-max"),
    pytest.param("score", 3, "min", (5.0, 4.0, 6.0, 1.0, 3.0, 2.0, 0.5), id="top-3-min"),
    pytest.param("score", 2, "max", (nan, 1.0, nan, 3.0, 2.0, nan, 2.5), id="with-nan"),
    pytest.param("score", 2, "max", (2.0, 2.0, 1.0, 2.0, 3.0), id="ties-keep-the-earlier"),
    pytest.param("loss", 2, "min", (0.0,) * 6, id="real-validation-loss"),
]


@pytest.mark.parametrize(("metric", "top_k", "mode", "scores"), TOP_K_CASES)
def test_top_k_keeps_exactly_the_k_best_of_metrics_tsv(
    maps_path: Path,
    metric: str,
    top_k: int,
    mode: Literal["min", "max"],
    scores: Sequence[float],
) -> None:
    callback = ModelCheckpointCallback(metric, top_k=top_k, mode=mode, save_last=False)
    trainer, copies = scripted_trainer(maps_path, scores, [MetricsWriterCallback(), callback])
    written: list[str] = []

    @trainer.on("checkpoint")
    def record(*, tag: str, kind: str) -> None:
        written.append(tag)

    trainer.train(make_loader(), flipped_loader())
    values = validation_values(maps_path, metric)
    assert len(values) == len(scores)
    best = k_best(values, top_k, mode)
    ranked = {f"best-{metric}-epoch-{e}": e for e in best}
    assert tags_in(maps_path) == sorted([*ranked, f"best-{metric}"])
    assert [(e.epoch, e.tag) for e in callback.top] == [
        (e, f"best-{metric}-epoch-{e}") for e in best
    ]
    for tag, epoch in ranked.items():
        metadata = metadata_of(maps_path, tag)
        assert (metadata["metric"], metadata["epoch"], metadata["value"]) == (
            metric,
            epoch,
            values[epoch],
        )
        assert same_weights(stored_weights(maps_path / "checkpoints" / tag), copies[epoch])
    single = metadata_of(maps_path, f"best-{metric}")
    assert (single["epoch"], single["value"]) == (best[0], values[best[0]])
    assert callback.best == values[best[0]]
    if metric == "score":
        # Models that left the top k were written, then deleted.
        evicted = {t for t in written if t.startswith("best-score-epoch-")} - set(ranked)
        assert evicted


def test_a_model_leaving_the_top_k_is_deleted_only_after_its_replacement_is_committed(
    maps_path: Path,
) -> None:
    callback = ModelCheckpointCallback("score", mode="max", top_k=2, save_last=False)
    trainer, _ = scripted_trainer(maps_path, (1.0, 2.0, 3.0), [callback])
    seen_at_commit: dict[str, list[str]] = {}

    @trainer.on("checkpoint", priority=0)  # before the callback's own handler (-500)
    def look(*, tag: str) -> None:
        seen_at_commit[tag] = tags_in(maps_path)

    trainer.train(make_loader(), make_loader(16))
    assert "best-score-epoch-0" in seen_at_commit["best-score-epoch-2"]
    assert "best-score-epoch-2" in seen_at_commit["best-score-epoch-2"]
    assert tags_in(maps_path) == ["best-score", "best-score-epoch-1", "best-score-epoch-2"]


TWO_INSTANCE_CASES = [
    pytest.param(
        lambda: ModelCheckpointCallback("score", mode="max", top_k=2),
        lambda: ModelCheckpointCallback("score", mode="max", top_k=2, prefix="b-"),
        id="one-metric-two-prefixes",
    ),
    pytest.param(
        lambda: ModelCheckpointCallback("score", mode="max", top_k=2, save_last=False),
        lambda: ModelCheckpointCallback("loss", top_k=2, every_n_epochs=2),
        id="two-metrics",
    ),
    pytest.param(
        lambda: ModelCheckpointCallback("score", mode="max", top_k=2),
        lambda: ModelCheckpointCallback(
            "score", mode="min", top_k=3, prefix="low-", epochs=range(5)
        ),
        id="best-and-worst",
    ),
]


@pytest.mark.parametrize(("first", "second"), TWO_INSTANCE_CASES)
def test_two_instances_in_one_maps_keep_their_own_files(
    maps_path: Path,
    first: Callable[[], ModelCheckpointCallback],
    second: Callable[[], ModelCheckpointCallback],
) -> None:
    callbacks = [first(), second()]
    trainer, _ = scripted_trainer(maps_path, SCORES, [MetricsWriterCallback(), *callbacks])
    check_tag_conflicts(trainer.callbacks)
    trainer.train(make_loader(), flipped_loader())
    assert [c.callback_id for c in callbacks] == [
        "ModelCheckpointCallback",
        "ModelCheckpointCallback#2",
    ]
    assert callbacks[0].created.isdisjoint(callbacks[1].created)
    assert set(tags_in(maps_path)) == callbacks[0].created | callbacks[1].created
    for callback in callbacks:
        assert callback.metric is not None and callback.mode is not None
        values = validation_values(maps_path, callback.metric)
        best = k_best(values, callback.top_k, callback.mode)
        assert [e.epoch for e in callback.top] == best
        for tag in callback.created:
            owner = metadata_of(maps_path, tag)["requested_by"]
            assert owner.startswith(f"{callback.callback_id}.")
        for entry in callback.top:
            assert metadata_of(maps_path, entry.tag)["value"] == values[entry.epoch]


# ------------------------------------------------------------------------------ tag conflicts
CONFLICT_CASES = [
    pytest.param(
        lambda: [ModelCheckpointCallback(), ModelCheckpointCallback()], r"'last'", id="two-lasts"
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback("loss", save_last=False),
            ModelCheckpointCallback("loss", top_k=3, save_last=False),
        ],
        r"'best-loss'",
        id="same-metric",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback("loss", top_k=2, save_last=False),
            ModelCheckpointCallback(epochs=[3], save_last=False, prefix="best-loss-"),
        ],
        r"pattern 'best-loss-epoch-\{n\}' \(e\.g\. 'best-loss-epoch-3'\)",
        id="ranked-pattern-across-prefixes",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback("last", mode="max", save_last=False),
            ModelCheckpointCallback(prefix="best-"),
        ],
        r"'best-last'",
        id="best-tag-equals-a-prefixed-last",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(epochs=range(0, 10, 3), save_last=False),
            ModelCheckpointCallback(epochs=[6, 7], save_last=False),
        ],
        r"pattern 'epoch-\{n\}' \(e\.g\. 'epoch-6'\)",
        id="epochs-overlap",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(epochs=range(0, 10, 2), save_last=False),
            ModelCheckpointCallback(epochs=range(10, 0, -3), save_last=False),
        ],
        r"pattern 'epoch-\{n\}' \(e\.g\. 'epoch-4'\)",
        id="ranges-overlap",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(every_n_epochs=2, save_last=False),
            ModelCheckpointCallback(every_n_epochs=3, save_last=False),
        ],
        r"pattern 'epoch-\{n\}' \(e\.g\. 'epoch-5'\)",
        id="every-n-overlap",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(epochs={2, 9}, save_last=False),
            ModelCheckpointCallback(every_n_epochs=5, save_last=False),
        ],
        r"pattern 'epoch-\{n\}' \(e\.g\. 'epoch-9'\)",
        id="epochs-and-every-n-overlap",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(epochs=EvenEpochs(), save_last=False),
            ModelCheckpointCallback(every_n_epochs=7, save_last=False),
        ],
        r"pattern 'epoch-\{n\}' \(an epochs container that cannot be enumerated",
        id="opaque-container",
    ),
]


class EvenEpochs:
    """A container of epochs that can only answer membership."""

    def __contains__(self, epoch: object) -> bool:
        return isinstance(epoch, int) and epoch % 2 == 0


@pytest.mark.parametrize(("build", "shared"), CONFLICT_CASES)
def test_instances_that_could_write_one_tag_are_refused(
    build: Callable[[], list[ModelCheckpointCallback]], shared: str
) -> None:
    first, second = build()
    callbacks: list[Callback] = [
        EarlyStoppingCallback("loss"),
        named(first, "ModelCheckpointCallback"),
        named(second, "ModelCheckpointCallback#2"),
    ]
    with pytest.raises(
        ConfigurationError,
        match=r"^ModelCheckpointCallback and ModelCheckpointCallback#2 could both write the "
        rf"checkpoint tag {shared}.*give each a distinct prefix, e\.g\. .*prefix=",
    ):
        check_tag_conflicts(callbacks)
    # The conflict is real: run over 60 epochs, both would write at least one same tag.
    assert _tags_written_in(first, 60) & _tags_written_in(second, 60)


def test_a_conflict_between_instances_with_one_id_names_their_positions() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"ModelCheckpointCallback \(callbacks\[0\]\) and ModelCheckpointCallback "
        r"\(callbacks\[2\]\) could both write the checkpoint tag 'last'",
    ):
        check_tag_conflicts(
            [ModelCheckpointCallback(), EarlyStoppingCallback("loss"), ModelCheckpointCallback()]
        )


NO_CONFLICT_CASES = [
    pytest.param(
        lambda: [ModelCheckpointCallback(), ModelCheckpointCallback(prefix="b-")], id="prefix"
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback("loss", top_k=2),
            ModelCheckpointCallback("score", mode="max", top_k=2, save_last=False),
        ],
        id="two-metrics",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(epochs=range(0, 10**9, 2), save_last=False),
            ModelCheckpointCallback(epochs=range(1, 10**9, 2)),
        ],
        id="disjoint-huge-ranges",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(epochs={0, 2, 4}, save_last=False),
            ModelCheckpointCallback(every_n_epochs=2),
        ],
        id="epochs-between-every-n",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback(epochs=range(0, 50, 4), save_last=False),
            ModelCheckpointCallback(epochs=range(2, 50, 4), save_last=False),
        ],
        id="interleaved-ranges",
    ),
    pytest.param(
        lambda: [
            ModelCheckpointCallback("loss", top_k=-1),
            ModelCheckpointCallback(every_n_epochs=1, save_last=False),
        ],
        id="ranked-and-epoch-tags",
    ),
    pytest.param(lambda: [ModelCheckpointCallback("loss")], id="one-instance"),
]


@pytest.mark.parametrize("build", NO_CONFLICT_CASES)
def test_instances_with_disjoint_tags_pass_the_conflict_check(
    build: Callable[[], list[ModelCheckpointCallback]],
) -> None:
    callbacks = build()
    for index, callback in enumerate(callbacks[1:], 2):
        callback.callback_id = f"ModelCheckpointCallback#{index}"
    check_tag_conflicts([EarlyStoppingCallback("loss"), *callbacks])
    tags = [_tags_written_in(c, 60) for c in callbacks]
    assert all(tags)
    for index, own in enumerate(tags):
        for other in tags[index + 1 :]:
            assert own.isdisjoint(other)


def _tags_written_in(callback: ModelCheckpointCallback, epochs: int) -> set[str]:
    """Every tag the callback could write in ``epochs`` epochs of improving metrics."""
    tags: set[str] = set()
    for epoch in range(epochs):
        state = TrainerState(current_epoch=epoch, iteration=epoch + 1)
        if callback.metric is not None:
            value = -epoch if callback.mode == "min" else epoch
            callback.on_validation_end(metrics={callback.metric: value})
        tags.update(command.tag for command in callback.on_epoch_end(state=state))
    return tags


# ------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"metric": ""}, r"metric='' is not a metric name or None"),
        ({"metric": 5}, r"metric=5 is not a metric name or None"),
        (
            {"metric": "précision", "mode": "max"},
            r"prefix='' and metric='précision' make checkpoint tags such as 'best-précision'.*"
            r"not a safe directory name",
        ),
        ({"epochs": 5}, r"epochs=5 is not a collection of epoch numbers"),
        ({"epochs": True}, r"epochs=True is not a collection of epoch numbers"),
        ({"epochs": "0,1"}, r"epochs='0,1' is not a collection of epoch numbers"),
        ({"epochs": [1, "2"]}, r"epochs=\[1, '2'\] holds '2', which is not an epoch number"),
        ({"epochs": [True]}, r"epochs=\[True\] holds True, which is not an epoch number"),
        ({"epochs": {1.0}}, r"epochs=\{1\.0\} holds 1\.0, which is not an epoch number"),
        ({"epochs": [-1, 2]}, r"epochs=\[-1, 2\] holds -1, which is not an epoch number"),
        ({"epochs": range(-2, 3)}, r"epochs=range\(-2, 3\) holds negative epochs; .*0-based"),
        ({"epochs": []}, r"epochs=\[\] is empty; pass None to keep no epoch checkpoints"),
        ({"epochs": range(3, 3)}, r"epochs=range\(3, 3\) is empty"),
        ({"save_last": "yes"}, r"save_last='yes' is not a bool"),
        ({"save_last": 1}, r"save_last=1 is not a bool"),
        ({"metric": "loss", "top_k": 0}, r"top_k=0 would keep no model; pass top_k=1"),
        ({"metric": "loss", "top_k": -2}, r"top_k=-2 is not a positive integer or -1"),
        ({"metric": "loss", "top_k": True}, r"top_k=True is not a positive integer or -1"),
        ({"metric": "loss", "top_k": 1.5}, r"top_k=1\.5 is not a positive integer or -1"),
        ({"top_k": 3}, r"top_k=3 ranks models by a metric, but metric is None"),
        ({"metric": "loss", "mode": "lowest"}, r"mode='lowest' is not 'min' or 'max'"),
        ({"mode": "max"}, r"mode='max' is given without a metric"),
        ({"every_n_epochs": 0}, r"every_n_epochs=0 is not a positive integer or None"),
        ({"every_n_epochs": True}, r"every_n_epochs=True is not a positive integer or None"),
        ({"every_n_epochs": 2.0}, r"every_n_epochs=2\.0 is not a positive integer or None"),
        ({"prefix": "../x"}, r"prefix='\.\./x' is not a safe tag prefix"),
        ({"prefix": "a/b-"}, r"prefix='a/b-' is not a safe tag prefix"),
        ({"prefix": ".hidden-"}, r"prefix='\.hidden-' is not a safe tag prefix"),
        ({"prefix": "a..b"}, r"prefix='a\.\.b' is not a safe tag prefix"),
        ({"prefix": 3}, r"prefix=3 is not a safe tag prefix"),
        ({"prefix": "x" * 120}, r"make checkpoint tags such as 'x+epoch-999999'.*at most 128"),
    ],
)
def test_bad_model_checkpoint_arguments_are_refused(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ModelCheckpointCallback(**arguments)


def test_epochs_may_be_any_container_of_ints(maps_path: Path) -> None:
    callback = ModelCheckpointCallback(epochs=EvenEpochs(), save_last=False)
    trainer, _ = scripted_trainer(maps_path, SCORES, [callback])
    trainer.train(make_loader(16))
    assert tags_in(maps_path) == ["epoch-0", "epoch-2", "epoch-4"]


# ---------------------------------------------------------------------------------- state
def test_config_describes_the_callback() -> None:
    callback = ModelCheckpointCallback(metric="val_loss", epochs=range(4), top_k=2, prefix="a-")
    assert callback.mode == "min"
    assert callback.config() == {
        "metric": "val_loss",
        "epochs": "range(0, 4)",
        "every_n_epochs": None,
        "save_last": True,
        "top_k": 2,
        "mode": "min",
        "prefix": "a-",
    }


def test_state_dict_round_trips_the_ranking_through_a_weights_only_load(
    maps_path: Path, tmp_path: Path
) -> None:
    callback = ModelCheckpointCallback("score", mode="max", top_k=2)
    trainer, _ = scripted_trainer(maps_path, SCORES, [callback])
    trainer.train(make_loader(), make_loader(16))
    state = callback.state_dict()
    assert state["top"] == [
        {"value": 5.0, "epoch": 3, "tag": "best-score-epoch-3"},
        {"value": 4.0, "epoch": 4, "tag": "best-score-epoch-4"},
    ]
    assert state["created"] == ["best-score", "best-score-epoch-3", "best-score-epoch-4", "last"]
    assert (state["best"], state["best_epoch"], state["pending"]) == (5.0, 3, [])
    torch.save(state, tmp_path / "state.pt")
    for loaded in (
        torch.load(tmp_path / "state.pt", weights_only=True),
        json.loads(json.dumps(state)),
    ):
        restored = ModelCheckpointCallback("score", mode="max", top_k=2)
        restored.load_state_dict(loaded)
        assert restored.state_dict() == state
        assert restored.top == callback.top
        assert restored.created == callback.created
        assert restored.last_iteration == trainer.state.iteration
        # The restored ranking goes on: 4.5 enters and pushes epoch 4 out, 4.0 does not.
        restored.on_validation_end(metrics={"score": 4.5})
        saves = restored.on_epoch_end(state=TrainerState(current_epoch=5, iteration=36))
        assert [s.tag for s in saves] == ["best-score-epoch-5", "last"]
        assert [e.tag for e in restored.top] == ["best-score-epoch-3", "best-score-epoch-5"]


def test_a_state_of_the_single_best_only_still_loads() -> None:
    restored = ModelCheckpointCallback(metric="val_loss")
    restored.load_state_dict({"best": 0.25})
    assert restored.best == 0.25
    restored.on_validation_end(metrics={"val_loss": 0.5})
    assert [c.tag for c in restored.on_epoch_end(state=TrainerState())] == ["last"]
    restored.on_validation_end(metrics={"val_loss": 0.125})
    assert [c.tag for c in restored.on_epoch_end(state=TrainerState())] == [
        "best-val_loss",
        "last",
    ]


@pytest.mark.parametrize(
    "changed",
    [
        {"metric": "loss"},
        {"mode": "min"},
        {"top_k": 3},
        {"prefix": "b-"},
    ],
)
def test_a_state_saved_with_another_ranking_is_refused(changed: dict[str, Any]) -> None:
    original = ModelCheckpointCallback("score", mode="max", top_k=2)
    arguments: dict[str, Any] = {"metric": "score", "mode": "max", "top_k": 2, **changed}
    other = ModelCheckpointCallback(**arguments)
    with pytest.raises(
        ConfigurationError,
        match=r"the saved state ranks with .*'metric': 'score'.*resume with the same metric, "
        r"mode, top_k and prefix",
    ):
        other.load_state_dict(original.state_dict())


# --------------------------------------------------------------------------------- resume
class SimulatedCrashError(Exception):
    """Raised by a test handler to cut a run short, as a crash would."""


RESUME_CHECKED = ("metric", "value", "mode", "epoch", "iteration", "global_step")


def assert_same_checkpoints(reference: Path, resumed: Path) -> None:
    assert tags_in(resumed) == tags_in(reference)
    for tag in tags_in(reference):
        expected = metadata_of(reference, tag)
        actual = metadata_of(resumed, tag)
        assert {k: actual.get(k) for k in RESUME_CHECKED} == {
            k: expected.get(k) for k in RESUME_CHECKED
        }
        assert same_weights(
            stored_weights(resumed / "checkpoints" / tag),
            stored_weights(reference / "checkpoints" / tag),
        )


def resume_callbacks(every_n_epochs: int) -> list[Callback]:
    return [
        MetricsWriterCallback(),
        ModelCheckpointCallback("score", mode="max", top_k=2),
        TrainingCheckpointCallback(every_n_epochs=every_n_epochs),
    ]


def interrupted_then_resumed(
    tmp_path: Path,
    scores: Sequence[float],
    every_n_epochs: int,
    crash: Callable[[Trainer], None],
) -> tuple[Path, list[tuple[list[str], list[str]]], ModelCheckpointCallback, list[str]]:
    """Train ``scores`` uninterrupted into ``reference``, and with ``crash`` then a resume.

    Returns the interrupted MAPS, what the checkpoints and the ranking were right after the
    callback handled ``resume``, the resumed callback, and the tags left by the interruption.
    """
    reference, _ = scripted_trainer(
        tmp_path / "reference", scores, resume_callbacks(every_n_epochs)
    )
    reference.train(make_loader(), make_loader(16))
    maps = tmp_path / "maps"
    trainer, _ = scripted_trainer(maps, scores, resume_callbacks(every_n_epochs))
    crash(trainer)
    with pytest.raises(SimulatedCrashError):
        trainer.train(make_loader(), make_loader(16))
    interrupted = tags_in(maps)
    callbacks = resume_callbacks(every_n_epochs)
    callback = callbacks[1]
    assert isinstance(callback, ModelCheckpointCallback)
    resumed, _ = scripted_trainer(maps, scores, callbacks, resume=True)
    at_resume: list[tuple[list[str], list[str]]] = []

    @resumed.on("resume", priority=-600)  # after the callback's own handler (-500)
    def look() -> None:
        at_resume.append((tags_in(maps), [e.tag for e in callback.top]))

    resumed.train(make_loader(), make_loader(16))
    assert_same_checkpoints(tmp_path / "reference", maps)
    assert callback.created == set(tags_in(maps))
    assert callback.state_dict()["pending"] == []
    return maps, at_resume, callback, interrupted


def test_a_crash_between_the_weights_and_the_training_state_keeps_the_ranking_right(
    tmp_path: Path,
) -> None:
    def crash_after_epoch_3_weights(trainer: Trainer) -> None:
        @trainer.on("checkpoint")
        def crash(*, state: TrainerState, tag: str, kind: str) -> None:
            # The weights of epoch 3 are committed, its training state is never written.
            if kind == "weights" and tag == "last" and state.current_epoch == 3:
                raise SimulatedCrashError

    scores = (1.0, 2.0, 0.0, 3.0, 2.5)
    maps, at_resume, callback, interrupted = interrupted_then_resumed(
        tmp_path, scores, 1, crash_after_epoch_3_weights
    )
    # Epoch 3 entered the top 2 and deleted epoch 0 before the crash.
    assert interrupted == ["best-score", "best-score-epoch-1", "best-score-epoch-3", "last"]
    # Resumed from the end of epoch 2: epoch 3 is replayed, so its ranked model is stale, and
    # epoch 0, gone, leaves the ranking.
    assert at_resume == [(["best-score", "best-score-epoch-1", "last"], ["best-score-epoch-1"])]
    values = validation_values(maps, "score")
    assert k_best(values, 2, "max") == [3, 4]
    assert tags_in(maps) == ["best-score", "best-score-epoch-3", "best-score-epoch-4", "last"]
    assert metadata_of(maps, "best-score")["epoch"] == 3
    assert metadata_of(maps, "best-score")["value"] == values[3] == callback.best


def test_a_resume_from_an_older_state_removes_ranked_models_of_the_replayed_epochs(
    tmp_path: Path,
) -> None:
    def crash_at_epoch_3(trainer: Trainer) -> None:
        @trainer.on("epoch_start")
        def crash(*, state: TrainerState) -> None:
            if state.current_epoch == 3:
                raise SimulatedCrashError

    scores = (1.0, 2.0, 3.0, 0.0, 2.5)
    # Training states every 2 epochs: the newest is from the end of epoch 1.
    maps, at_resume, callback, interrupted = interrupted_then_resumed(
        tmp_path, scores, 2, crash_at_epoch_3
    )
    assert interrupted == ["best-score", "best-score-epoch-1", "best-score-epoch-2", "last"]
    assert at_resume == [(["best-score", "best-score-epoch-1", "last"], ["best-score-epoch-1"])]
    values = validation_values(maps, "score")
    assert k_best(values, 2, "max") == [2, 4]
    assert tags_in(maps) == ["best-score", "best-score-epoch-2", "best-score-epoch-4", "last"]
    assert [e.tag for e in callback.top] == ["best-score-epoch-2", "best-score-epoch-4"]
    assert metadata_of(maps, "best-score")["epoch"] == 2


def test_saves_asked_at_the_restored_boundary_but_never_committed_are_asked_again(
    maps_path: Path,
) -> None:
    callback = ModelCheckpointCallback("score", mode="max", top_k=2)
    trainer, copies = scripted_trainer(maps_path, (1.0, 2.0, 3.0), [callback])
    captured: list[dict[str, Any]] = []

    @trainer.on("epoch_end", priority=-600)  # after the callback asked for its saves
    def crash(*, state: TrainerState) -> None:
        if state.current_epoch == 2:
            captured.append(callback.state_dict())
            raise SimulatedCrashError

    with pytest.raises(SimulatedCrashError):
        trainer.train(make_loader(), make_loader(16))
    saved = torch.load(io_buffer(captured[0]), weights_only=True)
    assert [p["tag"] for p in saved["pending"]] == ["best-score-epoch-2", "best-score", "last"]
    assert tags_in(maps_path) == ["best-score", "best-score-epoch-0", "best-score-epoch-1", "last"]

    restored = ModelCheckpointCallback("score", mode="max", top_k=2)
    restored.load_state_dict(saved)
    maps = Maps(maps_path)
    # The last save was committed before the interruption: it is not asked again.
    model = make_model()
    model.load_state_dict(copies[2])
    save_weights(
        maps,
        "last",
        model,
        metadata={"requested_by": "ModelCheckpointCallback.on_epoch_end", "iteration": 18},
    )
    state = TrainerState(current_epoch=2, iteration=18)
    asked = restored.on_resume(state=state, maps=maps)
    assert [(s.tag, dict(s.metadata)["epoch"]) for s in asked] == [
        ("best-score-epoch-2", 2),
        ("best-score", 2),
    ]
    assert "best-score-epoch-0" in tags_in(maps_path)
    for save in asked:
        path = save_weights(maps, save.tag, model, metadata=dict(save.metadata))
        restored.on_checkpoint(checkpoint=path, tag=save.tag, kind="weights")
    # Epoch 0 left the top 2 at epoch 2: deleted once epoch 2's model is committed.
    assert tags_in(maps_path) == ["best-score", "best-score-epoch-1", "best-score-epoch-2", "last"]
    assert restored.created == set(tags_in(maps_path))
    assert restored.state_dict()["pending"] == []
    stale = ModelCheckpointCallback("score", mode="max", top_k=2)
    stale.load_state_dict(saved)
    # Asked at another boundary: the weights restored are not the ones it was asked for.
    assert stale.on_resume(state=TrainerState(current_epoch=3, iteration=24), maps=maps) == []


def io_buffer(state: dict[str, Any]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_last_is_saved_at_train_end_when_no_epoch_ran(maps_path: Path) -> None:
    first = Trainer(
        maps_path,
        make_model(),
        callbacks=[TrainingCheckpointCallback()],
        default_callbacks=False,
        max_epochs=2,
    )
    first.train(make_loader())
    assert tags_in(maps_path) == []
    model = make_model(seed=7)
    resumed = Trainer.from_maps(
        maps_path,
        model,
        callbacks=[ModelCheckpointCallback(), TrainingCheckpointCallback()],
        default_callbacks=False,
    )
    with pytest.warns(TrainbusWarning, match=r"\['ModelCheckpointCallback'\] start without"):
        resumed.train(make_loader())
    assert tags_in(maps_path) == ["last"]
    assert metadata_of(maps_path, "last")["event"] == "train_end"
    assert same_weights(stored_weights(maps_path / "checkpoints" / "last"), weights_of(model))
    assert same_weights(weights_of(model), weights_of(first.model))


def test_the_trainer_refuses_two_checkpoint_callbacks_that_would_share_a_tag(
    maps_path: Path,
) -> None:
    message = r"ModelCheckpointCallback#2 could both write .*'best-loss'.*prefix="
    with pytest.raises(ConfigurationError, match=message):
        Trainer(
            maps_path,
            make_model(),
            callbacks=[ModelCheckpointCallback("loss"), ModelCheckpointCallback("loss")],
        )
    assert not maps_path.exists()
