"""One round of a peer, run in the background while it trains on: wait (bounded) until the peers at
its state are ready, then all-reduce the pseudo-gradient with them.

A round ends in one of four ways, which the peer's loop acts on (:meth:`p2pdiloco.peer.Peer._finish_round`):

- a :class:`~p2pdiloco.averaging.RoundResult`: the group's average, identical on every member;
- ``"alone"``: no other live peer exists at all, so our own pseudo-gradient is the run's average;
- ``"behind"``: the swarm moved on (or our epoch's fork went another way): download its state;
- ``None``: no round this time (nobody ready, a failed all-reduce, an unreadable DHT): keep the
  work, which goes with what is added to it at the next attempt.

A peer that is merely behind or slow still belongs to the run: stepping without it would fork the
state, so "alone" needs every other record gone, confirmed (see :class:`~p2pdiloco.presence.Presence`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable

import torch

from p2pdiloco import pace
from p2pdiloco import plan as planning
from p2pdiloco.averaging.front import RoundResult
from p2pdiloco.config import RunConfig
from p2pdiloco.errors import AveragingFailed
from p2pdiloco.presence import Presence

log = logging.getLogger("p2pdiloco")


@dataclasses.dataclass
class PendingRound:
    """A round running in the background: its future, what was sent, and what it was measured to."""

    delta: torch.Tensor  # the pseudo-gradient sent (error feedback included)
    base: torch.Tensor  # the local parameters it was measured to: the rebase point when it lands
    sent: pace.Work  # the work it carries
    future: Future | None = None
    waiting_alone: bool = True  # no other peer at our state is ready yet: the main loop trains on
    stage: str = "waiting for peers"  # for the console view: "averaging" once the all-reduce starts
    # Two-level rounds: (start, stop) spans of ``delta`` that no decision included; the peer keeps
    # them for its next round instead of losing them (docs/scaling.md).
    carried: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def refresh(self, delta: torch.Tensor, base: torch.Tensor, sent: pace.Work) -> bool:
        """Send this instead, if the round is still waiting for a peer to be ready."""
        with self.lock:
            if self.waiting_alone:
                self.delta, self.base, self.sent = delta, base, sent
            return self.waiting_alone

    def close(self) -> tuple[torch.Tensor, int]:
        """No more refreshes: the pseudo-gradient and tokens this round sends."""
        with self.lock:
            self.waiting_alone = False
            return self.delta, self.sent.tokens


class Round:
    """Runs :class:`PendingRound` s for one peer (one at a time, on the peer's round thread).

    :param state: returns the peer's current (epoch, state digest)
    :param averager: the peer's :class:`~p2pdiloco.averaging.PseudoGradientAverager`
    :param run_over: whether the run reached its last epoch (``--max-epochs``)
    :param learn_bans: called after a failed all-reduce, to take the bans the averager made
    :param client: this peer cannot be dialed (client mode): it never owns a column of a two-level round
    """

    def __init__(self, *, run: RunConfig, peer_id: str, state: Callable[[], tuple[int, str]], averager,
                 presence: Presence, stop: threading.Event, run_over: Callable[[], bool],
                 learn_bans: Callable[[], None], client: bool = False):
        self.run, self.peer_id, self.state, self.averager = run, peer_id, state, averager
        self.client = client  # this peer cannot be dialed (client mode)
        self.presence, self.view, self.stop = presence, presence.view, stop
        self.run_over, self.learn_bans = run_over, learn_bans

    def __call__(self, pending: PendingRound):
        """One round: a RoundResult (with the average), "alone", "behind" or None (retry)."""
        others = self.wait_for_peers(pending)
        delta, tokens = pending.close()  # what we send is fixed from here on
        if others == "behind" or self.stop.is_set():
            return "behind"  # abandon: catch up, or leave without applying anything
        if others is None:
            return None  # the DHT could not be read: not knowing who is there is not being alone
        if not others:
            return "behind" if self.run_over() else "alone"
        epoch, digest = self.state()
        ready = self.view.ready(epoch, digest, others)
        if not ready:
            log.info("epoch %d: %d live peer(s), none ready to average yet; training on", epoch, len(others))
            return None
        pending.stage = "averaging"
        try:
            if self.run.averaging.protocol == "two_level":
                return self.two_level(pending, delta, tokens, epoch, digest, ready)
            return self.averager.average(delta, epoch=epoch, state_hash=digest, weight=tokens,
                                         gather={"peer": self.peer_id}, expected_size=len(ready) + 1)
        except AveragingFailed as e:
            log.warning("%s", e)
            self.learn_bans()
            if self.stop.is_set() or self.view.swarm_epoch(self.presence.live_others() or {}) > epoch:
                return "behind"
            return None

    def two_level(self, pending: PendingRound, delta: torch.Tensor, tokens: int, epoch: int, digest: str,
                  ready: list[str]):
        """One two-level round with every peer ready at our state (docs/scaling.md): the plan comes
        from the ready set as we read it, so peers that read the same set meet without matchmaking.

        Fewer ready peers than ``run.min_group_size``, or a round below the quorum (peers that read
        another set, or too many deaths), is no round: the work stays and goes at the next attempt.
        Otherwise the spans of our pseudo-gradient that no decision included go to
        :attr:`PendingRound.carried`, which the peer keeps for its next round.
        """
        if len(ready) + 1 < self.run.min_group_size:
            log.info("epoch %d: %d peer(s) ready, below run.min_group_size=%d; training on", epoch, len(ready) + 1,
                     self.run.min_group_size)
            return None
        live = self.view.live
        clients = [p for p in ready if p in live and live[p].client] + ([self.peer_id] if self.client else [])
        try:
            plan = planning.make_plan(epoch, digest, [self.peer_id, *ready], self.run.target_group_size, clients=clients)
        except ValueError as e:  # no ready peer can be dialed
            log.warning("epoch %d: no two-level round: %s", epoch, e)
            return None
        result = self.averager.average_plan(delta, plan, weight=tokens)
        outcome = result.outcome
        if not outcome.apply and result.doubtful:
            log.warning("epoch %d: this peer cannot be sure it holds the cells the others step with (a holder and some "
                        "peers it asked did not answer, or its round ran past its partners' cutoff); not applied, the "
                        "work goes at the next attempt", epoch)
            return None
        if not outcome.apply:
            log.warning("epoch %d: two-level round of %d peers decided %.0f %% of the values, below the quorum; "
                        "not applied, the work goes at the next attempt", epoch, len(plan.peers), 100 * outcome.decided)
            return None
        if outcome.carried:
            log.info("epoch %d: %.1f %% of this peer's pseudo-gradient missed the round's decisions; carried to the next",
                     epoch, 100 * sum(b - a for a, b in outcome.carried) / delta.numel())
        pending.carried = outcome.carried
        return RoundResult(average=result.average, group=sorted(plan.peers), gathered={}, seconds=result.seconds,
                           bytes_sent=result.bytes_sent, bytes_received=result.bytes_received, encode_s=result.encode_s,
                           decode_s=result.decode_s,
                           residual=result.residual, flagged=result.flagged, contributors=outcome.contributors,
                           refused=result.refused, included=dict(outcome.included))

    def wait_for_peers(self, pending: PendingRound):
        """Wait (bounded) for the live peers at or behind our epoch to be ready.

        Returns their records, "behind" if a peer is ahead of us (or our fork lost), or None if the
        DHT was unreadable.

        Entering matchmaking together lets all same-epoch peers land in one group. A peer behind
        us may be one that just finished the same round but has not published yet. The grace time
        (``grace_s``) runs from the moment a round can be held (another peer at our state is ready):
        stragglers get that long to join it. With overlap, while no other peer is ready there is
        no round to hold and nobody waits on us, so we keep waiting while the main loop trains on
        (and refreshes what we will send, see :meth:`p2pdiloco.peer.Peer._resend`), for up to
        ``round_s``; then the attempt ends and the next one announces us again. Without overlap
        the peer idles while it waits, so the grace time runs from the start.
        """
        averaging = self.run.averaging
        started = time.monotonic()
        grace_from = None if self.run.overlap else started
        self.presence.publish(ready=True)
        while True:
            others = self.presence.live_others()
            epoch, digest = self.state()
            if others is not None and self.view.behind(epoch, digest, others):
                return "behind"  # ahead of us, or the same epoch on another fork that wins: download it
            if grace_from is None and others and self.view.ready(epoch, digest, others):
                grace_from = time.monotonic()
            if grace_from is not None:
                pending.close()  # a round can be held: what we send is fixed
            now = time.monotonic()
            unconfirmed_alone = others == {} and not self.presence.confirmed_alone(now)
            waiting = others is None or unconfirmed_alone or self.view.waiting_on(epoch, others)
            over = now > grace_from + averaging.grace_s if grace_from is not None else now > started + averaging.round_s
            if not waiting or over or self.stop.is_set():
                return others
            self.stop.wait(0.2)  # poll the DHT: peers announce readiness there, not to us


def judge_flags(streaks: dict[str, int], group: list[str], flagged: list[str], limit: int) -> list[str]:
    """Count, per member of ``group``, the consecutive rounds a reducer's robust rule flagged it
    (``streaks``, updated in place); returns the members whose streak reached ``limit`` (0: never).

    One flag can be an honest outlier (a peer that brought many more steps than the others); a
    streak is a pattern.
    """
    for peer in group:
        streaks[peer] = streaks.get(peer, 0) + 1 if peer in flagged else 0
    return [peer for peer in group if limit and streaks[peer] >= limit]
