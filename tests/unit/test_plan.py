"""The two-level round's plan (p2pdiloco.plan): every peer computes the same groups, cells cover the
vector once, a round's outcome is judged alike everywhere, and bytes meet the butterfly bound."""

import pytest

from p2pdiloco import plan as planning
from p2pdiloco import scalesim


def ids(n):
    return [f"peer{i:03d}" for i in range(n)]


def test_every_peer_computes_the_same_plan_from_the_same_ready_set():
    a = planning.make_plan(3, "d", ids(10), 4)
    b = planning.make_plan(3, "d", list(reversed(ids(10))), 4)
    assert a == b
    assert sorted(len(g) for g in a.groups) == [3, 3, 4] and a.columns == 3
    assert sorted(a.peers) == ids(10)
    assert planning.make_plan(4, "d", ids(10), 4).plan_id != a.plan_id  # partners change every epoch
    assert planning.make_plan(3, "d", ids(9), 4).plan_id != a.plan_id  # another view is another plan
    with pytest.raises(ValueError):
        planning.make_plan(3, "d", [], 4)


@pytest.mark.parametrize("n,size", [(1, 10), (7, 1000), (12, 997), (33, 5000)])
def test_cells_cover_the_vector_exactly_once(n, size):
    p = planning.make_plan(0, "d", ids(n), 4)
    covered = sorted(p.cell_spans(size).values())
    assert covered[0][0] == 0 and covered[-1][1] == size
    assert all(x[1] == y[0] for x, y in zip(covered, covered[1:]))
    assert {p.decider(c) for c in p.cells()} <= set(p.peers)


def test_a_round_applies_with_every_decision_and_carries_what_was_left_out():
    p = planning.make_plan(0, "d", ids(8), 4)
    me, other = p.groups[0][0], p.groups[1][0]
    everyone = {c: planning.Decision(c, frozenset(p.peers)) for c in p.cells()}
    full = planning.assemble(p, me, everyone, 100)
    assert full.apply and full.decided == 1 and full.contributors == sorted(p.peers) and full.carried == []
    lost = next(iter(everyone))
    some = {c: d for c, d in everyone.items() if c != lost}
    part = planning.assemble(p, me, some, 100)
    assert part.apply and part.carried == [p.cell_span(lost, 100)] and part.missing == [lost]
    assert part.included[other] == part.decided  # an undecided cell is nobody's: it is a zero update everywhere
    without_me = {c: planning.Decision(c, frozenset(p.peers) - {me}) for c in p.cells()}
    assert planning.assemble(p, me, without_me, 100).carried == [(0, 100)]
    few = dict(list(everyone.items())[:2])  # a minority plan: stepping would make a second state
    judged = planning.assemble(p, me, few, 100)
    assert not judged.apply and judged.carried == [(0, 100)] and judged.contributors == []


@pytest.mark.parametrize("n,group", [(8, 4), (12, 4), (16, 2), (30, 4)])
def test_bytes_per_peer_stay_at_the_butterfly_bound(n, group):
    p = planning.make_plan(0, "d", ids(n), group)
    size, payload = 10**8, (lambda values: values)
    bound = planning.butterfly_bound(n, size, payload)
    sent = [sum(planning.bytes_sent(p, peer, size, payload).values()) for peer in p.peers]
    assert max(sent) <= 1.5 * bound
    if all(len(g) == group for g in p.groups):
        assert sum(sent) / n == pytest.approx(bound, rel=1e-6)  # equal groups: exactly a butterfly's bytes


@pytest.mark.parametrize("seed", range(40))
def test_simulated_swarms_keep_one_state_and_account_for_all_work(seed):
    sim = scalesim.ScaleSim(peers=6 + seed % 11, group_size=2 + seed % 3, rounds=6, fail=0.05, view_miss=0.05,
                            slow=0.02, seed=seed, params=10**6)
    result = scalesim.run(sim)
    assert result["work_accounted"]
    assert all(r["state"] for r in result["rows"])
    clean = scalesim.run(scalesim.ScaleSim(peers=sim.peers, group_size=sim.group_size, rounds=4, fail=0, seed=seed, params=10**6))
    assert clean["work_kept"] == 1 and clean["forks"] == 0 and clean["downloads"] == 0
