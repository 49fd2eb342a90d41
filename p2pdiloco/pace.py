"""Pacing peers of different speeds: dynamic local updates, speed, emulated slowness, rebasing.

A swarm mixes an H100 and a laptop. In lock-step DiLoCo every peer runs ``H`` inner steps per
epoch, so the fast ones wait for the slowest. With dynamic local updates (DyLU, Liu et al. 2024,
Eq. 6) a peer runs ``floor(H * v_self / v_fastest)`` steps instead (never fewer than
``min_inner_steps``), where ``v`` is inner steps per second of compute, measured by each peer and
published in its record: everyone reaches the round at about the same time and nobody idles. The
round's average is weighted by tokens, so a slow peer's shorter phase counts for what it is.

With overlap, a peer keeps training while its round runs. When the round lands, the work done
meanwhile is *rebased* onto the new global parameters: ``local <- theta_new + (local - base)``
where ``base`` is the local model the round's pseudo-gradient was measured to. Nothing computed is
thrown away; that work is part of the next epoch's pseudo-gradient. The same rebasing carries a
late peer's work onto a newer state it downloaded (its contribution then arrives one or more
epochs stale, which is what ``delayed_nesterov`` is for).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
import time

import torch


def dylu_steps(inner_steps: int, own_speed: float, speeds: list[float], min_steps: int) -> int:
    """Inner steps for this epoch: ``inner_steps`` scaled by our speed over the fastest known.

    ``speeds`` are the other peers' published speeds (0 = not measured yet). Before this peer has
    measured its own speed it runs the full ``inner_steps``.
    """
    fastest = max([own_speed, *speeds])
    if own_speed <= 0 or fastest <= 0:
        return inner_steps
    return max(min_steps, min(inner_steps, math.floor(inner_steps * own_speed / fastest + 1e-9)))


@torch.no_grad()
def rebase(local: torch.Tensor, base: torch.Tensor, new_global: torch.Tensor) -> torch.Tensor:
    """``new_global + (local - base)``: the progress made since ``base``, moved onto ``new_global``."""
    return new_global + (local - base)


@dataclasses.dataclass
class Work:
    """Inner steps done since this peer's global state was loaded and not yet part of it."""

    steps: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    losses: list[float] = dataclasses.field(default_factory=list)
    started_epoch: int = 0  # the epoch of the state this work was computed from (for staleness)

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.compute_s += seconds
        self.losses.append(loss)

    def snapshot(self) -> "Work":
        return dataclasses.replace(self, losses=list(self.losses))

    def since(self, earlier: "Work", epoch: int) -> "Work":
        """The part of this work done after ``earlier`` (a snapshot of it), now based on ``epoch``."""
        return Work(self.steps - earlier.steps, self.tokens - earlier.tokens, self.compute_s - earlier.compute_s,
                    self.losses[len(earlier.losses):], epoch)


class Speedometer:
    """This peer's speed in inner steps per second of compute, and optional emulated slowness.

    ``emulate_speed`` < 1 is an EMULATION for tests and benchmarks on one machine: after each
    step the peer sleeps ``(1/emulate_speed - 1)`` times that step's compute time, so it runs at
    that fraction of this hardware's speed and measures (and publishes) the slower speed, as a
    slower device would. The sleep counts as compute time, not idle time.

    The speed is measured over the last ``window`` steps (the peer sets it to its epoch's step
    budget, at least 5), so a peer whose hardware slows down (throttling, a shared GPU) shows it
    within about one epoch.
    """

    def __init__(self, emulate_speed: float = 1.0, window: int = 20, stop: threading.Event | None = None):
        self.emulate_speed, self.window = emulate_speed, max(1, window)
        self.stop = stop or threading.Event()
        self.recent: list[float] = []

    def timed(self, step):
        """Run ``step()`` (one inner step), emulate slowness, record; returns ``(result, seconds)``."""
        started = time.perf_counter()
        result = step()
        spent = time.perf_counter() - started
        if self.emulate_speed < 1.0:
            self.stop.wait(spent * (1.0 / self.emulate_speed - 1.0))
            spent = time.perf_counter() - started
        self.recent = (self.recent + [spent])[-self.window:]
        return result, spent

    @property
    def steps_per_s(self) -> float:
        """1 / the median step time of the window: one step slowed by a hiccup (garbage collection,
        a neighbour's burst on a shared machine) does not change the swarm's step budgets."""
        if not self.recent:
            return 0.0
        median = statistics.median(self.recent)
        return 1.0 / median if median > 0 else 0.0
