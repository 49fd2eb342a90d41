"""Metrics sinks: the JSON-lines file, TensorBoard event files and wandb offline runs, read back."""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path

import pytest

from p2pdiloco import metrics
from p2pdiloco.config import PeerConfig
from p2pdiloco.errors import ConfigError

PEER_ID = "12D3KooWTestPeerAbc123"

RECORDS = [
    dict(peer=PEER_ID, time=1_700_000_000.0, epoch=0, event="start", val_loss=6.2, state_hash="aa" * 8),
    dict(peer=PEER_ID, time=1_700_000_010.0, epoch=1, event="outer_step", state_hash="bb" * 8, group_size=3,
         group=["a", "b", "c"], inner_steps=4, train_loss=5.5, val_loss=5.9, bytes_sent=1200, allreduce_s=0.25,
         speed=3.5, val_epoch=None, flag=True),
    dict(peer=PEER_ID, time=1_700_000_020.0, epoch=2, event="outer_step", state_hash="cc" * 8, group_size=2,
         group=["a", "b"], inner_steps=4, train_loss=5.0, val_loss=None, bytes_sent=1300, allreduce_s=0.5, speed=3.0),
]


def test_numeric_fields_keep_numbers_only():
    assert metrics.numeric_fields(RECORDS[1]) == dict(group_size=3, inner_steps=4, train_loss=5.5, val_loss=5.9,
                                                      bytes_sent=1200, allreduce_s=0.25, speed=3.5)


def test_jsonl_sink_appends_one_object_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"earlier": 1}) + "\n")  # a restarted peer appends to its old file
    sinks = metrics.open_sinks(PeerConfig(), path, run_name="test", peer_id=PEER_ID)
    for record in RECORDS:
        sinks.write(record)
    sinks.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"earlier": 1}, *RECORDS]


def test_no_switch_no_sink(tmp_path):
    sinks = metrics.open_sinks(PeerConfig(), None, run_name="test", peer_id=PEER_ID)
    assert sinks.sinks == []
    sinks.write(RECORDS[0])
    sinks.close()
    sinks.close()  # twice is fine (Peer.close after a failed run)


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = PeerConfig(tensorboard_dir=str(tmp_path / "tb"))
    sinks = metrics.open_sinks(cfg, None, run_name="test", peer_id=PEER_ID)
    for record in RECORDS:
        sinks.write(record)
    sinks.close()

    run_dir = tmp_path / "tb" / "test" / PEER_ID[-6:]  # one TensorBoard run per peer
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "group_size", "bytes_sent", "allreduce_s", "inner_steps", "speed"} <= tags
    assert not tags & {"epoch", "time", "event", "group", "peer", "state_hash", "flag", "val_epoch"}
    train = events.Scalars("train_loss")
    assert [(e.step, e.value) for e in train] == [(1, 5.5), (2, 5.0)]
    assert train[0].wall_time == pytest.approx(RECORDS[1]["time"])
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("val_loss")] == [(0, 6.2), (1, 5.9)]
    assert [(e.step, e.value) for e in events.Scalars("bytes_sent")] == [(1, 1200), (2, 1300)]


def _wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a ``:W&B`` header, then LevelDB-log framed
    records (4-byte CRC, 2-byte length, 1-byte type: full, first, middle, last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, pieces = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pieces, pos = pieces + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def _finished_wandb_run(folder: Path, timeout: float = 30.0) -> list:
    """The records of the one offline run in ``folder``, once its exit record is written.

    ``run.finish()`` returns when wandb's service has the run's end, which may be before the
    service's buffered file writer has written it out (seen once on a loaded machine): poll.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = list(folder.glob("offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        try:
            records = list(_wandb_records(files[0])) if files else []
        except Exception:  # a record still being written
            records = []
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds:
            return records
        assert time.monotonic() < deadline, f"no finished wandb run in {folder}: {files} {kinds}"
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb fills one or the other


def test_wandb_offline_run_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))  # nothing written to the home folder
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    cfg = PeerConfig(wandb_project="p2pdiloco-test")
    sinks = metrics.open_sinks(cfg, None, run_name="test", peer_id=PEER_ID, config={"inner_steps": 4})
    for record in RECORDS:
        sinks.write(record)
    sinks.close()

    records = _finished_wandb_run(tmp_path / "wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project, run.run_group) == (PEER_ID[-6:], "p2pdiloco-test", "test")
    config = {_key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["peer_id"] == PEER_ID and config["inner_steps"] == 4
    rows = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert [row.get("train_loss") for row in rows] == [None, 5.5, 5.0]
    assert rows[1]["bytes_sent"] == 1200 and "event" not in rows[1] and "flag" not in rows[1]


@pytest.mark.parametrize("switch, value, extra", [("tensorboard_dir", "tb", "tensorboard"), ("wandb_project", "p", "wandb")])
def test_missing_package_is_a_one_line_error(monkeypatch, switch, value, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed: find_spec answers None
    cfg = PeerConfig(**{switch: value})
    with pytest.raises(ConfigError) as err:
        metrics.require_packages(cfg)
    message = str(err.value)
    assert "\n" not in message and f"pip install 'p2pdiloco[{extra}]'" in message and f"peer.{switch}" in message
    metrics.require_packages(PeerConfig())  # switched off: nothing is needed


def test_broken_tensorboard_import_gives_the_same_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'p2pdiloco\[tensorboard\]'"):
        metrics.TensorBoardSink(tmp_path)


def test_a_failing_sink_is_dropped_with_a_warning(tmp_path, caplog):
    class Broken:
        def write(self, record):
            raise OSError("disk full")

        def close(self):
            pass

    good = metrics.JsonlSink(tmp_path / "m.jsonl")
    sinks = metrics.Sinks([Broken(), good])
    with caplog.at_level(logging.WARNING, logger="p2pdiloco"):
        sinks.write(RECORDS[0])
        sinks.write(RECORDS[1])
    assert sinks.sinks == [good]
    assert sum("Broken failed" in r.getMessage() for r in caplog.records) == 1
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
