import os

import pytest
import torch

from p2pdiloco import checkpoint
from p2pdiloco.errors import CheckpointError


def _state(epoch=3, size=10, fingerprint="abc"):
    return dict(fingerprint=fingerprint, epoch=epoch, state_hash="h", params=torch.arange(size, dtype=torch.float32),
                momentum=torch.ones(size), inner={"state": {}}, data={"position": 7})


def test_round_trip(tmp_path):
    checkpoint.save(tmp_path, _state())
    state = checkpoint.load(tmp_path, fingerprint="abc", size=10)
    assert state["epoch"] == 3 and state["data"] == {"position": 7}
    assert torch.equal(state["params"], torch.arange(10, dtype=torch.float32))


def test_missing_checkpoint_is_none(tmp_path):
    assert checkpoint.load(tmp_path / "nothing", fingerprint="abc", size=10) is None


def test_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _state(epoch=3))

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)  # the new file is written but never renamed into place
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, _state(epoch=4))
    monkeypatch.undo()
    assert checkpoint.load(tmp_path, fingerprint="abc", size=10)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "a temporary file was left behind"


def test_corrupt_or_foreign_checkpoints_are_refused_with_the_fix(tmp_path):
    checkpoint.save(tmp_path, _state())
    with pytest.raises(CheckpointError, match="another run config"):
        checkpoint.load(tmp_path, fingerprint="other", size=10)
    with pytest.raises(CheckpointError, match="malformed 'params'"):
        checkpoint.load(tmp_path, fingerprint="abc", size=11)
    path = checkpoint.checkpoint_path(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable.*move it away"):
        checkpoint.load(tmp_path, fingerprint="abc", size=10)
