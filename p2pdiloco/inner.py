"""The inner optimizer: local AdamW steps between two averaging rounds (DiLoCo's inner loop).

Its learning rate follows the run's schedule at the *global* step the caller passes in (for a
peer: ``epoch * inner_steps + local step``), so a peer that joins late or resumes lands on the same
point of the schedule as everyone else. Its AdamW state is local to the peer and is never reset
here, not even when the outer step replaces the parameters (DiLoCo keeps it across rounds).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from p2pdiloco.config import InnerConfig
from p2pdiloco.model import autocast


def lr_at(cfg: InnerConfig, global_step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr_ratio * lr`` at ``total_steps``.

    Warmup counts from 1 (step 0 trains at ``lr / warmup_steps``, not at zero); past
    ``total_steps`` the rate stays at the floor.
    """
    if global_step < cfg.warmup_steps:
        return cfg.lr * (global_step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (global_step - cfg.warmup_steps) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


class InnerOptimizer:
    """AdamW on the peer's model, with gradient accumulation, clipping and the global LR schedule.

    Weight decay applies to matrices (projections, MLP, the embedding and the tied output layer)
    and not to vectors (RMSNorm weights, biases if any), as in nanoGPT and most Llama trainers.

    Args:
        model: the model to train, already on ``device``.
        cfg: the run's inner-optimizer config.
        device: where the model lives; batches are moved there.
        bf16: run forward and backward under bf16 autocast (parameters and optimizer stay fp32).
        micro_batch_size: split each batch into chunks of this many rows and accumulate gradients
            (same result as one full batch, less activation memory); ``None`` = no split.
    """

    def __init__(self, model: nn.Module, cfg: InnerConfig, device: torch.device, bf16: bool,
                 micro_batch_size: int | None = None):
        self.model, self.cfg, self.device, self.bf16 = model, cfg, device, bf16
        self.micro_batch_size = micro_batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused AdamW updates each parameter in one pass with no temporaries (the foreach path
        # allocates model-sized intermediates every step); torch has it for CUDA and CPU
        fused = device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(groups, lr=lr_at(cfg, 0), betas=cfg.betas, fused=fused or None)
        self.last_grad_norm: torch.Tensor | None = None  # pre-clip norm of the last step, on device
        # Multiplies what is backpropagated, not the loss returned: a rank of a multi-device peer
        # (p2pdiloco.workers) scales its share of the global batch, so that DDP's mean is exact.
        self.loss_scale = 1.0

    def lr_at(self, global_step: int) -> float:
        return lr_at(self.cfg, global_step)

    def step(self, batch: torch.Tensor, global_step: int) -> float:
        """One optimizer step on a ``[rows, seq_len]`` token batch; returns its mean loss."""
        lr = self.lr_at(global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        rows = batch.shape[0]
        chunk = self.micro_batch_size or rows
        if chunk >= rows:
            with autocast(self.device, self.bf16):
                loss = self.model(input_ids=batch, labels=batch).loss
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
            total = loss.detach()
        else:
            total = torch.zeros((), device=self.device)
            parts = batch.split(chunk)
            # DDP (several local devices): average the gradients once, after the last micro-batch
            no_sync = getattr(self.model, "no_sync", contextlib.nullcontext)
            for i, part in enumerate(parts):
                weight = part.shape[0] / rows  # every row has seq_len tokens: row weights are exact
                with no_sync() if i < len(parts) - 1 else contextlib.nullcontext():
                    with autocast(self.device, self.bf16):
                        loss = self.model(input_ids=part, labels=part).loss
                    (loss * (weight * self.loss_scale)).backward()
                total += loss.detach() * weight
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        # keep the gradient buffers and zero them in place: no model-sized allocation per step
        self.optimizer.zero_grad(set_to_none=False)
        return total.item()  # the one host sync of the step

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
