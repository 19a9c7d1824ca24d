"""Every file and directory trainbus creates gets the mode the umask gives ``open``/``mkdir``.

Files written atomically are created under a temporary name and renamed into place; they must
not keep a private 0600 (nor directories 0700): a colleague reading a shared MAPS, or a backup
running as another user, must see what the umask promises.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_loader, make_model
from trainbus import LoggerCallback, Trainer


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    value: int = request.param
    previous = os.umask(value)
    try:
        yield value
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root.parent)): oct(stat.S_IMODE(path.lstat().st_mode))
        for path in [root, *root.rglob("*")]
    }


def test_every_file_and_directory_of_a_training_has_the_umask_mode(
    umask: int, tmp_path: Path
) -> None:
    trainer = Trainer(
        tmp_path / "runs" / "v{version}",
        make_model(),
        callbacks=[LoggerCallback(console=False)],
        max_epochs=2,
        log_every_n_batches=2,
    )
    trainer.train(make_loader(), make_loader(16))
    trainer.validate(make_loader(16))
    root = tmp_path / "runs"
    found = modes(root)
    names = set(found)
    for expected in (
        "runs/v1/maps.json",
        "runs/v1/environment.json",
        "runs/v1/monitor.json",
        "runs/v1/training/latest",
        "runs/v1/checkpoints/last",
        "runs/v1/checkpoints/last/model.safetensors",
        "runs/v1/training/state-0000000012-epoch-end/trainer.pt",
        "runs/v1/logs/train.jsonl",
        "runs/v1/.lock",
    ):
        assert expected in names, f"{expected} was not written: {sorted(names)}"
    wrong = {
        name: mode
        for name, mode in found.items()
        if mode != oct((0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask)
    }
    assert not wrong, f"umask {oct(umask)}: {wrong}"
