"""The swarm view's decisions from hand-written records: no DHT, no processes."""

from __future__ import annotations

import pytest

from p2pdiloco.rounds import judge_flags
from p2pdiloco.swarm import Progress, winning_state
from p2pdiloco.swarmview import SwarmView, Target


def rec(peer: str, epoch: int, digest: str, *, ready: bool = False, leaving: bool = False, backup: bool = False) -> Progress:
    return Progress(peer=peer, epoch=epoch, state_hash=digest, ready=ready, leaving=leaving, backup=backup)


def records(*items: Progress) -> dict[str, Progress]:
    return {r.peer: r for r in items}


def view_of(*items: Progress, me: str = "me", banned: set[str] | None = None) -> SwarmView:
    view = SwarmView(me, banned)
    view.update(records(*items))
    return view


# ---------------------------------------------------------------- who is live, who is ready
def test_live_leaves_out_ourselves_leavers_backups_and_banned():
    view = view_of(rec("me", 3, "a"), rec("p1", 3, "a"), rec("p2", 3, "a", leaving=True), rec("b", 3, "a", backup=True),
                   rec("evil", 3, "a", ready=True), banned={"evil"})
    assert set(view.live) == {"p1"}
    assert set(view.backups) == {"b"}
    assert view.departed == {"p2"} and view.seen == {"p1"}


def test_ready_is_same_epoch_same_state_and_ready():
    view = view_of(rec("p1", 3, "a", ready=True), rec("p2", 3, "a"), rec("p3", 3, "b", ready=True),
                   rec("p4", 2, "a", ready=True), rec("p5", 3, "a", ready=True))
    assert view.ready(3, "a") == ["p1", "p5"]
    assert view.waiting_on(3) == ["p2", "p4"]  # not ready yet, or behind us


def test_a_banned_peer_is_never_ready_nor_waited_for():
    banned = {"evil"}
    view = view_of(rec("p1", 3, "a", ready=True), rec("evil", 3, "a", ready=True), banned=banned)
    assert view.ready(3, "a") == ["p1"]
    banned.add("p1")  # the peer shares its set: a later read leaves the newly banned out too
    view.update(records(rec("p1", 3, "a", ready=True), rec("evil", 3, "a")))
    assert view.ready(3, "a") == [] and view.waiting_on(3) == []


def test_furthest_epoch_counts_leavers_but_not_backups():
    view = view_of(rec("p1", 2, "a"), rec("gone", 9, "z", leaving=True), rec("b", 20, "y", backup=True))
    assert view.furthest_epoch == 9
    assert view.run_over(3, max_epochs=9) and not view.run_over(3, max_epochs=10) and not view.run_over(3, None)
    view.update({})  # the farewell record expired: what it showed is kept
    assert view.furthest_epoch == 9


# ---------------------------------------------------------------- the fork rule
def test_winner_most_peers_then_smallest_digest():
    assert winning_state(records(rec("p1", 5, "b"), rec("p2", 5, "b"), rec("p3", 5, "a")), 5) == "b"
    assert winning_state(records(rec("p1", 5, "b"), rec("p2", 5, "a")), 5) == "a"  # a tie: the smaller digest
    assert winning_state(records(rec("p1", 5, "b")), 5, own=(5, "a")) == "a"  # our own state votes too
    assert winning_state(records(rec("p1", 5, "b")), 5, own=(4, "a")) == "b"  # ...only at its own epoch
    assert winning_state(records(rec("p1", 4, "b")), 5) is None  # nobody holds that epoch


def test_winner_waits_while_peers_behind_could_change_it():
    # Two pairs forked at epoch 5; one peer is still finishing its round at epoch 4.
    seen = records(rec("p1", 5, "b"), rec("p2", 5, "b"), rec("p3", 5, "a"), rec("late", 4, "x"))
    assert winning_state(seen, 5) is None  # "late" joining a would tie b and win it
    assert winning_state(seen, 5, settled=False) == "b"  # the leader, for a peer that is behind
    assert winning_state({**seen, "late": rec("late", 5, "b")}, 5) == "b"
    assert winning_state({**seen, "late": rec("late", 5, "a")}, 5) == "a"


def test_behind_when_a_peer_is_ahead_or_our_fork_lost():
    assert view_of(rec("p1", 6, "z")).behind(5, "a")
    assert view_of(rec("p1", 5, "b"), rec("p2", 5, "b")).behind(5, "a")  # settled: b 2, us 1
    assert not view_of(rec("p1", 5, "b")).behind(5, "a")  # a tie goes to our smaller digest
    assert not view_of(rec("p1", 5, "b"), rec("p2", 5, "b"), rec("p3", 4, "x")).behind(5, "a")  # not settled yet
    assert not view_of(rec("p1", 4, "x")).behind(5, "a")


# ---------------------------------------------------------------- what to download
def test_catch_up_behind_takes_the_settled_winner_or_else_the_leader():
    view = view_of(rec("p1", 7, "b"), rec("p2", 7, "b"), rec("p3", 7, "a"))
    assert view.catch_up(5, "q") == Target(7, "b", ["p1", "p2"], "behind")
    unsettled = view_of(rec("p1", 7, "b"), rec("p2", 7, "a"), rec("p3", 6, "x"))
    assert unsettled.catch_up(5, "q") == Target(7, "a", ["p2"], "behind")


def test_catch_up_at_our_epoch_only_for_a_settled_lost_fork():
    assert view_of(rec("p1", 5, "b"), rec("p2", 5, "b")).catch_up(5, "a") == Target(5, "b", ["p1", "p2"], "fork")
    assert view_of(rec("p1", 5, "a"), rec("p2", 5, "b")).catch_up(5, "a") is None  # we win
    assert view_of(rec("p1", 5, "b"), rec("p2", 5, "b"), rec("p3", 4, "x")).catch_up(5, "a") is None  # judged later
    assert view_of(rec("p1", 4, "x")).catch_up(5, "a") is None  # nobody ahead


def test_catch_up_alone_restores_the_newest_backup_ahead():
    view = view_of(rec("b1", 9, "y", backup=True), rec("b2", 12, "z", backup=True), rec("b3", 12, "z", backup=True))
    assert view.catch_up(5, "a") == Target(12, None, ["b2", "b3"], "backup")
    assert view.catch_up(12, "z") is None
    assert view_of(rec("p1", 5, "a"), rec("b2", 12, "z", backup=True)).catch_up(5, "a") is None  # a live peer wins


@pytest.mark.parametrize("top", [
    # settled: 3 b vs 1 a at epoch 9
    [rec("p1", 9, "b"), rec("p2", 9, "b"), rec("p3", 9, "b"), rec("p4", 9, "a")],
    # unsettled: 2 b vs 1 a with 2 peers still behind
    [rec("p1", 9, "b"), rec("p2", 9, "b"), rec("p3", 9, "a"), rec("p4", 8, "x"), rec("p5", 8, "y")],
    # a tie settled on the smaller digest
    [rec("p1", 9, "b"), rec("p2", 9, "a")],
])
def test_a_backup_and_a_behind_peer_pick_the_same_state(top):
    """The coordinator's backup uses the peers' own fork rule (it once took a plain majority)."""
    seen = records(*top, rec("me", 4, "old"), rec("backup", 3, "old", backup=True))
    peer = SwarmView("me")
    peer.update(seen)
    backup = SwarmView("backup")
    backup.update(seen)
    mine = peer.catch_up(4, "old")
    theirs = backup.catch_up(3, "old", vote=False)
    assert mine is not None and theirs is not None
    assert (mine.epoch, mine.digest, mine.donors) == (theirs.epoch, theirs.digest, theirs.donors)


def test_a_backup_follows_a_settled_fork_of_its_own_epoch_without_voting():
    seen = records(rec("p1", 9, "b"), rec("p2", 9, "b"), rec("p3", 9, "a"))
    backup = view_of(*seen.values(), me="backup")
    assert backup.catch_up(9, "a", vote=False) == Target(9, "b", ["p1", "p2"], "fork")
    assert backup.catch_up(9, "b", vote=False) is None


# ---------------------------------------------------------------- alone or cut off
def test_alone_when_everyone_seen_has_left():
    view = view_of(rec("p1", 3, "a"))
    view.update(records(rec("p1", 3, "a", leaving=True)))
    assert view.may_be_alone(0.0, 60.0, neighbours=lambda: 0)


def test_alone_when_neighbours_answer():
    view = view_of(rec("p1", 3, "a"))
    view.update({})  # p1's record expired without a farewell: dead, or are we cut off?
    assert view.may_be_alone(0.0, 60.0, neighbours=lambda: 2)


def test_cut_off_waits_alone_after_s_then_forgets():
    view = view_of(rec("p1", 3, "a"))
    view.update({})
    assert not view.may_be_alone(100.0, 60.0, neighbours=lambda: 0)  # nobody answers: cut off
    assert view.cut_off_since == 100.0
    assert not view.may_be_alone(159.0, 60.0, neighbours=lambda: 0)
    assert view.may_be_alone(160.0, 60.0, neighbours=lambda: 0)  # assume the swarm is gone
    assert view.seen == set()


def test_back_from_a_cut_an_empty_read_proves_nothing_until_the_records_settle():
    view = view_of(rec("p1", 3, "a"))
    view.update({})
    assert not view.may_be_alone(100.0, 60.0, neighbours=lambda: 0, settle_s=6.0)  # cut off
    # The link heals: neighbours answer at once, the others' records are not readable yet.
    assert not view.may_be_alone(110.0, 60.0, neighbours=lambda: 1, settle_s=6.0)
    assert view.cut_off_since is None and view.back_since == 110.0
    assert not view.may_be_alone(115.9, 60.0, neighbours=lambda: 1, settle_s=6.0)
    assert view.may_be_alone(116.0, 60.0, neighbours=lambda: 1, settle_s=6.0)  # still nobody: alone
    view.update(records(rec("p1", 4, "b")))
    assert view.back_since is None


def test_unknown_neighbours_is_not_alone_and_a_live_record_ends_a_cut():
    view = view_of(rec("p1", 3, "a"))
    view.update({})

    def broken() -> int:
        raise TimeoutError("the DHT did not answer")

    assert not view.may_be_alone(0.0, 60.0, neighbours=broken)
    assert not view.may_be_alone(1.0, 60.0, neighbours=lambda: 0)
    view.update(records(rec("p1", 4, "b")))
    assert view.cut_off_since is None


# ---------------------------------------------------------------- bans from flags
def test_a_ban_needs_a_streak_of_flags():
    streaks: dict[str, int] = {}
    group = ["a", "b", "c"]
    assert judge_flags(streaks, group, ["a"], limit=2) == []
    assert judge_flags(streaks, group, ["b"], limit=2) == []  # a's streak broke
    assert judge_flags(streaks, group, ["b"], limit=2) == ["b"]
    assert streaks == {"a": 0, "b": 2, "c": 0}
    assert judge_flags({}, group, group, limit=0) == []  # ban_after = 0: never
