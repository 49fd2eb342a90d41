"""Peers of unequal speed (emulated): dynamic local updates, rounds that overlap compute, and late
work folded into later rounds, with every peer holding the same state at every epoch."""

import statistics

import pytest

pytestmark = pytest.mark.swarm

EPOCHS = 6
# The test recipe's step takes ~10 ms, far less than a round or a DHT poll; emulated at a tenth
# of that speed and below, an epoch outlasts a round, as it does in a real run.
SPEEDS = (0.1, 0.05, 0.025)
GRACE_S = 4.0


def _rounds(swarm, i):
    return [r for r in swarm.metrics(i) if r.get("event") in ("outer_step", "solo_step")]


def _steady_rounds(swarm, i):
    """Rounds after this peer's first, and not right after a download: those records also
    cover starting up (building the model, joining the DHT) or catching up, which are not rounds."""
    out, previous = [], None
    for r in swarm.metrics(i):
        if r.get("event") == "outer_step" and previous is not None and previous.get("event") == "outer_step":
            out.append(r)
        previous = r
    return out


def test_dylu_peers_of_unequal_speed_stay_identical_and_never_idle_beyond_the_grace(local_swarm):
    swarm = local_swarm([
        "run.inner_steps=24", "run.min_inner_steps=2", f"run.averaging.grace_s={GRACE_S}",
        "run.outer_optimizer=delayed_nesterov", "run.outer_delay=3",
    ])
    for speed in SPEEDS:
        swarm.add_peer(EPOCHS, "--set", f"peer.emulate_speed={speed}")
    assert swarm.wait_exit(range(3), 300) == [0, 0, 0]

    swarm.assert_consistent(range(3))
    rounds = [_rounds(swarm, i) for i in range(3)]
    assert all(rs and rs[-1]["epoch"] == EPOCHS for rs in rounds)
    # DyLU: once the speeds are known, the slower a peer the fewer steps it runs per epoch.
    steps = [statistics.median(r["inner_steps"] for r in rs if r["epoch"] > 2) for rs in rounds]
    assert steps[0] > steps[1] > steps[2], steps
    assert steps[0] >= 20 and steps[2] <= 9, steps
    # The slowest peer still takes part in the rounds (its work is weighted by its tokens).
    assert sum(r["group_size"] == 3 for r in rounds[2]) >= EPOCHS // 2
    # Nobody idles past the grace time (plus the round's own communication, which overlap hides
    # when it is shorter than the next epoch's steps) in any round.
    for i in range(3):
        for r in _steady_rounds(swarm, i):
            assert r["idle_s"] <= GRACE_S + r["allreduce_s"] + 1.0, (i, r["epoch"], r["idle_s"], r["allreduce_s"])
    # Overlap: peers kept training while rounds ran, and those steps were carried over.
    assert sum(r["overlap_steps"] for rs in rounds for r in rs) > 0


def test_a_straggler_past_the_grace_brings_its_work_to_a_later_round(local_swarm):
    # Lock-step step counts (no DyLU) and a short grace: the slow peer misses rounds, downloads
    # the newer state, rebases its work onto it and contributes it, stale, to a later round.
    swarm = local_swarm([
        "run.inner_steps=16", "run.dynamic_local_updates=false", "run.averaging.grace_s=0.5",
        "run.outer_optimizer=delayed_nesterov", "run.outer_delay=3",
    ])
    # The straggler needs ~5 of the others' epochs for one of its own; it stops well before them
    # (a peer left alone after the others finished would rightly go on by itself).
    for speed, epochs in ((0.1, 3 * EPOCHS), (0.1, 3 * EPOCHS), (0.02, 2 * EPOCHS)):
        swarm.add_peer(epochs, "--set", f"peer.emulate_speed={speed}")
    assert swarm.wait_exit(range(3), 300) == [0, 0, 0]

    swarm.assert_consistent(range(3))
    slow = swarm.metrics(2)
    assert any(r.get("event") == "downloaded" for r in slow), "the straggler never fell behind"
    stale = [r for r in slow if r.get("event") == "outer_step" and r["staleness"] >= 1]
    assert stale, "the straggler's late work never reached a round"
    # Its work was not thrown away: a round carrying it counts all its steps.
    assert max(r["inner_steps"] for r in stale) >= 16
