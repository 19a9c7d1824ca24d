"""Exact resume: random number generator states and the position inside a training loader.

A training state must let a new process continue as if it had never stopped. Two things make
that hard, and this module owns both:

- **Random states**: Python's ``random``, NumPy's global generator, torch's CPU generator and
  every CUDA device's generator are captured and restored together.
- **The loader position**: a ``DataLoader`` with ``shuffle=True`` and no generator of its own
  draws its permutation (and its workers' base seed) from the global torch generator when the
  epoch's iterator is created. The loop therefore records the generators' states *before*
  creating each epoch's iterator; a resume in the middle of an epoch restores them, rebuilds the
  same permutation and skips the batches already trained on **at the sampler level** (indices
  are drawn, no sample is loaded), then restores the states of the moment of the checkpoint.

Limits, stated plainly: random augmentation done inside DataLoader worker processes continues
from a fresh worker state (workers are re-seeded from the same base seed, but draws made for the
skipped batches are not replayed); an ``IterableDataset`` or a plain iterable cannot be skipped
by index, so its first batches are produced and discarded.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from trainbus.errors import CheckpointError, DataError

RandomStates = dict[str, Any]

_END = object()


def capture_random_states() -> RandomStates:
    """The states of every global generator, as values a weights-only ``torch.load`` reads."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    states: RandomStates = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: RandomStates) -> None:
    """Restore what :func:`capture_random_states` returned."""
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(
                f"the training state holds CUDA generator states for {len(cuda)} devices, but "
                f"{torch.cuda.device_count()} are visible; resume with the same devices"
            )
        torch.cuda.set_rng_state_all(cuda)


def loader_generators(loader: object) -> dict[str, torch.Generator]:
    """The generators of a loader besides the global one: its own and its sampler's."""
    found: dict[str, torch.Generator] = {}
    if not isinstance(loader, DataLoader):
        return found
    if isinstance(loader.generator, torch.Generator):
        found["loader"] = loader.generator
    for name, holder in (("sampler", loader.sampler), ("batch_sampler", loader.batch_sampler)):
        generator = getattr(holder, "generator", None)
        known = any(generator is g for g in found.values())
        if isinstance(generator, torch.Generator) and not known:
            found[name] = generator
    return found


@dataclass(frozen=True, slots=True)
class EpochStart:
    """What drew the epoch's shuffling: generator states before its iterator was created."""

    torch_state: torch.Tensor
    generators: dict[str, torch.Tensor]
    reused_iterator: bool

    @classmethod
    def capture(cls, loader: object) -> EpochStart:
        """Record the states now, right before ``iter(loader)``."""
        reused = (
            isinstance(loader, DataLoader)
            and loader.persistent_workers
            and loader.num_workers > 0
            and getattr(loader, "_iterator", None) is not None
        )
        return cls(
            torch_state=torch.get_rng_state(),
            generators=capture_loader_generators(loader),
            reused_iterator=bool(reused),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values for a training state."""
        return {
            "torch": self.torch_state,
            "generators": dict(self.generators),
            "reused_iterator": self.reused_iterator,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochStart:
        """Inverse of :meth:`as_dict`."""
        return cls(values["torch"], dict(values["generators"]), bool(values["reused_iterator"]))

    def restore(self, loader: object) -> None:
        """Put the global and the loader's generators back to the epoch's start."""
        torch.set_rng_state(self.torch_state)
        restore_loader_generators(loader, self.generators)


def capture_loader_generators(loader: object) -> dict[str, torch.Tensor]:
    """The states of a loader's own generators (see :func:`loader_generators`)."""
    return {name: generator.get_state() for name, generator in loader_generators(loader).items()}


def restore_loader_generators(loader: object, states: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`capture_loader_generators` returned, into the same kind of loader."""
    generators = loader_generators(loader)
    if set(generators) != set(states):
        raise CheckpointError(
            f"the training loader's generators {sorted(generators)} differ from those "
            f"recorded in the training state {sorted(states)}; resume with a loader built "
            "the same way (same shuffle, sampler and generator arguments)"
        )
    for name, generator in generators.items():
        generator.set_state(states[name])


class _SkipFirst(Sampler[Any]):
    """Yield what ``inner`` yields, minus the first ``skip`` items (indices, never samples)."""

    def __init__(self, inner: Iterable[Any], skip: int) -> None:
        self.inner = inner
        self.skip = skip
        self._primed: Iterator[Any] | None = None
        self._started = False

    def prime(self) -> None:
        """Draw the inner permutation now (it reads the generators) and skip ahead, once."""
        if self._started:
            return
        self._started = True
        iterator = iter(self.inner)
        for _ in range(self.skip):
            next(iterator, None)
        # Samplers are generators: their permutation is drawn at the first item, so one item
        # is taken now (an index, not a sample) and put back in front.
        following = next(iterator, _END)
        self._primed = iterator if following is _END else itertools.chain([following], iterator)

    def __iter__(self) -> Iterator[Any]:
        # A generator, like torch's samplers: nothing is drawn before the first item is asked.
        self.prime()
        iterator, self._primed = self._primed, None
        if iterator is None:
            raise DataError(
                "a resumed epoch's sampler was iterated twice; iterate the loader of a resumed "
                "epoch once (the next epoch uses the original loader again)"
            )
        yield from iterator

    def __len__(self) -> int:
        if not isinstance(self.inner, Sized):
            raise TypeError("the wrapped sampler has no length")
        return max(len(self.inner) - self.skip, 0)


def resumed_iterator(loader: Iterable[Any], start: EpochStart, skip: int) -> Iterator[Any]:
    """An iterator over ``loader`` for an epoch that began at ``start``, past ``skip`` batches.

    The caller restores the checkpoint's random states afterwards: building this iterator
    replays the epoch's first draws.
    """
    start.restore(loader)
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        iterator = iter(loader)
        for _ in range(skip):
            if next(iterator, _END) is _END:
                break
        return iterator
    if loader.batch_sampler is not None:
        skipper = _SkipFirst(loader.batch_sampler, skip)
        resumed = replica(loader, batch_sampler=skipper)
    else:
        skipper = _SkipFirst(loader.sampler, skip)
        resumed = replica(loader, sampler=skipper, batch_size=None)
    if start.reused_iterator:
        # A persistent iterator was reset: the permutation was drawn first, with no new seed.
        skipper.prime()
    iterator = iter(resumed)
    skipper.prime()  # single-process iterators draw lazily; the straight run drew here
    return iterator


def replica(loader: DataLoader[Any], **changes: Any) -> DataLoader[Any]:
    """A DataLoader like ``loader`` (same dataset, workers, collation) with ``changes``.

    Worker processes are not kept between epochs unless ``changes`` says so.
    """
    arguments: dict[str, Any] = {
        "dataset": loader.dataset,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "in_order": loader.in_order,
    }
    if loader.num_workers > 0:
        arguments["prefetch_factor"] = loader.prefetch_factor
        arguments["persistent_workers"] = False
    arguments.update(changes)
    return DataLoader(**arguments)
