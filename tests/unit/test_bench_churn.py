"""bench/churn_soak.py's judgement, on synthetic metrics records (no processes)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_churn", Path(__file__).resolve().parents[2] / "bench" / "churn_soak.py")
churn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(churn)


def rec(peer, epoch, digest, contributors=(), event="outer_step", one_sided=0, time=0.0, reason=None):
    r = dict(peer=peer, epoch=epoch, time=time + epoch, event=event, state_hash=digest, contributors=list(contributors),
             group=list(contributors), group_size=len(contributors), tokens=100, train_loss=1.0, allreduce_s=0.1,
             bytes_sent=0, one_sided=one_sided)
    if reason:
        r["reason"] = reason
    return r


def test_a_fork_that_merges_later_is_healed_and_its_lost_work_counted():
    # Epoch 1: {a, b} and {c} average apart (two states); c downloads the winner, and epoch 2 is one state again.
    a = [rec("a", 1, "k1", "ab"), rec("a", 2, "k2", "abc")]
    b = [rec("b", 1, "k1", "ab"), rec("b", 2, "k2", "abc")]
    c = [rec("c", 1, "x1", "c"), rec("c", 1, "k1", event="downloaded", reason="fork"), rec("c", 2, "k2", "abc")]
    report = churn.analyse([a, b, c], kills=[], exit_codes=[0, 0, 0], leftovers=0, wall_s=10.0)
    assert report["disagreeing_epochs"] == [1]
    assert report["unhealed_forks"] == []
    assert report["forks_healed"] == 1
    assert report["work_kept_peer_epochs"] == "5/6"  # c's epoch-1 work is not in the kept state
    assert report["work_lost"] == dict(catch_up=0, catch_up_rebased=0, fork=1, part=0, left_out=0)
    assert report["max_group_size"] == 3


def test_two_branches_that_never_merge_are_unhealed():
    a = [rec("a", 1, "k1", "a"), rec("a", 2, "k2", "a")]
    b = [rec("b", 1, "x1", "b"), rec("b", 2, "x2", "b")]
    report = churn.analyse([a, b], kills=[], exit_codes=[0, 0], leftovers=0, wall_s=10.0)
    assert report["unhealed_forks"] == [1, 2]


def test_one_sided_rounds_are_summed_over_each_process_life():
    # Peer a counted 2, was killed and restarted (its counter starts again at 0), then counted 1 more.
    a = [rec("a", 1, "k1", "ab", one_sided=1), rec("a", 2, "k2", "ab", one_sided=2),
         rec("a", 3, "k3", "ab", one_sided=0), rec("a", 4, "k4", "ab", one_sided=1)]
    b = [rec("b", e, f"k{e}", "ab") for e in range(1, 5)]
    report = churn.analyse([a, b], kills=[], exit_codes=[0, 0], leftovers=0, wall_s=10.0)
    assert report["one_sided_rounds"] == 3
    assert report["work_kept"] == 1.0


def test_lost_work_says_where_it_went():
    # Epoch 1: c's column owner died, so a third of c's work missed the state (carried); d was left
    # out; e was restarted and spent the epoch downloading.
    a = [rec("a", 1, "k1", "ab")]
    c = [dict(rec("c", 1, "k1", "ab"), partly_included={"c": 0.6667})]
    d = [rec("d", 1, "k1", "ab")]
    e = [rec("e", 1, "k1", event="downloaded", reason="behind")]
    f = [dict(rec("f", 1, "k1", event="downloaded", reason="behind"), rebased_steps=7)]  # a lagging peer: its work goes next
    report = churn.analyse([a, c, d, e, f], kills=[], exit_codes=[0] * 5, leftovers=0, wall_s=10.0)
    assert report["work_lost"] == dict(catch_up=2, catch_up_rebased=1, fork=0, part=0.33, left_out=1)
    assert report["work_kept_whole"] == 0.2 and report["work_kept"] == round(1.6667 / 5, 4)
