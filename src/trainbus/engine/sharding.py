"""Sharded training: FSDP2 (``fully_shard``) and its checkpoints through Distributed Checkpoint.

With ``Trainer(strategy="fsdp")`` under torchrun, :func:`shard_model` shards the model's
parameters over every rank with PyTorch's ``fully_shard``: each *unit* (see
:meth:`~trainbus.Model.shard`) gathers its parameters for its forward and backward only, and
the model's remaining parameters form the root unit. Nothing here sends a tensor itself: the
gathers and reductions are FSDP's, the checkpoint files Distributed Checkpoint's (DCP).

Checkpoints:

- a model checkpoint (``ModelCheckpointCallback``) holds the full, unsharded weights, gathered
  on rank 0 by :func:`full_weights` (every rank takes part): ``load_weights`` reads it in one
  process without torch.distributed;
- a training state holds the model and optimizer states as a DCP checkpoint (a file per rank
  and DCP's ``.metadata``), written by :func:`save_sharded` into the state's staging
  directory; the rest of the state (counters, random states, callbacks) is trainbus's own.
  :func:`load_sharded` reads it back on any number of ranks: DCP reshards the weights and
  optimizer states.

DCP reads its ``.metadata`` with ``pickle`` and the non-tensor values of a state with
``torch.load(weights_only=False)``: either runs code a crafted file names. Here both are read
by a restricted reader and load planner that accept DCP's own
metadata classes and plain values only, as the rest of trainbus loads with
``weights_only=True``.
"""

from __future__ import annotations

import functools
import io
import pickle
import shutil
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from trainbus.errors import (
    CheckpointError,
    ConfigurationError,
    ConfigurationTypeError,
    CorruptCheckpointError,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from trainbus.engine.compute import Precision
    from trainbus.engine.model import Model

DCP_METADATA = ".metadata"
"""The file where Distributed Checkpoint describes every shard (written by rank 0)."""

STRATEGIES = ("auto", "ddp", "fsdp")
"""``Trainer(strategy=...)``: ``"auto"`` is ``"ddp"`` (replicated weights) today."""


def check_strategy(strategy: object, precision: str) -> str:
    """``Trainer(strategy=...)`` checked against the precision; ``"auto"`` resolved."""
    if not isinstance(strategy, str):
        raise ConfigurationTypeError(
            f"strategy={strategy!r} is not a string; pass one of {list(STRATEGIES)}"
        )
    if strategy not in STRATEGIES:
        raise ConfigurationError(
            f"strategy={strategy!r} is not one of {list(STRATEGIES)}; use 'ddp' to replicate "
            "the model on every rank, 'fsdp' to shard its parameters (models too big for one "
            "device), or 'auto'"
        )
    if strategy == "fsdp" and precision == "16":
        raise ConfigurationError(
            "precision='16' with strategy='fsdp' is not supported: fp16 loss scaling would "
            "need every rank to agree on skipped steps; use precision='bf16' (no loss "
            "scaling) or strategy='ddp'"
        )
    return "ddp" if strategy == "auto" else strategy


def shard_model(model: Model, device: torch.device, precision: Precision) -> nn.Module:
    """Shard ``model`` over the default process group; returns the root unit to call.

    ``model.shard(shard)`` chooses the units; the root wraps the whole model, so calling it
    as ``root(batch)`` runs ``model.forward_step(batch)`` with every parameter gathered
    (``root(batch, step="evaluation_step")`` for the other steps). With ``precision="bf16"``
    parameters are gathered in bf16 and gradients reduced in fp32 (FSDP's
    ``MixedPrecisionPolicy``); autocast still keeps the operations that need fp32 in fp32.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from trainbus.engine.distributed import Routed

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision.dtype is torch.bfloat16
        else MixedPrecisionPolicy()
    )

    def shard(module: nn.Module) -> None:
        fully_shard(module, mesh=mesh, mp_policy=policy)

    model.shard(shard)
    root = Routed(model)
    shard(root)
    return root


def set_gradient_sync(root: nn.Module, sync: bool) -> None:
    """Whether the next backward reduces gradients across ranks (off inside an accumulation)."""
    root.set_requires_gradient_sync(sync)  # type: ignore[operator]


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on rank 0 (on the CPU), ``{}`` elsewhere; every rank calls."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


def save_sharded(
    directory: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """Write the sharded model and optimizer states into ``directory`` (every rank calls)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    save(_states(model, optimizers), storage_writer=FileSystemWriter(directory))


_checkpoint_groups: dict[int, Any] = {}
"""A gloo group for asynchronous saves, by id of the default group: DCP's writer thread
exchanges its plans there while the training thread uses the default group."""


def save_sharded_async(
    directory: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> Future[Any]:
    """Copy the shards to host memory now, write them on DCP's thread (``async_save``).

    Every rank calls it at the same point; the future is done when this rank's part is
    written (rank 0's when every shard and DCP's metadata are).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import async_save

    world = id(dist.group.WORLD)
    if world not in _checkpoint_groups:
        _checkpoint_groups[world] = dist.new_group(backend="gloo")
    result = async_save(
        _states(model, optimizers),
        storage_writer=FileSystemWriter(directory),
        process_group=_checkpoint_groups[world],
    )
    return cast("Future[Any]", getattr(result, "upload_completion", result))


def commit_after(shards: Future[Any], commit: Callable[[], Path] | None, staging: Path) -> Path:
    """Wait until the shards are written, then ``commit`` (rank 0; ``None`` elsewhere).

    Runs on the background writer's thread. A failed write removes the staging directory
    (rank 0): the previous training states are intact.
    """
    try:
        shards.result()
    except BaseException:
        if commit is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging if commit is None else commit()


def load_sharded(
    directory: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], name: str
) -> None:
    """Load the model and optimizer states of ``directory``, resharded to this world size."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    states = _states(model, optimizers)
    try:
        reader, planner = _restricted()
        with warnings.catch_warnings():
            # One process reading a sharded state (gathered whole) is what is meant here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load(states, storage_reader=reader(directory), planner=planner())
    except CheckpointError:
        raise
    except Exception as exc:  # DCP wraps every rank's failure in its own exception type
        raise CheckpointError(
            f"the training state {name} cannot be loaded into this model and its optimizers: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}; resume with "
            "the model and build_optimizers of the interrupted run"
        ) from exc
    set_model_state_dict(model, states["model"])
    for optimizer, state in zip(optimizers, states["optimizers"], strict=True):
        set_optimizer_state_dict(model, optimizer, state)


def _states(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optimizers": [get_optimizer_state_dict(model, o) for o in optimizers],
    }


# ------------------------------------------------------------------ restricted reading
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch._utils": {"_get_layout"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata classes, torch dtypes and plain values; refuses the rest."""

    def __init__(self, stream: io.BufferedIOBase, path: Path) -> None:
        super().__init__(stream)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CorruptCheckpointError(
            f"checkpoint file {self.path} is corrupt or not trustworthy: its pickle names "
            f"{module}.{name}, which Distributed Checkpoint's metadata never holds; refusing to "
            "load it (it could run code)"
        )


def read_metadata(directory: Path) -> Metadata:
    """DCP's ``.metadata`` of ``directory``, read by the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = directory / DCP_METADATA
    try:
        with path.open("rb") as stream:
            metadata = _MetadataUnpickler(stream, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated or garbled pickle raises many types
        raise CorruptCheckpointError(
            f"checkpoint file {path} is corrupt: its pickle cannot be read ({exc})"
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(
            f"checkpoint file {path} is corrupt: it holds {type(metadata).__name__}, not "
            "Distributed Checkpoint's Metadata"
        )
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


@functools.cache
def _restricted() -> tuple[type, type]:
    """DCP's reader and load planner, restricted (built on first use: DCP imports slowly)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader whose metadata goes through the restricted unpickler."""

        def __init__(self, directory: Path) -> None:
            super().__init__(directory)
            self.directory = Path(directory)

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            metadata = read_metadata(self.directory)
            metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's load planner, reading the non-tensor values with ``weights_only=True`` first."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CorruptCheckpointError(
                    f"a value of {read_item.dest_index.fqn!r} in a sharded training state is "
                    f"not trustworthy: {str(exc).splitlines()[0]}; refusing to load it (it "
                    "could run code)"
                ) from exc
            # Verified: only tensors and plain values, so DCP's own loading reads the same.
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeReader, SafeLoadPlanner
