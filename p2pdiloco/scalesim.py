"""The lab of the two-level round: :mod:`p2pdiloco.plan` run by N simulated peers on a virtual
clock, with seeded faults, to measure what a swarm of any size keeps (docs/scaling.md).

Every decision is :mod:`p2pdiloco.plan`'s: each peer builds its plan from the ready set *it*
read, owners include what reached them, deciders :func:`~p2pdiloco.plan.decide`, each peer
:func:`~p2pdiloco.plan.assemble` s what reached it (the plan's decisions are judged once,
:func:`~p2pdiloco.plan.judge`, since every live peer of a plan holds the same ones; each peer adds
its own carried ranges). This module only delivers messages, keeps the time and injects the faults:

- ``fail``: the share of peers that die in each round, each at a uniform time in it. A peer that
  dies in a stage has sent a uniform share of that stage's messages (one-sided deliveries
  included); it is replaced by a newcomer at the next round.
- ``view_miss``: the chance that a peer's read of the ready set misses one other ready peer
  (DHT views differ), so that it computes another plan.
- ``slow``: the chance that a peer is late for each stage: its messages of that stage miss their
  deadline (it stays in the run).

Values are not simulated: a cell is decided once and the same bytes go everywhere (that is
:mod:`p2pdiloco.averaging`'s job, checked byte for byte in the swarm tests), so a peer's state is
the hash of the decisions it applied; two peers with one digest hold one state. Bytes are those
of ``params`` values through the run's codec (:func:`p2pdiloco.plan.bytes_sent`).

Work: each peer trains one peer-epoch per round. The share of its pseudo-gradient that a decision
included lands in the state; the rest is carried into its next round (``Outcome.carried``); a
peer that dies loses what it carried, and a peer whose state loses a fork loses what that round
included. ``work_kept`` is what landed over what was trained; ``work_accounted`` checks that
landed + carried + lost = trained, so no work disappears unaccounted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import statistics
from collections import Counter

from p2pdiloco import plan as planning
from p2pdiloco.codecs import make_codec

STAGES = ("members", "partials", "decisions", "forward")  # the order of a round's stages (plan.bytes_sent's keys)


@dataclasses.dataclass(frozen=True)
class ScaleSim:
    """One simulated swarm. Times in virtual seconds, ``params`` the model's size in values."""

    peers: int = 16
    group_size: int = 4
    rounds: int = 20
    params: int = 150_000_000
    codec: str = "blockwise8"
    latency_s: float = 0.05
    bandwidth_mbit: float = 1000.0
    fail: float = 0.01
    view_miss: float = 0.0
    slow: float = 0.0
    wait_s: float = 10.0  # how long a stage waits for an awaited message that never comes (next_chunk_s)
    quorum: float = 0.5
    seed: int = 0


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def run(sim: ScaleSim) -> dict:
    """Run ``sim.rounds`` rounds; returns the figures (see the module docstring) and per-round rows."""
    rng = random.Random(sim.seed)
    # Cells come in a few distinct sizes, and every peer's bytes ask for them: compute each once.
    payload = functools.lru_cache(maxsize=None)(make_codec(sim.codec).payload_size)
    live = [f"p{i:05d}" for i in range(sim.peers)]
    born = sim.peers
    state = {p: "genesis" for p in live}
    pending = {p: 0.0 for p in live}  # work trained and not yet in the state (peer-epochs)
    trained = landed = lost_dead = lost_fork = 0.0
    rows = []
    for epoch in range(sim.rounds):
        for p in live:
            pending[p] += 1.0
        trained += len(live)
        row = _round(sim, rng, epoch, live, state, payload)
        for p in live:
            share = row["included"].get(p, 0.0)
            if p in row["dead"]:
                lost_dead += pending.pop(p)
            elif p in row["fork_losers"]:
                lost_fork += pending[p] * share
                pending[p] *= 1 - share
            else:
                landed += pending[p] * share
                pending[p] *= 1 - share
        survivors = [p for p in live if p not in row["dead"]]
        winner = row["state"]
        for p in survivors:
            state[p] = winner  # appliers of the winning plan hold it; the others download it
        newcomers = [f"p{born + i:05d}" for i in range(len(live) - len(survivors))]
        born += len(newcomers)
        for p in newcomers:
            state[p], pending[p] = winner, 0.0  # a newcomer downloads the state, then trains
        for p in row["dead"]:
            state.pop(p, None)
        live = survivors + newcomers
        rows.append({k: v for k, v in row.items() if k not in ("included", "dead", "fork_losers")})
    carried = sum(pending.values())
    bound = planning.butterfly_bound(sim.peers, sim.params, payload)
    sent = [r["bytes_per_peer"] for r in rows]
    return dict(
        sim=dataclasses.asdict(sim),
        work_kept=landed / trained,
        work_accounted=abs(landed + carried + lost_dead + lost_fork - trained) < 1e-6 * trained,
        lost_dead=lost_dead / trained, lost_fork=lost_fork / trained, carried_at_end=carried / trained,
        forks=sum(r["forks"] for r in rows),
        downloads=sum(r["downloads"] for r in rows),
        round_s=statistics.median(r["round_s"] for r in rows),
        bytes_per_peer=statistics.median(sent),
        bytes_max=max(r["bytes_max"] for r in rows),
        butterfly_bound=bound,
        bytes_ratio=statistics.median(sent) / bound,
        groups=rows[0]["groups"],
        decided=statistics.median(r["decided"] for r in rows),
        rows=rows,
    )


def _stage_of(death: float, ends: list[float]) -> tuple[int, float]:
    """Which stage a death at ``death`` falls in, and how far into it (0..1)."""
    start = 0.0
    for k, end in enumerate(ends):
        if death < end:
            return k, (death - start) / max(end - start, 1e-12)
        start = end
    return len(ends), 1.0


def _round(sim: ScaleSim, rng: random.Random, epoch: int, live: list[str], state: dict[str, str], payload) -> dict:
    digest = Counter(state[p] for p in live).most_common(1)[0][0]
    true_plan = planning.make_plan(epoch, digest, live, sim.group_size)
    sent = {p: planning.bytes_sent(true_plan, p, sim.params, payload) for p in live}
    bits_per_s = sim.bandwidth_mbit * 1e6 / 8
    durations = [sim.latency_s + max(s[k] for s in sent.values()) / bits_per_s for k in STAGES]
    ends, t = [], 0.0
    for d in durations:
        t += d
        ends.append(t)

    # Faults, drawn up front from the seed: who dies when, who is late in which stage, who misread the set.
    death = {p: _stage_of(rng.uniform(0, ends[-1]), ends) for p in live if rng.random() < sim.fail}
    late = {(p, k) for p in live for k in range(len(STAGES)) if sim.slow and rng.random() < sim.slow}

    def delivers(p: str, k: int) -> bool:
        """Whether one message of ``p`` in stage ``k`` arrives in time."""
        if (p, k) in late:
            return False
        if p not in death:
            return True
        stage, share = death[p]
        return k < stage or (k == stage and rng.random() < share)

    def alive_after(p: str, k: int) -> bool:
        return p not in death or death[p][0] > k

    # Peers that read the whole set share one view object (a copy per peer would cost O(N²)), and
    # peers are grouped by view in one pass, in order of first reader (the order the rng is used in).
    everyone = frozenset(live)
    views = {}
    for p in live:
        view = everyone
        if sim.view_miss and rng.random() < sim.view_miss and len(live) > 1:
            view = everyone - {rng.choice([q for q in live if q != p])}
        views[p] = view
    readers: dict[frozenset, list[str]] = {}
    for p in live:
        readers.setdefault(views[p], []).append(p)
    plans: dict[frozenset, planning.Plan] = {
        view: planning.make_plan(epoch, state[on[0]], view, sim.group_size) for view, on in readers.items()}

    shaky = set(death) | {p for p, _ in late}  # the only peers whose messages may not arrive
    outcomes: dict[str, planning.Outcome] = {}
    digests: dict[str, str] = {}
    # A stage runs to its deadline (wait_s) when a peer it awaits died or was late in it.
    waited = [any(d[0] == k for d in death.values()) or any(k == j for _, j in late) for k in range(len(STAGES))]
    if len(plans) > 1:
        waited = [True] * len(STAGES)  # members of another plan never send: their partners wait them out
    for view, plan in plans.items():
        on = set(readers[view])  # the peers running this plan
        decisions = _decisions(plan, on, delivers, alive_after, shaky)
        survivors = [p for p in on if alive_after(p, len(STAGES) - 1)]
        # The same decisions reach every live peer of the plan (repair: any holder serves a cell), so
        # the plan's judgement is computed once; each survivor adds only its own carried ranges.
        judged = planning.judge(plan, decisions, sim.params, sim.quorum)
        applied: dict[str, str] = {}  # the state a step from state[p] makes, per distinct state[p]
        for p in survivors:
            outcomes[p] = planning.assemble(plan, p, decisions, sim.params, sim.quorum, judged=judged)
            if outcomes[p].apply:
                if state[p] not in applied:
                    applied[state[p]] = _digest(state[p], plan.plan_id, _decisions_key(decisions))
                digests[p] = applied[state[p]]

    # The fork rule: the state held by the most peers wins; the others download it.
    counts = Counter(digests.values())
    winner = min(counts, key=lambda h: (-counts[h], h)) if counts else digest
    fork_losers = {p for p, h in digests.items() if h != winner}
    holders = [p for p in live if digests.get(p) == winner]
    holding = set(holders)
    included = {}
    for p, outcome in outcomes.items():
        included[p] = outcome.included.get(p, 0.0) if outcome.apply else 0.0
    round_s = sum(max(d, sim.wait_s) if w else d for d, w in zip(durations, waited))
    totals = [sum(s.values()) for s in sent.values()]
    return dict(
        epoch=epoch, peers=len(live), groups=len(true_plan.groups), plans=len(plans),
        state=winner if counts else state[live[0]], forks=max(0, len(counts) - 1),
        downloads=sum(1 for p in live if alive_after(p, len(STAGES) - 1) and p not in holding),
        died=len(death), decided=outcomes[holders[0]].decided if holders else 0.0,
        contributors=len(outcomes[holders[0]].contributors) if holders else 0,
        round_s=round_s, bytes_per_peer=statistics.mean(totals), bytes_max=max(totals),
        included=included, dead=set(death), fork_losers=fork_losers,
    )


def _decisions_key(decisions: dict) -> list:
    """The decisions as a sorted list, for a digest: what a step from one state applies. Each
    distinct member set is sorted once (a column's cells mostly share one)."""
    ordered: dict[frozenset, list[str]] = {}
    for d in decisions.values():
        if d.members not in ordered:
            ordered[d.members] = sorted(d.members)
    return sorted((c, ordered[d.members]) for c, d in decisions.items())


def _decisions(plan: planning.Plan, on: set[str], delivers, alive_after, shaky: set[str]) -> dict:
    """The decisions of one plan's round that some live peer of the plan holds at its end.

    Stage 0: members' columns to owners; 1: owners' partial cells to deciders; 2: decisions to the
    column's owners; 3: owners forward to their members. A decision reaching any live peer of the
    plan is served to the others on request (the repair step), so it counts for all of them.

    ``shaky``: the peers whose messages may not arrive (dying or late). The others' partials always
    reach a decider, so they are gathered once per column; only the shaky owners are asked per cell.
    """
    partial: dict[tuple[int, int], set[str]] = {}
    for g, members in enumerate(plan.groups):
        for c in range(plan.columns):
            owner = plan.owner(g, c)
            if owner in on and alive_after(owner, 0):  # else no partial: its members carry that column
                partial[(g, c)] = {m for m in members if m == owner or (m in on and delivers(m, 0))}
    steady: dict[int, dict[int, set[str]]] = {}  # column -> the partials that reach every decider
    unsure: dict[int, list[int]] = {}  # column -> the groups whose owner may fail to send, in order
    for c in range(plan.columns):
        steady[c], unsure[c] = {}, []
        for g in range(len(plan.groups)):
            if (g, c) in partial:
                if plan.owner(g, c) in shaky:
                    unsure[c].append(g)
                else:
                    steady[c][g] = partial[(g, c)]
    decisions = {}
    for cell in plan.cells():
        c, h = cell
        decider = plan.decider(cell)
        if decider not in on or not alive_after(decider, 1):
            continue
        arrived = dict(steady[c])
        for g in unsure[c]:  # in group order: the order the rng of a dying owner's deliveries is drawn in
            if g == h or delivers(plan.owner(g, c), 1):
                arrived[g] = partial[(g, c)]
        if alive_after(decider, 3) or _reached_a_survivor(plan, cell, on, delivers, alive_after):
            decisions[cell] = planning.decide(plan, cell, arrived)
    return decisions


def _reached_a_survivor(plan: planning.Plan, cell, on: set[str], delivers, alive_after) -> bool:
    """Whether a decider that died after deciding got its decision to a peer alive at the end:
    an owner it reached (stage 2), or a member that owner forwarded it to (stage 3)."""
    c, _ = cell
    decider = plan.decider(cell)
    for g, members in enumerate(plan.groups):
        owner = plan.owner(g, c)
        if owner == decider or owner not in on or not delivers(decider, 2) or not alive_after(owner, 2):
            continue
        if alive_after(owner, 3):
            return True
        if any(m != owner and m in on and alive_after(m, 3) and delivers(owner, 3) for m in members):
            return True
    return False
