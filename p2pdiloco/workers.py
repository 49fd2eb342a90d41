"""A peer on several local devices: one process per device, data parallel inside the peer.

A volunteer brings a machine, not a GPU. With ``peer.devices`` naming several devices, the peer's
own process is rank 0 of a local process group: it trains on the first device and is the only
process that speaks to the swarm (DHT, rounds, state serving). Ranks 1..W-1 are worker processes
started here, one per other device. For the swarm nothing changes: one peer, one pseudo-gradient,
one record.

Each inner step, rank 0 tells the workers what to do (a small command tensor broadcast on a gloo
group), then every rank trains on its slice of the same global batch: every rank reads the peer's
shard through an identical :class:`~p2pdiloco.data.TokenStream` and keeps its rows of each batch,
so the global batch is the recipe's whatever the number of devices, and the run's config and
fingerprint do not depend on a volunteer's hardware. DistributedDataParallel (NCCL on GPUs, gloo on
CPU) averages the gradients, weighted so that uneven slices give the exact mean over the global
batch, and keeps the replicas identical: the pseudo-gradient is taken once, from rank 0. After an
outer step (or a download) rank 0 broadcasts the new parameters to the workers.

The outer state and the error-feedback residual stay in rank 0's host memory, as with one device:
they are touched once per round, and the averager reads them from host memory anyway.

A worker ignores SIGINT and SIGTERM (Ctrl+C in a terminal reaches the whole process group, and
the peer's graceful stop may still need the workers): it stops when rank 0 says so, when rank 0's
connection closes, or by SIGKILL from rank 0's exit handler, which runs however rank 0 exits. If a
worker dies, rank 0's next collective fails and the peer stops with
:class:`~p2pdiloco.errors.LocalWorkerFailed`, naming it; its checkpoint, written atomically by
rank 0 alone, stays valid.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from p2pdiloco.config import PeerConfig, RunConfig
from p2pdiloco.errors import LocalWorkerFailed
from p2pdiloco.local import LocalModel

log = logging.getLogger(__name__)

STEP, LOAD, STATE, STOP = range(4)  # the commands rank 0 sends


def slice_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a ``rows``-row global batch that ``rank`` of ``world`` trains on:
    as even as possible, the first ``rows % world`` ranks one row more."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _Replica(LocalModel):
    """One rank's model: a :class:`LocalModel` on its device whose steps train on its rows of each
    global batch, with gradients averaged by DDP across the peer's ranks."""

    def __init__(self, run: RunConfig, peer: PeerConfig, cache: Path, shard_key: str, device: torch.device,
                 rank: int, world: int):
        super().__init__(run, peer, cache, shard_key, device=device)
        from torch.nn.parallel import DistributedDataParallel

        self.rank, self.world = rank, world
        self.rows = slice_rows(run.data.batch_size, world, rank)
        # DDP broadcasts rank 0's parameters at construction: every replica starts identical.
        ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.inner.model = ddp  # forward and backward through DDP; the optimizer holds the same tensors
        # DDP averages over ranks; a rank's loss is scaled by its share of the batch against an
        # even share, so that uneven slices still give the global batch's exact mean gradient.
        self.inner.loss_scale = (self.rows[1] - self.rows[0]) * world / run.data.batch_size

    def step(self, global_step: int) -> float:
        """Our rows' step (every rank at once); the global batch's mean loss."""
        start, stop = self.rows
        loss = self._step(lambda: self.stream.next_batch()[start:stop], global_step)
        # The ranks' scaled means average to the global batch's mean.
        total = torch.tensor([loss * self.inner.loss_scale], device=_wire(self.device))
        dist.all_reduce(total)
        return total.item() / self.world


def _worker(rank: int, world: int, port: int, run: RunConfig, peer: PeerConfig, cache: str, shard_key: str,
            device: str, timeout_s: float) -> None:
    """A worker process: wait for rank 0's commands and follow them until STOP or rank 0 is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop (Ctrl+C reaches us too)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if peer.threads:
        torch.set_num_threads(peer.threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = _init(rank, world, port, device, timeout_s)
    replica = _Replica(run, peer, Path(cache), shard_key, device, rank, world)
    try:
        while True:
            command = torch.zeros(2, dtype=torch.int64)
            dist.broadcast(command, 0, group=group)
            op, argument = command.tolist()
            if op == STEP:
                replica.step(argument)
            elif op == LOAD:
                params = torch.empty(argument, dtype=torch.float32, device=_wire(device))
                dist.broadcast(params, 0)
                replica.load(params)
            elif op == STATE:
                box = [None]
                dist.broadcast_object_list(box, 0, group=group)
                replica.load_state_dict(box[0])
            else:
                break
    except (RuntimeError, ConnectionError) as e:  # rank 0 is gone: nothing to do without it
        log.debug("local worker %d: rank 0 is gone (%r)", rank, e)
    finally:
        replica.stream.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _wire(device: torch.device) -> torch.device:
    """Where a tensor must live for the data backend: the GPU for NCCL, the host for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def _init(rank: int, world: int, port: int, device: torch.device, timeout_s: float):
    """Join the peer's local process group; returns the gloo group for commands."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalWorkers:
    """The model a peer trains on several local devices; the same calls as :class:`LocalModel`.

    :param devices: one per rank; ``devices[0]`` is this process's
    """

    def __init__(self, run: RunConfig, peer: PeerConfig, cache: Path, shard_key: str, devices: list[torch.device]):
        from p2pdiloco import corpus

        self.devices, self.world = devices, len(devices)
        self.timeout_s, self.failed, self.closed = peer.local_timeout_s, False, False
        corpus.prepare(run.data, run.model.vocab_size, cache)  # once, here: the workers then only read the cache
        port = _free_port()
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked DHT or threads
        self.procs = [
            context.Process(target=_worker, name=f"p2pdiloco-worker-{rank}", daemon=True,
                            args=(rank, self.world, port, run, peer, str(cache), shard_key, str(devices[rank]), self.timeout_s))
            for rank in range(1, self.world)
        ]
        for proc in self.procs:
            proc.start()
        # Before multiprocessing's own exit handler, which would wait for workers that ignore SIGTERM.
        atexit.register(self.close)
        if devices[0].type == "cuda":
            torch.cuda.set_device(devices[0])
        try:
            self.group = _init(0, self.world, port, devices[0], self.timeout_s)
            self.replica = _Replica(run, peer, cache, shard_key, devices[0], 0, self.world)
        except Exception as e:
            self.close()
            raise self._failure(e) from None
        log.info("training on %d local devices: %s", self.world, ", ".join(map(str, devices)))

    # The peer reads these as it would a LocalModel's.
    @property
    def model(self) -> torch.nn.Module:
        return self.replica.model

    @property
    def stream(self):
        return self.replica.stream

    @property
    def inner(self):
        return self.replica.inner

    @property
    def tokens_per_step(self) -> int:
        return self.replica.tokens_per_step

    @property
    def device(self) -> torch.device:
        return self.replica.device

    def _command(self, op: int, argument: int = 0) -> None:
        dist.broadcast(torch.tensor([op, argument], dtype=torch.int64), 0, group=self.group)

    def _failure(self, error: BaseException) -> LocalWorkerFailed:
        self.failed = True  # the group is broken: no more commands
        # A killed worker's sockets close as it dies: give its exit a moment to be seen.
        multiprocessing.connection.wait([proc.sentinel for proc in self.procs], timeout=2.0)
        dead = [(rank, proc.exitcode) for rank, proc in enumerate(self.procs, 1) if not proc.is_alive()]
        if dead:
            rank, code = dead[0]
            return LocalWorkerFailed(f"local worker {rank} (on {self.devices[rank]}) died (exit {code}): this peer stops; "
                                     "its checkpoint is kept, restart it to go on")
        return LocalWorkerFailed(f"the local workers stopped answering ({type(error).__name__}: {str(error)[:200]}): "
                                 f"this peer stops; its checkpoint is kept (peer.local_timeout_s = {self.timeout_s:g})")

    def _collective(self, fn):
        try:
            return fn()
        except (RuntimeError, ConnectionError) as e:
            raise self._failure(e) from None

    def step(self, global_step: int) -> float:
        """One inner step on every device (the global batch split among them); the batch's mean loss."""
        def run():
            self._command(STEP, global_step)
            return self.replica.step(global_step)
        return self._collective(run)

    def parameters(self) -> torch.Tensor:
        return self.replica.parameters()

    def load(self, params: torch.Tensor) -> None:
        """Every rank moves to ``params`` (flat)."""
        def run():
            self._command(LOAD, params.numel())
            flat = params.detach().to(_wire(self.device), dtype=torch.float32).contiguous()
            dist.broadcast(flat, 0)
            self.replica.load(flat)
        self._collective(run)

    def rebase(self, base: torch.Tensor, params: torch.Tensor) -> None:
        from p2pdiloco import pace

        self.load(pace.rebase(self.parameters(), base, params))

    def evaluate(self, params: torch.Tensor, *, keep_working: bool) -> float:
        """Validation loss of ``params``, on rank 0 alone; the workers only learn ``params`` if they
        become the working parameters."""
        loss = self.replica.evaluate(params, keep_working=keep_working)
        if not keep_working:
            self.load(params)
        return loss

    def state_dict(self) -> dict:
        return self.replica.state_dict()

    def load_state_dict(self, state: dict) -> bool:
        """Every rank takes the inner optimizer's state and the data position (a resumed checkpoint)."""
        def run():
            self._command(STATE)
            dist.broadcast_object_list([state], 0, group=self.group)
            return self.replica.load_state_dict(state)
        return self._collective(run)

    def close(self) -> None:
        """Stop the workers (bounded) and leave the process group; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        if hasattr(self, "replica"):
            self.replica.stream.close()
        if dist.is_initialized():
            if not self.failed:
                try:
                    self._command(STOP)
                except Exception as e:  # a worker died just now: the others see rank 0's group go away
                    log.debug("could not tell the local workers to stop: %r", e)
            dist.destroy_process_group()
        for proc in self.procs:
            # After a failure a live worker may be stuck in a collective with the dead one: no use waiting.
            proc.join(timeout=0 if self.failed else self.timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
