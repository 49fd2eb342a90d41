"""Quantized pseudo-gradients between real peers: the state stays byte-identical, the wire shrinks,
and the error-feedback residual is carried and checkpointed."""

import pytest
import torch

from p2pdiloco import checkpoint

pytestmark = pytest.mark.swarm

EPOCHS = 5


@pytest.mark.parametrize("codec,ratio", [("4bit", 7.0), ("blockwise8", 3.8)])
def test_three_peers_stay_identical_with_a_quantized_codec_and_error_feedback(local_swarm, tmp_path, codec, ratio):
    # Groups of 3 only: every round quantizes between all three (peers that start early wait
    # for the last one, rather than the test hoping that start-up on a loaded machine is even).
    swarm = local_swarm([f"run.compression={codec}", "run.error_feedback=true", "run.min_group_size=3"])
    for i in range(3):
        swarm.add_peer(EPOCHS, "--checkpoint-dir", str(tmp_path / f"ckpt{i}"))
    assert swarm.wait_exit(range(3), 300) == [0, 0, 0]

    swarm.assert_consistent(range(3))
    full = [r for i in range(3) for r in swarm.metrics(i) if r.get("event") == "outer_step" and r["group_size"] == 3]
    assert len({r["epoch"] for r in full}) >= 3, "the three peers rarely averaged together"
    saved = [torch.load(checkpoint.checkpoint_path(tmp_path / f"ckpt{i}"), weights_only=True) for i in range(3)]
    size = saved[0]["params"].numel()
    # Over a round of a group of g, every value crosses the wire 2(g-1) times: each non-reducer
    # (two-level: non-owner) sends it to its reducer, which sends the average back to each of them.
    # A member's record counts the bytes since its previous round (a reducer's last replies may
    # leave after its own result, a faster member's columns arrive before it starts), so compare
    # totals over the run: each of the g members' records carries 1/g of it.
    rounds = [r for i in range(3) for r in swarm.metrics(i) if r.get("event") == "outer_step"]
    fp32 = sum(2 * (r["group_size"] - 1) * 4 * size / r["group_size"] for r in rounds)
    sent, received = sum(r["bytes_sent"] for r in rounds), sum(r["bytes_received"] for r in rounds)
    # (upper bound: a failed round's bytes count too, in the next successful round's record)
    assert fp32 / ratio / 1.25 < sent < fp32 / ratio * 1.3, (sent, fp32)
    assert fp32 / ratio / 1.25 < received < fp32 / ratio * 1.3, (received, fp32)
    assert all(r["encode_s"] > 0 and r["decode_s"] > 0 for r in full)
    for state in saved:  # the residual is part of the checkpoint: the right size, finite and small
        residual = state["residual"]
        assert residual.shape == (size,) and torch.isfinite(residual).all()
        assert residual.norm() < 0.1 * state["params"].norm()
    # A member quantizes none of the values it reduces itself (groups: this model fits one part, so
    # one member's residual is zero; two-level: its own column); the others carry what it dropped.
    assert sum(state["residual"].norm() > 0 for state in saved) >= 2
