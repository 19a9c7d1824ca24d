"""A model's own backward_step and optimization_step are called on every path of the loop.

The loop has a direct optimizer step for the common case (one optimizer, no scaling, no
clipping, no accumulation): these tests keep it from skipping an override.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_loader, make_model
from trainbus import SupervisedModel, Trainer


class Counting(SupervisedModel):
    """Counts its hook calls; its optimization_step never changes the weights."""

    def __init__(self) -> None:
        base = make_model()
        super().__init__(base.network, base.loss, base.optimizer_factory)
        self.backward_calls = 0
        self.optimization_calls = 0

    def backward_step(self, loss: torch.Tensor) -> None:
        self.backward_calls += 1
        super().backward_step(loss)

    def optimization_step(
        self, optimizers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None
    ) -> None:
        self.optimization_calls += 1  # and no step: the weights must not move


class BackwardOnly(SupervisedModel):
    """Overrides backward_step only: gradients doubled, optimizer stepped by the loop."""

    def __init__(self) -> None:
        base = make_model()
        super().__init__(base.network, base.loss, base.optimizer_factory)
        self.backward_calls = 0

    def backward_step(self, loss: torch.Tensor) -> None:
        self.backward_calls += 1
        (loss * 2).backward()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="common-case"),
        pytest.param({"accumulate_grad_batches": 2}, id="accumulation"),
        pytest.param({"gradient_clip_val": 1.0}, id="clipping"),
    ],
)
def test_overridden_hooks_are_called_at_every_step(tmp_path: Path, options: dict[str, Any]) -> None:
    model = Counting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = Trainer(
        tmp_path / "maps", model, default_callbacks=False, max_epochs=2, **options
    ).train(make_loader())
    accumulate = options.get("accumulate_grad_batches", 1)
    assert model.backward_calls == 12
    assert model.optimization_calls == 12 // accumulate == state.global_step
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # the override replaced the step


def test_an_overridden_backward_step_shapes_the_update(tmp_path: Path) -> None:
    doubled, plain = BackwardOnly(), make_model()
    for model, name in ((doubled, "doubled"), (plain, "plain")):
        Trainer(tmp_path / name, model, default_callbacks=False, max_epochs=1).train(make_loader())
    assert doubled.backward_calls == 6
    changed = [
        not torch.equal(a, b)
        for a, b in zip(doubled.state_dict().values(), plain.state_dict().values(), strict=True)
    ]
    assert all(changed)


class ForwardCounting(SupervisedModel):
    """Overrides forward_step with the same loss, counted: the loop must call it."""

    def __init__(self) -> None:
        base = make_model()
        super().__init__(base.network, base.loss, base.optimizer_factory)
        self.forward_calls = 0

    def forward_step(self, batch: Any) -> torch.Tensor:
        self.forward_calls += 1
        loss = super().forward_step(batch)
        assert isinstance(loss, torch.Tensor)
        return loss


def test_an_overridden_forward_step_is_called_and_trains_as_the_plain_model(
    tmp_path: Path,
) -> None:
    # The loop applies a plain SupervisedModel's network and loss itself; a subclass that
    # overrides forward_step goes through it, and both train to the same weights.
    counting, plain = ForwardCounting(), make_model()
    for model, name in ((counting, "counting"), (plain, "plain")):
        Trainer(tmp_path / name, model, default_callbacks=False, max_epochs=2).train(make_loader())
    assert counting.forward_calls == 12
    for (name, a), b in zip(
        counting.state_dict().items(), plain.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_forward_step_replaced_on_the_instance_is_called(tmp_path: Path) -> None:
    # As compile=True does: the instance attribute wins over SupervisedModel's own step.
    model = make_model()
    calls = []
    own_step = model.forward_step

    def replaced(batch: Any) -> torch.Tensor:
        calls.append(1)
        loss = own_step(batch)
        assert isinstance(loss, torch.Tensor)
        return loss

    model.forward_step = replaced  # type: ignore[method-assign]
    Trainer(tmp_path / "maps", model, default_callbacks=False, max_epochs=1).train(make_loader())
    assert len(calls) == 6


@pytest.mark.parametrize("hook", ["backward_step", "optimization_step"])
def test_a_hook_replaced_on_the_instance_is_called(tmp_path: Path, hook: str) -> None:
    model = make_model()
    calls = []
    own_hook = getattr(model, hook)

    def replaced(*arguments: Any) -> None:
        calls.append(1)
        own_hook(*arguments)

    setattr(model, hook, replaced)
    Trainer(tmp_path / "maps", model, default_callbacks=False, max_epochs=1).train(make_loader())
    assert len(calls) == 6
