"""A network partition and its healing, with peers in network namespaces (a real cut link).

Topology (see ../shared/reference/netem.md): a hub namespace with a bridge, one namespace per
node attached by a veth pair, addresses 10.77.0.N, no default route anywhere. The coordinator is
node 10, peers are nodes 1-3. Peer 3's link is cut by taking the hub's end of its veth down.

Checked: while cut off, peer 3 never applies an outer step (it must not publish a state of its
own as the run's); the others go on; after healing, peer 3 finds the swarm again (its DHT
routing table was emptied by the cut; the watchdog re-contacts the coordinator), downloads the
newer state and averages with the others; every epoch's states agree.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from p2pdiloco.simulate import ProcessGroup, _cli, read_metrics, start_coordinator
from tests.conftest import TEST_CONFIG

pytestmark = pytest.mark.swarm

PORT = 31337


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class NetnsSwarm:
    """Namespaces, a coordinator and peers inside them; ``stop`` removes all of it."""

    def __init__(self, out: Path, cache_dir: Path):
        self.out, self.cache_dir = out, cache_dir
        self.prefix = f"p2pt{os.getpid() % 100000}"
        self.hub = f"{self.prefix}hub"
        self.namespaces: list[str] = []
        self.peers: dict[int, ProcessGroup] = {}
        self.coordinator: ProcessGroup | None = None
        self._add_namespace(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_node(self, node: int) -> list[str]:
        """A namespace for ``node`` linked to the hub; returns the ``ip netns exec`` launcher."""
        ns = f"{self.prefix}n{node}"
        self._add_namespace(ns)
        _ip("-n", self.hub, "link", "add", f"h{node}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.hub, "link", "set", f"h{node}", "master", "br0")
        _ip("-n", self.hub, "link", "set", f"h{node}", "up")
        _ip("-n", ns, "addr", "add", f"10.77.0.{node}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return ["ip", "netns", "exec", ns]

    def set_link(self, node: int, up: bool) -> None:
        _ip("-n", self.hub, "link", "set", f"h{node}", "up" if up else "down")

    def start_coordinator(self) -> list[str]:
        launcher = self.add_node(10)
        self.coordinator, addrs = start_coordinator(
            self.out, 60, "--host", "10.77.0.10", "--port", str(PORT), launcher=launcher
        )
        return addrs

    def add_peer(self, node: int, addrs: list[str]) -> None:
        args = [*self.add_node(node), *_cli(), "join", TEST_CONFIG, "--host", f"10.77.0.{node}", "--port", str(PORT),
                "--metrics-file", str(self.out / f"peer{node}.jsonl"), "--set", f'peer.cache_dir="{self.cache_dir}"']
        for addr in addrs:
            args += ["--peers", addr]
        self.peers[node] = ProcessGroup(args, self.out / f"peer{node}.log")

    def metrics(self, node: int) -> list[dict]:
        return read_metrics(self.out / f"peer{node}.jsonl")

    def epoch(self, node: int) -> int:
        return max((r["epoch"] for r in self.metrics(node)), default=-1)

    def wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            crashed = [n for n, p in self.peers.items() if not p.alive()]
            if crashed or time.monotonic() > deadline:
                raise AssertionError(f"{'peer(s) %s exited' % crashed if crashed else 'timed out'} waiting for {what}; logs in {self.out}")
            time.sleep(0.25)  # metrics files have no change notification to block on

    def stop(self) -> list[int]:
        for p in self.peers.values():
            p.terminate()
        codes = [p.stop(grace=30) for p in self.peers.values()]
        if self.coordinator is not None:
            self.coordinator.stop(grace=10)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()
        return codes


@pytest.fixture
def netns_swarm(tmp_path, data_cache):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    probe = f"p2pprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {done.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    swarm = NetnsSwarm(tmp_path, data_cache)
    try:
        yield swarm
    finally:
        swarm.stop()


def test_cut_off_peer_does_not_fork_and_rejoins_after_the_link_heals(netns_swarm):
    swarm = netns_swarm
    addrs = swarm.start_coordinator()
    for node in (1, 2, 3):
        swarm.add_peer(node, addrs)
    swarm.wait_until(lambda: min(swarm.epoch(n) for n in (1, 2, 3)) >= 2, 240, "3 peers to reach epoch 2")

    swarm.set_link(3, up=False)
    cut_at = time.time()
    cut_epoch = swarm.epoch(3)
    # Long enough for the cut-off peer's DHT routing table to empty (about 6 s) and for the others
    # to go on for several epochs.
    swarm.wait_until(lambda: min(swarm.epoch(n) for n in (1, 2)) >= cut_epoch + 4 and time.time() > cut_at + 15,
                     120, "the connected peers to go on without peer 3")
    swarm.set_link(3, up=True)
    healed_at = time.time()

    def rejoined() -> bool:
        later = [r for r in swarm.metrics(3) if r["time"] > healed_at]
        downloads = [k for k, r in enumerate(later) if r["event"] == "downloaded"]
        return bool(downloads) and any(r["event"] == "outer_step" and r["group_size"] == 3 for r in later[downloads[0]:])

    swarm.wait_until(rejoined, 120, "peer 3 to re-sync and average with the others after the link healed")
    codes = swarm.stop()
    assert codes == [0, 0, 0], f"peers did not leave cleanly: {codes}"

    cut_off_steps = [r for r in swarm.metrics(3) if cut_at < r["time"] < healed_at and r["event"] in ("outer_step", "solo_step")]
    # A round already in flight when the link went down may still have completed; nothing after it.
    assert len(cut_off_steps) <= 1 and not [r for r in cut_off_steps if r["event"] == "solo_step"], cut_off_steps
    states: dict[int, set[str]] = {}
    for node in (1, 2, 3):
        for r in swarm.metrics(node):
            states.setdefault(r["epoch"], set()).add(r["state_hash"])
    forks = {e: h for e, h in states.items() if len(h) > 1}
    assert not forks, f"peers hold different states at epochs {sorted(forks)}"
