"""The dashboard's bookkeeping and its HTTP surface, without a swarm (the browser test has one)."""

import json
import urllib.error
import urllib.request

import pytest

from p2pdiloco import dashboard
from p2pdiloco.swarm import Progress, RoundStat


def _record(peer, epoch, *, val=None, val_epoch=None, rounds=(), t=100.0, **kw):
    """``rounds``: (epoch, group size, all-reduce s, bytes sent[, contributors]); no contributors: an older peer's."""
    stats = [RoundStat(epoch=e, group_size=g, allreduce_s=s, bytes_sent=b, contributors=c[0] if c else 0) for e, g, s, b, *c in rounds]
    return Progress(peer=peer, epoch=epoch, state_hash="ab" * 8, tokens_per_s=1000.0, val_loss=val, val_epoch=val_epoch,
                    rounds=stats, bytes_sent_total=sum(stat.bytes_sent for stat in stats), time=t, **kw)


def test_summary_counts_training_peers_and_the_last_round():
    records = {
        "a": _record("a", 3, val=4.0, val_epoch=3, rounds=[(2, 2, 0.5, 100, 2), (3, 3, 0.25, 300, 2)]),
        "b": _record("b", 3, rounds=[(3, 3, 0.75, 200, 2)], ready=True),
        "c": _record("c", 2, leaving=True),
        "k": _record("k", 3, backup=True),
    }
    s = dashboard.summarize_run("r", records, now=110.0)
    assert (s["epoch"], s["peers_online"], s["tokens_per_s"]) == (3, 2, 2000.0)
    assert (s["val_loss"], s["val_epoch"]) == (4.0, 3)
    assert s["last_round"] == dict(epoch=3, group_size=3, contributors=2, allreduce_s=0.5, bytes_sent=500, reports=2)
    roles = {p["peer"]: p["role"] for p in s["peers"]}
    assert roles == {"a": "training", "b": "ready", "c": "leaving", "k": "backup"}
    # each peer's last round: 3 members, one left out of the average; none yet for the others
    assert {p["peer"]: (p["group_size"], p["contributors"]) for p in s["peers"]} == {
        "a": (3, 2), "b": (3, 2), "c": (None, None), "k": (None, None)}
    assert {p["peer"]: p["last_seen_s"] for p in s["peers"]}["a"] == 10.0
    json.dumps(s)  # what status --json prints


def test_watch_keeps_history_the_dht_forgets():
    watch = dashboard.SwarmWatch(dht=None, run="r")
    watch._fold("r", {"a": _record("a", 1, val=5.0, val_epoch=1, rounds=[(1, 2, 0.5, 10)])}, now=1.0)
    # Later records: the first value measured for an epoch stays, rounds recalled again are not doubled.
    watch._fold("r", {"a": _record("a", 2, val=4.0, val_epoch=2, rounds=[(1, 2, 0.5, 10), (2, 2, 0.4, 10)]),
                      "b": _record("b", 2, val=9.9, val_epoch=1, rounds=[(2, 2, 0.6, 20)])}, now=2.0)
    run = watch.snapshot()["runs"][0]
    assert [(p["epoch"], p["val_loss"]) for p in run["val_curve"]] == [(1, 5.0), (2, 4.0)]
    assert [(r["epoch"], r["bytes_sent"], r["reports"]) for r in run["rounds"]] == [(1, 10, 1), (2, 30, 2)]
    assert [(r["group_size"], r["contributors"]) for r in run["rounds"]] == [(2, 0), (2, 0)]  # 0: not said
    assert [(p["time"], p["peers"]) for p in run["throughput"]] == [(1.0, 1), (2.0, 2)]


def test_server_is_read_only_and_serves_the_page_and_state():
    watch = dashboard.SwarmWatch(dht=None, run="r")
    watch._fold("r", {"a": _record("a", 1)}, now=1.0)
    server = dashboard.serve(watch, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        page = urllib.request.urlopen(base, timeout=10)
        assert b"p2pdiloco swarm" in page.read() and "default-src 'self'" in page.headers["Content-Security-Policy"]
        state = json.loads(urllib.request.urlopen(base + "api/state", timeout=10).read())
        assert state["runs"][0]["peers_online"] == 1
        for method, path, code in (("POST", "api/state", 405), ("DELETE", "", 405), ("GET", "nope", 404)):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(base + path, method=method), timeout=10)
            assert err.value.code == code
    finally:
        server.shutdown()
        server.server_close()


def test_a_taken_port_is_a_one_line_error():
    from p2pdiloco.errors import SwarmError

    watch = dashboard.SwarmWatch(dht=None)
    server = dashboard.serve(watch, "127.0.0.1", 0)
    try:
        with pytest.raises(SwarmError, match="choose another --dashboard-port"):
            dashboard.serve(watch, "127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_a_run_started_again_under_its_name_gets_a_fresh_history():
    watch = dashboard.SwarmWatch(dht=None, run="r")
    watch._fold("r", {"a": _record("a", 5, val=4.0, val_epoch=5, rounds=[(5, 2, 0.5, 10)])}, now=1.0)
    watch._fold("r", {"a": _record("a", 5, leaving=True)}, now=2.0)  # everyone left: the history stays
    assert watch.snapshot()["runs"][0]["val_curve"]
    watch._fold("r", {"b": _record("b", 1, val=7.0, val_epoch=1, rounds=[(1, 2, 0.5, 10)])}, now=3.0)
    run = watch.snapshot()["runs"][0]
    assert [p["val_loss"] for p in run["val_curve"]] == [7.0] and [r["epoch"] for r in run["rounds"]] == [1]
    assert run["history_since"] == 3.0


def test_each_peer_says_where_it_trains():
    from p2pdiloco.swarm import devices_label

    records = {"a": _record("a", 1, devices=["cuda:0", "cuda:1", "cuda:2", "cuda:3"]), "b": _record("b", 1, devices=["cpu"]),
               "k": _record("k", 1, backup=True)}
    rows = {p["peer"]: p["devices"] for p in dashboard.summarize_run("r", records, now=100.0)["peers"]}
    assert rows == {"a": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], "b": ["cpu"], "k": []}
    assert [devices_label(rows[p]) for p in "abk"] == ["4×cuda", "cpu", "-"]
    assert devices_label(["cpu", "cpu"]) == "2×cpu"
    with pytest.raises(ValueError):
        Progress(peer="x", epoch=0, state_hash="ab", devices=["x" * 33])
