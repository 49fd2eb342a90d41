"""PURE: the two-level round of one epoch, for any number of ready peers (docs/scaling.md).

Every ready peer computes the same :class:`Plan` from the same inputs (epoch, state digest, the
ready set it read from the DHT), with no leader and no message: the ready peers are dealt, in an
order seeded by the epoch and the set, into ``G`` groups of about ``n``. The flat pseudo-gradient
is cut into ``K`` columns (``K`` = the smallest group's size) and each column into ``G`` cells:

1. inside each group, member ``c`` owns column ``c``: the members send it their column ``c``, and
   it reduces them to the group's *partial* for that column (the robust rule runs here);
2. across groups, the owners of column ``c`` (one per group) send cell ``h`` of their partial to
   the cell's *decider*, the owner of column ``c`` in group ``h``, which takes the weighted mean
   of the partials that arrived, encodes it **once** and sends those bytes to every owner of
   column ``c``;
3. inside each group, the owner forwards its column's cells, unchanged, to the members.

Each cell is decided once, by one peer, so the same bytes reach everyone: one state, whatever
``N``. A peer sends about ``2 (N-1)/N`` times the pseudo-gradient's payload, the butterfly
bound (:func:`bytes_sent`). A dead or late peer costs its cells, not the epoch: an undecided cell
is a zero update everywhere (:func:`assemble`), and each peer carries the parts of its work that
no decision included into the next epoch (:class:`Outcome.carried`), so that work is not lost.
Judging a round is two steps: :func:`judge`, the same for every peer holding the same decisions
(computed once), and :func:`carried`, each peer's own leftovers; :func:`assemble` composes them.

This module holds every decision of that protocol and no I/O: the lab drives it on a virtual
clock with seeded faults (:mod:`p2pdiloco.scalesim`), the peers over hivemind.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import random
import types
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence

Cell = tuple[int, int]  # (column, the group whose owner decides it)


def spans(n: int, parts: int, start: int = 0) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges covering ``[start, start + n)``, sizes within 1."""
    bounds = [start + n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Who reduces and decides what in one epoch's round. Build it with :func:`make_plan`."""

    epoch: int
    digest: str  # the state the round averages from
    plan_id: str  # names the ready set: peers that read another set have another plan and never mix
    groups: tuple[tuple[str, ...], ...]  # members of each group, in order: member c owns column c
    # Peers that others cannot dial (client mode, behind a NAT): never owners, always last in their
    # group; they send their columns and fetch the decisions, as a repair does.
    clients: frozenset[str] = frozenset()

    @functools.cached_property  # read for every cell and peer: an O(G) min each time adds up to O(N²)
    def columns(self) -> int:
        """``K``: one column per dialable member of the group with the fewest (a larger group's
        last members own none)."""
        return min(sum(1 for p in g if p not in self.clients) for g in self.groups)

    @property
    def peers(self) -> list[str]:
        return [p for g in self.groups for p in g]

    def _seats(self) -> dict[str, tuple[int, int]]:
        """peer -> (its group, its place in the group), built once: a lookup per peer must not scan
        the groups, or asking it for every peer costs O(N²)."""
        seats = self.__dict__.get("_seat")  # a frozen dataclass may still memoize (as cell_spans)
        if seats is None:
            seats = {p: (g, i) for g, members in enumerate(self.groups) for i, p in enumerate(members)}
            self.__dict__["_seat"] = seats
        return seats

    def group_of(self, peer: str) -> int:
        try:
            return self._seats()[peer][0]
        except KeyError:
            raise KeyError(f"{peer} is not in this plan") from None

    def owner(self, group: int, column: int) -> str:
        return self.groups[group][column]

    def decider(self, cell: Cell) -> str:
        column, h = cell
        return self.groups[h][column]

    def column_of(self, peer: str) -> int | None:
        """The column ``peer`` owns, or None (the extra member of a larger group)."""
        self.group_of(peer)  # the KeyError of a stranger
        c = self._seats()[peer][1]
        return c if c < self.columns else None

    def cells(self) -> list[Cell]:
        return [(c, h) for c in range(self.columns) for h in range(len(self.groups))]

    def column_span(self, column: int, size: int) -> tuple[int, int]:
        return spans(size, self.columns)[column]

    def cell_span(self, cell: Cell, size: int) -> tuple[int, int]:
        return self.cell_spans(size)[cell]

    def cell_spans(self, size: int) -> dict[Cell, tuple[int, int]]:
        """Every cell's (start, stop) in a vector of ``size`` values (computed once per size)."""
        cache = self.__dict__.setdefault("_spans", {})  # a frozen dataclass may still memoize
        if size not in cache:
            cache[size] = {(c, h): span for c, (start, stop) in enumerate(spans(size, self.columns))
                           for h, span in enumerate(spans(stop - start, len(self.groups), start))}
        return cache[size]


def ready_set_id(epoch: int, digest: str, ready: Iterable[str], clients: Iterable[str] = ()) -> str:
    """The name of a ready set (and of which of its peers cannot be dialed): equal on every peer
    that read the same set."""
    clients = sorted(set(clients))
    text = "|".join([str(epoch), digest, *sorted(set(ready)), *(["clients", *clients] if clients else [])])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_plan(epoch: int, digest: str, ready: Iterable[str], group_size: int, clients: Iterable[str] = ()) -> Plan:
    """The epoch's plan from the ready set (ids of the peers ready at ``epoch`` with state ``digest``,
    ourselves included). Groups: ``ceil(N / group_size)`` of sizes within one of each other, so
    the smallest group (which sets the columns) is as large as it can be. The order is a
    permutation seeded by the set, so that which peers meet changes every epoch (a hostile peer
    cannot choose its partners, and no pair of peers is stuck in one group).

    ``clients``: ready peers that cannot be dialed. The dialable peers are dealt first (at most one
    group per dialable peer), then the clients go, one by one, to the smallest group, behind its
    dialable members: so every owner and decider can be reached.
    """
    members = sorted(set(ready))
    clients = frozenset(clients) & set(members)
    if not members:
        raise ValueError("a plan needs at least one ready peer")
    if group_size < 1:
        raise ValueError("group_size must be at least 1")
    if clients == set(members):
        raise ValueError("a plan needs at least one ready peer that the others can dial")
    plan_id = ready_set_id(epoch, digest, members, clients)
    random.Random(plan_id).shuffle(members)
    dialable = [p for p in members if p not in clients]
    count = min(-(-len(members) // group_size), len(dialable))
    dealt = [list(dialable[a:b]) for a, b in spans(len(dialable), count)]
    for p in members:
        if p in clients:
            min(dealt, key=len).append(p)  # the first of the smallest groups
    return Plan(epoch=epoch, digest=digest, plan_id=plan_id, groups=tuple(tuple(g) for g in dealt), clients=clients)


@dataclasses.dataclass(frozen=True)
class Decision:
    """A decided cell, as its decider sends it: which peers' work it holds. (The values travel
    beside it, encoded once.)"""

    cell: Cell
    members: frozenset[str]  # peers whose pseudo-gradient is in the cell's value


def decide(plan: Plan, cell: Cell, partials: Mapping[int, Iterable[str]]) -> Decision:
    """The decision of ``cell`` from the partials that reached its decider in time: group index ->
    the members its owner included. A group with no member in its partial adds nothing."""
    return Decision(cell, frozenset(itertools.chain.from_iterable(partials.values())))


@dataclasses.dataclass
class Outcome:
    """What a peer does with a round: step or not, and which of its work it carries over.

    ``apply``: take the outer step with the assembled average (undecided cells are zero).
    ``decided``: the share of the vector's values whose cell was decided and reached us.
    ``contributors``: peers whose work is in every decided cell (in the state entire).
    ``included``: per peer, the share of its work (by values) in the state.
    ``carried``: our own (start, stop) ranges that no decision included: rebased into our next
    pseudo-gradient, so a failure costs that work a delay, not the work.
    """

    apply: bool
    decided: float
    contributors: list[str]
    included: dict[str, float]
    carried: list[tuple[int, int]]
    missing: list[Cell]


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The part of a round's outcome that is the same on every peer holding the same decisions:
    :func:`judge` computes it once, :func:`assemble` adds each peer's own ``carried`` to it.

    The fields are :class:`Outcome`'s of the same names; ``included`` is shared by whoever holds
    this judgement, so it is a read-only view (:func:`assemble` hands each peer its own copy).
    ``missing_spans``: the undecided cells' ranges (everyone carries them); ``held``: each distinct
    member set of the decisions with the ranges of the cells decided with exactly those members
    (a peer carries the ranges of the sets it is not in).
    """

    plan_id: str
    size: int
    quorum: float
    apply: bool
    decided: float
    contributors: tuple[str, ...]
    included: Mapping[str, float] = dataclasses.field(repr=False)
    missing: tuple[Cell, ...]
    missing_spans: tuple[tuple[int, int], ...] = dataclasses.field(repr=False)
    held: tuple[tuple[frozenset[str], tuple[tuple[int, int], ...]], ...] = dataclasses.field(repr=False)


def judge(plan: Plan, decisions: Mapping[Cell, Decision], size: int, quorum: float = 0.5) -> Judgement:
    """Judge a round from a set of decisions, for every peer of ``plan`` at once.

    The round applies when the decided cells hold more than ``quorum`` of the values. Below it,
    the peers holding these decisions are on the wrong side of a split (their plan's deciders
    were mostly elsewhere: another view of the ready set, a partition): stepping would make a
    second state, so they step not, carry all their work and catch up with the swarm's state
    (:mod:`p2pdiloco.catchup`). Two plans of disjoint deciders can both pass a quorum only if the
    ready set is split in two halves that cannot see each other; the fork rule settles that case.

    A peer's weight is the number of values whose decision holds its work. Decisions with equal
    ``members`` are gathered first and each distinct member set is walked once: in a round where
    few things fail, a column's cells mostly hold the same peers, so this is about
    O(cells + distinct sets × N) rather than O(cells × N) additions (plus hashing each set once).
    """
    cells = plan.cell_spans(size)
    decided = 0
    missing: list[Cell] = []
    missing_spans: list[tuple[int, int]] = []
    held: dict[frozenset[str], list[tuple[int, int]]] = {}  # a member set -> the ranges decided with it
    width_of: Counter[frozenset[str]] = Counter()  # a member set -> how many values those ranges hold
    for cell, (start, stop) in cells.items():
        decision = decisions.get(cell)
        if decision is None:
            missing.append(cell)
            missing_spans.append((start, stop))
            continue
        decided += stop - start
        width_of[decision.members] += stop - start
        held.setdefault(decision.members, []).append((start, stop))
    weights = {p: 0 for p in plan.peers}  # every peer of the plan, those with nothing included too
    for members, width in width_of.items():
        for p in members:
            if p in weights:  # a member from outside the plan has no share here
                weights[p] += width
    apply = decided > quorum * size
    # Integer weights, so "in every decided cell" is an exact equality.
    contributors = tuple(sorted(p for p, w in weights.items() if apply and decided and w == decided))
    included = types.MappingProxyType({p: (w / size if apply else 0.0) for p, w in weights.items()})
    return Judgement(plan_id=plan.plan_id, size=size, quorum=quorum, apply=apply, decided=decided / size,
                     contributors=contributors, included=included, missing=tuple(missing),
                     missing_spans=tuple(missing_spans),
                     held=tuple((members, tuple(ranges)) for members, ranges in held.items()))


def carried(judged: Judgement, me: str) -> list[tuple[int, int]]:
    """``me``'s own ranges that no decision included, merged: the per-peer part of a round's
    outcome. Everything when the round does not apply (the peer steps not).

    Each distinct member set of the decisions is asked once whether it holds ``me``, so a peer
    costs O(distinct sets + its carried ranges), at most O(cells).
    """
    if not judged.apply:
        return _merge([(0, judged.size)])
    left_out = list(judged.missing_spans)
    for members, ranges in judged.held:
        if me not in members:
            left_out.extend(ranges)
    return _merge(left_out)


def assemble(plan: Plan, me: str, decisions: Mapping[Cell, Decision], size: int, quorum: float = 0.5,
             judged: Judgement | None = None) -> Outcome:
    """Judge a round from the decisions that reached ``me``: :func:`judge` then :func:`carried`.

    Every peer holding the same decisions has the same judgement; a caller assembling for many
    peers (the lab) passes ``judged``, computed once, so each peer costs only its own part. It
    must be the judgement of this plan, size and quorum, and of the same decisions.
    """
    if judged is None:
        judged = judge(plan, decisions, size, quorum)
    elif (judged.plan_id, judged.size, judged.quorum) != (plan.plan_id, size, quorum):
        raise ValueError("the judgement is of another plan, size or quorum")
    return Outcome(apply=judged.apply, decided=judged.decided, contributors=list(judged.contributors),
                   included=dict(judged.included), carried=carried(judged, me),
                   missing=list(judged.missing))


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def bytes_sent(plan: Plan, peer: str, size: int, payload: Callable[[int], int]) -> dict[str, int]:
    """Bytes ``peer`` sends in each stage of a round without failures; ``payload(values)``: the
    codec's serialized size of that many values.

    stage 1: its columns to their owners (not its own); stage 2 (owners): its partial's cells to
    their deciders (not its own), then (deciders) each decided cell to the column's other owners;
    stage 3 (owners): the column's cells to the group's other members.

    O(K) per peer: a column's ``G`` cells hold ``q`` or ``q + 1`` values (:func:`spans`), so their
    payloads are summed by count rather than cell by cell (which made the lab's O(N·G) a round).
    """
    g = plan.group_of(peer)
    own = plan.column_of(peer)
    sent = {"members": 0, "partials": 0, "decisions": 0, "forward": 0}
    for c, (start, stop) in enumerate(spans(size, plan.columns)):
        if c != own:
            sent["members"] += payload(stop - start)
    if own is not None:
        count = len(plan.groups)
        start, stop = plan.column_span(own, size)
        q, r = divmod(stop - start, count)  # r cells of q + 1 values, the others of q
        column = r * payload(q + 1) + (count - r) * payload(q)  # every cell of the column, each encoded alone
        start, stop = plan.cell_span((own, g), size)
        mine = payload(stop - start)  # the cell this peer decides
        sent["partials"] += column - mine
        sent["decisions"] += (count - 1) * mine
        sent["forward"] += (len(plan.groups[g]) - 1) * column
    return sent


def butterfly_bound(n: int, size: int, payload: Callable[[int], int]) -> float:
    """What each of ``n`` peers sends in one all-reduce over all of them: 2 (n-1)/n of the payload."""
    return 2 * (n - 1) / n * payload(size)
