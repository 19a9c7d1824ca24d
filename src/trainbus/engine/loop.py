"""The training loop: epochs, batches, accumulation and optimizer steps.

It announces every step on the bus and knows nothing of files or locks: at each boundary it
calls the ``boundary`` function it was given, which carries out what the
:class:`~trainbus.engine.policy.CommandPolicy` allows there. Exact resume needs the loop's
position, its epoch-start generator states and its loss accumulator: they live here, and
:mod:`~trainbus.engine.saving` / :mod:`~trainbus.engine.restore` read and set them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from trainbus.engine import distributed as dist_tools
from trainbus.engine.batches import (
    detached_all,
    loss_of,
    named_losses,
    no_batches,
    reuses_workers,
)
from trainbus.engine.compute import batch_size, move_to, with_last
from trainbus.engine.core import Engine, learning_rates, rates_moved
from trainbus.engine.evaluation import Evaluation
from trainbus.engine.limits import Limits, check_interval, epoch_batches, epoch_cap, take
from trainbus.engine.loss_tracking import FOLD_EVERY, LossTracker, log_mean, warn_skipped
from trainbus.engine.model import supervised_step
from trainbus.engine.policy import Boundary, BoundaryHook
from trainbus.engine.resume import (
    EpochStart,
    RandomStates,
    capture_random_states,
    restore_loader_generators,
    restore_random_states,
    resumed_iterator,
)
from trainbus.engine.stepping import (
    all_finite,
    backward_of,
    direct_optimizer,
    gradient_sync,
    optimizer_step,
    record_moved_rates,
    release_reduction,
)

STEP_EVENTS = (
    "batch_start",
    "forward_start",
    "backward_start",
    "backward_end",
    "batch_end",
    "optimizer_step_start",
    "optimizer_step_end",
)


class TrainingLoop:
    """Runs the training epochs of one Trainer (its evaluation passes: :attr:`evaluation`)."""

    def __init__(self, engine: Engine, boundary: BoundaryHook) -> None:
        self.engine = engine
        self.boundary = boundary
        self.position: dict[str, Any] = {"epoch": 0, "batches_done": 0, "in_epoch": False}
        self.epoch_start: EpochStart | None = None
        self.losses = LossTracker()
        self.train_loader: Iterable[Any] | None = None
        self.pending_random: RandomStates | None = None
        self.pending_loader_generators: dict[str, torch.Tensor] | None = None
        self.random_before_validation: RandomStates | None = None
        """The generators as a running validation found them: a training state written when
        a signal cut that validation short holds these, so that the resume redoes it exactly."""
        self.evaluation = Evaluation(engine, boundary)
        self.limits = Limits(engine.settings)
        """The step and time limits of the running ``train()`` call."""
        self.emitters: dict[str, Callable[..., Any] | None] = {}
        """The step events' emitters of the running epoch (see :meth:`Dispatcher.emitters`)."""
        self._first_epoch = 0

    @property
    def fresh(self) -> bool:
        """Whether no training happened yet: the next ``train()`` starts a new run."""
        return self.position == {"epoch": 0, "batches_done": 0, "in_epoch": False} and (
            self.engine.state.get("iteration") == 0
        )

    # ------------------------------------------------------------------ training
    def train(self, train_loader: Iterable[Any], val_loader: Iterable[Any] | None) -> None:
        """Epochs until ``max_epochs`` or a stop; ``train_start`` was emitted by the caller."""
        engine = self.engine
        self.train_loader = train_loader
        self._first_epoch = self.position["epoch"]
        limits = self.limits = Limits(engine.settings)
        self.random_before_validation = None
        if engine.settings.limit_val_batches == 0:
            val_loader = None
        while (
            self.position["epoch"] < engine.settings.max_epochs
            and not engine.policy.stop_requested
            and not limits.steps_done(engine.state.get("global_step"))
        ):
            self._run_epoch(train_loader, val_loader)

    def _run_epoch(self, train_loader: Iterable[Any], val_loader: Iterable[Any] | None) -> None:
        engine = self.engine
        state, emit, policy = engine.state, engine.dispatcher.emit, engine.policy
        epoch = self.position["epoch"]
        settings = engine.settings
        num_batches, exact = epoch_batches(settings, train_loader)
        cap = epoch_cap(settings, num_batches)
        changes = {
            "stage": "train",
            "current_epoch": epoch,
            "num_batches": num_batches,
            **learning_rates(engine.optimizers, read_tensors=False),
        }
        if self.position["in_epoch"]:
            # Resumed in the middle of this epoch: epoch_start fired before the interruption.
            skip = self.position["batches_done"]
            state.update(batch_idx=skip - 1, **changes)
            assert self.epoch_start is not None
            dist_tools.set_epoch(train_loader, epoch)
            batches = resumed_iterator(train_loader, self.epoch_start, skip)
        else:
            skip = 0
            state.update(batch_idx=-1, **changes)
            self.restore_pending_random()
            self.position = {"epoch": epoch, "batches_done": 0, "in_epoch": True}
            emit("epoch_start")
            engine.dispatcher.agree(only_if_due=True)
            batches = self._epoch_iterator(train_loader, epoch)
        self.restore_pending_random()
        if self.position.pop("validation_due", False) and val_loader is not None:
            # A signal cut this validation short before the training state was written.
            if not self._validate(val_loader, redo=True):
                return
            state.update(stage="train", batch_idx=skip - 1)
        batches = take(batches, None if cap is None else cap - skip)
        interval = check_interval(settings, num_batches)
        completed = self._train_epoch(batches, skip, exact, val_loader, interval)
        limits = self.limits
        # Not max_time: a run it pauses is not finished (and ranks' clocks could disagree).
        last = (
            epoch + 1 == settings.max_epochs
            or policy.stop_requested
            or limits.steps_done(state.get("global_step"))
        )
        if (
            val_loader is not None
            and completed
            and (
                (epoch + 1) % settings.val_every_n_epochs == 0
                or (last and settings.validate_last_epoch)
            )
            and not self._validate(val_loader)
        ):
            return
        state.update(stage="train")
        if completed:
            self.position = {"epoch": epoch + 1, "batches_done": 0, "in_epoch": False}
        # else a stop cut the epoch: the position stays inside it, so a resumable stop
        # continues with the batches that were left.
        emit("epoch_end")
        if (
            completed
            and epoch + 1 < settings.max_epochs
            and not policy.stop_requested
            and not limits.steps_done(state.get("global_step"))
            and self._out_of_time()
        ):
            engine.dispatcher.request(limits.pause(state.get("global_step"), "epoch_end"))
        engine.dispatcher.agree()
        self.boundary(Boundary.EPOCH, "epoch_end")

    def _epoch_iterator(self, loader: Iterable[Any], epoch: int) -> Iterator[Any]:
        """The epoch's iterator, its generator states recorded first (see ``EpochStart``)."""
        dist_tools.set_epoch(loader, epoch)
        if epoch > 0 and reuses_workers(loader) and getattr(loader, "_iterator", 1) is None:
            # The uninterrupted run created the worker iterator at epoch 0 and only resets it
            # since; creating one now draws a base seed before the permutation. It is created
            # here with the generators put back afterwards, so the permutation is drawn as the
            # uninterrupted run drew it.
            before = EpochStart.capture(loader)
            iter(loader)
            before.restore(loader)
        self.epoch_start = EpochStart.capture(loader)
        return iter(loader)

    def _train_epoch(
        self,
        batches: Iterator[Any],
        first: int,
        total: int | None,
        val_loader: Iterable[Any] | None,
        interval: int | None,
    ) -> bool:
        """Train on ``batches`` (numbered from ``first``); False when a stop cut it short.

        ``interval``: validate on ``val_loader`` after every ``interval`` batches of the
        epoch too (not after its last: the epoch's own validation follows).

        The hot path: what a step reads is bound to locals first; each step event has an
        emitter bound to this loop (:meth:`Dispatcher.emitters`, rebound when a subscription
        comes or goes), None when nobody listens; named losses are built and detached only
        for subscribers that ask for them. When no step event is heard and every batch is
        one direct optimizer step, the step counters stay in locals and reach the state, with
        the learning rates (:meth:`_publish`), only where something can read them: log steps,
        boundaries, a subscription change, the loop's exit (an exception included).
        """
        engine = self.engine
        model, state, policy = engine.model, engine.state, engine.policy
        dispatcher = engine.dispatcher
        bus = engine.bus
        wanted = bus.wanted
        signals = dispatcher.signals
        pending, values = policy.pending, state.values
        track = self.losses.recent.append
        model.train()
        ddp = engine.forward
        forward = model.forward_step if ddp is None else ddp
        backward = backward_of(model)
        supervised = supervised_step(model) if ddp is None else None
        sync_gradients = gradient_sync(engine)
        autocast = engine.precision.autocast if engine.precision.dtype is not None else None
        world_size = engine.placement.world_size
        settings = engine.settings
        accumulate = settings.accumulate_grad_batches
        log_every = settings.log_every_n_batches
        skip_nonfinite = settings.nonfinite_loss == "skip"
        moves_batches, device = engine.moves_batches, engine.device
        scaler, group = engine.scaler, dispatcher.group
        stop_before_epoch = policy.stop_requested
        policy.open_group = 0
        direct = direct_optimizer(engine)
        optimizers, tensor_rates = engine.optimizers, engine.tensor_rates
        position = self.position
        emitters = self.emitters
        checks = self.limits.active or (interval is not None and val_loader is not None)
        fold_every = FOLD_EVERY
        may_defer = direct is not None and not checks and group is None and not skip_nonfinite
        bound = -1  # bus.version starts at 0: the first batch binds the emitters
        seen_any = False
        batch: Any
        loss: torch.Tensor | None = None
        output: Any = None
        known = total is not None
        source = enumerate(batches, first) if known else enumerate(with_last(batches), first)
        # The counters live in locals; ``values`` gets them at once, or, while nothing can
        # read them (``deferred``), at the next log step, boundary, subscription change or exit.
        iteration, seen, steps = values["iteration"], values["samples_seen"], values["global_step"]
        offset = iteration + 1 - first  # batch_idx == iteration - offset, in either mode
        done_base = first - steps  # while deferred, one step per batch: done == done_base + steps
        deferred = False
        try:
            for batch_idx, item in source:
                if known:
                    batch = item
                    is_last = batch_idx + 1 == total
                else:
                    batch, is_last = item
                seen_any = True
                if bus.version != bound:
                    if deferred:
                        self._publish(iteration - offset, iteration, seen, steps, batch_idx)
                    emitters.update(dispatcher.emitters(STEP_EVENTS))
                    bound = bus.version
                    (
                        batch_start,
                        forward_start,
                        backward_start,
                        backward_end,
                        batch_end,
                        step_start,
                        step_end,
                    ) = (emitters[event] for event in STEP_EVENTS)
                    # Nobody can read the counters during a step: no step event is heard, no
                    # check or skip reads the state, and every batch is one direct step.
                    deferred = may_defer and all(emitters[event] is None for event in STEP_EVENTS)
                    asked = wanted.get("batch_end", ())
                    loss_at_batch_end, losses_at_batch_end = "loss" in asked, "losses" in asked
                    losses_at_backward_start = "losses" in wanted.get("backward_start", ())
                    losses_at_backward_end = "losses" in wanted.get("backward_end", ())
                    done_base = batch_idx - steps
                # One change per batch start: samples_seen counts this batch from batch_start on.
                if (
                    (type(batch) is tuple or type(batch) is list)
                    and batch
                    and type(head := batch[0]) is torch.Tensor
                    and head.ndim
                ):
                    samples = head.size(0)  # the common case: no call, no torch.Size built
                else:
                    samples = batch_size(batch)
                iteration += 1
                seen += samples * world_size
                if not deferred:
                    values["batch_idx"] = batch_idx
                    values["iteration"] = iteration
                    values["samples_seen"] = seen
                    state.cached = None
                # The previous step's loss (and its autograd graph) is let go when this step's
                # forward rebinds it, as in a hand-written loop, not before the forward.
                if batch_start is None or not batch_start(batch):
                    if moves_batches:
                        batch = move_to(batch, device)
                    if forward_start is not None:
                        forward_start(batch)
                    if sync_gradients is not None:
                        # Gradients are averaged across ranks at the backward that closes a group.
                        sync_gradients(policy.open_group + 1 >= accumulate or is_last)
                    if autocast is not None:
                        with autocast():
                            output = forward(batch)
                    elif (
                        supervised is not None
                        and (type(batch) is tuple or type(batch) is list)
                        and len(batch) == 2
                    ):
                        # SupervisedModel.forward_step, one Python call fewer per step.
                        output = supervised._step_loss(supervised._step_network(batch[0]), batch[1])
                    else:
                        output = forward(batch)
                    if type(output) is torch.Tensor and output.ndim == 0 and output.requires_grad:
                        loss = output  # the common case, checked without a call
                    else:
                        loss = loss_of(output)
                    finite = not skip_nonfinite or all_finite(engine, loss)
                    if not finite:
                        warn_skipped(engine, loss)
                        release_reduction(engine)
                    elif backward_start is not None and backward_start(
                        batch,
                        loss,
                        named_losses(output) if losses_at_backward_start else None,
                    ):
                        release_reduction(engine)
                    else:
                        scaled = loss / accumulate if accumulate > 1 else loss
                        if scaler is not None:
                            scaled = scaler.scale(scaled)
                        backward(scaled)
                        if direct is None:
                            policy.open_group += 1
                        if backward_end is not None:
                            backward_end(
                                batch,
                                loss,
                                named_losses(output) if losses_at_backward_end else None,
                            )
                        if direct is None:
                            if policy.open_group == accumulate or is_last:
                                optimizer_step(engine, policy.open_group)
                                policy.open_group = 0
                                steps = values["global_step"]
                        # The direct path steps every batch (no accumulation): no group is open.
                        elif step_start is not None and step_start(optimizers):
                            direct.zero_grad(set_to_none=True)
                        else:
                            direct.step()
                            direct.zero_grad(set_to_none=True)
                            steps += 1
                            if not deferred:
                                values["global_step"] = steps
                                state.cached = None
                                # Tensor learning rates are read at log intervals only:
                                # comparing them would be a host-device sync.
                                recorded, groups = values["learning_rates"], direct.param_groups
                                if not tensor_rates and (
                                    (groups[0]["lr"],) != recorded
                                    if len(groups) == 1
                                    else rates_moved(optimizers, recorded)
                                ):
                                    state.update(**learning_rates(optimizers, read_tensors=True))
                                if step_end is not None:
                                    step_end(optimizers)
                    if finite:
                        # Kept on the device, folded every FOLD_EVERY iterations and read at log
                        # intervals only (a host-device sync); appending launches no kernel.
                        track(loss.detach())
                else:
                    loss = output = None
                if not deferred:
                    position["batches_done"] = batch_idx + 1
                log_step = iteration % log_every == 0 or is_last
                if log_step:
                    if deferred:
                        self._publish(batch_idx, iteration, seen, steps, batch_idx + 1)
                    log_mean(engine, self.losses)
                elif iteration % fold_every == 0:
                    self.losses.fold()
                # Distributed: emitted on every rank (its emitter is never None), so that each
                # knows when to agree, even where the subscribers run on rank 0 only.
                if batch_end is not None:
                    batch_end(
                        batch,
                        None if loss is None or not loss_at_batch_end else loss.detach(),
                        None if loss is None or not losses_at_batch_end else detached_all(output),
                    )
                if checks and not is_last:
                    self._within_epoch(batch_idx, val_loader, interval)
                if group is not None:
                    dispatcher.agree(only_if_due=not log_step)
                if pending or signals.received or (group is not None and dispatcher.agreed_signal):
                    if deferred:
                        self._publish(batch_idx, iteration, seen, steps, batch_idx + 1)
                    self.boundary(Boundary.STEP, "batch_end")
                if values["stopped_by"] is not None and not stop_before_epoch and policy.ends_epoch:
                    if policy.open_group:
                        # A final stop drops the open accumulation group.
                        policy.open_group = 0
                        engine.zero_grad()
                    return False
        finally:
            if deferred:
                self._publish(iteration - offset, iteration, seen, steps, done_base + steps)
        if policy.open_group:
            # The last batch was skipped while a group was open: step what was accumulated.
            optimizer_step(engine, policy.open_group)
            policy.open_group = 0
            dispatcher.agree(only_if_due=True)
            self.boundary(Boundary.STEP, "batch_end")
        if not seen_any and first == 0:
            epoch = self.position["epoch"]
            raise no_batches(self.train_loader, epoch, again=epoch > self._first_epoch)
        return True

    def _publish(
        self, batch_idx: int, iteration: int, seen: int, steps: int, batches_done: int
    ) -> None:
        """Write what deferred steps kept in locals into the state: counters, position, rates."""
        engine = self.engine
        engine.state.update(
            batch_idx=batch_idx, iteration=iteration, samples_seen=seen, global_step=steps
        )
        self.position["batches_done"] = batches_done
        record_moved_rates(engine)

    def _within_epoch(
        self, batch_idx: int, val_loader: Iterable[Any] | None, interval: int | None
    ) -> None:
        """After a batch that is not the epoch's last: a validation due, a limit reached.

        The validation runs before the step's boundary, so a training state written there
        includes what it changed (metrics, early-stopping counters): the resume is exact.
        """
        engine = self.engine
        if val_loader is not None and interval is not None and (batch_idx + 1) % interval == 0:
            if not self._validate(val_loader, redo=True):
                return
            engine.state.update(stage="train", batch_idx=batch_idx)
            engine.dispatcher.agree()
        if engine.policy.stop_requested or self.limits.requested:
            return
        limits, global_step = self.limits, engine.state.get("global_step")
        if limits.steps_done(global_step):
            # Every rank counts the same steps: each takes the pause on its own.
            engine.dispatcher.request(limits.pause(global_step, "batch_end"), agreed=True)
        elif self._out_of_time():
            engine.dispatcher.request(limits.pause(global_step, "batch_end"))

    def _validate(self, val_loader: Iterable[Any], *, redo: bool = False) -> bool:
        """A validation inside training; False when a stop signal cut it short.

        Then the training state is written at once, with the generators as the validation
        found them and a position before it: the resume redoes the validation and goes on
        exactly as the uninterrupted run. ``redo``: the position must say so (a validation
        inside an epoch; at an epoch's end, the position already comes before it). Under
        torchrun a validation runs to its end (ranks would have to agree at every batch).
        """
        engine = self.engine
        interruptible = engine.dispatcher.group is None
        self.random_before_validation = capture_random_states() if interruptible else None
        if self.evaluation.validation(val_loader, interruptible=interruptible):
            self.random_before_validation = None
            return True
        if redo:
            self.position["validation_due"] = True
        self.boundary(Boundary.STEP, "evaluation_step_end")
        return False

    def _out_of_time(self) -> bool:
        """Whether ``max_time`` is spent; in a distributed run rank 0's clock decides."""
        return self.engine.placement.is_main and self.limits.out_of_time()

    def restore_pending_random(self) -> None:
        """Put every generator back as it was when the resumed state was written."""
        if self.pending_random is not None:
            restore_random_states(self.pending_random)
            self.pending_random = None
        if self.pending_loader_generators is not None:
            restore_loader_generators(self.train_loader, self.pending_loader_generators)
            self.pending_loader_generators = None
