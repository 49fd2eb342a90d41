"""The lab of the two-level round (p2pdiloco.scalesim) at the sizes the unit tier can afford: with
1 % of peers dying per round it keeps at least 95 % of the work, accounts for all of it, and
never forks while every peer reads the same ready set. bench/scale_lab.py runs it at 1,024."""

import pytest

from p2pdiloco import scalesim


@pytest.mark.parametrize("peers,rounds,seed", [(16, 8, 0), (16, 8, 1), (64, 4, 0), (64, 4, 2)])
def test_one_percent_failing_keeps_the_work_and_one_state(peers, rounds, seed):
    result = scalesim.run(scalesim.ScaleSim(peers=peers, rounds=rounds, fail=0.01, seed=seed))
    assert result["work_accounted"]
    assert result["work_kept"] >= 0.95
    assert result["forks"] == 0 and result["lost_fork"] == 0  # no view misses: one plan, one state
    assert result["groups"] == peers // 4
    assert result["bytes_ratio"] <= 1.5


def test_deaths_cost_the_dead_peers_work_only():
    result = scalesim.run(scalesim.ScaleSim(peers=64, rounds=4, fail=0.05, seed=3))
    assert sum(r["died"] for r in result["rows"]) > 0  # the case is one with deaths
    assert result["work_accounted"] and result["forks"] == 0
    assert result["work_kept"] + result["lost_dead"] + result["carried_at_end"] == pytest.approx(1)


def test_the_same_seed_gives_the_same_figures():
    sim = scalesim.ScaleSim(peers=32, rounds=3, fail=0.05, view_miss=0.05, slow=0.02, seed=5, params=10**6)
    assert scalesim.run(sim) == scalesim.run(sim)
