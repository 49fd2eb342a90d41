"""Moving a whole outer state between peers: serving ours, fetching a donor's, checking it once,
adopting it.

A peer that is behind (or on a losing fork) and a coordinator's backup both catch up the same way,
so they share this object: :meth:`CatchUp.fetch` tries donors until one serves a state that
passes every check of :func:`p2pdiloco.outer.validate_state` (header, shapes, finite values,
digest), :meth:`CatchUp.adopt` swaps it in under the state lock, and :meth:`CatchUp.serve` is
what the averager hands to newcomers, under the same lock, so a download never sees half an
outer step. Which state to fetch, and from whom, is decided elsewhere
(:meth:`p2pdiloco.swarmview.SwarmView.catch_up`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, Sequence

import torch

from p2pdiloco.errors import StateDownloadFailed
from p2pdiloco.outer import OuterState, StateHeader

log = logging.getLogger("p2pdiloco")


@dataclasses.dataclass
class Fetched:
    """A donor's state that passed every check, ready to :meth:`CatchUp.adopt`."""

    donor: str
    header: StateHeader
    tensors: Sequence[torch.Tensor]


class CatchUp:
    """Serve, fetch, validate and adopt the outer state ``outer`` of a run (``fingerprint``).

    :param lock: taken around reading the state (serve) and replacing it (adopt); the peer's outer
        step takes it too
    :param ban: called with (donor, reason) for a donor that served an invalid state: not a network
        hiccup but a broken or hostile peer, ignored from then on
    """

    def __init__(self, outer: OuterState, *, fingerprint: str, lock: threading.Lock,
                 ban: Callable[[str, str], None] = lambda donor, reason: None):
        self.outer, self.fingerprint, self.lock, self.ban = outer, fingerprint, lock, ban
        self.averager = None  # set by the owner once its averager exists (it serves through serve())

    def serve(self) -> tuple[dict, list[torch.Tensor]]:
        """(header, copies of the tensors) of our state, as a donor sends it."""
        with self.lock:
            return dict(self.outer.meta(), fingerprint=self.fingerprint), [t.clone() for t in self.outer.tensors()]

    def fetch(self, donors: list[str], min_epoch: int, *, timeout: float) -> Fetched | None:
        """A state of epoch ``min_epoch`` or later from one of ``donors``, checked whole, or None.

        The averager asks the donors in turn (those that declare they serve first) within
        ``timeout``; a donor that now serves an older epoch (it restarted) is skipped, one that
        serves an invalid state is banned (``ban``), and the others are asked next. Retrying later,
        with the donors picked again from fresh records, is the caller's choice.
        """
        while donors:
            try:
                donor, meta, tensors = self.averager.download_state(donors, timeout=timeout)
            except StateDownloadFailed as e:
                log.warning("state download failed: %s", e)
                return None
            donors = [d for d in donors if d != donor]
            if isinstance(meta, dict) and isinstance(meta.get("epoch"), int) and meta["epoch"] < min_epoch:
                log.info("%s now serves epoch %d (restarted?); trying another donor", donor[-6:], meta["epoch"])
                continue
            try:
                # Every check, digest included, before anything is adopted: whole and verified or not at all.
                header = self.outer.validate(meta, tensors, fingerprint=self.fingerprint)
            except StateDownloadFailed as e:
                self.ban(donor, f"served an invalid state ({e})")
                continue
            return Fetched(donor, header, tensors)
        return None

    def adopt(self, fetched: Fetched) -> None:
        """Make ``fetched`` our state, and tell newcomers we now serve its epoch."""
        with self.lock:
            self.outer.adopt(fetched.header, fetched.tensors)
        self.averager.set_state_priority(self.outer.epoch)
