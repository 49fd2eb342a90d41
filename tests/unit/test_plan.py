"""The two-level round's plan (p2pdiloco.plan): every peer computes the same groups, cells cover the
vector once, a round's outcome is judged alike everywhere, and bytes meet the butterfly bound."""

import random

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


def _assemble_as_before(plan, me, decisions, size, quorum=0.5):
    """assemble as it was before the judge/carried split (one pass over cells and members per
    peer): the reference the split must match exactly."""
    weights = {p: 0 for p in plan.peers}
    decided, carried, missing = 0, [], []
    for cell, (start, stop) in plan.cell_spans(size).items():
        decision = decisions.get(cell)
        if decision is None:
            missing.append(cell)
            carried.append((start, stop))
            continue
        decided += stop - start
        for p in decision.members:
            if p in weights:
                weights[p] += stop - start
        if me not in decision.members:
            carried.append((start, stop))
    apply = decided > quorum * size
    if not apply:
        carried = [(0, size)]
    contributors = sorted(p for p, w in weights.items() if apply and decided and w == decided)
    included = {p: (w / size if apply else 0.0) for p, w in weights.items()}
    return planning.Outcome(apply=apply, decided=decided / size, contributors=contributors, included=included,
                            carried=planning._merge(carried), missing=missing)


def _bytes_sent_as_before(plan, peer, size, payload):
    g, own, cells = plan.group_of(peer), plan.column_of(peer), plan.cell_spans(size)
    sent = {"members": 0, "partials": 0, "decisions": 0, "forward": 0}
    for c in range(plan.columns):
        if c != own:
            start, stop = plan.column_span(c, size)
            sent["members"] += payload(stop - start)
    if own is not None:
        for h in range(len(plan.groups)):
            start, stop = cells[(own, h)]
            if h != g:
                sent["partials"] += payload(stop - start)
            else:
                sent["decisions"] += (len(plan.groups) - 1) * payload(stop - start)
            sent["forward"] += (len(plan.groups[g]) - 1) * payload(stop - start)
    return sent


def _random_round(rng):
    """A plan and decisions as a round with arbitrary losses could leave them: cells undecided,
    member sets that differ per cell (some shared, as a column's cells mostly are), now and then
    a member from outside the plan, and sizes smaller than the number of cells (empty cells)."""
    p = planning.make_plan(rng.randrange(5), "d", ids(rng.randint(1, 40)), rng.randint(1, 5))
    size = rng.choice([1, 3, 7, 100, 997, 10**6])
    peers = p.peers
    shared = [frozenset(rng.sample(peers, rng.randint(0, len(peers)))) for _ in range(3)]
    decisions = {}
    for cell in p.cells():
        roll = rng.random()
        if roll < 0.2:
            continue  # undecided
        members = rng.choice(shared) if roll < 0.7 else frozenset(rng.sample(peers, rng.randint(0, len(peers))))
        if rng.random() < 0.05:
            members |= {"stranger"}
        decisions[cell] = planning.Decision(cell, members)
    return p, decisions, size, rng.choice([0.0, 0.3, 0.5, 0.9])


@pytest.mark.parametrize("seed", range(60))
def test_judging_once_then_each_peer_gives_what_one_pass_per_peer_gave(seed):
    rng = random.Random(seed)
    p, decisions, size, quorum = _random_round(rng)
    judged = planning.judge(p, decisions, size, quorum)
    for me in p.peers + ["stranger", "nobody"]:
        expected = _assemble_as_before(p, me, decisions, size, quorum)
        assert planning.assemble(p, me, decisions, size, quorum) == expected
        assert planning.assemble(p, me, decisions, size, quorum, judged=judged) == expected
        assert planning.carried(judged, me) == expected.carried
    assert judged.apply == expected.apply and judged.decided == expected.decided
    assert list(judged.contributors) == expected.contributors and dict(judged.included) == expected.included


def test_each_outcome_is_its_own_and_a_judgement_is_of_one_plan():
    p = planning.make_plan(0, "d", ids(8), 4)
    everyone = {c: planning.Decision(c, frozenset(p.peers)) for c in p.cells()}
    judged = planning.judge(p, everyone, 100)
    a, b = (planning.assemble(p, me, everyone, 100, judged=judged) for me in p.peers[:2])
    a.included[p.peers[0]] = 0.0  # a peer that edits its outcome edits nobody else's
    assert b.included[p.peers[0]] == 1.0 and judged.included[p.peers[0]] == 1.0
    with pytest.raises(TypeError):
        judged.included[p.peers[0]] = 0.0  # type: ignore[index]
    other = planning.make_plan(0, "d", ids(9), 4)
    with pytest.raises(ValueError):
        planning.assemble(other, other.peers[0], everyone, 100, judged=judged)
    with pytest.raises(ValueError):
        planning.assemble(p, p.peers[0], everyone, 101, judged=judged)


@pytest.mark.parametrize("n,group,size", [(1, 4, 10), (7, 4, 1000), (12, 4, 997), (33, 5, 40), (64, 4, 10**6), (30, 3, 7)])
def test_bytes_sent_by_count_equals_cell_by_cell(n, group, size):
    p = planning.make_plan(1, "d", ids(n), group)
    for payload in (lambda v: v, lambda v: 1024 + 4 * -(-v // 4096) + v):  # blockwise8's shape: payload(0) > 0
        for peer in p.peers:
            assert planning.bytes_sent(p, peer, size, payload) == _bytes_sent_as_before(p, peer, size, payload)


def test_peers_that_cannot_be_dialed_never_own_a_column_and_sit_last_in_their_group():
    make_plan = planning.make_plan
    ready = [f"p{i:02d}" for i in range(11)]
    clients = {"p01", "p04", "p05", "p09"}
    plan = make_plan(3, "d", ready, 4, clients=clients)
    assert sorted(plan.peers) == ready and plan.clients == clients
    sizes = [len(g) for g in plan.groups]
    assert len(sizes) == 3 and max(sizes) - min(sizes) <= 1
    for g, members in enumerate(plan.groups):
        dialable = [p for p in members if p not in clients]
        assert list(members) == dialable + [p for p in members if p in clients], "clients after the dialable members"
        for c in range(plan.columns):
            assert plan.owner(g, c) not in clients
    for p in clients:
        assert plan.column_of(p) is None
    assert make_plan(3, "d", ready, 4, clients=clients) == plan  # every peer computes the same plan
    assert make_plan(3, "d", ready, 4).plan_id != plan.plan_id  # another view of who is dialable: another plan
    # Fewer dialable peers than groups: one group per dialable peer.
    few = make_plan(3, "d", ready, 2, clients=set(ready) - {"p00", "p03"})
    assert len(few.groups) == 2 and few.columns == 1
    with pytest.raises(ValueError, match="dial"):
        make_plan(3, "d", ["a", "b"], 2, clients={"a", "b"})
