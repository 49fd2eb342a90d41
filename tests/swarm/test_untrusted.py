"""Untrusted peers with real `join` peers: in a closed run members average and outsiders do not
get in (and the secret never shows in any log or metrics file); in an open run with a robust rule,
a hostile peer is bounded, named in the metrics and banned."""

import subprocess
import statistics

import pytest

from tests.conftest import TEST_CONFIG
from tests.swarm.conftest import LocalSwarm

pytestmark = pytest.mark.swarm

SECRET = "e2e-closed-run-secret-5f1c0b9a7d2e"
EPOCHS = 4


def _rounds_of_two(swarm: LocalSwarm, index: int) -> int:
    return sum(r.get("event") == "outer_step" and r["group_size"] == 2 for r in swarm.metrics(index))


def test_members_of_a_closed_run_train_together_and_an_outsider_never_joins(tmp_path, data_cache):
    secret, wrong = tmp_path / "run.secret", tmp_path / "other.secret"
    secret.write_text(SECRET + "\n")
    wrong.write_text("an-outsider-guess-of-the-secret-000\n")
    for path in (secret, wrong):
        path.chmod(0o600)
    swarm = LocalSwarm(tmp_path / "swarm", data_cache, overrides=["run.closed=true"],
                       coordinator_args=["--secret-file", str(secret)])
    try:
        first = swarm.add_peer(1000, "--secret-file", str(secret))
        outsider = swarm.add_peer(1000, "--secret-file", str(wrong))
        swarm.wait_until(lambda: swarm.epoch(first) >= 1, 120, "the first member to train")
        # A late member catches up by downloading the state, which donors serve to members only.
        members = [first, swarm.add_peer(1000, "--secret-file", str(secret))]
        swarm.wait_until(lambda: _rounds_of_two(swarm, members[1]) >= EPOCHS, 240, "the members to average")
        assert [swarm.peers[i].stop(grace=30) for i in [*members, outsider]] == [0, 0, 0]
    finally:
        swarm.stop()
    swarm.assert_consistent(members)
    member_ids = {swarm.metrics(i)[0]["peer"] for i in members}
    outsider_id = swarm.metrics(outsider)[0]["peer"]
    rounds = [r for i in members for r in swarm.metrics(i) if r.get("event") == "outer_step"]
    assert len(rounds) >= 2 * EPOCHS
    assert swarm.metrics(members[1])[0]["event"] == "downloaded", "the late member did not download the state"
    assert rounds and all(set(r["group"]) == member_ids for r in rounds), "members must average only with members"
    # The outsider cannot read the members' records (wrong MAC): to it the run looks empty.
    assert all(outsider_id not in r["group"] for r in rounds)
    assert not [r for r in swarm.metrics(outsider) if set(r.get("group", [])) & member_ids]
    logs = "".join(p.read_text(errors="replace") for p in swarm.out.glob("*.log")) + "".join(
        p.read_text() for p in swarm.out.glob("*.jsonl"))
    assert SECRET not in logs, "the run secret leaked into a log or metrics file"
    assert "closed run: membership key id" in logs


def test_a_peer_of_a_closed_run_without_the_secret_stops_with_the_fix(tmp_path):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "P2PDILOCO_RUN_SECRET"}
    done = subprocess.run([sys.executable, "-m", "p2pdiloco", "join", TEST_CONFIG, "--set", "run.closed=true"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert "--secret-file" in done.stderr and "P2PDILOCO_RUN_SECRET" in done.stderr, done.stderr[-500:]


def _tokens_at(swarm, peer: str, epoch: int) -> int | None:
    """The tokens ``peer`` brought to its round that applied ``epoch`` (None: no such record)."""
    found = [r["tokens"] for r in swarm.metrics_of(peer) if r.get("event") == "outer_step" and r["epoch"] == epoch]
    return found[0] if found else None


def _longest_streak(records: list[dict], peer: str) -> int:
    """The most consecutive rounds of this peer's in which ``peer`` was in the group and flagged,
    counted conservatively (any other round or a download ends a run): at most the peer's own streak."""
    best = run = 0
    for r in records:
        if r.get("event") == "outer_step":
            run = run + 1 if peer in r["group"] and peer in r["flagged"] else 0
            best = max(best, run)
        elif r.get("event") == "downloaded":
            run = 0
    return best


def test_an_open_run_with_a_robust_rule_bans_a_peer_that_keeps_sending_scaled_updates(tmp_path, data_cache):
    # Groups of 3 or more: in a pair nobody can tell who is hostile (and two pairs at one epoch fork,
    # so the pair with the hostile peer would lose its rounds to downloads and prove nothing).
    swarm = LocalSwarm(tmp_path / "swarm", data_cache, overrides=["run.aggregation.method=norm_bound",
                                                                   "run.aggregation.ban_after=2", "run.min_group_size=3"])
    try:
        honest = [swarm.add_peer(6) for _ in range(3)]
        hostile = swarm.add_peer(6, fault="send:scale@1+")  # 1000 x its pseudo-gradient, every round
        assert swarm.wait_exit(honest, 240) == [0, 0, 0]
    finally:
        swarm.stop()
    swarm.assert_consistent(honest)
    hostile_id = swarm.metrics(hostile)[0]["peer"] if swarm.metrics(hostile) else None
    rounds = [r for i in honest for r in swarm.metrics(i) if r.get("event") == "outer_step"]
    with_hostile = [r for r in rounds if hostile_id in r["group"]]
    assert hostile_id and len(with_hostile) >= 2, "the hostile peer never took part: the test proves nothing"
    assert all(hostile_id in r["flagged"] for r in with_hostile if len(r["group"]) >= 3), "norm_bound must flag it"
    # An honest peer may be flagged in a round where it brought several times the group's median
    # work (the first peer trains on while the others start: one round, then it is in step); one
    # flag accuses nobody, bans take ban_after consecutive ones. Any other flag of it is a false one.
    for r in rounds:
        for peer in set(r["flagged"]) - {hostile_id}:
            tokens = {m: _tokens_at(swarm, m, r["epoch"]) for m in r["group"]}
            known = [t for t in tokens.values() if t is not None]
            assert tokens[peer] is not None and tokens[peer] >= 3 * statistics.median_low(known), (
                f"an honest peer was flagged at epoch {r['epoch']} for no more work than the others: {tokens}")
    honest_ids = {swarm.metrics(i)[0]["peer"] for i in honest}
    for i in honest:
        assert all(_longest_streak(swarm.metrics(i), p) < 2 for p in honest_ids), "an honest peer was flagged in 2 rounds running"
        assert not set(swarm.metrics(i)[-1].get("banned", [])) & honest_ids, "an honest peer was banned"
    # Banned by every honest peer that averaged with it in 2 consecutive rounds (ban_after): a peer
    # that was downloading during one of them has seen it once only, and keeps judging.
    last = [swarm.metrics(i)[-1] for i in honest]
    judged = [i for i in honest if _longest_streak(swarm.metrics(i), hostile_id) >= 2]
    assert judged, "no honest peer saw the hostile one in 2 consecutive rounds"
    assert all(hostile_id in swarm.metrics(i)[-1].get("banned", []) for i in judged), "the hostile peer was not banned"
    # A ban is each peer's own: once a peer banned it, none of *its* later rounds has it (the round
    # after the ban may already have been matched). Others that have not banned it yet may still
    # average with it, and list the banning peer in a group it refused.
    for i in judged:
        own = [r for r in swarm.metrics(i) if r.get("event") == "outer_step"]
        banned_at = min(r["epoch"] for r in own if hostile_id in r.get("banned", []))
        assert not [r["epoch"] for r in own if r["epoch"] > banned_at + 1 and hostile_id in r["group"]], "grouped after its ban"
    losses = [r["val_loss"] for r in last if r.get("val_loss") is not None]
    assert losses and max(losses) < 10, f"the honest model diverged: {losses}"
