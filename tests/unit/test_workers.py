"""A peer on several local devices (p2pdiloco/workers.py): the split of the global batch, and two
CPU workers (gloo) against one process on the same global batch."""

import os
import signal

import pytest
import torch

from p2pdiloco.config import load_recipe
from p2pdiloco.errors import LocalWorkerFailed
from p2pdiloco.local import LocalModel
from p2pdiloco.workers import LocalWorkers, slice_rows


def test_the_global_batch_is_split_into_contiguous_nearly_even_slices():
    for rows in (1, 7, 8, 13):
        for world in range(1, rows + 1):
            slices = [slice_rows(rows, world, r) for r in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
            sizes = [b - a for a, b in slices]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.fixture
def recipe(data_cache):
    return load_recipe("test", ["peer.threads=1", "peer.local_timeout_s=60", f'peer.cache_dir="{data_cache}"'])


def test_two_cpu_workers_take_the_same_steps_as_one_process_on_the_same_global_batch(recipe, data_cache):
    # 8 rows over 3 workers: uneven slices (3, 3, 2) must still give the global batch's mean gradient.
    one = LocalModel(recipe.run, recipe.peer, data_cache, "peer-x")
    several = LocalWorkers(recipe.run, recipe.peer, data_cache, "peer-x", [torch.device("cpu")] * 3)
    try:
        start = one.parameters()
        assert torch.equal(start, several.parameters()), "DDP starts every replica from rank 0's init"

        def same_step(step):
            before = one.parameters()
            assert several.step(step) == pytest.approx(one.step(step), rel=1e-5)
            # Float rounding differs (the gradient is summed in another order), and AdamW's first
            # steps amplify it where a gradient is near zero: compare the updates, relatively.
            update = one.parameters() - before
            assert (several.parameters() - one.parameters()).norm() < 1e-3 * update.norm()

        for step in range(3):
            same_step(step)
        moved = one.parameters() + 0.01
        several.load(moved)  # broadcast to every worker: the next step starts from it everywhere
        one.load(moved)
        assert torch.equal(several.parameters(), moved)
        same_step(3)
    finally:
        several.close()
    assert [p.exitcode for p in several.procs] == [0, 0], "the workers did not stop cleanly when told to"


def test_a_dead_worker_stops_the_peer_with_its_name(recipe, data_cache):
    several = LocalWorkers(recipe.run, recipe.peer, data_cache, "peer-x", [torch.device("cpu")] * 2)
    try:
        several.step(0)
        os.kill(several.procs[0].pid, signal.SIGKILL)
        several.procs[0].join()
        with pytest.raises(LocalWorkerFailed, match=r"local worker 1 \(on cpu\) died \(exit -9\)"):
            several.step(1)
    finally:
        several.close()
    assert not any(p.is_alive() for p in several.procs)
