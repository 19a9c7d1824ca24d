"""Data-parallel training on torch.distributed, as launched by ``torchrun``.

The same script runs unchanged under ``python train.py`` and
``torchrun --nproc-per-node=N train.py`` (multi-node through torchrun's rendezvous). The
Trainer reads where this process sits from torchrun's environment (:func:`detect_placement`),
and during each call (train, validate, test, predict) a :class:`ProcessGroup`:

- initialises the process group (``nccl`` on GPUs, ``gloo`` on the CPU) unless the script did
  it already; a group trainbus created serves the process's later calls and is destroyed when
  the process exits (initialising a gloo group again after destroying it can hang);
- wraps the model in ``DistributedDataParallel`` (:func:`wrap_model`), whose construction
  copies rank 0's weights to every rank;
- shards the loaders: a training ``DataLoader`` gets a ``DistributedSampler`` (``set_epoch``
  every epoch; a sampler the user made for distributed runs is kept), an evaluation loader an
  exact shard per rank with no sample repeated, so the metrics torchmetrics reduces across
  ranks are those of the whole dataset;
- agrees on what handlers asked for (:meth:`ProcessGroup.agree`), so a stop, a skipped step or
  a save decided on one rank happens on every rank at the same step;
- runs the MAPS writes on rank 0 only, and hands their result (or their error) to every rank
  (:meth:`ProcessGroup.on_main`), so a failure on rank 0 ends every rank with the same error
  instead of leaving them waiting at a barrier.

Control messages (agreements, errors, per-rank random states) go through a ``gloo`` group even
when the model's gradients go through ``nccl``: reading a CUDA tensor back would be a
host-device sync.
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from trainbus.engine.resume import replica
from trainbus.errors import ConfigurationError, ConfigurationTypeError, TrainbusError
from trainbus.events.commands import Request

T = TypeVar("T")

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""The variables torchrun sets for every worker (with MASTER_ADDR and MASTER_PORT)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where this process sits in the run: its rank, the world size and its local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0
    launched: bool = False  # by torchrun (or in a process group): a group even of one

    @property
    def distributed(self) -> bool:
        """Whether training goes through a process group (torchrun, even with one process)."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the MAPS and the logs."""
        return self.rank == 0


def detect_placement(environ: Mapping[str, str] | None = None) -> Placement:
    """Read the placement from an initialised process group, or from torchrun's variables.

    Without either, the process trains alone (rank 0 of 1). ``TORCHELASTIC_RESTART_COUNT``
    (set by torchrun) counts restarts after a worker failed.
    """
    environ = os.environ if environ is None else environ
    restarts = _environment_int(environ, "TORCHELASTIC_RESTART_COUNT", default=0)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _environment_int(environ, "LOCAL_RANK", default=rank)
        return Placement(rank, world_size, local_rank, restarts, launched=True)
    present = [name for name in ENVIRONMENT if name in environ]
    if not present:
        return Placement(restart_count=restarts)
    if len(present) != len(ENVIRONMENT):
        missing = [name for name in ENVIRONMENT if name not in environ]
        raise ConfigurationError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}; launch "
            "with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) "
            "or unset them to train in one process"
        )
    rank = _environment_int(environ, "RANK")
    world_size = _environment_int(environ, "WORLD_SIZE")
    local_rank = _environment_int(environ, "LOCAL_RANK")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigurationError(
            f"RANK={rank} and WORLD_SIZE={world_size} in the environment are inconsistent; "
            "expected 0 <= RANK < WORLD_SIZE: launch with torchrun"
        )
    return Placement(rank, world_size, local_rank, restarts, launched=True)


def _environment_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None:
        if default is None:
            raise ConfigurationError(f"{name} is not set in the environment")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigurationError(
            f"{name}={text!r} in the environment is not an integer; launch with torchrun"
        ) from None
    if value < 0:
        raise ConfigurationError(f"{name}={text!r} in the environment is negative")
    return value


def device_for(placement: Placement, device: str | torch.device) -> str | torch.device:
    """Under torchrun, ``"auto"`` and ``"cuda"`` mean this worker's GPU, ``cuda:LOCAL_RANK``."""
    if placement.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", placement.local_rank % torch.cuda.device_count())
    return device


def portable_error(error: BaseException) -> BaseException:
    """``error`` if it can be pickled to the other ranks, else its text in a TrainbusError."""
    try:
        pickle.dumps(error)
    except Exception:  # any error that cannot be pickled is sent as its text
        return TrainbusError(f"{type(error).__name__} on rank 0: {error}")
    return error


class _Failure:
    """An error raised on rank 0, sent to the other ranks so that they raise it too."""

    def __init__(self, error: BaseException) -> None:
        self.error = portable_error(error)


_control_groups: dict[int, Any] = {}
"""The gloo group for control messages, by id of the default group it was made in."""


def _destroy_at_exit() -> None:
    """Destroy the group trainbus created, once every rank is done with it.

    Gloo's threads must be stopped while the interpreter is still alive, and a rank that
    tears its connections down while another still uses them can abort that one: the ranks
    first meet (for a minute at most; a rank that never comes leaves the group as it is).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(minutes=1))
        else:
            control = _control_groups.get(id(dist.group.WORLD))
            dist.monitored_barrier(group=control, timeout=timedelta(minutes=1))
    except RuntimeError:
        return
    _control_groups.clear()
    dist.destroy_process_group()


class ProcessGroup:
    """The process group of one Trainer call, and the collectives the loop needs."""

    def __init__(self, placement: Placement, device: torch.device) -> None:
        self.placement = placement
        self.device = device
        self.rank = placement.rank
        self.world_size = placement.world_size
        self.restart_count = placement.restart_count
        """Restarts of the run, the same on every rank once :meth:`open` returns."""
        self._control: Any = None
        self._attempt: int | None = None

    def open(self) -> None:
        """Initialise the process group from torchrun's environment, unless it already is."""
        if not dist.is_available():
            raise ConfigurationError(
                f"WORLD_SIZE={self.world_size} asks for a distributed run, but this torch build "
                "has no torch.distributed; install a build with it or run one process"
            )
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            options: dict[str, Any] = {"backend": backend, **self._rendezvous()}
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                options["device_id"] = self.device
            dist.init_process_group(**options)
            atexit.register(_destroy_at_exit)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ConfigurationError(
                f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, but "
                f"the environment says {self.rank} of {self.world_size}; initialise the group "
                "from torchrun's environment"
            )
        if dist.get_backend() != "gloo":
            # A gloo group for control messages keeps them on the host: reading them back from
            # a CUDA tensor would be a host-device sync. Made once per default group.
            world = id(dist.group.WORLD)
            if world not in _control_groups:
                _control_groups[world] = dist.new_group(
                    backend="gloo", timeout=timedelta(minutes=30)
                )
            self._control = _control_groups[world]
        if self._attempt is not None:
            # torchrun counts a restart only on the node whose worker failed: every rank takes
            # the highest count, so that all of them decide to resume alike.
            seen = torch.tensor(
                [max(self._attempt - 1, self.placement.restart_count)], dtype=torch.int64
            )
            dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=self._control)
            self.restart_count = int(seen[0])

    def _rendezvous(self) -> dict[str, Any]:
        """How the ranks find each other: torchrun's environment, fresh keys after a restart.

        After a restart torchrun's agent keeps its store, and the keys the failed attempt
        wrote in it: a new worker can read a dead one's address and fail to connect. The
        keys of each attempt are therefore put under their own prefix, numbered by the store
        itself (each rank counts its starts there): ``TORCHELASTIC_RESTART_COUNT`` cannot
        number them, as torchrun raises it only on the node whose worker failed, while it
        restarts the workers of every node.
        """
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if not agent_store:
            return {"init_method": "env://"}
        store = dist.TCPStore(  # type: ignore[attr-defined]
            host_name=os.environ["MASTER_ADDR"],
            port=int(os.environ["MASTER_PORT"]),
            world_size=self.world_size,
            is_master=False,
            timeout=timedelta(minutes=30),
        )
        self._attempt = int(store.add(f"trainbus/starts/rank-{self.rank}", 1))
        prefix = f"trainbus/attempt-{self._attempt}"
        return {
            "store": dist.PrefixStore(prefix, store),  # type: ignore[attr-defined]
            "rank": self.rank,
            "world_size": self.world_size,
        }

    # --------------------------------------------------------------- collectives
    def agree(self, local: Sequence[Request], signal: int) -> tuple[list[Request], int]:
        """Exchange what handlers asked for since the last agreement, and any signal received.

        Costs one all-reduce of two integers when nothing was asked anywhere (the common case);
        otherwise the requests themselves are gathered. Every rank gets the same list: rank 0's
        requests first, then rank 1's, ...; a request made identically on several ranks (a
        callback running on every rank) is kept once, where it was first made, and the source
        of one first made on rank N > 0 is suffixed with ``@rank<N>``. ``signal`` is the first
        signal number any rank received (0: none).
        """
        counts = torch.tensor([len(local), signal], dtype=torch.int64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._control)
        if int(counts[0]) == 0 and int(counts[1]) == 0:
            return [], 0
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (list(local), signal), group=self._control)
        union: list[Request] = []
        seen: set[tuple[str, str, str]] = set()
        for rank, (requests, _) in enumerate(gathered):
            for request in requests:
                key = (repr(request.command), request.source, request.event)
                if key in seen:
                    continue
                seen.add(key)
                source = request.source if rank == 0 else f"{request.source}@rank{rank}"
                union.append(Request(request.command, source, request.event))
        first_signal = next((s for _, s in gathered if s), 0)
        return union, first_signal

    def on_main(self, action: Callable[[], T]) -> T:
        """Run ``action`` on rank 0 and return its result on every rank (or raise its error)."""
        message: list[Any] = [None]
        if self.rank == 0:
            try:
                message[0] = action()
            except BaseException as error:
                message[0] = _Failure(error)
                dist.broadcast_object_list(message, src=0, group=self._control)
                raise
        dist.broadcast_object_list(message, src=0, group=self._control)
        if isinstance(message[0], _Failure):
            raise message[0].error
        result: T = message[0]
        return result

    def gather_on_main(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0 (``None`` on the others)."""
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, gathered, dst=0, group=self._control)
        return gathered

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (on its device; no host-device sync here)."""
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size

    def most(self, value: int) -> int:
        """The largest ``value`` of any rank."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._control)
        return int(tensor[0])

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        value = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self._control)
        return bool(value[0])

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        dist.barrier(group=self._control)


# ------------------------------------------------------------------------------ model
class Routed(nn.Module):
    """Routes ``forward`` to one of the model's steps, so DDP's and FSDP's hooks see it.

    ``routed(batch)`` runs ``model.forward_step(batch)``; ``routed(batch,
    step="evaluation_step")`` (or ``"predict_step"``) the others.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, step: str = "forward_step") -> Any:
        return getattr(self.model, step)(batch)


def ddp_arguments(options: object) -> dict[str, Any]:
    """``Trainer(ddp_options=...)`` checked: keyword arguments for DistributedDataParallel."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigurationTypeError(
            f"ddp_options={options!r} is not a dict of DistributedDataParallel keyword "
            "arguments; pass e.g. ddp_options={'find_unused_parameters': True}"
        )
    return dict(options)


def wrap_model(
    model: nn.Module, device: torch.device, options: Mapping[str, Any]
) -> DistributedDataParallel:
    """Wrap ``model`` for data-parallel training; calling the result runs ``forward_step``.

    The model's parameters are shared, not copied: optimizers built on ``model`` and
    checkpoints of ``model`` keep working. ``options`` go to ``DistributedDataParallel``
    (e.g. ``find_unused_parameters=True``).
    """
    arguments: dict[str, Any] = {}
    if device.type == "cuda":
        arguments["device_ids"] = [device]
    arguments.update(options)
    return DistributedDataParallel(Routed(model), **arguments)


# ---------------------------------------------------------------------------- loaders
class EvaluationShard(Sampler[int]):
    """Every ``world_size``-th index of the dataset, from ``rank``: no index repeated or padded.

    Shards may differ in length by one; evaluation runs no collective per batch, and
    torchmetrics gathers shards of any size, so the metrics are those of the whole dataset.
    """

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _kept_sampler(loader: DataLoader[Any]) -> bool:
    """Whether the loader's own sampler already knows about distributed runs."""
    for sampler in (loader.sampler, loader.batch_sampler):
        if isinstance(sampler, DistributedSampler) or callable(getattr(sampler, "set_epoch", None)):
            return True
        inner = getattr(sampler, "sampler", None)
        if isinstance(inner, DistributedSampler):
            return True
    return False


def _to_shard(name: str, loader: Iterable[Any]) -> bool:
    """Whether trainbus shards ``loader`` (a map-style DataLoader without a distributed sampler)."""
    if (
        not isinstance(loader, DataLoader)
        or isinstance(loader.dataset, IterableDataset)
        or _kept_sampler(loader)
    ):
        return False
    _check_shardable(name, loader)
    return True


def _check_shardable(name: str, loader: DataLoader[Any]) -> None:
    batch_sampler = loader.batch_sampler
    plain_batches = batch_sampler is None or type(batch_sampler) is BatchSampler
    plain_sampler = type(loader.sampler) in (RandomSampler, SequentialSampler)
    if not (plain_batches and plain_sampler):
        used = loader.sampler if not plain_sampler else batch_sampler
        raise ConfigurationError(
            f"{name} uses {type(used).__name__}, which would give every rank the same samples in "
            "a distributed run; pass sampler=DistributedSampler(dataset) (or a sampler with a "
            "set_epoch method that shards by rank), or use shuffle=True/False and let trainbus "
            "shard the data"
        )


def shard_training_loader(
    loader: Iterable[Any], name: str, placement: Placement, seed: int
) -> Iterable[Any]:
    """A copy of ``loader`` that gives this rank its share of every epoch.

    A map-style ``DataLoader`` gets a ``DistributedSampler`` (shuffled when the loader
    shuffled, with ``seed``; padded to equal shares unless ``drop_last``). A loader whose
    sampler is already distributed, an ``IterableDataset`` (it shards itself, e.g. with
    ``torch.distributed.get_rank()``) and other iterables are used as they are: they must
    give every rank the same number of batches, as the ranks meet after each epoch's last.
    """
    if not _to_shard(name, loader):
        return loader
    assert isinstance(loader, DataLoader)
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,
        num_replicas=placement.world_size,
        rank=placement.rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    return _rebuilt(loader, sampler)


def shard_evaluation_loader(
    loader: Iterable[Any], name: str, placement: Placement
) -> Iterable[Any]:
    """A copy of ``loader`` over this rank's exact shard (see :class:`EvaluationShard`)."""
    if not _to_shard(name, loader):
        return loader
    assert isinstance(loader, DataLoader)
    if not isinstance(loader.dataset, Sized):
        return loader
    shard = EvaluationShard(len(loader.dataset), placement.rank, placement.world_size)
    return _rebuilt(loader, shard)


def _rebuilt(loader: DataLoader[Any], sampler: Sampler[int]) -> DataLoader[Any]:
    kept = {"persistent_workers": loader.persistent_workers} if loader.num_workers > 0 else {}
    return replica(
        loader, sampler=sampler, batch_size=loader.batch_size, drop_last=loader.drop_last, **kept
    )


def set_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tell the loader's distributed sampler which epoch begins (it reshuffles by epoch)."""
    if not isinstance(loader, DataLoader):
        return
    for holder in (
        loader.sampler,
        loader.batch_sampler,
        getattr(loader.batch_sampler, "sampler", None),
    ):
        method = getattr(holder, "set_epoch", None)
        if callable(method):
            method(epoch)
            return
