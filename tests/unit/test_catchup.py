"""Catching up: a donor's state is checked whole before it is adopted; bad donors are banned."""

from __future__ import annotations

import threading

import torch

from p2pdiloco.catchup import CatchUp
from p2pdiloco.errors import StateDownloadFailed
from p2pdiloco.outer import OuterState


def outer_at(epoch: int, seed: int) -> OuterState:
    state = OuterState(torch.randn(16, generator=torch.Generator().manual_seed(seed)), optimizer="nesterov", lr=0.7,
                       momentum=0.9)
    for _ in range(epoch):
        state.step(torch.full((16,), 0.01))
    return state


class Donors:
    """Stands in for the averager's download: serves, per donor, what ``states`` says, in turn."""

    def __init__(self, states: dict):
        self.states, self.asked, self.priority = states, [], None

    def download_state(self, donors, timeout):
        for donor in donors:
            self.asked.append(donor)
            served = self.states.get(donor)
            if served is not None:
                return donor, *served
        raise StateDownloadFailed("nobody answered")

    def set_state_priority(self, epoch):
        self.priority = epoch


def catch_up(outer: OuterState, averager: Donors, banned: list) -> CatchUp:
    c = CatchUp(outer, fingerprint="fp", lock=threading.Lock(), ban=lambda donor, reason: banned.append((donor, reason)))
    c.averager = averager
    return c


def served(state: OuterState) -> tuple[dict, list[torch.Tensor]]:
    return dict(state.meta(), fingerprint="fp"), [t.clone() for t in state.tensors()]


def test_fetch_checks_then_adopt_replaces_the_state():
    donor = outer_at(3, seed=1)
    mine, banned = outer_at(0, seed=2), []
    averager = Donors({"d1": served(donor)})
    c = catch_up(mine, averager, banned)
    fetched = c.fetch(["d1"], 3, timeout=1.0)
    assert fetched is not None and fetched.donor == "d1" and mine.epoch == 0  # nothing adopted yet
    c.adopt(fetched)
    assert (mine.epoch, mine.state_hash, averager.priority) == (3, donor.state_hash, 3)
    assert torch.equal(mine.params, donor.params) and banned == []


def test_a_donor_serving_a_corrupt_state_is_banned_and_the_next_one_tried():
    good = outer_at(3, seed=1)
    meta, tensors = served(good)
    tensors[0][0] += 1.0  # no longer matches its digest
    mine, banned = outer_at(0, seed=2), []
    averager = Donors({"bad": (meta, tensors), "ok": served(good)})
    c = catch_up(mine, averager, banned)
    fetched = c.fetch(["bad", "ok"], 3, timeout=1.0)
    assert fetched is not None and fetched.donor == "ok"
    assert [d for d, _ in banned] == ["bad"] and "digest" in banned[0][1]
    assert mine.epoch == 0


def test_a_restarted_donor_serving_an_older_epoch_is_skipped():
    mine, banned = outer_at(0, seed=2), []
    averager = Donors({"old": served(outer_at(1, seed=1)), "new": served(outer_at(3, seed=1))})
    c = catch_up(mine, averager, banned)
    fetched = c.fetch(["old", "new"], 3, timeout=1.0)
    assert fetched is not None and fetched.donor == "new" and banned == []


def test_nothing_valid_leaves_our_state_alone():
    mine, banned = outer_at(2, seed=2), []
    before = mine.state_hash
    meta, tensors = served(outer_at(3, seed=1))
    meta["fingerprint"] = "another run"
    c = catch_up(mine, Donors({"x": (meta, tensors)}), banned)
    assert c.fetch(["x"], 3, timeout=1.0) is None
    assert mine.state_hash == before and [d for d, _ in banned] == ["x"]
    assert catch_up(mine, Donors({}), []).fetch(["y"], 3, timeout=1.0) is None  # nobody answers


def test_serve_sends_copies_with_the_run_fingerprint():
    mine = outer_at(2, seed=2)
    meta, tensors = catch_up(mine, Donors({}), []).serve()
    assert meta == dict(epoch=2, pending=0, state_hash=mine.state_hash, fingerprint="fp")
    tensors[0].zero_()
    assert mine.params.abs().sum() > 0
