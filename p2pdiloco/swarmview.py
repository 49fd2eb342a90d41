"""What one peer knows of the rest of its run, and the decisions it takes from that alone.

A peer reads the run's progress records from the DHT (:func:`p2pdiloco.swarm.read_progress`) and
hands them to :meth:`SwarmView.update`. Everything else here is pure: no DHT, no clock of its own
(times come in as arguments), no I/O but log lines. That is what lets the unit tests drive every
decision (who is live, who is ready, are we behind, which state wins a fork, are we alone or cut
off) from hand-written records, and what lets a coordinator's backup use the very same rules
(:mod:`p2pdiloco.backup`) instead of a copy that drifts.

The decisions:

- **live**: other training peers with a current record (not leaving, not a backup, not banned);
- **ready**: live peers at our epoch and state digest that finished their inner phase;
- **behind**: a live peer is at a later epoch, or our epoch's fork rule picks another digest;
- **catch-up target**: which state to download, from whom, and why (``behind``, ``fork``, or
  ``backup`` when no peer is live but a coordinator's copy is ahead);
- **alone or cut off**: with no live record, a peer steps alone only if every peer it ever saw
  announced leaving, or its DHT neighbours still answer, or it has been cut off for
  ``alone_after_s``: stepping alone while cut off from a swarm that goes on would fork the run.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping

from p2pdiloco.swarm import Progress, winning_state

log = logging.getLogger("p2pdiloco")


@dataclasses.dataclass(frozen=True)
class Target:
    """A state to download: the ``epoch`` and ``digest`` (None: any digest of a backup) it must
    have, the ``donors`` holding it (sorted) and the ``reason`` (behind, fork or backup)."""

    epoch: int
    digest: str | None
    donors: list[str]
    reason: str


class SwarmView:
    """One peer's view of its run, built from the records it reads.

    :param me: this peer's id (its own record is never one of the others)
    :param banned: the peers this peer ignores; shared with the peer, which adds to it
    """

    def __init__(self, me: str, banned: set[str] | None = None):
        self.me = me
        self.banned = banned if banned is not None else set()
        self.live: dict[str, Progress] = {}  # other training peers with a current record
        self.backups: dict[str, Progress] = {}  # coordinators keeping a copy of the state
        self.seen: set[str] = set()  # every other peer seen live in this run...
        self.departed: set[str] = set()  # ...and those that announced leaving
        self.furthest_epoch = 0  # the highest epoch any training peer reached, leaving ones included
        self.cut_off_since: float | None = None
        self.back_since: float | None = None  # when DHT neighbours answered again after a cut

    # ------------------------------------------------------------ reading records
    def update(self, records: Mapping[str, Progress]) -> dict[str, Progress]:
        """Take a fresh read of the run's records (farewell records included); returns the live others.

        Farewell records expire within 3 heartbeats, so the furthest epoch and the departures are
        noted from every read, before they do.
        """
        records = {p: r for p, r in records.items() if p != self.me and p not in self.banned}
        self.furthest_epoch = max([self.furthest_epoch, *(r.epoch for r in records.values() if not r.backup)])
        self.live = {p: r for p, r in records.items() if not r.leaving and not r.backup}
        self.departed.update(p for p, r in records.items() if r.leaving)
        self.backups = {p: r for p, r in records.items() if r.backup and not r.leaving}
        self.seen.update(self.live)
        if self.live:
            self.cut_off_since = self.back_since = None
        return self.live

    # ------------------------------------------------------------ decisions
    # ``records``: the live others to judge from, by default the latest read. A round passes the
    # very read it acted on, since the heartbeat thread may replace ``live`` meanwhile.
    def swarm_epoch(self, records: Mapping[str, Progress] | None = None) -> int:
        """The highest epoch among live others (-1 with none)."""
        return max((r.epoch for r in self._or_live(records).values()), default=-1)

    def ready(self, epoch: int, digest: str, records: Mapping[str, Progress] | None = None) -> list[str]:
        """Live others at our state (``epoch``, ``digest``) that wait to average: our group-to-be."""
        records = self._or_live(records)
        return sorted(p for p, r in records.items() if r.ready and r.epoch == epoch and r.state_hash == digest)

    def waiting_on(self, epoch: int, records: Mapping[str, Progress] | None = None) -> list[str]:
        """Live others a round at ``epoch`` should still wait for: behind us, or not ready yet."""
        return sorted(p for p, r in self._or_live(records).items() if r.epoch < epoch or not r.ready)

    def winner(self, epoch: int, digest: str, records: Mapping[str, Progress] | None = None, *,
               settled: bool = True) -> str | None:
        """The fork rule (:func:`p2pdiloco.swarm.winning_state`) at our ``epoch``, our ``digest`` voting."""
        return winning_state(self._or_live(records), epoch, own=(epoch, digest), settled=settled)

    def behind(self, epoch: int, digest: str, records: Mapping[str, Progress] | None = None) -> bool:
        """Must a peer at (``epoch``, ``digest``) give up its round and download? Yes if a live
        peer is ahead, or if our epoch's fork is settled on another digest."""
        records = self._or_live(records)
        return any(r.epoch > epoch for r in records.values()) or self.winner(epoch, digest, records) not in (None, digest)

    def _or_live(self, records: Mapping[str, Progress] | None) -> Mapping[str, Progress]:
        return self.live if records is None else records

    def catch_up(self, epoch: int, digest: str, *, vote: bool = True) -> Target | None:
        """Which state a holder of (``epoch``, ``digest``) should download now, if any.

        - live peers ahead: the fork rule's winner at the swarm's epoch (once settled; until then
          the leading digest, judged again from there);
        - live peers at our epoch: the winner, if settled and not ours (a fork we lost);
        - nobody live: a backup ahead of us, if any.

        ``vote``: our own state counts in our epoch's fork rule (a peer); a backup, which never
        trained, passes False.
        """
        if not self.live:
            ahead = {p: r for p, r in self.backups.items() if r.epoch > epoch}
            if not ahead:
                return None
            top = max(r.epoch for r in ahead.values())
            return Target(top, None, sorted(p for p, r in ahead.items() if r.epoch == top), "backup")
        top = self.swarm_epoch()
        if top < epoch:
            return None
        own = (epoch, digest) if vote else None
        target = winning_state(self.live, top, own=own)
        if top == epoch and target in (None, digest):
            return None  # ours wins, or peers still behind could change the outcome: judge it later
        if target is None:  # ahead of us, not settled yet: the leading state, judged again there
            target = winning_state(self.live, top, own=own, settled=False)
        donors = sorted(p for p, r in self.live.items() if r.epoch == top and r.state_hash == target)
        return Target(top, target, donors, "behind" if top > epoch else "fork")

    def run_over(self, epoch: int, max_epochs: int | None) -> bool:
        """``--max-epochs N``: we, or any training peer of the run (those that left included),
        reached epoch N. A straggler then has nothing left to contribute to, and stepping alone
        from its older state would only fork the finished run."""
        return max_epochs is not None and max(epoch, self.furthest_epoch) >= max_epochs

    def may_be_alone(self, now: float, alone_after_s: float, neighbours: Callable[[], int], settle_s: float = 0.0) -> bool:
        """With no live record: is this peer alone, or cut off from a swarm that goes on?

        Alone when every peer seen so far announced leaving, or when DHT neighbours still answer
        (``neighbours()``: how many answer a ping now; it may raise, which counts as not knowing).
        Cut off (nobody answers) a peer must not step alone: it would publish a state of its own
        as the run's. It trains on and asks again; after ``alone_after_s`` of being cut off it
        assumes the swarm is gone and forgets who it saw.

        Back from a cut, neighbours answer a ping before the others' records can be read through
        them: an empty read in the first ``settle_s`` (the records' lifetime) proves nothing. In
        the partition test a peer whose link had just healed read nobody, stepped alone and forked.
        """
        if self.seen <= self.departed:
            return True
        try:
            answering = neighbours()
        except Exception:
            return False
        if answering:
            if self.cut_off_since is not None:
                self.cut_off_since, self.back_since = None, now
            return self.back_since is None or now >= self.back_since + settle_s
        if self.cut_off_since is None:
            self.cut_off_since = now
            log.warning("no DHT neighbour left (network cut?): not stepping alone for up to %.0f s", alone_after_s)
        if now - self.cut_off_since < alone_after_s:
            return False
        log.warning("cut off for %.0f s: assuming the swarm is gone and training alone", now - self.cut_off_since)
        self.seen.clear()
        return True
