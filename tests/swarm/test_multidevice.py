"""A peer on several local devices in a real swarm: two CPU workers (gloo) make one peer, which
averages with a one-device peer; the death of a local worker stops its peer alone."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.swarm


def _spawned_workers(pid: int) -> list[int]:
    """The local workers a peer started: its children started by multiprocessing's spawn (the
    averager is forked, the resource tracker is not a worker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    workers = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def test_a_two_worker_peer_and_a_one_worker_peer_hold_one_state_and_a_dead_worker_stops_its_peer(local_swarm):
    swarm = local_swarm()
    pair = swarm.add_peer(1000, "--set", "peer.devices=cpu:2")
    single = swarm.add_peer(1000)
    # The single peer may train alone (and the pair download its state) while the pair starts its worker.
    steps = lambda: [r for r in swarm.metrics(pair) if r["event"] == "outer_step"]  # noqa: E731
    swarm.wait_until(lambda: len(steps()) >= 3, 240, "the two-worker peer to average 3 rounds")
    log = lambda: (swarm.out / f"peer{pair}.log").read_text()  # noqa: E731
    assert "training on 2 local devices" in log()
    assert all(r["group_size"] == 2 for r in steps()), "the two-worker peer is one member of the round"
    # status says where each peer trains
    args = [sys.executable, "-m", "p2pdiloco", "status", "--run", "test", "--json", "--timeout", "10", "--peers", swarm.addrs[0]]
    rows = json.loads(subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout)["test"]["peers"]
    devices = {row["peer"]: row["devices"] for row in rows}
    assert devices[steps()[0]["peer"]] == ["cpu", "cpu"] and devices[swarm.metrics(single)[0]["peer"]] == ["cpu"]

    workers = _spawned_workers(swarm.peers[pair].proc.pid)
    assert len(workers) == 1, f"expected one spawned local worker, found {workers}"
    signal_at = swarm.epoch(single)
    os.kill(workers[0], signal.SIGKILL)
    swarm.killed.add(pair)  # its exit is the test
    assert swarm.wait_exit([pair], 120) == [9], "the peer did not stop with LocalWorkerFailed's exit code"
    errors = [line for line in log().splitlines() if "local worker 1 (on cpu) died" in line]
    assert len(errors) == 1, "the peer did not name its dead worker in one line"
    swarm.wait_until(lambda: swarm.epoch(single) >= signal_at + 2, 120, "the other peer to go on")
    assert swarm.peers[single].stop(grace=30) == 0
    swarm.assert_consistent([pair, single])
