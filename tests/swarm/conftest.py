"""A local swarm of real ``p2pdiloco join`` processes for the swarm and e2e tests.

Each peer runs in its own process group (its DHT, averager and ``p2pd`` included); teardown
stops every group and checks that nothing of it is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pdiloco.simulate import ProcessGroup, _cli, read_metrics, start_coordinator
from tests.conftest import TEST_CONFIG


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSwarm:
    def __init__(self, out: Path, cache_dir: Path, overrides: list[str] = (), coordinator_args: list[str] = ()):
        self.out, self.cache_dir, self.overrides = out, cache_dir, list(overrides)
        out.mkdir(parents=True, exist_ok=True)
        # A fixed port and identity, so that a restarted coordinator has the very same address.
        self.coordinator_args = ["--port", str(_free_port()), "--identity", str(out / "coordinator.key"), *coordinator_args]
        self.coordinator, self.addrs = start_coordinator(out, 60, *self.coordinator_args)
        self.peers: list[ProcessGroup] = []
        self.killed: set[int] = set()

    def add_peer(self, max_epochs: int, *extra: str, fault: str | None = None) -> int:
        """Start a ``p2pdiloco join`` process; ``fault``: a P2PDILOCO_FAULT spec (see p2pdiloco/faults.py)."""
        index = len(self.peers)
        args = [*_cli(), "join", TEST_CONFIG, "--max-epochs", str(max_epochs), "--metrics-file", str(self.metrics_path(index))]
        for addr in self.addrs:
            args += ["--peers", addr]
        for item in [f'peer.cache_dir="{self.cache_dir}"', *self.overrides]:
            args += ["--set", item]
        env = dict(os.environ, P2PDILOCO_FAULT=fault) if fault else None
        self.peers.append(ProcessGroup(args + list(extra), self.out / f"peer{index}.log", env=env))
        return index

    def restart_coordinator(self) -> list[str]:
        """Start the coordinator again (same port and identity) after it was killed; its addresses."""
        self.coordinator, addrs = start_coordinator(self.out, 60, *self.coordinator_args)
        return addrs

    def states_by_epoch(self, indices) -> dict[int, dict[int, str]]:
        """epoch -> {peer index: state digest} from every record of the given peers."""
        out: dict[int, dict[int, str]] = {}
        for i in indices:
            for r in self.metrics(i):
                out.setdefault(r["epoch"], {})[i] = r["state_hash"]
        return out

    def assert_consistent(self, indices) -> None:
        """Every epoch reached by several of these peers: all of them hold the same state."""
        for epoch, by_peer in sorted(self.states_by_epoch(indices).items()):
            assert len(set(by_peer.values())) == 1, f"epoch {epoch}: peers hold different states {by_peer}"

    def longest_stall(self, index: int) -> float:
        """The longest time between two consecutive epochs of a peer (seconds)."""
        times = sorted(r["time"] for r in self.metrics(index) if r.get("event") in ("outer_step", "downloaded", "solo_step"))
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def metrics_path(self, index: int) -> Path:
        return self.out / f"peer{index}.jsonl"

    def metrics(self, index: int) -> list[dict]:
        return read_metrics(self.metrics_path(index))

    def metrics_of(self, peer_id: str) -> list[dict]:
        """The records of the peer with this id, whichever process index wrote them."""
        return [r for i in range(len(self.peers)) for r in self.metrics(i) if r["peer"] == peer_id]

    def epoch(self, index: int) -> int:
        return max((r["epoch"] for r in self.metrics(index)), default=-1)

    def wait_until(self, condition, timeout: float, what: str) -> None:
        """Wait for a condition on the peers' metrics files (written as epochs complete), bounded."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.out}")
            dead = [i for i, p in enumerate(self.peers) if not p.alive() and p.proc.returncode != 0 and i not in self.killed]
            if dead:
                raise AssertionError(f"peer(s) {dead} crashed; see {self.out}/peer*.log")
            time.sleep(0.25)  # metrics files have no change notification we could block on portably

    def kill(self, index: int) -> None:
        """SIGKILL the peer's whole process group: Python, DHT, averager and p2pd at once."""
        import signal

        self.killed.add(index)
        self.peers[index].signal(signal.SIGKILL)
        self.peers[index].proc.wait(30)
        self.peers[index].stop(grace=0)  # reaps, and waits until no process of the group is left

    def wait_exit(self, indices, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for i in indices:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                codes.append(self.peers[i].proc.wait(remaining))
            except Exception:
                raise AssertionError(f"peer {i} did not finish within {timeout:.0f} s; see {self.out}/peer{i}.log") from None
        return codes

    def stop(self) -> None:
        for p in self.peers:
            p.stop(grace=10)
        self.coordinator.stop(grace=10)
        leftovers = [p.proc.pid for p in [*self.peers, self.coordinator] if not p.gone()]
        assert not leftovers, f"process groups still alive after stop: {leftovers}"


@pytest.fixture
def local_swarm(tmp_path, data_cache):
    swarms = []

    def make(overrides=(), coordinator_args=()):
        swarm = LocalSwarm(tmp_path / f"swarm{len(swarms)}", data_cache, overrides, coordinator_args)
        swarms.append(swarm)
        return swarm

    yield make
    for swarm in swarms:
        swarm.stop()


AVERAGING_WORKER = Path(__file__).with_name("averaging_worker.py")


def run_averaging_workers(tmp_path, count: int, compression: str = "none", env: dict | None = None,
                          hostile: dict[int, str] | None = None, env_of: dict[int, dict] | None = None) -> list[dict]:
    """Run ``count`` averaging_worker.py processes as one group (rank -> P2PDILOCO_FAULT in
    ``hostile``; ``env`` shapes the group, ``env_of`` one worker, see the worker), wait for all,
    load their records. Each worker's stderr goes to ``avgN.log`` in ``tmp_path``."""
    outs = [tmp_path / f"avg{i}.pt" for i in range(count)]
    base = dict(os.environ, AVG_WORKERS=str(count), **(env or {}))
    base.pop("P2PDILOCO_FAULT", None)

    def start(i, *peers, **kw):
        fault = {"P2PDILOCO_FAULT": hostile[i]} if hostile and i in hostile else {}
        with open(tmp_path / f"avg{i}.log", "w") as log:
            return subprocess.Popen([sys.executable, str(AVERAGING_WORKER), str(outs[i]), str(i), compression, *peers],
                                    env=dict(base, **fault, **(env_of or {}).get(i, {})), start_new_session=True,
                                    stderr=log, **kw)

    procs = [start(0, stdout=subprocess.PIPE, text=True)]
    try:
        addr = procs[0].stdout.readline().strip()
        assert addr.startswith("/ip4/"), "the first worker did not start"
        procs += [start(i, addr) for i in range(1, count)]
        for p in procs:
            assert p.wait(timeout=240) == 0
    finally:
        for p in procs:  # by process group: the worker's DHT, averager and p2pd go with it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    import torch

    return [torch.load(out) for out in outs]
