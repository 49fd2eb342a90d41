"""Robust aggregation: how a reducer combines the group's parts when peers may be hostile.

In an open run anyone can join a group, and a plain weighted mean lets a single member move the
average anywhere: one peer sending ``1000 x`` its pseudo-gradient (or random values) drags every
honest peer's outer state with it. ``run.aggregation.method`` replaces the mean, in each reducer,
on the parts it averages (every member's slice of the flat pseudo-gradient), by one of:

``norm_bound``
    Each part longer than ``clip_ratio`` times the group's median part norm is scaled down to that
    length, then the weighted mean is taken. A hostile member's pull on the average is bounded by
    its weight share times ``clip_ratio x median norm``; the cheapest of the three.
``trimmed_mean``
    Coordinate-wise: per value, the ``b`` largest and ``b`` smallest of the members' values are
    dropped and the rest averaged (unweighted), ``b = floor(trim x n)``, at least 1 in groups of
    3 or more. With at most ``b`` hostile members, every value of the result lies between two
    honest members' values.
``centered_clip``
    CenteredClip (Karimireddy, He and Jaggi, 2021): starting from the coordinate-wise median ``v``,
    repeat ``v <- v + mean_i(clip(x_i - v, tau))`` for ``clip_iters`` iterations, where ``clip``
    scales a vector down to norm ``tau``. ``tau`` is ``clip_ratio`` times the median distance of
    the members to the starting point, so the rule needs no scale of its own. A hostile member's
    pull per iteration is at most its weight share times ``tau``.

Two guards apply to every robust method:

- weights (tokens) are capped at ``max_weight_ratio`` times the group's median weight, so a
  member cannot claim all the tokens to dominate the mean;
- members whose part lies further from the result than ``flag_ratio`` times the group's scale
  (the larger of the median distance to the result and the median part norm) are *flagged*,
  whatever the rule. Clipping starts earlier (``clip_ratio``):
  an honest member that is merely an outlier on one part (a rare token's embedding rows) loses a
  little of its pull without being accused, while scaled or random garbage is flagged on every
  part. Every reducer tells the group whom it flagged on at least half of its parts; a peer
  flagged in ``ban_after`` consecutive rounds is banned for the run (see ``Peer``).

Robust aggregation needs honest majorities in groups of 3 or more (f < n/2): in a group of two,
nobody can tell who is the hostile one. It does not make a hostile *reducer* harmless: the
member that reduces a slice controls what it sends back for that slice (BTARD-style verification
would be needed); each member checks the averages it receives are finite and of the right size.

The functions here are pure (no hivemind): the reducer in :mod:`p2pdiloco.averaging.runner` and the
lab (:mod:`p2pdiloco.lab`) call the same code, :func:`aggregate_with`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # annotations only: the rules stay importable without the config schema
    from p2pdiloco.config import AggregationConfig

METHODS = ("mean", "norm_bound", "trimmed_mean", "centered_clip")
_EPS = 1e-12


def cap_weights(weights: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Weights capped at ``max_ratio`` x their (lower) median."""
    cap = max_ratio * weights.median()
    return torch.minimum(weights, cap)


def _clip_factors(norms: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """Per member: the factor that scales a vector of norm ``norms`` down to at most ``bound``."""
    bound = torch.as_tensor(bound, dtype=norms.dtype)
    return torch.where(norms <= bound, torch.ones_like(norms), bound / norms.clamp_min(_EPS))


def norm_bound(parts: torch.Tensor, weights: torch.Tensor, clip_ratio: float) -> torch.Tensor:
    norms = parts.norm(dim=1)
    factors = _clip_factors(norms, clip_ratio * norms.median())
    return (parts * (weights * factors)[:, None]).sum(0) / weights.sum()


def trim_count(n: int, trim: float) -> int:
    """How many values a trimmed mean drops at each end in a group of ``n``."""
    if n < 3 or trim <= 0:
        return 0
    return min(max(1, math.floor(trim * n)), (n - 1) // 2)


def trimmed_mean(parts: torch.Tensor, trim: float) -> torch.Tensor:
    n = len(parts)
    b = trim_count(n, trim)
    return parts.sort(dim=0).values[b : n - b].mean(0)


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, clip_ratio: float, iters: int) -> torch.Tensor:
    v = parts.median(dim=0).values  # (lower) coordinate-wise median: a robust start
    tau = clip_ratio * (parts - v).norm(dim=1).median()
    total = weights.sum()
    for _ in range(iters):
        diffs = parts - v
        factors = _clip_factors(diffs.norm(dim=1), tau)
        v = v + (diffs * (weights * factors)[:, None]).sum(0) / total
    return v


def far_from(parts: torch.Tensor, center: torch.Tensor, ratio: float) -> list[int]:
    """Members further from ``center`` than ``ratio`` x the group's scale (the flag rule).

    The scale is the larger of the median distance to ``center`` and the median part norm. The
    distance alone fails exactly when the swarm is healthiest: early in training every honest
    pseudo-gradient points the same way, the median distance is a few percent of the norm, and a
    peer that merely ran half the inner steps lies ten median distances away. Garbage worth
    flagging (scaled, random, negated) is many *norms* away, so the floor costs no detection.
    """
    distances = (parts - center).norm(dim=1)
    limit = ratio * torch.maximum(distances.median(), parts.norm(dim=1).median())
    return [i for i in range(len(parts)) if distances[i] > limit and distances[i] > _EPS]


def aggregate(
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    *,
    clip_ratio: float = 2.0,
    trim: float = 0.25,
    clip_iters: int = 3,
    max_weight_ratio: float = 2.0,
    flag_ratio: float = 5.0,
) -> tuple[torch.Tensor, list[int]]:
    """Combine the members' ``parts`` (same-shape fp32 tensors) with ``weights``.

    Returns the aggregate (fp32, the parts' shape) and the indices of the members the rule flagged.
    ``mean`` is the plain weighted mean and flags nobody. All computation is in fp32 in a fixed
    order, so the reducer's result depends only on the parts it received.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r}: one of {', '.join(METHODS)}")
    if not parts:
        raise ValueError("nothing to aggregate")
    shape = parts[0].shape
    stacked = torch.stack([p.reshape(-1).float() for p in parts])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if len(parts) == 1:
        return stacked[0].reshape(shape).clone(), []
    if method == "mean":
        return ((stacked * w[:, None]).sum(0) / w.sum()).reshape(shape), []
    w = cap_weights(w, max_weight_ratio)
    if method == "norm_bound":
        result = norm_bound(stacked, w, clip_ratio)
    elif method == "trimmed_mean":
        result = trimmed_mean(stacked, trim)
    else:
        result = centered_clip(stacked, w, clip_ratio, clip_iters)
    return result.reshape(shape), far_from(stacked, result, flag_ratio)


def aggregate_with(
    parts: Sequence[torch.Tensor], weights: Sequence[float], cfg: AggregationConfig
) -> tuple[torch.Tensor, list[int]]:
    """:func:`aggregate` with a run's ``[run.aggregation]`` settings.

    The real reducers and the lab both call this, so a setting added to :class:`AggregationConfig`
    reaches both or neither.
    """
    return aggregate(parts, weights, cfg.method, clip_ratio=cfg.clip_ratio, trim=cfg.trim, clip_iters=cfg.clip_iters,
                     max_weight_ratio=cfg.max_weight_ratio, flag_ratio=cfg.flag_ratio)
