"""Quantized pseudo-gradients between real peers: the state stays byte-identical, the wire shrinks,
and the error-feedback residual is carried and checkpointed."""

import pytest
import torch

from p2pdiloco import checkpoint

pytestmark = pytest.mark.swarm

EPOCHS = 5


@pytest.mark.parametrize("codec,ratio", [("4bit", 7.0), ("blockwise8", 3.8)])
def test_three_peers_stay_identical_with_a_quantized_codec_and_error_feedback(local_swarm, tmp_path, codec, ratio):
    swarm = local_swarm([f"run.compression={codec}", "run.error_feedback=true"])
    for i in range(3):
        swarm.add_peer(EPOCHS, "--checkpoint-dir", str(tmp_path / f"ckpt{i}"))
    assert swarm.wait_exit(range(3), 300) == [0, 0, 0]

    swarm.assert_consistent(range(3))
    rounds = [r for i in range(3) for r in swarm.metrics(i) if r.get("event") == "outer_step"]
    full = [r for r in rounds if r["group_size"] == 3]
    assert len({r["epoch"] for r in full}) >= 3, "the three peers rarely averaged together"
    saved = [torch.load(checkpoint.checkpoint_path(tmp_path / f"ckpt{i}"), weights_only=True) for i in range(3)]
    size = saved[0]["params"].numel()
    fp32 = 4 * 4 * size  # per group of 3 and round: the parts for the 2 others' slices, and our averages twice
    for epoch in {r["epoch"] for r in full}:
        group = [r for r in full if r["epoch"] == epoch]
        if len(group) == 3:
            sent, received = sum(r["bytes_sent"] for r in group), sum(r["bytes_received"] for r in group)
            assert fp32 / ratio / 1.25 < sent < fp32 / ratio * 1.05, (sent, fp32)
            assert fp32 / ratio / 1.25 < received < fp32 / ratio * 1.05, (received, fp32)
    assert all(r["encode_s"] > 0 and r["decode_s"] > 0 for r in full)
    for state in saved:  # the residual is part of the checkpoint: the right size, finite and small
        residual = state["residual"]
        assert residual.shape == (size,) and torch.isfinite(residual).all()
        assert residual.norm() < 0.1 * state["params"].norm()
    # This model fits one part of the all-reduce, so the member reducing it quantizes none of its
    # own values (residual zero); the two that sent their parts carry what quantization dropped.
    assert sum(state["residual"].norm() > 0 for state in saved) >= 2
