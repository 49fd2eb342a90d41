import threading

import pytest
import torch

from p2pdiloco.outer import OuterState
from p2pdiloco.pace import Speedometer, Work, dylu_steps, rebase


@pytest.mark.parametrize(
    "speeds, expected",
    [
        ([4.0, 2.0, 1.0], [20, 10, 5]),  # the 1 : 0.5 : 0.25
        ([3.0, 3.0, 3.0], [20, 20, 20]),  # equal speeds: everyone runs H (lock-step DiLoCo)
        ([10.0, 7.0, 1.0], [20, 14, 2]),  # floor(H * v / v_max)
        ([100.0, 1.0], [20, 2]),  # never below min_inner_steps
    ],
)
def test_dylu_step_counts_follow_the_speeds(speeds, expected):
    for own, want in zip(speeds, expected):
        others = [v for v in speeds if v is not own]
        assert dylu_steps(20, own, others, min_steps=2) == want


def test_dylu_runs_full_epochs_until_speeds_are_known():
    assert dylu_steps(20, 0.0, [5.0], min_steps=1) == 20  # our own speed not measured yet
    assert dylu_steps(20, 2.0, [0.0, 0.0], min_steps=1) == 20  # others not measured: we are the fastest known


def test_dylu_gives_equal_wall_time_per_epoch():
    # The point of DyLU: with the step counts it gives, every peer's epoch lasts about as long.
    speeds = [1 / 0.58, 1 / 0.75, 1 / 1.51, 1 / 3.33]  # the async paper's notebook profile (s/step)
    times = [dylu_steps(50, v, speeds, 5) / v for v in speeds]
    assert max(times) / min(times) < 1.1


def test_rebase_preserves_local_progress_exactly():
    gen = torch.Generator().manual_seed(0)
    theta_e = torch.randn(10_000, generator=gen)
    sent_local = theta_e - 1e-2 * torch.randn(10_000, generator=gen)  # what the round's delta was measured to
    local_now = sent_local - 1e-3 * torch.randn(10_000, generator=gen)  # tau more inner steps while it ran
    state = OuterState(theta_e, optimizer="nesterov", lr=0.7, momentum=0.9)
    state.step(state.pseudo_gradient(sent_local))
    moved = rebase(local_now, sent_local, state.params)
    # The progress made since the send, bit for bit, on top of the new global parameters...
    progress = local_now - sent_local
    assert torch.equal(moved, state.params + progress)
    # ...so the next pseudo-gradient holds exactly those steps, up to the one rounding of the sum.
    ulp = torch.finfo(torch.float32).eps * state.params.abs().max()
    assert (moved - state.params - progress).abs().max() <= ulp
    assert torch.equal(rebase(sent_local, sent_local, state.params), state.params)  # no progress: the new global


def test_work_since_keeps_only_what_came_after_the_send():
    work = Work(started_epoch=3)
    for i in range(5):
        work.add(float(i), 100, 0.5)
    sent = work.snapshot()
    work.add(9.0, 100, 0.25)
    after = work.since(sent, epoch=4)
    assert (after.steps, after.tokens, after.compute_s, after.losses, after.started_epoch) == (1, 100, 0.25, [9.0], 4)
    assert sent.losses == [0.0, 1.0, 2.0, 3.0, 4.0]  # the snapshot is a copy


def test_speedometer_emulates_slowness_and_measures_it():
    meter = Speedometer(emulate_speed=0.25, window=3)
    fast = Speedometer(window=3)
    stop = threading.Event()

    def work():
        stop.wait(0.01)  # a 10 ms "step"
        return 1.0

    for _ in range(3):
        assert meter.timed(work)[0] == 1.0
        fast.timed(work)
    ratio = fast.steps_per_s / meter.steps_per_s
    assert 3.0 < ratio < 5.0  # 4x slower, within scheduling noise
    meter.window = 3
    assert len(meter.recent) == 3


def test_speedometer_median_ignores_one_hiccup():
    meter = Speedometer(window=5)
    meter.recent = [0.1, 0.1, 0.1, 0.1, 5.0]
    assert meter.steps_per_s == pytest.approx(10.0)
