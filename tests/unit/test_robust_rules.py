"""The robust aggregation rules (p2pdiloco.robust), on honest parts plus hostile ones."""

import pytest
import torch

from p2pdiloco import robust


def _honest(n=3, size=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(size, generator=g)
    return [common + 0.3 * torch.randn(size, generator=g) for _ in range(n)]


def test_mean_is_the_plain_weighted_mean_and_flags_nobody():
    parts = _honest()
    result, flagged = robust.aggregate(parts, [1.0, 2.0, 3.0], "mean")
    expected = (parts[0] + 2 * parts[1] + 3 * parts[2]) / 6
    assert torch.allclose(result, expected, atol=1e-6) and flagged == []


@pytest.mark.parametrize("method", ["norm_bound", "trimmed_mean", "centered_clip"])
@pytest.mark.parametrize("attack", ["scale", "random", "negated"])
def test_one_hostile_of_four_is_bounded_and_flagged(method, attack):
    honest = _honest()
    g = torch.Generator().manual_seed(9)
    bad = {"scale": 1000 * honest[0], "random": 100 * torch.randn(4096, generator=g), "negated": -50 * honest[1]}[attack]
    result, flagged = robust.aggregate([*honest, bad], [1, 1, 1, 1], method)
    mean = sum(honest) / 3
    if method == "norm_bound":  # the stated bound: the hostile part counts at most 2 x the median norm
        median = torch.stack([p.norm() for p in [*honest, bad]]).median()
        assert (result - mean).norm() <= (2.0 * median + mean.norm()) / 4 + 1e-3
    else:  # these two stay much closer whatever the direction of the attack
        assert (result - mean).norm() < 0.3 * mean.norm(), "the robust result left the honest neighbourhood"
    assert flagged == [3], "exactly the hostile member is flagged"
    plain, _ = robust.aggregate([*honest, bad], [1, 1, 1, 1], "mean")
    assert (plain - mean).norm() > 10 * mean.norm()  # what the attack does to a plain mean


def test_norm_bound_meets_its_stated_bound():
    honest = _honest()
    bad = 1e6 * torch.ones(4096)
    result, _ = robust.aggregate([*honest, bad], [1, 1, 1, 1], "norm_bound", clip_ratio=2.0)
    mean = sum(honest) / 3
    median = torch.stack([p.norm() for p in [*honest, bad]]).median()
    # The hostile part is cut to 2 x the median norm: the result moves at most a quarter of that
    # (plus a quarter of the honest mean, which its share no longer carries).
    assert (result - mean).norm() <= (2.0 * median + mean.norm()) / 4 + 1e-3


def test_trimmed_mean_stays_within_the_honest_range_per_value():
    honest = _honest(n=4)
    bad = 1e4 * torch.randn(4096)
    result, _ = robust.aggregate([*honest, bad], [1] * 5, "trimmed_mean", trim=0.2)
    stacked = torch.stack(honest)
    assert bool(((result >= stacked.min(0).values) & (result <= stacked.max(0).values)).all())
    assert robust.trim_count(5, 0.2) == 1 and robust.trim_count(2, 0.25) == 0 and robust.trim_count(8, 0.25) == 2


def test_a_member_cannot_buy_influence_with_a_huge_weight():
    honest = _honest()
    bad = 3 * honest[0]  # within the norm bound, so only its weight could give it the average
    result, _ = robust.aggregate([*honest, bad], [1, 1, 1, 1e9], "norm_bound")
    mean = sum(honest) / 3
    assert (result - mean).norm() < 0.9 * mean.norm()
    capped = robust.cap_weights(torch.tensor([1.0, 1.0, 1.0, 1e9]), 2.0)
    assert capped.tolist() == [1.0, 1.0, 1.0, 2.0]


def test_honest_groups_pass_unchanged_enough_and_unflagged():
    honest = _honest(n=4)
    mean = sum(honest) / 4
    for method in ("norm_bound", "centered_clip"):
        result, flagged = robust.aggregate(honest, [1, 1, 1, 1], method)
        assert torch.allclose(result, mean, atol=1e-5), method  # nobody beyond the bounds: the plain mean
        assert flagged == []
    result, flagged = robust.aggregate(honest, [1, 1, 1, 1], "trimmed_mean")
    assert (result - mean).norm() < 0.1 * mean.norm() and flagged == []


def test_edge_cases():
    single = [torch.randn(8)]
    assert torch.equal(robust.aggregate(single, [5.0], "centered_clip")[0], single[0])
    zeros = [torch.zeros(8)] * 3
    for method in robust.METHODS:
        result, flagged = robust.aggregate(zeros, [1, 1, 1], method)
        assert torch.isfinite(result).all() and not flagged
    with pytest.raises(ValueError, match="unknown aggregation method"):
        robust.aggregate(single, [1.0], "median")


@pytest.mark.parametrize("method", ["norm_bound", "trimmed_mean", "centered_clip"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_an_honest_peer_with_fewer_steps_is_not_flagged_when_the_others_agree_closely(method, n):
    """Early in training every peer's pseudo-gradient points the same way, so the median distance
    to the result is tiny; a peer that ran half the inner steps (a slower machine, a newcomer) is
    then many median distances away while being perfectly honest. Found by the ban swarm test."""
    g = torch.Generator().manual_seed(3)
    common = torch.randn(4096, generator=g)
    parts = [common + 0.02 * torch.randn(4096, generator=g) for _ in range(n - 1)]
    parts.append(0.5 * common + 0.02 * torch.randn(4096, generator=g))
    _, flagged = robust.aggregate(parts, [1.0] * n, method)
    assert flagged == []
    _, flagged = robust.aggregate([*parts, 1000 * parts[0]], [1.0] * (n + 1), method)
    assert flagged == [n], "a scaled part is still flagged next to them"
