"""Which pieces of FSDP2 and Distributed Checkpoint this torch build runs, one line per check.

    torchrun --nproc-per-node=2 benchmarks/fsdp_probe.py            # gloo on the CPU
    torchrun --nproc-per-node=2 benchmarks/fsdp_probe.py --device cuda
    python benchmarks/fsdp_probe.py                                  # starts torchrun itself

A tiny MLP is sharded with ``fully_shard``, trained 3 steps with gradient clipping, saved
with ``dcp.save`` and ``dcp.async_save``, loaded back into a freshly sharded model and
optimizer, and gathered into a full state dict on rank 0. Rank 0 prints ``<check>: ok`` or
``<check>: failed: <error>`` (with the rank that failed); a check that needs one that failed
is reported as skipped. The exit status is the number of checks that did not pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

TIMEOUT = timedelta(seconds=90)


class Probe:
    """Runs the checks on every rank and reports them on rank 0."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.passed: set[str] = set()
        self.failures = 0

    def check(self, name: str, action: Callable[[], Any], *, needs: tuple[str, ...] = ()) -> Any:
        missing = [n for n in needs if n not in self.passed]
        if missing:
            self.report(name, f"skipped: needs {', '.join(missing)}")
            self.failures += 1
            return None
        started = time.perf_counter()
        result, error = None, ""
        try:
            result = action()
        except Exception as failure:  # the probe's purpose is to report any failure
            error = f"{type(failure).__name__}: {failure}".replace("\n", " | ")
            if os.environ.get("FSDP_PROBE_TRACEBACK"):
                traceback.print_exc()
        seconds = time.perf_counter() - started
        errors = gathered(error)
        failed = [(rank, text) for rank, text in enumerate(errors) if text]
        if failed:
            self.failures += 1
            rank, text = failed[0]
            self.report(name, f"failed (rank {rank}): {text}")
        else:
            self.passed.add(name)
            self.report(name, f"ok ({seconds:.2f}s)")
        return result

    def report(self, name: str, outcome: str) -> None:
        if self.rank == 0:
            print(f"{name}: {outcome}", flush=True)


def gathered(text: str) -> list[str]:
    """Every rank's ``text``; a failed exchange (a broken group) reports this rank's alone."""
    try:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, text)
        return [str(t) for t in every]
    except Exception as failure:
        return [text or f"the ranks could not exchange results: {failure}"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--directory", type=Path, default=None, help="where to save (a temp dir)")
    parser.add_argument("--quick", action="store_true", help="the same checks (they are quick)")
    options = parser.parse_args()
    if "RANK" not in os.environ:
        # Started by hand (or by the benchmarks' smoke test): two processes under torchrun.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node=2", __file__, *sys.argv[1:]]
        return subprocess.run(command, check=False).returncode
    cuda = options.device == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    # cpu:gloo keeps a CPU path even with nccl, which Distributed Checkpoint's planner uses.
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    probe = Probe()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if probe.rank == 0:
        print(
            f"torch {torch.__version__}, {dist.get_world_size()} processes, backend {backend}, "
            f"device {device.type}",
            flush=True,
        )
    try:
        run_checks(probe, device, options.directory)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return probe.failures


def run_checks(probe: Probe, device: torch.device, directory: Path | None) -> None:
    if directory is not None:
        probe_checks(probe, device, directory)
        return
    names = [tempfile.mkdtemp(prefix="fsdp-probe-") if probe.rank == 0 else ""]
    dist.broadcast_object_list(names, src=0)
    try:
        probe_checks(probe, device, Path(names[0]))
    finally:
        dist.barrier()
        if probe.rank == 0:
            shutil.rmtree(names[0], ignore_errors=True)


def probe_checks(probe: Probe, device: torch.device, directory: Path) -> None:
    world = dist.get_world_size()
    mesh = probe.check("init_device_mesh", lambda: init_device_mesh(device.type, (world,)))

    def shard() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp().to(device)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if not all(isinstance(p, DTensor) for p in model.parameters()):
            raise AssertionError("fully_shard left parameters that are not DTensors")
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    built = probe.check(
        "fully_shard (per Linear, then the root)", shard, needs=("init_device_mesh",)
    )
    model, optimizer = built if built is not None else (None, None)
    generator = torch.Generator().manual_seed(1 + probe.rank)
    inputs = torch.randn(3, 8, 16, generator=generator).to(device)
    target = torch.randint(0, 4, (3, 8), generator=generator).to(device)

    def train() -> list[float]:
        assert model is not None and optimizer is not None
        norms = []
        for step in range(3):
            loss = nn.functional.cross_entropy(model(inputs[step]), target[step])
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            norms.append(float(norm))
            clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            if isinstance(clipped, DTensor):
                clipped = clipped.full_tensor()
            if not float(norm) > 0.1 >= float(clipped) - 1e-6:
                raise AssertionError(f"norm {float(norm):.4f} clipped to {float(clipped):.4f}")
            optimizer.step()
            optimizer.zero_grad()
        return norms

    trained = ("fully_shard (per Linear, then the root)",)
    norms = probe.check(
        "train 3 steps with clip_grad_norm_ on DTensor parameters", train, needs=trained
    )
    if norms is not None and probe.rank == 0:
        print(f"  total norms before clipping to 0.1: {', '.join(f'{n:.4f}' for n in norms)}")

    def expected_local() -> dict[str, torch.Tensor]:
        assert model is not None
        return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}

    reference = expected_local() if model is not None else {}

    def save(target_dir: Path) -> None:
        assert model is not None and optimizer is not None
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=target_dir)

    trained_steps = ("train 3 steps with clip_grad_norm_ on DTensor parameters",)
    probe.check(
        "dcp.save (get_state_dict of model and optimizer)",
        lambda: save(directory / "sync"),
        needs=trained_steps,
    )

    def async_save() -> str:
        assert model is not None and optimizer is not None
        model_state, optimizer_state = get_state_dict(model, optimizer)
        started = time.perf_counter()
        pending = dcp.async_save(
            {"model": model_state, "optimizer": optimizer_state},
            checkpoint_id=directory / "async",
        )
        returned = time.perf_counter() - started
        future = getattr(pending, "upload_completion", pending)
        future.result()
        return f"returned after {returned:.3f}s"

    timing = probe.check("dcp.async_save (waited on)", async_save, needs=trained_steps)
    if timing is not None and probe.rank == 0:
        print(f"  async_save {timing}")

    def load(source: Path) -> None:
        fresh, fresh_optimizer = shard()
        model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=source)
        set_state_dict(
            fresh,
            fresh_optimizer,
            model_state_dict=loaded["model"],
            optim_state_dict=loaded["optimizer"],
        )
        for name, parameter in fresh.named_parameters():
            local = parameter.to_local()
            if not torch.equal(local, reference[name]):
                raise AssertionError(f"{name} differs from the saved model after loading")
        state = fresh_optimizer.state_dict()["state"]
        if not state:
            raise AssertionError("the optimizer has no state after loading")

    probe.check(
        "dcp.load + set_state_dict into a fresh sharded model (sync save)",
        lambda: load(directory / "sync"),
        needs=("dcp.save (get_state_dict of model and optimizer)",),
    )
    probe.check(
        "dcp.load + set_state_dict into a fresh sharded model (async save)",
        lambda: load(directory / "async"),
        needs=("dcp.async_save (waited on)",),
    )

    def full_state() -> None:
        assert model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        full = {n: p.full_tensor().cpu() for n, p in model.named_parameters()}
        if probe.rank == 0:
            for name, tensor in full.items():
                if isinstance(state[name], DTensor) or not torch.equal(state[name], tensor):
                    raise AssertionError(f"{name} of the full state dict is not the full parameter")
            if state["0.weight"].shape != (32, 16):
                raise AssertionError(f"0.weight has shape {tuple(state['0.weight'].shape)}")
        elif state:
            raise AssertionError(f"rank {probe.rank} got {len(state)} entries (cpu_offload: none)")

    probe.check(
        "get_model_state_dict(full_state_dict, cpu_offload) on rank 0",
        full_state,
        needs=trained_steps,
    )


if __name__ == "__main__":
    sys.exit(main())
