"""The model a peer trains locally: inner AdamW steps on its data shard, and the moves between its
working parameters and the run's global ones (load, rebase, evaluate).

Everything here is one process and one device; nothing touches the network. The peer
(:mod:`p2pdiloco.peer`) decides when to train, measure and adopt; this object does it.
:func:`make` gives a peer on several devices :class:`p2pdiloco.workers.LocalWorkers` instead,
which has the same calls.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from p2pdiloco import faults, pace
from p2pdiloco.config import PeerConfig, RunConfig
from p2pdiloco.errors import OutOfMemory, is_out_of_memory
from p2pdiloco.outer import flatten_parameters, load_flat_parameters


class LocalModel:
    """The working copy of the model, its inner optimizer and its token stream.

    :param shard_key: the peer id: it picks the data shard, and mixes into the batch order so two
        peers that draw the same shard still see different batches
    :param device: where to train (default: the first of ``peer.devices``)
    """

    def __init__(self, run: RunConfig, peer: PeerConfig, cache: Path, shard_key: str, device: torch.device | None = None):
        from p2pdiloco import data, inner, model

        self.run, self.micro_batch_size = run, peer.micro_batch_size
        self.device = device or model.resolve_devices(peer)[0]
        self.bf16 = model.use_bf16(peer, self.device)
        self.model = model.build_model(run.model).to(self.device)
        self.inner = inner.InnerOptimizer(self.model, run.inner, self.device, self.bf16, peer.micro_batch_size)
        order_seed = run.seed ^ int(hashlib.sha256(shard_key.encode()).hexdigest()[:8], 16)
        self.stream = data.TokenStream(run.data, run.model.vocab_size, cache, shard_key=shard_key, seed=order_seed)
        self.val_batches = self.stream.val_batches()
        self._evaluate = lambda: model.evaluate(self.model, self.val_batches, self.device, self.bf16,
                                                micro_batch_size=peer.micro_batch_size)

    @property
    def devices(self) -> list[torch.device]:
        return [self.device]

    @property
    def tokens_per_step(self) -> int:
        return self.run.data.batch_size * self.run.data.seq_len

    def step(self, global_step: int) -> float:
        """One inner AdamW step on the next batch (``global_step`` sets the LR schedule); its loss.

        Running out of memory is a :class:`~p2pdiloco.errors.OutOfMemory` naming the fix (a smaller
        micro-batch), not a traceback."""
        return self._step(self.stream.next_batch, global_step)

    def _step(self, next_batch, global_step: int) -> float:
        try:
            if faults.reached("inner") == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory (injected by P2PDILOCO_FAULT)")
            return self.inner.step(next_batch().to(self.device), global_step)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            rows = self.micro_batch_size or self.run.data.batch_size
            raise OutOfMemory(
                f"out of memory in an inner step on {self.device} ({rows} sequences of {self.run.data.seq_len} "
                f"tokens at once): set a smaller micro-batch, e.g. --set peer.micro_batch_size={max(1, rows // 2)}"
            ) from None

    def parameters(self) -> torch.Tensor:
        """The working parameters, flat, fp32, on the CPU."""
        return flatten_parameters(self.model)

    def load(self, params: torch.Tensor) -> None:
        """Replace the working parameters by ``params`` (flat)."""
        load_flat_parameters(self.model, params.to(self.device))

    def rebase(self, base: torch.Tensor, params: torch.Tensor) -> None:
        """Move onto the global ``params``, keeping the progress made since ``base`` (the local
        parameters our last pseudo-gradient was measured to, or the previous global parameters):
        see :func:`p2pdiloco.pace.rebase`."""
        self.load(pace.rebase(self.parameters(), base, params))

    def evaluate(self, params: torch.Tensor, *, keep_working: bool) -> float:
        """Validation loss of the global ``params`` (not our working copy, which is put back
        afterwards if ``keep_working``)."""
        working = self.parameters() if keep_working else None
        self.load(params)
        loss = self._evaluate()
        if working is not None:
            self.load(working)
        return loss

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the local side: the inner optimizer and the data position."""
        return dict(inner=self.inner.state_dict(), data=self.stream.state_dict())

    def load_state_dict(self, state: dict) -> bool:
        """Take a checkpoint's inner optimizer state and data position (:meth:`state_dict`); whether
        the data position was for this stream (another peer id reads another shard: it starts afresh)."""
        self.inner.load_state_dict(state["inner"])
        try:
            self.stream.load_state_dict(state["data"])
        except ValueError:
            return False
        return True

    def close(self) -> None:
        self.stream.close()


def make(run: RunConfig, peer: PeerConfig, cache: Path, shard_key: str):
    """The local side of a peer: a :class:`LocalModel` on one device, or
    :class:`~p2pdiloco.workers.LocalWorkers` on the several that ``peer.devices`` names."""
    from p2pdiloco import model

    devices = model.resolve_devices(peer)
    if len(devices) == 1:
        return LocalModel(run, peer, cache, shard_key, device=devices[0])
    from p2pdiloco.workers import LocalWorkers

    return LocalWorkers(run, peer, cache, shard_key, devices)
