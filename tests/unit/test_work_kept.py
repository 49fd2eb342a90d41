"""Lost work made visible: the records name each state's contributors, and ``simulate``'s summary
counts the peer-epochs whose work reached the state the run continued from (``work_kept``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import torch

from p2pdiloco.averaging.front import RoundResult
from p2pdiloco.peer import Peer
from p2pdiloco.simulate import print_table, summarize
from p2pdiloco.swarm import Progress, RoundStat


def _step(peer: str, epoch: int, digest: str, group: list[str], contributors: list[str] | None = None) -> dict:
    """An ``outer_step`` record as ``join --metrics-file`` writes it (``contributors`` None: an old one)."""
    r = dict(peer=peer, epoch=epoch, event="outer_step", state_hash=digest, group=group, group_size=len(group),
             train_loss=3.0, allreduce_s=0.1, bytes_sent=10, time=float(epoch))
    if contributors is not None:
        r["contributors"] = contributors
    return r


def _download(peer: str, epoch: int, digest: str) -> dict:
    return dict(peer=peer, epoch=epoch, event="downloaded", state_hash=digest, time=epoch + 0.5)


def _two_groups(epochs: int, *, download: bool, new_records: bool = True) -> dict[str, list[dict]]:
    """8 peers averaging in two groups of 4 at every epoch, each group with its own state; with
    ``download``, the losing group then adopts the winner's state, as peers do after a fork."""
    peers = [f"p{i}" for i in range(8)]
    lo, hi = peers[:4], peers[4:]
    metrics = {p: [dict(peer=p, epoch=0, event="start", state_hash="init", time=0.0)] for p in peers}
    for e in range(1, epochs + 1):
        # Same count each: the tie goes to the smallest digest, the "a" group's.
        for group, digest in ((lo, f"a{e}"), (hi, f"b{e}")):
            for p in group:
                metrics[p].append(_step(p, e, digest, group, group if new_records else None))
        if download:
            for p in hi:
                metrics[p].append(_download(p, e, f"a{e}"))
    return metrics


def test_a_lost_fork_hides_behind_identical_states_but_not_behind_work_kept(capsys):
    s = summarize(_two_groups(4, download=True), num_peers=8, wall_s=1.0)
    assert s["consistent"] and all(r["distinct_states"] == 1 for r in s["epochs"])  # what hid the loss
    assert (s["work_kept_peer_epochs"], s["peer_epochs_trained"], s["work_kept"]) == (16, 32, 0.5)
    assert [(r["kept_state"], r["contributors"], r["trained"]) for r in s["epochs"]] == (
        [("init", 0, 0)] + [(f"a{e}", 4, 8) for e in range(1, 5)])
    print_table(s)
    out = capsys.readouterr().out
    assert "4/8" in out and "work kept: 16/32 peer-epochs (50 %)" in out


def test_a_standing_fork_keeps_the_state_the_fork_rule_picks():
    s = summarize(_two_groups(2, download=False), num_peers=8, wall_s=1.0)
    assert not s["consistent"]
    assert [(r["kept_state"], r["contributors"], r["distinct_states"]) for r in s["epochs"][1:]] == [("a1", 4, 2), ("a2", 4, 2)]
    assert s["work_kept"] == 0.5


def test_one_state_for_everyone_keeps_all_the_work(capsys):
    peers = ["p0", "p1", "p2"]
    metrics = {p: [_step(p, e, f"s{e}", peers, peers) for e in range(1, 4)] for p in peers}
    s = summarize(metrics, num_peers=3, wall_s=1.0)
    assert s["consistent"] and (s["work_kept_peer_epochs"], s["peer_epochs_trained"], s["work_kept"]) == (9, 9, 1.0)
    print_table(s)
    assert "work kept: 9/9 peer-epochs (100 %)" in capsys.readouterr().out


def test_a_member_left_out_of_the_average_is_not_a_contributor():
    # p2 sent garbage: the others averaged without it and it downloaded their state.
    group = ["p0", "p1", "p2"]
    metrics = {"p0": [_step("p0", 1, "s1", group, ["p0", "p1"])], "p1": [_step("p1", 1, "s1", group, ["p0", "p1"])],
               "p2": [_download("p2", 1, "s1")]}
    s = summarize(metrics, num_peers=3, wall_s=1.0)
    assert (s["epochs"][0]["contributors"], s["epochs"][0]["trained"]) == (2, 3)


def test_a_dead_owners_group_counts_for_the_share_of_its_work_in_the_state(capsys):
    # Two-level, 6 peers in groups (p0..p2), (p3..p5): p2 owned a column of its group and died in the
    # round, so p0 and p1 are in the state for 2/3 of their values (the rest carried); p2 trained
    # nothing that finished (no record), the other group is in it entire.
    live = ["p0", "p1", "p3", "p4", "p5"]
    partly = {"p0": 0.6667, "p1": 0.6667}
    metrics = {p: [dict(_step(p, 1, "s1", live + ["p2"], ["p3", "p4", "p5"]), partly_included=partly)] for p in live}
    s = summarize(metrics, num_peers=6, wall_s=1.0)
    assert (s["whole_peer_epochs"], s["work_kept_peer_epochs"], s["peer_epochs_trained"]) == (3, 4.33, 5)
    assert s["work_kept"] == pytest.approx(4.3334 / 5) and s["work_kept_whole"] == pytest.approx(3 / 5)
    print_table(s)
    out = capsys.readouterr().out
    assert "4.33/5" in out and "3 of them entire, the others in part" in out
    # A record whose share is out of range cannot push the sum past the peers that trained.
    metrics["p0"][0]["partly_included"] = {"p0": 7.0, "p1": -1.0}
    assert summarize(metrics, num_peers=6, wall_s=1.0)["work_kept"] <= 1.0


def test_records_from_before_contributors_count_their_group():
    s = summarize(_two_groups(3, download=True, new_records=False), num_peers=8, wall_s=1.0)
    assert (s["work_kept_peer_epochs"], s["peer_epochs_trained"]) == (12, 24)
    solo = {"p0": [dict(peer="p0", epoch=1, event="solo_step", state_hash="x", group=["p0"], group_size=1,
                        train_loss=3.0, allreduce_s=0.0, bytes_sent=0, time=1.0)]}
    assert summarize(solo, num_peers=1, wall_s=1.0)["work_kept"] == 1.0


def test_no_training_yet_has_no_work_kept(capsys):
    s = summarize({"p0": [dict(peer="p0", epoch=0, event="start", state_hash="init", time=0.0)]}, num_peers=1, wall_s=1.0)
    assert (s["work_kept"], s["peer_epochs_trained"]) == (None, 0)
    print_table(s)
    assert "work kept" not in capsys.readouterr().out


def _fake_peer() -> SimpleNamespace:
    """The Peer attributes its outer-step record and round bookkeeping read."""
    return SimpleNamespace(
        peer_id="me", outer=SimpleNamespace(epoch=5), work=SimpleNamespace(steps=0), speedometer=SimpleNamespace(steps_per_s=1.0),
        last_loss=3.0, banned=set(), bytes_sent_total=0, recent_rounds=[], _maybe_eval=lambda: None, _clock_fields=dict,
        _judge_flags=lambda result: None, averager=SimpleNamespace(one_sided=2),
    )


def test_the_outer_step_record_and_the_dht_record_carry_the_contributors():
    peer, done = _fake_peer(), SimpleNamespace(steps=10, tokens=100)
    result = RoundResult(average=torch.zeros(1), group=["a", "me", "z"], gathered={}, seconds=0.5, bytes_sent=7,
                         bytes_received=7, encode_s=0.0, decode_s=0.0, contributors=["me", "a"])
    record = Peer._epoch_fields(peer, result, done, "digest", staleness=0)
    assert (record["event"], record["group"], record["contributors"]) == ("outer_step", ["a", "me", "z"], ["a", "me"])
    assert record["one_sided"] == 2  # the averager's count so far (bench/churn_soak.py sums it)
    assert record["partly_included"] == {}
    result.included = {"a": 1.0, "me": 0.75, "z": 0.0}  # two-level: a dead owner's column left part of ours out
    assert Peer._epoch_fields(peer, result, done, "digest", staleness=0)["partly_included"] == {"me": 0.75}
    solo = Peer._epoch_fields(peer, None, done, "digest", staleness=0)
    assert (solo["event"], solo["contributors"]) == ("solo_step", ["me"])
    Peer._note_round(peer, result)
    assert (peer.recent_rounds[-1].group_size, peer.recent_rounds[-1].contributors) == (3, 2)
    # A record from a peer that does not send the count yet still parses.
    old = Progress.model_validate(dict(peer="old", epoch=1, state_hash="h", rounds=[dict(epoch=1, group_size=2, allreduce_s=0.1, bytes_sent=1)]))
    assert old.rounds[0] == RoundStat(epoch=1, group_size=2, allreduce_s=0.1, bytes_sent=1, contributors=0)
