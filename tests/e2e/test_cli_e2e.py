"""The command line as a user runs it: subprocesses, their exit codes, files and output."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pdiloco.simulate import ProcessGroup, _cli, read_metrics, start_coordinator
from tests.conftest import TEST_CONFIG

pytestmark = pytest.mark.e2e


def _join(out: Path, index: int, peers: list[str], cache: Path, *extra: str) -> ProcessGroup:
    args = [*_cli(), "join", TEST_CONFIG, "--metrics-file", str(out / f"peer{index}.jsonl"), "--set", f'peer.cache_dir="{cache}"']
    for addr in peers:
        args += ["--peers", addr]
    return ProcessGroup(args + list(extra), out / f"peer{index}.log")


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)  # metrics files are polled: they have no change notification


@pytest.mark.quick  # in the README's `pytest -q`: the README's main command, end to end
def test_simulate_writes_a_consistent_summary_plot_and_model(tmp_path, data_cache):
    out = tmp_path / "sim"
    r = subprocess.run(
        [*_cli(), "simulate", TEST_CONFIG, "--peers", "2", "--epochs", "3", "--out", str(out), "--set", f'peer.cache_dir="{data_cache}"'],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["consistent"] is True and summary["epochs_completed"] == 3 and summary["peers"] == 2
    assert summary["val_loss_final"] < summary["val_loss_initial"]
    assert set(summary["state_hashes"]) >= {"0", "1", "2", "3"}
    assert summary["bytes_sent_total"] > 0 and summary["wall_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert "identical" in r.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.num_parameters() > 0 and len(tokenizer("To be or not to be")["input_ids"]) > 0
    # peer 0's checkpoint holds the same final global model as model/
    import torch

    from p2pdiloco.export import global_model, read_checkpoint
    from p2pdiloco.outer import flatten_parameters

    assert (out / "checkpoint" / "checkpoint.pt").is_file() and f"{out / 'checkpoint'}/" in r.stdout
    final = read_checkpoint(out / "checkpoint")
    assert final.epoch >= 1 and torch.equal(flatten_parameters(global_model(final)), flatten_parameters(model))


def test_status_lists_the_peer_and_join_refuses_a_different_config(tmp_path, data_cache):
    coord, addrs = start_coordinator(tmp_path, timeout=60)
    first = _join(tmp_path, 0, addrs, data_cache, "--max-epochs", "50")
    try:
        _wait_for(lambda: read_metrics(tmp_path / "peer0.jsonl"), 120, "the first peer to start")
        status = subprocess.run([*_cli(), "status", "--peers", addrs[0], "--json"], capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
        run = json.loads(status.stdout)["test"]
        records = run["peers"]
        assert run["peers_online"] == 1 and run["epoch"] == records[0]["epoch"]
        assert [r["peer"] for r in records] == [read_metrics(tmp_path / "peer0.jsonl")[0]["peer"]]
        assert records[0]["epoch"] >= 0 and records[0]["state_hash"]
        r = subprocess.run(
            [*_cli(), "join", TEST_CONFIG, "--peers", addrs[0], "--set", "run.outer_lr=0.5", "--set", f'peer.cache_dir="{data_cache}"'],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 3, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "run.outer_lr: ours=0.5 swarm=0.7" in last
    finally:
        first.stop()
        coord.stop()


def test_two_peers_train_through_a_plain_hivemind_dht(tmp_path, data_cache):
    hivemind_dht = Path(sys.executable).with_name("hivemind-dht")
    boot = ProcessGroup([str(hivemind_dht), "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--no_relay"], tmp_path / "dht.log")
    peers = []
    try:
        log = tmp_path / "dht.log"
        _wait_for(lambda: "--initial_peers" in log.read_text(), 60, "hivemind-dht to start")
        addr = re.search(r"--initial_peers (\S+)", log.read_text()).group(1)
        peers = [_join(tmp_path, i, [addr], data_cache, "--max-epochs", "3") for i in range(2)]
        for p in peers:
            assert p.proc.wait(240) == 0
        hashes = {}
        for i in range(2):
            for rec in read_metrics(tmp_path / f"peer{i}.jsonl"):
                hashes.setdefault(rec["epoch"], set()).add(rec["state_hash"])
        assert max(hashes) == 3 and all(len(h) == 1 for h in hashes.values()), hashes
        steps = [rec for i in range(2) for rec in read_metrics(tmp_path / f"peer{i}.jsonl") if rec.get("event") == "outer_step"]
        assert steps and all(rec["group_size"] == 2 for rec in steps)
    finally:
        for p in peers:
            p.stop()
        boot.stop()


def test_sigint_without_a_terminal_makes_the_peer_leave_cleanly(tmp_path, data_cache):
    """``kill -INT`` (nohup, a service manager): hivemind's averager sets SIGINT to "ignore" when it
    starts, so the peer must take its handler back afterwards."""
    import signal

    peer = _join(tmp_path, 0, [], data_cache, "--max-epochs", "500")
    try:
        _wait_for(lambda: read_metrics(tmp_path / "peer0.jsonl"), 120, "the peer to start training")
        peer.proc.send_signal(signal.SIGINT)
        assert peer.proc.wait(90) == 0
        assert "SIGINT received: finishing the current round, then leaving" in (tmp_path / "peer0.log").read_text()
        assert max(r["epoch"] for r in read_metrics(tmp_path / "peer0.jsonl")) < 500
    finally:
        peer.stop()
