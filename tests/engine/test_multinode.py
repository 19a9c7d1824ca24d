"""Two torchrun "nodes" on this machine: c10d rendezvous, gloo, one process per node.

Each node is its own ``torchrun --nnodes=2`` launch with its own working directory and output
directory; the MAPS path is the same for both, as on a shared file system. The c10d
rendezvous ignores ``--node-rank`` and ranks the agents its own way, so the tests find which
node holds which rank from the files each one wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from . import test_distributed as single

OPTIONS = (
    *("--epochs", "3", "--samples", "128", "--log-every", "4"),
    *("--shuffle", "--dropout", "0.3", "--rank-seeds", "--every-n-steps", "3"),
    *("--stop-rank", "1", "--stop-at-iteration", "20"),
)
"""24 steps planned; rank 1 alone asks to stop at iteration 20, in the last epoch."""

KILLED = ("--hang-rank", "1", "--hang-at-iteration", "11")
"""Rank 1 waits to be killed at iteration 11 of the first attempt (last state: step 9)."""

"""Each rendezvous round gets a fresh TCPStore: no attempt prefix is needed to meet again."""


@dataclass
class Nodes:
    maps: Path
    homes: list[Path]
    outputs: list[str]

    def file(self, name: str) -> Path:
        """``name`` in the output directory of whichever node wrote it."""
        found = [home / "out" / name for home in self.homes if (home / "out" / name).exists()]
        assert len(found) == 1, f"{name} in {found}"
        return found[0]

    def summary(self, rank: int) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.file(f"rank{rank}.json").read_text())
        return loaded

    def weights(self, rank: int) -> dict[str, torch.Tensor]:
        loaded: dict[str, torch.Tensor] = torch.load(self.file(f"rank{rank}.pt"))
        return loaded

    def home_of(self, rank: int) -> Path:
        return self.file(f"rank{rank}.json").parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop(agent: subprocess.Popen[str]) -> None:
    """SIGKILL a torchrun agent and its workers (torchrun starts each in a session of its own)."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
    workers = children.read_text().split() if children.exists() else []
    os.killpg(agent.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(worker), signal.SIGKILL)
    agent.communicate()


def two_nodes(
    directory: Path,
    *options: str,
    max_restarts: int = 0,
    kill: bool = False,
    environment: dict[str, str] | None = None,
    timeout: float = 180,
) -> Nodes:
    """Start both nodes together and wait for both; with ``kill``, SIGKILL the hanging worker."""
    maps, pid_file = directory / "maps", directory / "worker.pid"
    homes = [directory / f"node{n}" for n in (0, 1)]
    port = free_port()
    env = {**single.environment(), **(environment or {})}
    agents = []
    for node, home in enumerate(homes):
        home.mkdir(parents=True)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--node-rank={node}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.2",
            str(single.JOB),
            str(maps),
            "out",
            *options,
            *(("--pid-file", str(pid_file)) if kill else ()),
        ]
        agents.append(
            subprocess.Popen(
                command,
                env=env,
                cwd=home,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        if kill:
            while not pid_file.exists():
                assert all(a.poll() is None for a in agents), "a node ended before the kill"
                assert time.monotonic() < deadline, "no worker reached the iteration to kill"
                time.sleep(0.05)
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        outputs = [a.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for a in agents]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two nodes did not end within {timeout} s")
    finally:
        for agent in agents:
            if agent.poll() is None:
                stop(agent)
    for agent, output in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, output[-6000:]
    return Nodes(maps, homes, outputs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Nodes:
    """An uninterrupted two-node training, each node recording what it wrote under the MAPS."""
    directory = tmp_path_factory.mktemp("two-nodes")
    return two_nodes(directory, *OPTIONS, "--resume", "--audit-writes")


def test_a_stop_asked_on_one_node_ends_both_at_the_same_step(straight: Nodes) -> None:
    summaries = [straight.summary(0), straight.summary(1)]
    assert [(s["rank"], s["world_size"]) for s in summaries] == [(0, 2), (1, 2)]
    assert straight.home_of(0) != straight.home_of(1)
    for summary in summaries:
        assert (summary["iteration"], summary["global_step"]) == (20, 20)
        assert summary["stopped_by"] == "OneRankDecides.on_batch_end@rank1"
    assert summaries[0]["metrics"] == summaries[1]["metrics"]
    single.assert_equal_weights(straight.weights(0), straight.weights(1))


def test_rank_zero_of_one_node_alone_writes_the_maps(straight: Nodes) -> None:
    written = {rank: json.loads(straight.file(f"writes{rank}.json").read_text()) for rank in (0, 1)}
    # The audit sees rank 0's writes (the lock, maps.json, the training states): it would see
    # the other node's.
    assert any(w.endswith("/maps.json") for w in written[0])
    assert any("/training/" in w for w in written[0])
    assert written[1] == []
    other = straight.home_of(1)
    assert sorted(p.name for p in other.iterdir()) == ["out"]
    assert sorted(p.name for p in (other / "out").iterdir()) == [
        "rank1.json",
        "rank1.pt",
        "writes1.json",
    ]
    recorded = json.loads((straight.maps / "maps.json").read_text())
    assert [call["call"] for call in recorded["calls"]] == ["train", "test"]
    assert {call["world_size"] for call in recorded["calls"]} == {2}
    entries = single.jsonl(straight.maps)
    assert [e["event"] for e in entries].count("train_start") == 1
    assert sum(output.count("train_start") for output in straight.outputs) == 1


@pytest.mark.fault(
    "SIGKILL of a worker on one of two torchrun nodes (c10d), restarted by --max-restarts",
    outcome="both nodes restart, agree on the restart and resume bit-identically",
)
def test_a_killed_worker_on_one_node_restarts_both_nodes_and_resumes_exactly(
    straight: Nodes, tmp_path: Path
) -> None:
    # A plain launch: the rendezvous store shared across rounds, and no resume=True.
    killed = two_nodes(tmp_path, *OPTIONS, *KILLED, max_restarts=1, kill=True, timeout=120)
    # torchrun counts the restart only on the node whose worker died; the ranks agree on it.
    assert [killed.summary(rank)["restart_count"] for rank in (0, 1)] == [1, 1]
    for rank in (0, 1):
        assert killed.summary(rank)["iteration"] == 20
        single.assert_equal_weights(killed.weights(rank), straight.weights(0))
    assert killed.summary(0)["metrics"] == straight.summary(0)["metrics"]
    recorded = json.loads((killed.maps / "maps.json").read_text())
    resumed = [c["resumed_from"]["state"] for c in recorded["calls"] if "resumed_from" in c]
    assert resumed == ["state-0000000009"]
