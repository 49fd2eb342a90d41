"""Faults at exact points of a round, on real peers: kills, a freeze, a NaN sender, a lost coordinator.

The fault is injected by the victim itself (``P2PDILOCO_FAULT``, see p2pdiloco/faults.py) at the
N-th time it reaches a point of the round, so it lands *inside* matchmaking or the all-reduce
however fast the round is. Each test ends with the equality check: every epoch, all peers that
recorded it hold byte-identical states.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from p2pdiloco.config import load_recipe
from tests.conftest import TEST_CONFIG
from tests.swarm.conftest import LocalSwarm

pytestmark = pytest.mark.swarm

CFG = load_recipe(TEST_CONFIG, [])
# The longest a survivor may wait for one epoch after a fault: a round that runs into its
# deadline, the wait for a dead peer's record to expire (3 heartbeats) or for slow peers, a
# retried inner phase, and slack for a loaded 2-core machine.
STALL_BOUND_S = CFG.run.averaging.round_s + CFG.run.averaging.grace_s + 3 * CFG.peer.heartbeat_s + 15


def _process_state(pid: int) -> str:
    """One letter from /proc: R running, S sleeping, T stopped, Z zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def _peer_id(swarm: LocalSwarm, index: int) -> str | None:
    records = swarm.metrics(index)
    return records[0]["peer"] if records else None


def _three_peers(swarm: LocalSwarm, fault: str) -> int:
    swarm.add_peer(1000)
    swarm.add_peer(1000)
    return swarm.add_peer(1000, fault=fault)


def _status_through(addrs: list[str]) -> list[dict]:
    """The run's peers as ``p2pdiloco status --json`` reads them through these addresses."""
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "p2pdiloco", "status", "--run", CFG.run.name, "--json", "--timeout", "10"]
    for addr in addrs:
        args += ["--peers", addr]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return []
    return [r for r in json.loads(done.stdout).get(CFG.run.name, {}).get("peers", []) if r["role"] != "leaving"]


def _stop(swarm: LocalSwarm, indices) -> None:
    """SIGTERM to all at once (one by one, the last ones would go on alone past the others)."""
    for i in indices:
        swarm.peers[i].terminate()
    codes = [swarm.peers[i].stop(grace=30) for i in indices]
    assert codes == [0] * len(indices), f"peers did not leave cleanly on SIGTERM: {codes}"


# quick (in the README's `pytest -q`): a kill inside the all-reduce, where a bug would fork the states
@pytest.mark.parametrize("point", ["matchmaking", pytest.param("allreduce", marks=pytest.mark.quick)])
def test_peer_killed_mid_round_leaves_survivors_identical_and_moving(local_swarm, point):
    swarm = local_swarm()
    victim = _three_peers(swarm, f"{point}:kill@3")
    swarm.killed.add(victim)  # its death is the test, not a crash
    assert swarm.wait_exit([victim], 240) == [-signal.SIGKILL]
    died_at = swarm.epoch(victim)
    survivors = [0, 1]
    swarm.wait_until(lambda: min(swarm.epoch(i) for i in survivors) >= died_at + 3, 120, "survivors to go on for 3 epochs")
    _stop(swarm, survivors)

    swarm.assert_consistent([*survivors, victim])
    for i in survivors:
        assert swarm.longest_stall(i) < STALL_BOUND_S, f"peer {i} stalled longer than the configured timeouts allow"
    after = [r for i in survivors for r in swarm.metrics(i) if r.get("event") == "outer_step" and r["epoch"] > died_at + 1]
    assert after and all(_peer_id(swarm, victim) not in r["group"] for r in after)


def test_frozen_peer_is_dropped_then_catches_up_when_resumed(local_swarm):
    swarm = local_swarm()
    victim = _three_peers(swarm, "allreduce:stop@3")
    pid = swarm.peers[victim].proc.pid
    swarm.wait_until(lambda: _process_state(pid) == "T", 240, "the victim to freeze (SIGSTOP) mid all-reduce")
    frozen_at = swarm.epoch(victim)
    survivors = [0, 1]
    swarm.wait_until(lambda: min(swarm.epoch(i) for i in survivors) >= frozen_at + 3, 120, "the others to go on without it")
    swarm.peers[victim].signal(signal.SIGCONT)

    def caught_up() -> bool:
        records = swarm.metrics(victim)
        downloads = [k for k, r in enumerate(records) if r["event"] == "downloaded" and r["epoch"] > frozen_at]
        return bool(downloads) and any(r["event"] == "outer_step" for r in records[downloads[0]:])

    swarm.wait_until(caught_up, 120, "the resumed peer to download the newer state and average again")
    _stop(swarm, [*survivors, victim])

    swarm.assert_consistent([*survivors, victim])
    caught = next(r for r in swarm.metrics(victim) if r["event"] == "downloaded" and r["epoch"] > frozen_at)
    assert caught["reason"] == "behind"
    for i in survivors:
        assert swarm.longest_stall(i) < STALL_BOUND_S, f"peer {i} waited on the frozen peer longer than the timeouts allow"


def test_a_member_whose_round_failed_says_so_and_the_others_stop_waiting_for_it(local_swarm):
    """A one-sided round on purpose (``result:drop``): one member's all-reduce fails after every part
    arrived while the others' succeed. It files "failed" under the round's name, so the others give
    the round up at once instead of waiting ``commit_s`` (a minute here) for its confirmation, and
    nobody steps alone: one state, and the round is retried. The commit is the ``groups``
    protocol's (two-level rounds need none: each cell is decided once, see docs/scaling.md)."""
    swarm = local_swarm(["run.averaging.commit_s=60", 'run.averaging.protocol="groups"'])
    victim = _three_peers(swarm, "result:drop@3")
    logs = lambda i: (swarm.out / f"peer{i}.log").read_text()  # noqa: E731
    swarm.wait_until(lambda: "fault injection: drop" in logs(victim), 240, "the victim's round to fail")
    dropped_at = max(swarm.epoch(i) for i in range(3))
    swarm.wait_until(lambda: min(swarm.epoch(i) for i in range(3)) >= dropped_at + 2, 120, "all three to go on")
    _stop(swarm, range(3))

    swarm.assert_consistent(range(3))
    told = [i for i in (0, 1) if "member(s) failed theirs" in logs(i)]
    assert told, "no other member learnt of the failed round from its record"
    for i in (0, 1):
        assert "did not confirm theirs within commit_s" not in logs(i), f"peer {i} waited commit_s for the failed member"


def test_nan_pseudo_gradient_is_excluded_and_its_sender_named(local_swarm):
    swarm = local_swarm()
    bad = _three_peers(swarm, "send:nan@3")
    honest = [0, 1]
    swarm.wait_until(lambda: "fault injection: nan" in (swarm.out / f"peer{bad}.log").read_text(), 240, "the NaN to be sent")
    sent_at = max(swarm.epoch(i) for i in honest)
    swarm.wait_until(lambda: min(swarm.epoch(i) for i in honest) >= sent_at + 3, 120, "the honest peers to go on")
    _stop(swarm, [*honest, bad])

    bad_id = _peer_id(swarm, bad)
    for i in honest:
        log = (swarm.out / f"peer{i}.log").read_text()
        named = [line for line in log.splitlines() if f"peer {bad_id} " in line and "non-finite" in line]
        assert named, "the offender is not named in an honest peer's log"
        records = swarm.metrics(i)
        # From the round the NaN was sent in: every epoch a successful round, never with the offender.
        later = [r for r in records if r["epoch"] > sent_at]
        assert later and all(r["event"] == "outer_step" for r in later), "an honest peer lost a round"
        assert [r["epoch"] for r in later] == list(range(sent_at + 1, sent_at + 1 + len(later)))
        assert all(bad_id not in r["group"] for r in later[1:]), "the offender was averaged with again"
        assert all(r["val_loss"] == r["val_loss"] for r in records if r.get("val_loss") is not None)  # no NaN
    swarm.assert_consistent([*honest, bad])


def test_training_survives_the_coordinator_and_a_restarted_one_is_found_again(local_swarm):
    swarm = local_swarm()
    for _ in range(2):
        swarm.add_peer(1000)
    swarm.wait_until(lambda: min(swarm.epoch(i) for i in range(2)) >= 2, 240, "2 peers to reach epoch 2")
    swarm.coordinator.signal(signal.SIGKILL)
    swarm.coordinator.stop(grace=0)
    lost_at = max(swarm.epoch(i) for i in range(2))
    swarm.wait_until(lambda: min(swarm.epoch(i) for i in range(2)) >= lost_at + 3, 120, "training to go on without the coordinator")

    assert swarm.restart_coordinator() == swarm.addrs, "the restarted coordinator has another address"
    # Found again: the peers re-contact it (their DHT watchdog), so the swarm is readable through it.
    swarm.wait_until(lambda: len(_status_through(swarm.addrs)) == 2, 60, "the restarted coordinator to know both peers")
    newcomer = swarm.add_peer(1000)  # knows only the coordinator's address

    def newcomer_averaged() -> bool:
        records = swarm.metrics(newcomer)
        return any(r["event"] == "outer_step" and r["group_size"] == 3 for r in records)

    swarm.wait_until(newcomer_averaged, 120, "a newcomer to find the swarm through the restarted coordinator")
    _stop(swarm, [0, 1, newcomer])
    first = swarm.metrics(newcomer)[0]
    assert first["event"] == "downloaded", f"the newcomer did not find the running swarm: {first}"
    assert not [r for r in swarm.metrics(newcomer) if r["event"] == "solo_step"]
    swarm.assert_consistent([0, 1, newcomer])


def test_ctrl_c_in_a_terminal_finishes_the_round_announces_leaving_and_saves(local_swarm, tmp_path):
    import os
    import pty
    import re
    import subprocess
    import time

    from p2pdiloco.simulate import _cli, read_metrics

    swarm = local_swarm()
    partner = swarm.add_peer(1000)
    metrics, ckpt, log_path = tmp_path / "tty.jsonl", tmp_path / "ckpt", tmp_path / "tty.log"
    args = [*_cli(), "join", TEST_CONFIG, "--metrics-file", str(metrics), "--checkpoint-dir", str(ckpt),
            "--set", f'peer.cache_dir="{swarm.cache_dir}"']
    for addr in swarm.addrs:
        args += ["--peers", addr]
    master, terminal = pty.openpty()  # stdin is a terminal, as for a volunteer typing the command
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdin=terminal, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        swarm.wait_until(lambda: max((r["epoch"] for r in read_metrics(metrics)), default=-1) >= 2, 240, "the peer to train")
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl+C: the whole foreground group
        limit = CFG.run.averaging.round_s + CFG.run.averaging.next_chunk_s + 30
        assert proc.wait(timeout=limit) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
        os.close(terminal)
    text = log_path.read_text()
    assert "SIGTERM received" in text and "checkpoint of epoch" in text, text[-2000:]
    peer_pid = int(re.search(r"peer process (\d+)", text).group(1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # init reaps the peer's grandchildren: nothing to wait on
        try:
            os.killpg(peer_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the peer's session are still running")
    from p2pdiloco.checkpoint import checkpoint_path

    assert checkpoint_path(ckpt).exists(), "no checkpoint saved"
    assert swarm.peers[partner].alive(), "the partner peer died"


def test_a_swarm_that_all_left_restarts_from_the_coordinators_backup(local_swarm, tmp_path):
    import re

    swarm = local_swarm(coordinator_args=["--backup", TEST_CONFIG, "--backup-dir", str(tmp_path / "backup")])
    for _ in range(2):
        swarm.add_peer(1000)
    coordinator_log = swarm.out / "coordinator.log"

    def backed_up() -> list[int]:
        return [int(e) for e in re.findall(r"backup: state of epoch (\d+)", coordinator_log.read_text())]

    swarm.wait_until(lambda: max(backed_up(), default=0) >= 3, 240, "the coordinator to back up epoch 3")
    _stop(swarm, [0, 1])  # every volunteer leaves
    kept = max(backed_up())
    newcomer = swarm.add_peer(1000)

    def restored() -> bool:
        records = swarm.metrics(newcomer)
        return any(r["event"] == "downloaded" for r in records) and any(r["event"] == "solo_step" for r in records)

    swarm.wait_until(restored, 120, "a newcomer to restart the run from the backup")
    _stop(swarm, [newcomer])
    first = swarm.metrics(newcomer)[0]
    assert first["event"] == "downloaded" and first["reason"] == "backup" and first["epoch"] == kept, first
    trained = {r["epoch"]: r["state_hash"] for i in (0, 1) for r in swarm.metrics(i)}
    assert first["state_hash"] == trained[kept], "the backup is not the state the swarm had at that epoch"
