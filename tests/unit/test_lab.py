"""The lab (p2pdiloco.lab): its all-reduce, its clock and its equivalences with the papers' rules."""

import math

import pytest
import torch

from p2pdiloco.codecs import make_codec
from p2pdiloco.config import AggregationConfig
from p2pdiloco.lab import LabArm, reduce, run_arm, shard_keys, slices
from p2pdiloco.data import shard_for

from tests.conftest import TEST_CONFIG


def test_reduce_without_compression_is_the_token_weighted_mean_and_counts_each_senders_bytes():
    torch.manual_seed(0)
    deltas = [torch.randn(1001) for _ in range(3)]
    avg, sent, flagged = reduce(deltas, [1.0, 2.0, 1.0], make_codec("none"))
    assert flagged == []  # the plain mean flags nobody
    torch.testing.assert_close(avg, (deltas[0] + 2 * deltas[1] + deltas[2]) / 4)
    sizes = [s.stop - s.start for s in slices(1001, 3)]
    # member i sends the others' slices (to their reducers) and its averaged slice to 2 members
    assert sent == [4 * (1001 - sizes[i]) + 2 * 4 * sizes[i] for i in range(3)]


def test_reduce_quantizes_both_legs_like_the_real_averaging():
    torch.manual_seed(1)
    deltas = [torch.randn(4096) * 1e-3 for _ in range(4)]
    exact, fp32_sent, _ = reduce(deltas, [1.0] * 4, make_codec("none"))
    for name, tol, smaller in (("blockwise8", 0.02, 1.9), ("4bit", 0.3, 6.0)):
        codec = make_codec(name)
        avg, sent, _ = reduce(deltas, [1.0] * 4, codec)
        # the reducer leg: every slice of the average is exactly what the codec decodes
        for part in slices(4096, 4):
            assert torch.equal(avg[part], codec.decode(codec.encode(avg[part]), part.stop - part.start))
        assert (avg - exact).abs().max() <= tol * exact.abs().max()
        assert max(sent) * smaller < min(fp32_sent)  # (blockwise8 carries a 1 KB table per part)


def test_a_robust_reduce_bounds_and_flags_a_scaled_member_part_by_part():
    torch.manual_seed(2)
    n = 4 * 131072 + 10  # every reducer's slice is two of hivemind's fp32 parts
    common = torch.randn(n)
    deltas = [common + 0.3 * torch.randn(n) for _ in range(3)]
    deltas.append(1000 * (common + 0.3 * torch.randn(n)))  # the send:scale fault
    codec = make_codec("none")
    plain, _, _ = reduce(deltas, [1.0] * 4, codec)
    assert torch.equal(reduce(deltas, [1.0] * 4, codec, AggregationConfig(method="mean"))[0], plain)
    bounded, sent, flagged = reduce(deltas, [1.0] * 4, codec, AggregationConfig(method="norm_bound"))
    assert flagged == [3] and sent == reduce(deltas, [1.0] * 4, codec)[1]
    honest = sum(deltas[:3]) / 3
    assert (plain - honest).norm() > 100 * honest.norm()
    assert (bounded - honest).norm() < 0.75 * honest.norm()


def test_shard_keys_pick_distinct_shards():
    keys = shard_keys(4, 4)
    assert len({shard_for(k, 4) for k in keys}) == 4


def _arm(**kw):
    return LabArm(**{"name": "t", "workers": 2, "steps": 16, "evals": 2, **kw})


def test_delayed_nesterov_in_async_rounds_with_equal_speeds_is_sync_diloco_bit_for_bit(data_cache):
    """The async paper's footnote 5: DN with N = k and homogeneous workers is synchronous DiLoCo.
    In the lab every worker lands at the same virtual time, the grace period groups them, and the
    outer step takes all k contributions: the curves must be equal, not just close."""
    sync = run_arm(_arm(mode="sync", overrides=("run.inner_steps=4",), speeds="homogeneous"), TEST_CONFIG, 0, cache=data_cache)
    dn = run_arm(_arm(mode="async", overrides=("run.inner_steps=4", "run.outer_optimizer=delayed_nesterov"),
                      speeds="homogeneous", grace_s=0.5), TEST_CONFIG, 0, cache=data_cache)
    assert sync["val_curve"] == dn["val_curve"]
    assert sync["rounds"] == dn["rounds"] == 4 and dn["mean_group_size"] == 2 and dn["mean_staleness"] == 0


def test_naive_async_applies_every_arrival_alone_with_staleness(data_cache):
    r = run_arm(_arm(mode="async", overrides=("run.inner_steps=4",), speeds=(1.0, 2.0)), TEST_CONFIG, 0, cache=data_cache)
    assert r["mean_group_size"] == 1 and r["mean_staleness"] > 0
    assert r["tokens"] == 2 * 16 * 8 * 32  # the budget: workers x steps x batch x seq_len, whatever the speeds
    assert all(math.isfinite(p[3]) for p in r["val_curve"])


def test_the_virtual_clock_of_lock_step_rounds_follows_the_slowest_worker(data_cache):
    arm = _arm(mode="sync", overrides=("run.inner_steps=4",), speeds=(1.0, 3.0), latency_s=0.5, bandwidth_mbit=1e9)
    r = run_arm(arm, TEST_CONFIG, 0, cache=data_cache)
    assert r["virtual_s"] == pytest.approx(4 * (4 * 3.0 + 0.5), rel=1e-6)
    single = run_arm(_arm(mode="single", overrides=("run.inner_steps=4",)), TEST_CONFIG, 0, cache=data_cache)
    assert single["tokens"] == r["tokens"] // 2 and single["bytes_per_peer"] == 0 and single["rounds"] == 0


def test_dylu_gives_slow_workers_fewer_steps_and_the_same_budget(data_cache):
    arm = _arm(mode="async", overrides=("run.inner_steps=4", "run.outer_optimizer=delayed_nesterov"), speeds=(1.0, 2.0),
               dylu=True, grace_s=1.0, steps=18)
    r = run_arm(arm, TEST_CONFIG, 0, cache=data_cache)
    assert r["tokens"] == 2 * 18 * 8 * 32 and r["rounds"] == 6  # 36 worker steps in rounds of 4 + 2
    assert r["mean_group_size"] == 2  # 4 steps x 1 s and 2 steps x 2 s land together


def test_one_hostile_worker_of_four_ruins_the_mean_but_not_norm_bound(data_cache):
    """The last worker trains, then sends 1000x its pseudo-gradient every round (send:scale)."""
    def arm(method):
        spec = _arm(workers=4, hostile=1, overrides=("run.inner_steps=4", f"run.aggregation.method={method}"))
        return run_arm(spec, TEST_CONFIG, 0, cache=data_cache)

    mean, bounded = arm("mean"), arm("norm_bound")
    assert math.isfinite(bounded["val_loss_final"]) and not bounded["diverged"]
    assert bounded["val_loss_final"] < bounded["val_curve"][0][3]  # it learned
    assert mean["diverged"] or not math.isfinite(mean["val_loss_final"]) or mean["val_loss_final"] > bounded["val_loss_final"] + 1
    assert bounded["flag_rate_hostile"] == 1.0 and bounded["flag_rate_honest"] == 0.0
    assert mean["flag_rate_hostile"] == 0.0  # the plain mean flags nobody
