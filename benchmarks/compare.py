"""Side-by-side step time: a hand-written loop, trainbus, PyTorch Ignite and PyTorch Lightning.

Run: ``.venv/bin/python benchmarks/compare.py`` (``--quick`` for a short smoke run,
``--model tiny|small|micro``, ``--subscribers N``, ``--steps S``, ``--json FILE``,
``--mode lockstep|whole``). Ignite and Lightning come from the optional ``bench`` extra
(``pip install -e ".[bench]"``); a peer that is not installed is skipped.

Every contender trains the same network, from the same initial weights, on the same batches
with the same SGD optimizer, in this one process.

- ``--mode lockstep`` (default; see :mod:`support.lockstep`): every contender trains in its
  own thread and the threads take turns every 20 steps, in a new random order each round;
  each step is timed with the thread's CPU clock; the first 3 steps after a turn are left
  out. Reported: the median over steps of the paired ratio to the raw loop's same step, its
  quartiles, and the median extra microseconds per step; with ``--repeats R`` rounds (5 by
  default) the median over rounds and the lowest and highest round.
- ``--mode whole``: whole fits interleaved in a random order at each repeat. Each
  measurement times runs of ``S`` and ``3 S`` steps: the difference over ``2 S`` is the steady
  time per step, free of what a framework does once per run, reported apart as the fixed
  cost. Reported: the median over repeats, its spread, and the ratio to the raw loop.

Contenders (``N`` = ``--subscribers``):

- ``raw``: the hand-written loop.
- ``raw+N``: the same loop calling a plain list of N no-op functions at each of the seven
  points where trainbus emits a step event: the floor for any callback system.
- ``design+N``: the least a loop of trainbus's design does (seven events with keyword calls,
  two frozen state snapshots per step, the loss kept for the log interval): trainbus's floor.
- ``trainbus`` / ``trainbus+N``: trainbus without default callbacks, with no subscriber and
  with N no-op subscribers on each step event.
- ``trainbus-defaults``: trainbus with its default callbacks (logger, monitor, metrics
  writer, model and training checkpoints), writing a MAPS in a temporary directory.
- ``ignite+N`` / ``ignite``: ``create_supervised_trainer`` with N no-op handlers on each
  per-iteration event, and with none (Ignite has no default handlers).
- ``lightning+N`` / ``lightning-defaults``: Lightning with N no-op callbacks on each step hook
  and nothing else, and with its defaults (progress bar, logger, checkpointing, summary).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from support.contenders import (
    MODELS,
    Batch,
    Runner,
    contenders,
    make_batches,
    make_network,
    quiet,
)
from support.lockstep import paired, run_lockstep

import trainbus


# ------------------------------------------------------------------------------ measuring
def timed(runner: Runner, model: str, batches: list[Batch]) -> float:
    network = make_network(model)
    gc.collect()
    gc.disable()  # as timeit does: a collection landing in one run only is noise
    try:
        started = time.perf_counter()
        runner(network, batches)
        return time.perf_counter() - started
    finally:
        gc.enable()


def measure_whole(
    runners: dict[str, Runner], model: str, steps: int, repeats: int, seed: int
) -> dict[str, dict[str, float]]:
    """Whole fits of S and 3 S steps, interleaved in a random order at each repeat."""
    short, long = make_batches(model, steps), make_batches(model, 3 * steps)
    per_step: dict[str, list[float]] = {name: [] for name in runners}
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    fixed: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    shuffler = random.Random(seed)
    for name in order:  # warm-up: imports, allocator, first-call caches
        timed(runners[name], model, short[:3])
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            short_time = timed(runners[name], model, short)
            long_time = timed(runners[name], model, long)
            step = (long_time - short_time) / (2 * steps)
            per_step[name].append(step)
            fixed[name].append(short_time - steps * step)
        for name in runners:
            # Against the raw loop of the same repeat: slow drifts of the machine cancel.
            ratios[name].append(per_step[name][-1] / per_step["raw"][-1])
    results = {}
    for name in runners:
        results[name] = {
            "median_us": statistics.median(per_step[name]) * 1e6,
            "low_us": min(per_step[name]) * 1e6,
            "high_us": max(per_step[name]) * 1e6,
            "ratio": statistics.median(ratios[name]),
            "ratio_low": min(ratios[name]),
            "ratio_high": max(ratios[name]),
            "fixed_ms": statistics.median(fixed[name]) * 1e3,
        }
    return results


def measure_lockstep(
    runners: dict[str, Runner],
    model: str,
    steps: int,
    rounds: int,
    *,
    seed: int,
    design: str | None = None,
) -> dict[str, dict[str, float]]:
    """Every contender in its own thread, taking turns every 20 steps (module docstring).

    ``rounds`` lock-step runs, each with fresh threads and networks and the contenders in a
    new random order (who follows whom, and where each one's tensors land in memory, would
    otherwise be the same in every round of a process): the figures are the median over
    rounds, and ``ratio_low``/``ratio_high`` the lowest and highest round.
    ``design`` names the design-minimum contender: ``vs_design`` is then each contender's
    median paired ratio to it (step k against its step k), the precise way to compare two
    contenders that both sit a few percent above the raw loop.
    """
    batches = make_batches(model, steps)
    for runner in runners.values():  # warm-up: imports, allocator, first-call caches
        timed(runner, model, batches[:3])
    per_round = []
    against_design: list[dict[str, dict[str, float]]] = []
    order, shuffler = list(runners), random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        gc.collect()
        gc.disable()
        try:
            steps_by_name = run_lockstep(
                {name: runners[name] for name in order}, lambda: make_network(model), batches
            )
        finally:
            gc.enable()
        per_round.append(paired(steps_by_name, reference="raw"))
        if design is not None:
            against_design.append(paired(steps_by_name, reference=design))
    results = {}
    for name in runners:
        rows = [result[name] for result in per_round]
        results[name] = {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {
            "ratio_low": min(row["ratio"] for row in rows),
            "ratio_high": max(row["ratio"] for row in rows),
        }
        if against_design:
            results[name]["vs_design"] = statistics.median(
                result[name]["ratio"] for result in against_design
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, 1 repeat (CI smoke run)")
    parser.add_argument("--mode", choices=("lockstep", "whole"), default="lockstep")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="steps (whole: of the short run)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats (lock-step: rounds; default 5)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    runners = contenders(arguments.subscribers)
    lockstep = arguments.mode == "lockstep"
    if lockstep:
        default_steps = 60 if arguments.quick else (4000 if arguments.model != "small" else 400)
    else:
        default_steps = 20 if arguments.quick else (400 if arguments.model != "small" else 60)
    steps = arguments.steps or default_steps
    repeats = arguments.repeats or (1 if arguments.quick else (5 if lockstep else 7))
    shape = (
        f"{steps} steps in turns of 20, {repeats} round(s)"
        if lockstep
        else f"{steps} and {3 * steps} steps, {repeats} repeats"
    )
    print(
        f"model {arguments.model}, {arguments.mode}: {shape}, "
        f"torch {torch.__version__} ({arguments.threads} thread), "
        f"trainbus {trainbus.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    if lockstep:
        design = f"design+{arguments.subscribers}"
        with quiet():
            results = measure_lockstep(
                runners, arguments.model, steps, repeats, seed=0, design=design
            )
        print(
            f"{'contender':<20} {'us/step':>9} {'x raw':>7} {'quartiles':>13} {'extra us':>9} "
            f"{'rounds':>13} {'x design':>9}"
        )
        for name, row in results.items():
            quartiles = f"{row['ratio_q1']:.3f}-{row['ratio_q3']:.3f}"
            rounds = f"{row['ratio_low']:.3f}-{row['ratio_high']:.3f}"
            print(
                f"{name:<20} {row['us_per_step']:>9.1f} {row['ratio']:>7.3f} {quartiles:>13} "
                f"{row['extra_us']:>9.1f} {rounds:>13} {row['vs_design']:>9.3f}"
            )
    else:
        with quiet():
            results = measure_whole(runners, arguments.model, steps, repeats, seed=0)
        print(
            f"{'contender':<20} {'us/step':>9} {'spread':>15} {'x raw':>7} "
            f"{'x raw spread':>13} {'fixed ms':>9}"
        )
        for name, row in results.items():
            spread = f"{row['low_us']:.1f}-{row['high_us']:.1f}"
            ratio_spread = f"{row['ratio_low']:.2f}-{row['ratio_high']:.2f}"
            print(
                f"{name:<20} {row['median_us']:>9.1f} {spread:>15} {row['ratio']:>7.3f} "
                f"{ratio_spread:>13} {row['fixed_ms']:>9.1f}"
            )
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
