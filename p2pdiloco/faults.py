"""Fault injection at exact points of a round, for the swarm tests.

A fault that must land *during* matchmaking or *during* the all-reduce cannot be aimed from
outside the process: a round of the test recipe lasts a fraction of a second. The test suite
starts a peer with ``P2PDILOCO_FAULT=POINT:ACTION@N`` and the peer hurts itself the N-th time it
reaches POINT (counted per process), or every time from the N-th on with ``@N+`` (a peer that is
hostile for good):

- points: ``matchmaking`` (the host process has asked its averager to find a group; two-level:
  is about to ask for the plan's round), ``allreduce`` (the averager process has sent its first
  part to a group member; two-level: its columns to their owners),
  ``send`` (the host process is handing its pseudo-gradient to the averager),
  ``part`` (the averager process is encoding one of its parts for a reducer),
  ``inner`` (an inner training step is about to run), ``partials`` (two-level round: an owner has
  reduced its group's column and is about to send its cells to their deciders), ``result`` (the
  averager process holds every averaged part of its all-reduce), ``link`` (two-level round: the
  round starts);
- actions: ``kill`` (SIGKILL of the peer's whole process group: Python, DHT, averager, p2pd),
  ``stop`` (SIGSTOP of the group: a frozen laptop; the test resumes it with SIGCONT),
  ``nan`` (only at ``send``: the pseudo-gradient goes on the wire as NaN, bypassing the peer's own
  finiteness check, as a buggy or hostile peer would send it), ``scale`` and ``random`` (only at
  ``send``: the pseudo-gradient goes out multiplied by 1000, or replaced by Gaussian noise 100
  times its norm: the scaled and garbage contributions robust aggregation must bound), ``inf``
  (only at ``send``: one value is +inf), ``truncate`` (only at ``part``: the part goes out one
  value short, a well-formed message of the wrong shape),
  ``oom`` (only at ``inner``: the
  step fails as if the accelerator ran out of memory), ``drop`` (only at ``result``: this member's
  round fails although every part arrived, while the others' succeed: a one-sided round on purpose),
  ``cut`` (only at ``link``: for that round, nothing passes between this peer and one other member of
  its group, either way, while both reach everyone else: a link down between two peers only).

Unset (always, outside the tests) it costs one dictionary lookup per point.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

import torch

ENV = "P2PDILOCO_FAULT"
POINTS = ("matchmaking", "allreduce", "send", "part", "inner", "partials", "result", "link")
ACTIONS = ("kill", "stop", "nan", "inf", "scale", "random", "truncate", "oom", "drop", "cut")
CORRUPTIONS = ("nan", "inf", "scale", "random")  # the actions at "send": what goes out instead (see corrupt)
_ONLY_AT = {"nan": "send", "inf": "send", "scale": "send", "random": "send", "truncate": "part", "oom": "inner", "drop": "result", "cut": "link"}

log = logging.getLogger(__name__)
_reached: Counter = Counter()


def _parse(spec: str) -> tuple[str, str, int, bool]:
    try:
        where, count = spec.rsplit("@", 1)
        point, action = where.split(":")
        onwards = count.endswith("+")
        count = int(count.removesuffix("+"))
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: expected POINT:ACTION@N or @N+, e.g. allreduce:kill@3") from None
    if point not in POINTS or action not in ACTIONS or count < 1 or _ONLY_AT.get(action, point) != point:
        raise ValueError(
            f"{ENV}={spec!r}: points {POINTS}, actions {ACTIONS} ('nan', 'inf', 'scale', 'random' only at "
            "'send', 'truncate' only at 'part', 'oom' only at 'inner', 'drop' only at 'result', 'cut' only at 'link'), N >= 1"
        )
    return point, action, count, onwards


def reached(point: str) -> str | None:
    """Count a visit to ``point``; act (kill/stop) or return the action ("nan", "scale", ...) if the fault is due."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    target, action, count, onwards = _parse(spec)
    if target != point:
        return None
    _reached[point] += 1
    if _reached[point] < count or (_reached[point] > count and not onwards):
        return None
    log.warning("fault injection: %s at %s #%d", action, point, count)
    if action == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif action == "stop":
        os.killpg(os.getpgrp(), signal.SIGSTOP)
    return action


def corrupt(values: torch.Tensor, action: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """What a broken or hostile peer sends instead of ``values`` (a new tensor), for ``action`` in
    :data:`CORRUPTIONS`: all NaN (``nan``), the first value +inf (``inf``), 1000x the values
    (``scale``) or Gaussian noise 100x their RMS (``random``, drawn from ``generator``, the global
    RNG when None).

    The ``send`` faults of the real averager and the lab's hostile workers both call this, so the
    lab measures robust aggregation against exactly the attacks the swarm tests inject.
    """
    if action == "nan":
        return torch.full_like(values, float("nan"))
    if action == "inf":
        hurt = values.clone()
        hurt[0] = float("inf")
        return hurt
    if action == "scale":
        return values * 1000.0
    if action == "random":
        return torch.randn(values.shape, generator=generator) * (100 * values.norm() / values.numel() ** 0.5)
    raise ValueError(f"not a corruption: {action!r} (one of {', '.join(CORRUPTIONS)})")
