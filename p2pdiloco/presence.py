"""A peer's presence in its run: its own progress record, kept alive by a heartbeat, and its reads
of the others' records into its :class:`~p2pdiloco.swarmview.SwarmView`.

The record's lifetime is 3 heartbeats, so it is refreshed from a thread of its own however long
the training loop spends in one place (a round, an evaluation, a state download): otherwise a
peer busy in a slow round looks dead, and a newcomer that sees nobody would step alone and fork
the run. Only a dead or frozen process stops refreshing it. Each beat also reads the others'
records, so DyLU budgets follow their speeds within a heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from p2pdiloco import swarm
from p2pdiloco.config import PeerConfig
from p2pdiloco.dht import reachable_neighbours
from p2pdiloco.swarmview import SwarmView

log = logging.getLogger("p2pdiloco")


class Presence:
    """Publish this peer's record and read the run's records.

    :param record: builds this peer's :class:`~p2pdiloco.swarm.Progress` record from its current
        state, given the ``ready`` and ``leaving`` flags
    """

    def __init__(self, dht, run_name: str, view: SwarmView, cfg: PeerConfig,
                 record: Callable[[bool, bool], swarm.Progress]):
        self.dht, self.run_name, self.view, self.cfg, self.record = dht, run_name, view, cfg, record
        self.ready = False  # published: this peer finished its inner phase and waits to average
        self.visible_since: float | None = None  # when this peer's first record was published
        self.lock = threading.Lock()  # records reach the DHT in the order they were made
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Publish now, then every ``heartbeat_s`` from a thread of its own (reading the others too)."""
        def beat():
            while not self.stopped.wait(self.cfg.heartbeat_s):
                try:
                    self.publish()
                    self.read()
                except Exception as e:  # the next beat tries again; a dead DHT shows up elsewhere
                    log.debug("heartbeat: %r", e)

        self.publish(ready=False)
        self.thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=self.cfg.dht_request_s)

    def publish(self, *, ready: bool | None = None, leaving: bool = False, wait: bool = False) -> None:
        """Store this peer's record (``ready``: None keeps the current flag). Fire and forget
        unless ``wait`` (leaving: bounded by ``dht_request_s``)."""
        # Called from the loop, the round's thread and the heartbeat: hivemind's DHT client sends
        # each request as one small message on its pipe (its averager process shares that pipe too).
        with self.lock:
            if ready is not None:
                self.ready = ready
            record = self.record(self.ready, leaving)
            timeout = self.cfg.dht_request_s if wait else None
            swarm.publish_progress(self.dht, self.run_name, record, ttl=3 * self.cfg.heartbeat_s, timeout=timeout)
            if self.visible_since is None:
                self.visible_since = time.monotonic()

    def confirmed_alone(self, now: float) -> bool:
        """Seeing nobody counts only once we have been visible for a heartbeat: a peer that started
        at the same moment is then visible to us, or sees us (two simultaneous starters must not
        both conclude they are alone and fork)."""
        return self.visible_since is not None and now >= self.visible_since + self.cfg.heartbeat_s

    def read(self) -> dict[str, swarm.Progress] | None:
        """Read the run's records into the view; the live others, or None if the DHT was unreadable."""
        records = swarm.read_progress(self.dht, self.run_name, timeout=self.cfg.dht_request_s, include_leaving=True)
        return None if records is None else self.view.update(records)

    def live_others(self) -> dict[str, swarm.Progress] | None:
        """The other live peers' records; None if the DHT could not be read, or if nobody is live
        and this peer may be cut off rather than alone (not knowing who is there is not being alone)."""
        others = self.read()
        if others is None:
            return None
        # back from a cut, a record can take its lifetime (3 heartbeats) to be readable again
        if others or self.view.may_be_alone(time.monotonic(), self.cfg.alone_after_s, self._neighbours,
                                            settle_s=3 * self.cfg.heartbeat_s):
            return others
        return None

    def wait_until_past(self, members: set[str], epoch: int, deadline: float) -> None:
        """Wait until ``members`` (of our last group, which reached ``epoch``) have its result,
        until ``deadline`` (monotonic) at the latest.

        A member may still be reading our reducer's reply when we finish: stopping p2pd then
        drops those bytes and fails that member's round (seen on loaded machines at the last
        epoch of a run, when every peer stops right after its round). Members show they are done
        by publishing the new epoch (or leaving); one whose record expired has died.
        """
        while members and time.monotonic() < deadline:
            others = self.live_others()
            if others is not None:
                members = {p for p in members if p in others and others[p].epoch < epoch and not others[p].leaving}
            if members:
                time.sleep(0.2)  # polling the DHT: members announce their progress there, not to us

    def _neighbours(self) -> int:
        return reachable_neighbours(self.dht, self.cfg.dht_request_s)
