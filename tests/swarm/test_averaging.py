"""The consistent all-reduce between three real peers (separate processes, real DHTs and averagers)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.swarm

WORKER = Path(__file__).with_name("averaging_worker.py")


def _run_group(tmp_path, compression):
    outs = [tmp_path / f"avg{i}.pt" for i in range(3)]
    first = subprocess.Popen(
        [sys.executable, str(WORKER), str(outs[0]), "0", compression], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    procs = [first]
    try:
        addr = first.stdout.readline().strip()
        assert addr.startswith("/ip4/"), "the first worker did not start"
        for i in (1, 2):
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(outs[i]), str(i), compression, addr], start_new_session=True))
        for p in procs:
            assert p.wait(timeout=200) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                import os, signal

                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [torch.load(out) for out in outs]


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
