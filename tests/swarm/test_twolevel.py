"""The two-level round (docs/scaling.md) between real peers: separate processes, real DHTs and
averagers on loopback, groups from the plan and no matchmaking."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pdiloco import plan as planning
from p2pdiloco.codecs import make_codec

pytestmark = pytest.mark.swarm

WORKER = Path(__file__).with_name("twolevel_worker.py")


def run_workers(tmp_path: Path, count: int, group_size: int, compression: str, faults: dict[int, str] | None = None,
                silence_s: float = 20.0, clients: tuple[int, ...] = ()) -> list[dict | None]:
    """Start ``count`` workers (rank -> P2PDILOCO_FAULT in ``faults``; ``clients``: ranks in client
    mode), wait for all, load the records of those that finished (None for a worker that died:
    one whose fault is a kill)."""
    faults = faults or {}
    dying = {i for i, fault in faults.items() if ":kill" in fault}
    outs = [tmp_path / f"tl{i}.pt" for i in range(count)]
    env = dict(os.environ, TL_WORKERS=str(count), TL_ALIVE=str(count - len(dying)), TL_SILENCE_S=str(silence_s),
               TL_CLIENTS=",".join(map(str, clients)))
    env.pop("P2PDILOCO_FAULT", None)

    def start(i, *peers, **kw):
        extra = {"P2PDILOCO_FAULT": faults[i]} if i in faults else {}
        with open(tmp_path / f"tl{i}.log", "w") as log:
            return subprocess.Popen([sys.executable, str(WORKER), str(outs[i]), str(i), str(group_size), compression, *peers],
                                    env=dict(env, **extra), start_new_session=True, stderr=log, **kw)

    procs = [start(0, stdout=subprocess.PIPE, text=True)]
    try:
        addr = procs[0].stdout.readline().strip()
        assert addr.startswith("/ip4/"), "the first worker did not start"
        procs += [start(i, addr) for i in range(1, count)]
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:  # by process group: the worker's DHT, averager and p2pd go with it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for i, code in enumerate(codes):
        assert (code == -signal.SIGKILL) if i in dying else (code == 0), f"worker {i} exited with {code}"
    return [None if i in dying else torch.load(out) for i, out in enumerate(outs)]


def exact_mean(inputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(x * w for x, w in zip(inputs, weights)) / sum(weights)


@pytest.mark.parametrize("compression,tolerance", [("none", 1e-6), ("blockwise8", 0.05)])
def test_six_peers_in_three_groups_hold_one_state_with_everyones_work(tmp_path, compression, tolerance):
    results = run_workers(tmp_path, 6, 2, compression)
    assert not [r["error"] for r in results if "error" in r]
    plan = planning.Plan(1, "digest", "", results[0]["groups"])
    assert len(plan.groups) == 3 and plan.columns == 2
    exact = exact_mean([r["input"] for r in results], [r["weight"] for r in results])
    peers = sorted(r["peer"] for r in results)
    for r in results:
        assert torch.equal(r["average"], results[0]["average"]), "peers hold different averages"
        assert r["apply"] and r["decided"] == 1.0 and r["carried"] == [] and r["one_sided"] == 0
        assert r["contributors"] == peers, "every ready peer's work is in the state"
        assert ((r["average"] - exact).norm() / exact.norm()).item() < tolerance
    # Bytes: what plan.bytes_sent says for each peer, plus the headers (under 2 %).
    payload = make_codec(compression).payload_size
    size = results[0]["input"].numel()
    for r in results:
        expected = sum(planning.bytes_sent(plan, r["peer"], size, payload).values())
        assert expected <= r["sent"] < 1.02 * expected + 4096, (r["sent"], expected)
    bound = planning.butterfly_bound(6, size, payload)
    assert sum(r["sent"] for r in results) / 6 <= 1.02 * bound


def test_peers_nobody_can_dial_send_their_columns_and_fetch_the_decisions(tmp_path):
    """Two of six peers in client mode (behind a NAT: no inbound stream at all). They own no
    column, send theirs out and fetch every decided cell; one state with all six peers' work."""
    results = run_workers(tmp_path, 6, 2, "none", clients=(2, 4))
    assert not [r["error"] for r in results if "error" in r]
    plan = planning.Plan(1, "digest", "", results[0]["groups"], clients=frozenset(results[0]["clients"]))
    assert len(plan.clients) == 2 and all(plan.column_of(p) is None for p in plan.clients)
    exact = exact_mean([r["input"] for r in results], [r["weight"] for r in results])
    for r in results:
        assert torch.equal(r["average"], results[0]["average"]), "peers hold different averages"
        assert r["apply"] and r["decided"] == 1.0 and r["contributors"] == sorted(plan.peers)
        assert ((r["average"] - exact).norm() / exact.norm()).item() < 1e-6


def test_a_nan_sender_is_named_in_the_decisions_so_every_peer_refuses_it_alike(tmp_path):
    """Rank 3 sends NaN. Its partner refuses its column, the deciders its partial; the decisions
    carry its name, so every peer (those that never received a byte from it too) learns the same
    refusal and bans it alike: the next plans agree. One state, without rank 3's NaN."""
    results = run_workers(tmp_path, 6, 2, "none", faults={3: "send:nan@1"})
    assert not [r["error"] for r in results if "error" in r]
    bad = results[3]["peer"]
    plan = planning.Plan(1, "digest", "", results[0]["groups"])
    for r in results:
        assert torch.equal(r["average"], results[0]["average"]), "peers hold different averages"
        assert torch.isfinite(r["average"]).all()
        assert r["refused"] == [bad], "a peer did not learn the refusal from the decisions"
        assert bad not in r["contributors"] and r["apply"]
    # Its partner's share of its column went to it and drowned in its NaN partial: carried, not lost.
    group = plan.groups[plan.group_of(bad)]
    assert results[0]["contributors"] == sorted(p for p in plan.peers if p not in group)
    partner = next(r for r in results if r["peer"] in group and r["peer"] != bad)
    assert partner["carried"], "the partner's work in the NaN owner's column is carried to the next round"


def test_a_link_down_between_two_members_only_leaves_one_state(tmp_path):
    """Rank 2 cannot reach one member of its group, nor that member it, while both reach the third:
    the cell that member decided never comes to rank 2 from it (no forward, no answer to the
    repair). Without asking around, rank 2 would step with that cell zero while the others step
    with it: two states. It peeks at the third member, which holds the cell: one state."""
    results = run_workers(tmp_path, 3, 4, "none", faults={2: "link:cut@1"}, silence_s=4.0)
    assert not [r["error"] for r in results if "error" in r]
    for r in results:
        assert torch.equal(r["average"], results[0]["average"]), "peers hold different averages"
        assert r["decisions"] == results[0]["decisions"] and r["decided"] == 1.0 and r["apply"]
        assert r["one_sided"] == 0, "every cell reached every peer: nothing left unsure"
    # The part of rank 2's work that went to the member it cannot reach is carried, not lost.
    assert results[2]["carried"] and results[2]["peer"] not in results[0]["contributors"]


def test_an_owner_killed_before_its_partials_costs_its_cells_not_the_state(tmp_path):
    """Rank 3 dies after reducing its group's column, before sending a cell of it: its own cell is
    undecided (zero everywhere) and its group's column is missing from the others. The five
    survivors still end with one state, holding the work of the two intact groups in full."""
    results = run_workers(tmp_path, 6, 2, "none", faults={3: "partials:kill@1"}, silence_s=4.0)
    live = [r for r in results if r is not None]
    assert not [r["error"] for r in live if "error" in r]
    plan = planning.Plan(1, "digest", "", live[0]["groups"])
    dead = next(p for p in plan.peers if p not in {r["peer"] for r in live})
    dead_group = plan.groups[plan.group_of(dead)]
    for r in live:
        assert torch.equal(r["average"], live[0]["average"]), "survivors hold different averages"
        assert r["decisions"] == live[0]["decisions"], "survivors hold different decisions"
        assert r["apply"], "5 of 6 cells decided: above the quorum"
        assert 0.5 < r["decided"] < 1.0
        assert r["contributors"] == sorted(p for p in plan.peers if p not in dead_group)
        # The dead peer decided its own cell, if anyone: nobody alive can rule out that it sent it
        # somewhere before dying, so each survivor counts the round as possibly one-sided.
        assert r["one_sided"] == 1
    partner = next(r for r in live if r["peer"] in dead_group)
    assert partner["carried"], "the dead owner's partner carries the part of its work no decision holds"
    whole = [r for r in live if r["peer"] not in dead_group]
    assert all(r["carried"] == [] or all((a, b) in plan.cell_spans(r["input"].numel()).values() for a, b in r["carried"]) for r in whole)


def test_six_join_peers_in_three_groups_keep_one_state_and_their_work_through_a_sigkill(local_swarm):
    """Real ``p2pdiloco join`` peers with the two-level round, groups of 2: one peer is SIGKILLed
    (its whole process group) in the middle of its third round, after reducing its group's column
    and before sending it on. The five others go on: one state at every epoch, most work kept."""
    from p2pdiloco.simulate import summarize

    swarm = local_swarm(['run.averaging.protocol="two_level"', "run.target_group_size=2"])
    epochs = 8
    for _ in range(5):
        swarm.add_peer(epochs)
    victim = swarm.add_peer(epochs, fault="partials:kill@3")
    swarm.killed.add(victim)  # its death is the test, not a crash
    assert swarm.wait_exit([victim], 240) == [-signal.SIGKILL]
    survivors = [i for i in range(6) if i != victim]
    assert swarm.wait_exit(survivors, 240) == [0] * 5
    swarm.assert_consistent(range(6))  # the victim's records up to its death included
    metrics = {str(i): swarm.metrics(i) for i in range(6)}
    summary = summarize(metrics, 6, 0.0)
    groups = [r["group_size"] for i in survivors for r in swarm.metrics(i) if r["event"] == "outer_step"]
    assert max(groups) == 6, "one round of all six peers, three groups of two"
    assert summary["work_kept"] >= 0.8, summary["work_kept"]
