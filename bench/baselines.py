"""Baseline: fully synchronous data parallelism with real ``torch.distributed`` DDP (gloo).

``k`` processes on loopback, one per simulated peer, each training the same model on its own data
shard (the shards the lab's workers read, :func:`p2pdiloco.lab.shard_keys`) with the very same
inner AdamW and schedule as a p2pdiloco peer (:class:`p2pdiloco.inner.InnerOptimizer`); DDP
averages the gradients of every step. Same recipe, seed and token budget as the lab's arms.

Bytes: gloo's ring all-reduce sends ``2 (k-1)/k x 4 x parameters`` per step and peer
(``bytes_per_peer_payload``); ``bytes_per_peer`` is what loopback actually carried during the arm
(``/proc/net/dev``), over ``k``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def loopback_tx_bytes(dev: str = "/proc/net/dev") -> int:
    """Bytes sent on the loopback interface since boot, by every process of this network namespace
    (or of the one whose ``/proc/PID/net/dev`` is ``dev``)."""
    for line in Path(dev).read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])  # receive: 8 fields, then transmit: bytes first
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, config: str, overrides: list[str], steps: int, cache: str,
              evals: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from p2pdiloco import data, inner, model
    from p2pdiloco.config import load_recipe
    from p2pdiloco.lab import shard_keys

    torch.set_num_threads(1)  # k processes share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        run = load_recipe(config, overrides).run
        net = model.build_model(run.model)
        ddp = DistributedDataParallel(net)
        opt = inner.InnerOptimizer(ddp, run.inner, torch.device("cpu"), False)
        stream = data.TokenStream(run.data, run.model.vocab_size, cache, shard_key=shard_keys(world, run.data.num_shards)[rank],
                                  seed=run.seed)
        val = stream.val_batches()
        tokens_per_step = world * run.data.batch_size * run.data.seq_len
        every = max(1, steps // max(1, evals))
        curve = []
        dist.barrier()
        started = time.perf_counter()
        for step in range(steps + 1):
            if rank == 0 and (step % every == 0 or step == steps):
                curve.append([step * tokens_per_step, time.perf_counter() - started, step, model.evaluate(net, val, torch.device("cpu"), False)])
            if step < steps:
                opt.step(stream.next_batch(), step)
        dist.barrier()
        if rank == 0:
            Path(out).write_text(json.dumps(dict(curve=curve, wall_s=time.perf_counter() - started, params=model.count_parameters(net),
                                                 fingerprint=run.fingerprint())))
    finally:
        dist.destroy_process_group()


def run_ddp(config: str, overrides: list[str], workers: int, steps: int, seed: int, cache: str, out_dir: str,
            evals: int = 12) -> dict:
    """Train with DDP over ``workers`` processes for ``steps`` steps each; returns the arm's figures
    (the lab's fields; ``clock`` is ``wall``)."""
    import torch.multiprocessing as mp

    overrides = [*overrides, f"run.seed={seed}", f"run.model.init_seed={seed}"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / f"ddp_seed{seed}.json"
    result_file.unlink(missing_ok=True)
    tx0, started = loopback_tx_bytes(), time.perf_counter()
    # spawn joins (reaps) every rank and raises if one of them failed
    mp.spawn(_ddp_rank, args=(workers, _free_port(), config, overrides, steps, str(cache), evals, str(result_file)),
             nprocs=workers, join=True)
    wall = time.perf_counter() - started
    measured = (loopback_tx_bytes() - tx0) / workers
    res = json.loads(result_file.read_text())
    per_step = 2 * (workers - 1) / workers * 4 * res["params"]
    curve = [[tokens, round(t, 3), per_step * step, loss] for tokens, t, step, loss in res["curve"]]
    return dict(
        arm="ddp", seed=seed, mode="ddp", clock="wall", workers=workers, val_curve=curve, val_loss_final=curve[-1][3],
        tokens=curve[-1][0], bytes_per_peer=measured, bytes_per_peer_payload=per_step * steps, rounds=steps,
        wall_s=wall, train_s=res["wall_s"], run_fingerprint=res["fingerprint"],
    )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="DDP baseline (gloo, loopback)")
    ap.add_argument("config")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/p2pdiloco"))
    ap.add_argument("--out", default="/tmp/ddp")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    a = ap.parse_args()
    print(json.dumps(run_ddp(a.config, a.overrides, a.workers, a.steps, a.seed, a.cache, a.out), indent=1))
