"""Checkpoint tags: which epochs get one, and whether two ModelCheckpointCallbacks could clash.

Each instance writes tags of a few families: a literal tag (``{prefix}best-{metric}``,
``{prefix}last``) or a head followed by an epoch number (``{prefix}epoch-{n}``,
``{prefix}best-{metric}-epoch-{n}``) for the epochs it selects. Two families overlap when
they can make one tag; for epoch families that means an epoch both select, found exactly for
ranges, sets and "every n-th epoch", and reported as possible for containers that can only
answer membership.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Container, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainbus.errors import ConfigurationError
from trainbus.events.callback import Callback

if TYPE_CHECKING:
    from trainbus.handlers.model_checkpoint import ModelCheckpointCallback

_RANGE_SCAN_LIMIT = 10_000
_UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class _Epochs:
    """0-based epochs: those in ``container``, and those whose number is a multiple of ``every``."""

    container: Container[int] | None
    every: int | None


@dataclass(frozen=True, slots=True)
class _Family:
    """Tags one instance may write: ``head`` alone, or ``head`` + an epoch of ``epochs``."""

    head: str
    epochs: _Epochs | None


def check_tag_conflicts(callbacks: Sequence[Callback]) -> None:
    """Raise :class:`ConfigurationError` if two ModelCheckpointCallbacks could write one tag.

    Two instances writing the same checkpoint tag in one MAPS would overwrite each other's
    weights, and a ranking could delete the other's directory. The error names both callback
    ids and the shared tag (or tag pattern); the fix is a distinct ``prefix=``.
    """
    # Imported on call: model_checkpoint imports this module, to re-export this function.
    from trainbus.handlers.model_checkpoint import ModelCheckpointCallback

    found = [(i, c) for i, c in enumerate(callbacks) if isinstance(c, ModelCheckpointCallback)]
    ids = [c.callback_id for _, c in found]
    labels = [
        c.callback_id if ids.count(c.callback_id) == 1 else f"{c.callback_id} (callbacks[{i}])"
        for i, c in found
    ]
    for a in range(len(found)):
        for b in range(a + 1, len(found)):
            shared = _shared_tag(found[a][1], found[b][1])
            if shared is not None:
                raise ConfigurationError(
                    f"{labels[a]} and {labels[b]} could both write the checkpoint tag "
                    f"{shared} in one MAPS: one would overwrite or delete the other's weights; "
                    "give each a distinct prefix, e.g. ModelCheckpointCallback(..., "
                    "prefix='second-')"
                )


def _families(callback: ModelCheckpointCallback) -> list[_Family]:
    families = []
    if callback.metric is not None:
        best = callback.best_tag
        assert best is not None
        families.append(_Family(best, None))
        if callback.top_k != 1:
            families.append(_Family(f"{best}-epoch-", _Epochs(None, 1)))
    if callback._epoch_set is not None or callback.every_n_epochs is not None:
        families.append(
            _Family(
                f"{callback.prefix}epoch-", _Epochs(callback._epoch_set, callback.every_n_epochs)
            )
        )
    if callback.save_last:
        families.append(_Family(callback.last_tag, None))
    return families


def _shared_tag(left: ModelCheckpointCallback, right: ModelCheckpointCallback) -> str | None:
    for a in _families(left):
        for b in _families(right):
            shared = _family_overlap(a, b)
            if shared is not None:
                return shared
    return None


def _family_overlap(a: _Family, b: _Family) -> str | None:
    if a.epochs is None and b.epochs is None:
        return repr(a.head) if a.head == b.head else None
    if a.epochs is None or b.epochs is None:
        literal, family = (a, b) if a.epochs is None else (b, a)
        assert family.epochs is not None
        rest = literal.head[len(family.head) :]
        if (
            literal.head.startswith(family.head)
            and rest.isascii()
            and rest.isdigit()
            and str(int(rest)) == rest
            and _common_epoch(family.epochs, _Epochs(frozenset({int(rest)}), None)) is not None
        ):
            return repr(literal.head)
        return None
    # Heads end with '-' and epochs are digits: different heads never make one tag.
    if a.head != b.head:
        return None
    common = _common_epoch(a.epochs, b.epochs)
    if common is None:
        return None
    if common == _UNKNOWN:
        return (
            f"pattern '{a.head}{{n}}' (an epochs container that cannot be enumerated may "
            "hold the same epochs)"
        )
    return f"pattern '{a.head}{{n}}' (e.g. '{a.head}{common}')"


def _common_epoch(a: _Epochs, b: _Epochs) -> int | str | None:
    """The smallest epoch both select, ``_UNKNOWN`` if it cannot be decided, else ``None``."""
    candidates: list[int | str | None] = []
    if a.container is not None and b.container is not None:
        candidates.append(_first_common(a.container, b.container))
    if a.container is not None and b.every is not None:
        candidates.append(_first_multiple(a.container, b.every))
    if b.container is not None and a.every is not None:
        candidates.append(_first_multiple(b.container, a.every))
    if a.every is not None and b.every is not None:
        candidates.append(math.lcm(a.every, b.every) - 1)
    found = [c for c in candidates if isinstance(c, int)]
    if found:
        return min(found)
    return _UNKNOWN if _UNKNOWN in candidates else None


def _first_multiple(container: Container[int], every: int) -> int | str | None:
    """The smallest epoch of ``container`` whose 1-based number is a multiple of ``every``."""
    if isinstance(container, range):
        ascending = container if container.step > 0 else container[::-1]
        # Epoch numbers modulo `every` repeat after at most `every` elements.
        return next((e for e in ascending[:every] if (e + 1) % every == 0), None)
    if isinstance(container, frozenset):
        return min((e for e in container if (e + 1) % every == 0), default=None)
    return _UNKNOWN


def _first_common(left: Container[int], right: Container[int]) -> int | str | None:
    """The smallest epoch in both containers (ranges and sets exactly, others when finite)."""
    if isinstance(left, range) and isinstance(right, range):
        return _range_intersection(left, right)
    for finite, other in ((left, right), (right, left)):
        if isinstance(finite, frozenset) or (
            isinstance(finite, range) and len(finite) <= _RANGE_SCAN_LIMIT
        ):
            assert isinstance(finite, Collection)
            return min((e for e in finite if e in other), default=None)
    return _UNKNOWN


def _range_intersection(left: range, right: range) -> int | None:
    if not left or not right:
        return None
    a = left if left.step > 0 else left[::-1]
    b = right if right.step > 0 else right[::-1]
    low, high = max(a[0], b[0]), min(a[-1], b[-1])
    if low > high:
        return None
    first = a[0] + -(-(low - a[0]) // a.step) * a.step
    # Elements of `a` modulo b.step repeat after b.step // gcd elements.
    for epoch in range(first, high + 1, a.step)[: b.step // math.gcd(a.step, b.step)]:
        if epoch in b:
            return epoch
    return None


def check_epochs(epochs: object) -> Container[int] | None:
    """``epochs`` as the container membership is tested against (ranges kept, others frozen)."""
    if epochs is None:
        return None
    if isinstance(epochs, str | bytes) or not isinstance(epochs, Container):
        raise ConfigurationError(
            f"ModelCheckpointCallback: epochs={epochs!r} is not a collection of epoch numbers; "
            "pass e.g. epochs=range(1, 100, 10) or epochs={0, 5} (0-based current_epoch), "
            "or None"
        )
    if isinstance(epochs, range):
        if not epochs:
            raise ConfigurationError(
                f"ModelCheckpointCallback: epochs={epochs!r} is empty; pass None to keep no "
                "epoch checkpoints"
            )
        if min(epochs[0], epochs[-1]) < 0:
            raise ConfigurationError(
                f"ModelCheckpointCallback: epochs={epochs!r} holds negative epochs; epochs are "
                "0-based (state.current_epoch)"
            )
        return epochs
    if not isinstance(epochs, Collection):
        return epochs  # membership only, e.g. a user-defined container of epochs
    items = list(epochs)
    bad = [e for e in items if isinstance(e, bool) or not isinstance(e, int) or e < 0]
    if bad:
        raise ConfigurationError(
            f"ModelCheckpointCallback: epochs={epochs!r} holds {bad[0]!r}, which is not an epoch "
            "number; pass ints >= 0 (0-based current_epoch), e.g. epochs={0, 5}"
        )
    if not items:
        raise ConfigurationError(
            f"ModelCheckpointCallback: epochs={epochs!r} is empty; pass None to keep no epoch "
            "checkpoints"
        )
    return frozenset(items)
