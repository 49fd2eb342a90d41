"""The epoch-keyed outer state and the outer optimizers (pure torch, no network).

The global state at epoch ``e`` is ``(theta_e, m_e, e)``: the flat fp32 global parameters, the
outer momentum and the number of outer steps applied so far. Every peer of the swarm holds the
same bytes for the same epoch; :meth:`OuterState.digest` is how they check it.

DiLoCo's outer step is SGD with Nesterov momentum on the averaged pseudo-gradient
``delta = theta_e - theta_local`` (before minus after, so it points like a gradient):

    m_{e+1}     = mu * m_e + delta
    theta_{e+1} = theta_e - lr * (delta + mu * m_{e+1})

which is exactly ``torch.optim.SGD(lr, momentum=mu, nesterov=True)`` (a unit test holds it to
that). ``sgd`` is plain averaging scaled by ``lr`` (FedAvg when ``lr = 1``).
"""

from __future__ import annotations

import hashlib

import torch

from p2pdiloco.errors import StateDownloadFailed


def flatten_parameters(model: torch.nn.Module) -> torch.Tensor:
    """All (unique) parameters of ``model`` as one new fp32 CPU vector, in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in model.parameters()])


@torch.no_grad()
def load_flat_parameters(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy a vector made by :func:`flatten_parameters` back into the model, in place."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the model {offset}")


def state_digest(epoch: int, params: torch.Tensor, momentum: torch.Tensor) -> str:
    """Hex digest of (epoch, parameters, momentum): equal on two peers iff their states are identical."""
    h = hashlib.sha256(str(int(epoch)).encode())
    h.update(params.numpy().tobytes())
    h.update(momentum.numpy().tobytes())
    return h.hexdigest()[:32]


class OuterState:
    """Global parameters, outer momentum and epoch, with the outer optimizer that advances them."""

    def __init__(self, params: torch.Tensor, *, optimizer: str, lr: float, momentum: float, epoch: int = 0):
        if optimizer not in ("nesterov", "sgd"):
            raise ValueError(f"unknown outer optimizer '{optimizer}'")
        self.params = params.detach().to(torch.float32).clone()
        self.momentum_buffer = torch.zeros_like(self.params)
        self.optimizer, self.lr, self.momentum = optimizer, lr, momentum
        self.epoch = epoch
        self._state_hash: str | None = None  # memo of digest(); step() and load() clear it

    @property
    def size(self) -> int:
        return self.params.numel()

    def pseudo_gradient(self, local_params: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta_e - theta_local``: what the inner phase moved, pointing like a gradient."""
        return torch.sub(self.params, local_params, out=out)

    @torch.no_grad()
    def step(self, delta: torch.Tensor) -> None:
        """Apply the averaged pseudo-gradient of this epoch and advance to the next epoch."""
        if not torch.isfinite(delta).all():  # the last line of defence: a NaN here ends the run
            raise ValueError("refusing an outer step with a non-finite pseudo-gradient")
        if self.optimizer == "nesterov":
            self.momentum_buffer.mul_(self.momentum).add_(delta)
            self.params.sub_(delta + self.momentum * self.momentum_buffer, alpha=self.lr)
        else:
            self.params.sub_(delta, alpha=self.lr)
        self.epoch += 1
        self._state_hash = None

    def digest(self) -> str:
        """:func:`state_digest` of this state."""
        return state_digest(self.epoch, self.params, self.momentum_buffer)

    @property
    def state_hash(self) -> str:
        """:meth:`digest`, computed once per state: hashing the whole state costs a pass over
        2 x parameters (1.2 GB at 150M), and peers ask for it on every heartbeat and poll."""
        if self._state_hash is None:
            self._state_hash = self.digest()
        return self._state_hash

    def tensors(self) -> list[torch.Tensor]:
        return [self.params, self.momentum_buffer]

    def load(self, epoch: int, params: torch.Tensor, momentum: torch.Tensor, expected_hash: str | None = None) -> None:
        """Replace the state with a downloaded one, after checking its shape, values and (if
        given) digest; a state that fails a check leaves this one untouched."""
        for name, t in (("parameters", params), ("momentum", momentum)):
            if t.shape != self.params.shape or t.dtype != torch.float32:
                raise StateDownloadFailed(f"state {name} have shape {tuple(t.shape)} {t.dtype}, expected {tuple(self.params.shape)} float32")
            if not torch.isfinite(t).all():
                raise StateDownloadFailed(f"state {name} contain NaN or Inf")
        if expected_hash is not None and state_digest(epoch, params, momentum) != expected_hash:
            raise StateDownloadFailed("state does not match its digest")
        self.params.copy_(params)
        self.momentum_buffer.copy_(momentum)
        self.epoch = int(epoch)
        self._state_hash = None
