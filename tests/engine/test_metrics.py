from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torchmetrics
import torchmetrics.aggregation
from torch import nn

from trainbus import LossMetricConfig, SupervisedModel, TorchMetricConfig, Trainer, TrainerState
from trainbus.engine.metrics import MetricInfo, bind_metrics, is_better
from trainbus.errors import ConfigurationError, ConfigurationTypeError, ModelContractError

from ..conftest import make_dataset, make_loader, make_model


def accuracy_metric(**options: Any) -> torchmetrics.Metric:
    return torchmetrics.Accuracy(task="multiclass", num_classes=2, **options)


class RenamedOutputsModel(SupervisedModel):
    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        inputs, target = batch
        logits = self.network(inputs)
        return {"loss": self.loss(logits, target), "logits": logits, "labels": target}


def test_default_metrics_are_the_mean_loss() -> None:
    bound = bind_metrics(None)
    assert list(bound) == ["loss"]
    assert bound["loss"].higher_is_better is False


@pytest.mark.parametrize(
    ("metrics", "error", "message"),
    [
        pytest.param(
            ["loss"], ConfigurationTypeError, r"metrics=\['loss'\] is not a mapping", id="list"
        ),
        pytest.param(
            {"val-loss": LossMetricConfig()},
            ConfigurationError,
            r"metric name 'val-loss' is not an identifier",
            id="name",
        ),
        pytest.param(
            {"accuracy": "accuracy"},
            ConfigurationTypeError,
            r"metric 'accuracy' is 'accuracy'; expected LossMetricConfig, TorchMetricConfig or "
            r"a torchmetrics\.Metric",
            id="spec",
        ),
    ],
)
def test_bad_metric_specifications_are_refused(
    maps_path: Any, metrics: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Trainer(maps_path, make_model(), metrics=metrics)  # type: ignore[arg-type]
    assert not maps_path.exists()


@pytest.mark.parametrize("loss_name", ["", None, 3])
def test_loss_metric_config_needs_a_key(loss_name: object) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a non-empty string"):
        LossMetricConfig(loss_name=loss_name)  # type: ignore[arg-type]


def test_mean_loss_is_weighted_by_batch_size(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(device="cpu")
    loader = make_loader(samples=20, batch_size=8, seed=2)
    network = trainer.model.network
    with torch.no_grad():
        per_batch = [nn.functional.cross_entropy(network(x), y).item() for x, y in loader]
        inputs, target = make_dataset(20, seed=2).tensors
        expected = nn.functional.cross_entropy(network(inputs), target).item()
    value = trainer.validate(loader)["loss"]
    assert value == pytest.approx(expected, rel=1e-5)
    assert value != pytest.approx(sum(per_batch) / len(per_batch), rel=1e-5)


def test_metrics_are_reset_between_passes(quiet_trainer: Callable[..., Trainer]) -> None:
    trainer = quiet_trainer(
        device="cpu", metrics={"loss": LossMetricConfig(), "accuracy": accuracy_metric()}
    )
    first = trainer.validate(make_loader(16))
    small = trainer.validate(make_loader(8, seed=4))
    again = trainer.validate(make_loader(16))
    assert first == again
    assert small != first


def test_a_torchmetrics_metric_is_computed_into_state_and_payload(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        metrics={"loss": LossMetricConfig(), "accuracy": accuracy_metric()},
        max_epochs=2,
    )
    payloads: list[tuple[str, dict[str, float]]] = []

    @trainer.on("metrics_computed")
    def record(*, metrics: Mapping[str, float], state: TrainerState) -> None:
        payloads.append((state.stage, dict(metrics)))

    val_loader = make_loader(24, seed=3)
    state = trainer.train(make_loader(), val_loader)
    inputs, target = make_dataset(24, seed=3).tensors
    with torch.no_grad():
        expected = (trainer.model.network(inputs).argmax(dim=1) == target).float().mean().item()
    assert [stage for stage, _ in payloads] == ["validation", "validation"]
    assert payloads[-1][1]["accuracy"] == pytest.approx(expected)
    assert dict(state.metrics) == payloads[-1][1]
    assert type(state.metrics["accuracy"]) is float
    assert 0.0 <= state.metrics["accuracy"] <= 1.0
    assert trainer.metrics["accuracy"].higher_is_better is True


def test_maps_json_names_each_metric_by_the_class_the_user_passed(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        metrics={
            "loss": LossMetricConfig(),
            "accuracy": accuracy_metric(),
            "wrapped": TorchMetricConfig(torchmetrics.MeanSquaredError()),
            "mean": torchmetrics.aggregation.MeanMetric(),
        },
        max_epochs=1,
    )
    assert {name: metric.info for name, metric in trainer.metrics.items()} == {
        "loss": MetricInfo("LossMetricConfig", higher_is_better=False, declared=False),
        "accuracy": MetricInfo("MulticlassAccuracy", higher_is_better=True, declared=True),
        "wrapped": MetricInfo("MeanSquaredError", higher_is_better=False, declared=True),
        "mean": MetricInfo("MeanMetric", higher_is_better=None, declared=False),
    }
    trainer.train(make_loader(16))
    recorded = trainer.maps.read_json("maps.json")["metrics"]
    assert recorded == {
        "loss": {"class": "LossMetricConfig", "higher_is_better": False},
        "accuracy": {"class": "MulticlassAccuracy", "higher_is_better": True},
        "wrapped": {"class": "MeanSquaredError", "higher_is_better": False},
        "mean": {"class": "MeanMetric", "higher_is_better": None},
    }


def test_torch_metric_config_reads_the_configured_keys(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    model = RenamedOutputsModel(make_model().network, nn.CrossEntropyLoss())
    metric = TorchMetricConfig(accuracy_metric(), preds="logits", target="labels")
    trainer = quiet_trainer(device="cpu", model=model, metrics={"accuracy": metric})
    inputs, target = make_dataset().tensors
    with torch.no_grad():
        expected = (model.network(inputs).argmax(dim=1) == target).float().mean().item()
    assert trainer.validate(make_loader()) == {"accuracy": pytest.approx(expected)}


def test_a_missing_output_key_names_the_key_and_what_is_there(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", metrics={"aux": LossMetricConfig(loss_name="aux_loss")})
    with pytest.raises(
        ModelContractError,
        match=r"metric 'aux' reads 'aux_loss' from evaluation_step's outputs, which hold "
        r"\['loss', 'preds', 'target'\]",
    ):
        trainer.validate(make_loader(16))


def test_a_loss_metric_over_a_non_scalar_output_names_its_shape(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", metrics={"bad": LossMetricConfig(loss_name="preds")})
    with pytest.raises(ModelContractError, match=r"'preds', which is a tensor of shape \(8, 2\)"):
        trainer.validate(make_loader(16))


def test_a_torchmetric_that_does_not_reduce_to_one_number_is_refused(
    quiet_trainer: Callable[..., Trainer],
) -> None:
    trainer = quiet_trainer(device="cpu", metrics={"per_class": accuracy_metric(average="none")})
    with pytest.raises(
        ModelContractError,
        match=r"metric 'per_class' computed a tensor of shape \(2,\); .*average='macro'",
    ):
        trainer.validate(make_loader(16))


class ConvertedOutputsModel(SupervisedModel):
    """Returns one evaluation output converted, as a model outside the contract would."""

    def __init__(self, key: str, convert: Callable[[torch.Tensor], Any]) -> None:
        base = make_model()
        super().__init__(base.network, nn.CrossEntropyLoss())
        self.key = key
        self.convert = convert

    def evaluation_step(self, batch: Any) -> Mapping[str, Any]:
        outputs = dict(super().evaluation_step(batch))
        outputs[self.key] = self.convert(outputs[self.key])
        return outputs


NON_TENSORS: list[Any] = [
    pytest.param(lambda t: t.tolist(), r"a list \(\[", id="list"),
    pytest.param(lambda t: t.numpy(), r"a numpy\.ndarray of shape \(8,( 2)?\)", id="numpy"),
    pytest.param(lambda t: None, r"None", id="none"),
]


@pytest.mark.parametrize("key", ["preds", "target"])
@pytest.mark.parametrize(("convert", "shown"), NON_TENSORS)
def test_a_torchmetric_fed_a_non_tensor_names_the_metric_and_the_key(
    quiet_trainer: Callable[..., Trainer], key: str, convert: Callable[..., Any], shown: str
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        model=ConvertedOutputsModel(key, convert),
        metrics={"val_accuracy": accuracy_metric()},
    )
    with pytest.raises(
        ModelContractError,
        match=rf"metric 'val_accuracy' reads evaluation_step's {key!r}, which is {shown}.*: "
        rf"return {key!r} as a torch\.Tensor",
    ):
        trainer.validate(make_loader(16))


@pytest.mark.parametrize(
    ("convert", "shown"),
    [
        pytest.param(lambda t: [t.item()], r"a list \(\[", id="list"),
        pytest.param(lambda t: t.item(), r"a float \(", id="float"),
        pytest.param(lambda t: t.numpy(), r"a numpy\.ndarray of shape \(\)", id="numpy"),
        pytest.param(lambda t: None, r"None", id="none"),
    ],
)
def test_a_loss_metric_fed_a_non_tensor_names_the_metric_and_the_key(
    quiet_trainer: Callable[..., Trainer], convert: Callable[..., Any], shown: str
) -> None:
    trainer = quiet_trainer(
        device="cpu",
        model=ConvertedOutputsModel("loss", lambda t: convert(t.detach())),
        metrics={"val_loss": LossMetricConfig()},
    )
    with pytest.raises(
        ModelContractError,
        match=rf"metric 'val_loss' reads evaluation_step's 'loss', which is {shown}.*; "
        r"return the batch's mean loss as a scalar tensor",
    ):
        trainer.validate(make_loader(16))


def test_a_torchmetric_refusing_its_tensors_names_the_metric_and_the_keys() -> None:
    bound = bind_metrics({"val_accuracy": accuracy_metric()})["val_accuracy"]
    outputs = {"preds": torch.zeros(8, 2), "target": torch.zeros(5, dtype=torch.long)}

    with pytest.raises(Exception) as info:  # noqa: PT011  # whatever torchmetrics raises
        bound.update(outputs, 8)

    notes = getattr(info.value, "__notes__", [])
    assert notes == [
        "trainbus: raised by metric 'val_accuracy' fed evaluation_step's 'preds' (a tensor of "
        "shape (8, 2)) and 'target' (a tensor of shape (5,)); return what this metric takes "
        "under these keys"
    ]


@pytest.mark.parametrize(
    ("value", "best", "higher_is_better", "expected"),
    [
        (1.0, None, False, True),
        (1.0, None, True, True),
        (0.5, 1.0, False, True),
        (1.5, 1.0, False, False),
        (1.0, 1.0, False, False),
        (1.5, 1.0, True, True),
        (0.5, 1.0, True, False),
        (1.0, 1.0, True, False),
        (0.5, 1.0, None, True),
        (math.nan, None, False, False),
        (math.nan, 1.0, True, False),
        (2.0, math.nan, False, True),
    ],
)
def test_is_better_follows_the_direction_and_ignores_nan(
    value: float, best: float | None, higher_is_better: bool | None, expected: bool
) -> None:
    assert is_better(value, best, higher_is_better) is expected
