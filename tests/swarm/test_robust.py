"""Robust aggregation and hostile input between four real peers (separate processes, real DHTs
and averagers): one of them sends scaled, random, non-finite or wrong-shaped pseudo-gradients."""

import pytest
import torch

from tests.swarm.conftest import run_averaging_workers

pytestmark = pytest.mark.swarm

CLIP_RATIO = 2.0  # AggregationConfig's default, which the workers use


# (rule, attack): each rule against the attack it is weakest to among scaled and random garbage
CASES = [("norm_bound", "random"), ("trimmed_mean", "scale"), ("centered_clip", "scale")]


@pytest.mark.parametrize("method,attack", CASES)
def test_one_hostile_peer_of_four_moves_the_robust_average_only_within_its_bound(tmp_path, method, attack):
    results = run_averaging_workers(tmp_path, 4, env={"AVG_AGGREGATION": method, "AVG_CORRELATED": "1"}, hostile={3: f"send:{attack}@1"})
    assert not [r["error"] for r in results if "error" in r]
    honest, hostile = results[:3], results[3]
    honest_mean = sum(r["input"] for r in honest) / 3
    for r in results:  # the robust result is as consistent as the mean: byte-identical everywhere
        assert torch.equal(r["average"], results[0]["average"]), "members disagree on the robust average"
        assert len(r["group"]) == 4
    for r in honest:
        assert r["flagged"] == [hostile["peer"]], f"{method} should flag exactly the hostile peer"
    error = (results[0]["average"] - honest_mean).norm().item()
    # What the plain mean would have given: the hostile member's contribution went in unbounded.
    sent = hostile["input"] * 1000 if attack == "scale" else None
    if sent is not None:
        mean_error = ((sum(r["input"] for r in honest) + sent) / 4 - honest_mean).norm().item()
        assert mean_error > 100 * honest_mean.norm().item()
    # The stated bounds (docs/security.md). norm_bound: the hostile part is at most CLIP_RATIO x the
    # median part norm, so the result is within (CLIP_RATIO x honest norms + |honest mean|) / 4 of
    # the honest mean. trimmed_mean and centered_clip: within 0.3 x the honest mean's norm (the
    # plain mean: 25-250x off).
    if method != "norm_bound":
        assert error < 0.3 * honest_mean.norm().item(), (method, error / honest_mean.norm().item())
    else:
        honest_norms = torch.stack([r["input"].norm() for r in honest]).square().sum().sqrt().item()
        assert error <= (CLIP_RATIO * honest_norms + honest_mean.norm().item()) / 4
    if method == "trimmed_mean":  # with one trimmed at each end, every value lies within the honest range
        stacked = torch.stack([r["input"] for r in honest])
        assert bool(((results[0]["average"] >= stacked.min(0).values - 1e-6) & (results[0]["average"] <= stacked.max(0).values + 1e-6)).all())


@pytest.mark.parametrize("fault", ["send:inf@1", "part:truncate@1"])
def test_non_finite_or_wrong_shaped_parts_are_rejected_and_cost_the_sender_its_place(tmp_path, fault):
    # Honest peers may retry (a peer's loop does); the refused sender's retries would only find no group.
    results = run_averaging_workers(tmp_path, 4, env={"AVG_CORRELATED": "1", "AVG_ATTEMPTS": "3",
                                                                      "AVG_MATCHMAKING_S": "4"}, hostile={3: fault},
                                    env_of={3: {"AVG_ATTEMPTS": "1"}})
    honest, hostile = results[:3], results[3]
    assert not [r["error"] for r in honest if "error" in r], "an honest peer ended without an average"
    for r in honest:
        assert torch.isfinite(r["average"]).all()
        assert hostile["peer"] in r["banned"], "the sender must be refused in this peer's later groups"
        assert torch.equal(r["average"], honest[0]["average"]), "honest members disagree"
    exact = sum(r["input"] for r in honest) / 3  # the honest peers' mean, once the sender is out
    final = [r for r in honest if hostile["peer"] not in r["group"]]
    for r in final:
        assert ((r["average"] - exact).norm() / exact.norm()).item() < 1e-5


SECRET = "closed-run-test-secret-0123456789"


def test_an_outsider_without_the_secret_is_refused_before_any_tensor_and_the_members_average(tmp_path):
    # Three members wait for a fourth (AVG_WORKERS=4), so the outsider has a whole matchmaking
    # window to knock; it knows the formats, reads the members' declarations, forges a proof.
    results = run_averaging_workers(tmp_path, 4, env={"AVG_CORRELATED": "1", "AVG_SECRET": SECRET},
                                    env_of={3: {"AVG_OUTSIDER": "1"}})
    members, outsider = results[:3], results[3]
    assert not [r["error"] for r in members if "error" in r]
    member_ids = {r["peer"] for r in members}
    exact = sum(r["input"] for r in members) / 3
    for r in members:
        assert set(r["group"]) == member_ids, "the outsider got into a members' group"
        assert torch.equal(r["average"], members[0]["average"])
        assert ((r["average"] - exact).norm() / exact.norm()).item() < 1e-5
    assert "error" in outsider or not set(outsider["group"]) & member_ids
    logs = "".join((tmp_path / f"avg{i}.log").read_text() for i in range(3))
    refusals = [line for line in logs.splitlines() if outsider["peer"] in line and "membership proof" in line]
    assert refusals, "no member logged the outsider's refusal with its peer id"
    assert SECRET not in logs + (tmp_path / "avg3.log").read_text()
