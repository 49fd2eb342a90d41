"""Two groups at one epoch (forced by a target group size of 2 with 4 peers) converge back.

The fork rule is what heals any fork (a partition's, or a two-level round's one-sided cell); the
``groups`` protocol forks at will, which makes it the way to exercise the rule here."""

import time

import pytest

pytestmark = pytest.mark.swarm


def test_two_groups_at_one_epoch_converge_within_an_epoch(local_swarm):
    swarm = local_swarm(["run.target_group_size=2", 'run.averaging.protocol="groups"'])
    for _ in range(4):
        swarm.add_peer(1000)
    # Whether both pairs complete a round at the same epoch is a race (the first epoch forks in most
    # runs); every epoch is another chance, so wait, bounded, until a fork has been healed.
    def fork_healed() -> bool:
        records = [r for i in range(4) for r in swarm.metrics(i)]
        return any(r.get("reason") == "fork" for r in records) and min(swarm.epoch(i) for i in range(4)) >= 8

    swarm.wait_until(fork_healed, 300, "a fork to form and heal, and 4 peers to reach epoch 8")
    # Peers stop one by one: the last ones may find themselves alone and step solo. Convergence is
    # judged on what they did before the stop, at fork epochs every peer had got past by then.
    reached, stopped_at = min(swarm.epoch(i) for i in range(4)), time.time()
    assert [p.stop(grace=30) for p in swarm.peers] == [0, 0, 0, 0]

    records = [r for i in range(4) for r in swarm.metrics(i)]
    steps = [r for r in records if r["event"] == "outer_step"]
    assert steps and max(r["group_size"] for r in steps) == 2, "groups larger than the target formed"
    by_epoch: dict[int, dict[str, str]] = {}
    for r in steps:
        by_epoch.setdefault(r["epoch"], {})[r["peer"]] = r["state_hash"]
    forks = sorted(e for e, h in by_epoch.items() if len(set(h.values())) > 1)
    assert forks, "no two groups ever formed at the same epoch: the test did not exercise a fork"
    healed = [r for r in records if r["event"] == "downloaded" and r.get("reason") == "fork"]
    assert healed, "forks were never healed by a download"
    # Converged within one epoch: of the states peers held at a fork epoch e, only one is trained
    # on (continued by an outer step to e + 1); every peer that held another one downloads next.
    judged = [e for e in forks if e < reached]
    assert judged, f"every fork (epochs {forks}) formed after epoch {reached}, while the peers stopped"
    for e in judged:
        continued, others = set(), []
        for i in range(4):
            seq = [r for r in swarm.metrics(i) if r["time"] < stopped_at]
            at_e = [k for k, r in enumerate(seq) if r["epoch"] == e]
            if not at_e or at_e[-1] + 1 >= len(seq):
                continue
            last, nxt = seq[at_e[-1]], seq[at_e[-1] + 1]
            if nxt["event"] == "outer_step" and nxt["epoch"] == e + 1:
                continued.add(last["state_hash"])
            else:
                others.append((i, nxt))
        assert len(continued) == 1, f"epoch {e}: {len(continued)} different states were trained on"
        for i, nxt in others:
            assert nxt["event"] == "downloaded", f"peer {i} neither continued the winning state nor downloaded: {nxt}"
    # No peer ever averaged from a state that differs from its group's: every group agrees.
    groups: dict[tuple, set] = {}
    for r in steps:
        groups.setdefault((r["epoch"], tuple(r["group"])), set()).add(r["state_hash"])
    assert all(len(h) == 1 for h in groups.values()), "members of one group ended with different states"
