"""The batch shapes SupervisedModel accepts: inputs-only batches for predict, a target otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import make_dataset, make_loader, make_model
from trainbus import Trainer
from trainbus.errors import ModelContractError

INPUTS, TARGET = make_dataset(20).tensors


def test_predict_runs_on_a_loader_of_inputs_only(tmp_path: Path) -> None:
    model = make_model()
    trainer = Trainer(tmp_path / "maps", model, default_callbacks=False, max_epochs=1)
    trainer.train(make_loader())
    outputs = trainer.predict(DataLoader(TensorDataset(INPUTS), batch_size=8))
    assert [tuple(output.shape) for output in outputs] == [(8, 2), (8, 2), (4, 2)]
    with torch.no_grad():
        expected = model.network(INPUTS)
    torch.testing.assert_close(torch.cat(outputs), expected)


@pytest.mark.parametrize(
    "batch",
    [
        INPUTS,
        (INPUTS,),
        [INPUTS],
        (INPUTS, TARGET),
        [INPUTS, TARGET],
        {"input": INPUTS},
        {"input": INPUTS, "target": TARGET},
    ],
    ids=["tensor", "1-tuple", "1-list", "pair", "2-list", "dict-inputs", "dict-pair"],
)
def test_predict_step_reads_the_inputs_of_every_batch_shape(batch: Any) -> None:
    model = make_model()
    with torch.no_grad():
        torch.testing.assert_close(model.predict_step(batch), model.network(INPUTS))


def test_predict_step_refuses_a_batch_it_cannot_read_inputs_from() -> None:
    with pytest.raises(
        ModelContractError,
        match=r"predict_step expects batches of inputs.*got a tuple of 3 items; .*override "
        "predict_step",
    ):
        make_model().predict_step((INPUTS, TARGET, TARGET))


@pytest.mark.parametrize("method", ["forward_step", "evaluation_step"])
@pytest.mark.parametrize(
    ("batch", "shown"),
    [
        ((INPUTS,), "a tuple of 1 item"),
        (INPUTS, "a tensor of shape (20, 4)"),
        ({"input": INPUTS}, "a dict with keys ['input']"),
    ],
    ids=["1-tuple", "tensor", "dict-inputs"],
)
def test_a_step_that_needs_a_target_says_the_batch_has_none(
    method: str, batch: Any, shown: str
) -> None:
    with pytest.raises(ModelContractError) as raised:
        getattr(make_model(), method)(batch)
    message = str(raised.value)
    assert f"SupervisedModel.{method} needs a target" in message
    assert f"the batch is {shown}: inputs only" in message
    assert "TensorDataset(X, y)" in message
    assert "inputs-only batches are for predict()" in message


def test_validating_on_inputs_only_fails_with_the_clear_error(tmp_path: Path) -> None:
    trainer = Trainer(tmp_path / "maps", make_model(), default_callbacks=False)
    with pytest.raises(ModelContractError, match=r"evaluation_step needs a target"):
        trainer.validate(DataLoader(TensorDataset(INPUTS), batch_size=8))


def test_a_batch_of_another_shape_names_the_method_to_override() -> None:
    with pytest.raises(
        ModelContractError,
        match=r"SupervisedModel.forward_step expects batches of \(inputs, target\).*got a "
        r"tuple of 3 items; .*override forward_step",
    ):
        make_model().forward_step((INPUTS, TARGET, TARGET))
