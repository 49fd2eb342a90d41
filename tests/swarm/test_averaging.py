"""The consistent all-reduce between three real peers (separate processes, real DHTs and averagers)."""

import pytest
import torch

from tests.swarm.conftest import run_averaging_workers

pytestmark = pytest.mark.swarm

def _run_group(tmp_path, compression):
    return run_averaging_workers(tmp_path, 3, compression)


# (codec, largest relative error of the average, smallest size ratio against fp32 on the wire)
CODECS = [("none", 1e-6, 1.0), ("bf16", 5e-3, 1.95), ("blockwise8", 0.03, 3.8), ("4bit", 0.15, 7.0)]


@pytest.mark.parametrize("compression,tolerance,ratio", CODECS)
def test_every_member_gets_byte_identical_weighted_average(tmp_path, compression, tolerance, ratio):
    results = _run_group(tmp_path, compression)
    assert not [r["error"] for r in results if "error" in r]
    exact = sum(r["input"] * (i + 1) for i, r in enumerate(results)) / 6  # weights 1, 2, 3
    # Over the group, fp32 moves 4 x 4 bytes per value: each member sends the parts the others
    # reduce, and the averages of its own slice to the two others (N - own + 2 own, summed: 4N).
    fp32_bytes = 4 * 4 * results[0]["input"].numel()
    sent, received = sum(r["sent"] for r in results), sum(r["received"] for r in results)
    assert fp32_bytes / ratio / 1.25 < sent < fp32_bytes / ratio * 1.05, (sent, fp32_bytes)
    assert fp32_bytes / ratio / 1.25 < received < fp32_bytes / ratio * 1.05, (received, fp32_bytes)
    for r in results:
        assert torch.equal(r["average"], results[0]["average"]), "members disagree on the average"
        assert len(r["group"]) == 3
        assert ((r["average"] - exact).norm() / exact.norm()).item() < tolerance
        assert r["encode_s"] > 0 and r["decode_s"] > 0
        if compression == "none":
            assert r["residual"] is None
        else:  # error feedback: what quantizing our parts dropped; zero on the slice we reduced ourselves
            assert 0 < r["residual"].norm() < tolerance * r["input"].norm()
    if compression != "none":  # every value was reduced by exactly one member, unquantized there
        zeros = sum((r["residual"] == 0).sum().item() for r in results)
        assert results[0]["input"].numel() <= zeros < 1.001 * results[0]["input"].numel()  # (+ values quantized exactly)
