"""A peer restarted from its own checkpoint after the swarm moved on catches up; nobody rolls back."""

import pytest
import torch

from p2pdiloco import checkpoint

pytestmark = pytest.mark.swarm


def test_restarted_peer_resumes_then_downloads_the_newer_state(local_swarm, tmp_path):
    swarm = local_swarm()
    ckpt = tmp_path / "ckpt"
    swarm.add_peer(1000)
    swarm.add_peer(1000)
    first = swarm.add_peer(1000, "--checkpoint-dir", str(ckpt))
    swarm.wait_until(lambda: min(swarm.epoch(i) for i in range(3)) >= 2, 240, "3 peers to reach epoch 2")
    assert swarm.peers[first].stop(grace=30) == 0  # SIGTERM: finishes or abandons its round, saves, leaves
    saved = torch.load(checkpoint.checkpoint_path(ckpt), weights_only=True)
    assert saved["epoch"] >= 2 and saved["state_hash"]

    swarm.wait_until(lambda: min(swarm.epoch(0), swarm.epoch(1)) >= saved["epoch"] + 3, 240, "the swarm to move on")
    again = swarm.add_peer(1000, "--checkpoint-dir", str(ckpt))
    swarm.wait_until(
        lambda: any(r.get("event") == "outer_step" for r in swarm.metrics(again)), 240, "the restarted peer to average"
    )
    codes = [swarm.peers[i].stop(grace=30) for i in (0, 1, again)]
    assert codes == [0, 0, 0]

    events = swarm.metrics(again)
    assert events[0]["event"] == "resumed" and events[0]["epoch"] == saved["epoch"]
    assert events[0]["state_hash"] == saved["state_hash"]
    downloaded = [r for r in events if r["event"] == "downloaded"]
    assert downloaded and downloaded[0]["epoch"] >= saved["epoch"] + 3, "it should have caught up, not trained alone"
    hashes: dict[int, set] = {}
    for i in (0, 1, first, again):
        epochs = [r["epoch"] for r in swarm.metrics(i)]
        assert epochs == sorted(epochs), f"peer {i} went back in epochs: {epochs}"
        for r in swarm.metrics(i):
            hashes.setdefault(r["epoch"], set()).add(r["state_hash"])
    shared = [e for e, h in hashes.items() if e <= max(r["epoch"] for r in events if r["event"] == "outer_step")]
    assert all(len(hashes[e]) == 1 for e in shared), {e: h for e, h in hashes.items() if len(h) > 1}
