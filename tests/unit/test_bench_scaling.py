"""bench/scaling.py's metrics, on synthetic metrics records (no processes)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_scaling", Path(__file__).resolve().parents[2] / "bench" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


def step(peer, epoch, time, digest, contributors, tokens=100, event="outer_step"):
    return dict(peer=peer, epoch=epoch, time=time, event=event, state_hash=digest, contributors=contributors,
                group=contributors, group_size=len(contributors), tokens=tokens, train_loss=1.0, allreduce_s=0.5,
                bytes_sent=0)


def swarm() -> dict[str, list[dict]]:
    """Four peers. Epoch 1: one group of all four, but peer d reaches it late (t = 12), so epoch 1
    is the first all four reached and the window runs from t = 12. Epoch 2: two groups, {a, b, c}
    (kept: three holders) and {d} alone with another digest; d then downloads the kept state.
    Epoch 3: all four again, each with 200 tokens."""
    all4 = ["a", "b", "c", "d"]
    m = {p: [dict(peer=p, epoch=0, time=0.0, event="start", state_hash="s0")] for p in all4}
    for p in "abc":
        m[p].append(step(p, 1, 10.0, "x1", all4))
    m["d"].append(step("d", 1, 12.0, "x1", all4))
    for p in "abc":
        m[p].append(step(p, 2, 20.0, "k2", ["a", "b", "c"]))
    m["d"] += [step("d", 2, 21.0, "l2", ["d"]), dict(peer="d", epoch=2, time=23.0, event="downloaded", state_hash="k2")]
    for p in all4:
        m[p].append(step(p, 3, 32.0, "x3", all4, tokens=200))
    return m


def test_kept_and_trained_tokens_per_epoch():
    m = swarm()
    assert scaling.kept_tokens_by_epoch(m) == {1: 400, 2: 300, 3: 800}  # d's 100 tokens of epoch 2 are lost
    assert scaling.trained_tokens_by_epoch(m) == {1: 400, 2: 400, 3: 800}


def test_throughput_counts_the_steady_window_only():
    r = scaling.throughput(swarm(), 4)
    assert (r["e0"], r["t0"], r["t_end"], r["window_s"]) == (1, 12.0, 32.0, 20.0)
    assert (r["kept_tokens"], r["trained_tokens"]) == (1100, 1200)  # epochs 2 and 3
    assert r["kept_tokens_per_s"] == pytest.approx(55.0) and r["trained_tokens_per_s"] == pytest.approx(60.0)
    assert r["median_round_s"] == 0.5 and r["solo_steps"] == 0 and r["peers_reporting"] == 4


def test_a_contributor_left_out_of_the_average_is_not_kept():
    m = swarm()
    m["c"][-1] = step("c", 3, 32.0, "x3", ["a", "b", "d"], tokens=200)  # c holds the result, its work is not in it
    for p in "abd":
        m[p][-1]["contributors"] = ["a", "b", "d"]
    assert scaling.kept_tokens_by_epoch(m)[3] == 600


def test_single_peer_baseline_and_efficiency():
    solo = {"peer0": [dict(peer="p", epoch=0, time=0.0, event="start", state_hash="s0")]
            + [step("p", e, 5.0 * e, f"h{e}", ["p"], event="solo_step") for e in range(1, 5)]}
    r = scaling.throughput(solo, 1)
    assert (r["e0"], r["window_s"], r["kept_tokens"]) == (1, 15.0, 300)
    single = r["kept_tokens_per_s"]
    assert single == pytest.approx(20.0) and r["median_round_s"] is None and r["solo_steps"] == 4
    assert scaling.efficiency(55.0, 4, single) == pytest.approx(55.0 / 80.0)
    assert scaling.efficiency(None, 4, single) is None and scaling.efficiency(55.0, 4, None) is None


def test_no_steady_window_when_the_peers_never_met():
    m = swarm()
    del m["d"]
    r = scaling.throughput(m, 4)  # 4 peers expected, only 3 ever reported
    assert r["kept_tokens_per_s"] is None and r["window_s"] is None


def test_efficiency_against_the_peers_own_speeds():
    m = swarm()
    for records in m.values():
        for r in records:
            if r.get("event") == "outer_step":
                r.update(speed=2.0, inner_steps=r["tokens"] // 10)  # 10 tokens per step: 20 tokens/s each
    r = scaling.throughput(m, 4)
    assert r["own_tokens_per_s"] == pytest.approx(80.0)  # 4 peers x 20 tokens/s
    assert r["efficiency_own"] == pytest.approx(55.0 / 80.0)


def test_carried_work_at_the_window_edges():
    m = swarm()
    for records in m.values():
        for r in records:
            if r.get("event") == "outer_step":
                r.update(inner_steps=r["tokens"] // 10, overlap_steps=r["epoch"])  # 10 tokens per step, carry grows
    r = scaling.throughput(m, 4)
    assert r["carried_tokens_start"] == pytest.approx(4 * 1 * 10)  # epoch 1 (e0) records: 1 step each
    assert r["carried_tokens_end"] == pytest.approx(4 * 3 * 10)  # epoch 3 records: 3 steps each
