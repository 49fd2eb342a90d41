"""The epoch-keyed outer state and the outer optimizers (pure torch, no network).

The global state at epoch ``e`` is ``(theta_e, m_e, e)``: the flat fp32 global parameters, the
outer momentum and the number of outer steps applied so far (plus, for ``delayed_nesterov``, the
contributions buffered since its last momentum update). Every peer of the swarm holds the same
bytes for the same epoch; :meth:`OuterState.digest` is how they check it.

Each outer step consumes one averaged pseudo-gradient ``delta = theta_e - theta_local`` (before
minus after, so it points like a gradient) made of ``k`` peers' contributions (the round's group).
The optimizers, with ``lr`` and ``mu`` the run's ``outer_lr`` and ``outer_momentum``:

``nesterov`` (DiLoCo)
    ``m <- mu m + delta;  theta <- theta - lr (delta + mu m)``, exactly
    ``torch.optim.SGD(lr, momentum=mu, nesterov=True)`` (a unit test holds it to that).
``delayed_nesterov`` (DN, Liu et al. 2024, Algorithm 3 with c = 0)
    Momentum moves once per ``N`` contributions (``run.outer_delay``); in between, each round
    is a plain step ``theta <- theta - lr (k/N) delta`` whose ``(k/N) delta`` is also added to a
    buffer. At the round that brings the count to ``N`` or more: ``m <- mu m + buffer`` and
    ``theta <- theta - lr ((k/N) delta + mu m)``, then the buffer empties. Over a window this is
    one Nesterov step on the window's contributions, so rounds that bring only part of the swarm
    (stragglers, late work) no longer each get a full momentum step, which is what makes naive
    asynchronous DiLoCo worse than synchronous (the paper's Eq. 5). With every round bringing
    ``k = N`` contributions it *is* ``nesterov``, bit for bit (a unit test).
``sgd``
    ``theta <- theta - lr delta``: plain averaging (FedAvg when ``lr = 1``).
``slowmo`` (Wang et al. 2020, heavy ball on the pseudo-gradient)
    ``m <- mu m + delta;  theta <- theta - lr m``. SlowMo's defaults are ``lr = 1``, ``mu = 0.5``
    (higher ``mu`` for more peers); the base learning rate it divides by is folded into delta.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Sequence

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


OUTER_OPTIMIZERS = ("nesterov", "delayed_nesterov", "sgd", "slowmo")


def state_digest(epoch: int, params: torch.Tensor, momentum: torch.Tensor, *extra: torch.Tensor, pending: int = 0) -> str:
    """Hex digest of the whole outer state: equal on two peers iff their states are identical."""
    h = hashlib.sha256(str(int(epoch)).encode() if not pending else f"{int(epoch)}+{int(pending)}".encode())
    for t in (params, momentum, *extra):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


# An epoch above this is malformed, not ambitious: an outer step a second for 8 million years.
MAX_EPOCH = 1 << 48
_HEX = re.compile(r"[0-9a-f]{1,64}")
_TENSOR_NAMES = ("parameters", "momentum", "delayed Nesterov buffer")


@dataclass(frozen=True)
class StateHeader:
    """The scalars of a state that :func:`validate_state` accepted."""

    epoch: int
    pending: int
    state_hash: str | None  # equal to the tensors' digest; None only if none was given and none required


def _count(value: Any) -> bool:
    # bool is an int to Python, but True is no epoch: a donor sending one is malformed
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A short repr of a stranger's scalar for an error message; the type for anything else (the repr
    of a value nested ~1000 deep raises RecursionError, and one of a huge container floods the log)."""
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 10**30):
        return repr(value)
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return f"(a {type(value).__name__})"


def validate_state(
    meta: Any,
    tensors: Any,
    *,
    fingerprint: str | None,
    expected_shapes: Sequence[tuple[int, ...]],
    max_pending: int = 1,
    require_hash: bool = True,
) -> StateHeader:
    """Check a whole outer state received from a donor before anything adopts it.

    ``meta`` is the donor's header as msgpack decoded it and ``tensors`` its tensors as hivemind
    deserialized them: either can be anything. Accepted only if ``meta`` is a dict with our
    ``fingerprint`` (unless None: a local checkpoint is checked elsewhere), an ``epoch`` in
    ``[0, MAX_EPOCH]``, a ``pending`` count in ``[0, max_pending)`` (both ints, not bools), a
    ``state_hash`` of at most 64 lowercase hex digits (may be absent only if not ``require_hash``),
    and ``tensors`` is a list of ``len(expected_shapes)`` dense CPU float32 tensors of those shapes
    that do not require grad (one that does would taint our state with an autograd graph), hold no
    NaN or Inf, and (with a ``state_hash``) have that digest. Cheap checks come first; the digest,
    a pass over the whole state, last. Raises :class:`StateDownloadFailed` naming the first problem.
    """
    if not isinstance(meta, dict):
        raise StateDownloadFailed(f"a malformed state header (a {type(meta).__name__}, not a dict)")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise StateDownloadFailed("a state of another run config")
    epoch, pending, state_hash = meta.get("epoch"), meta.get("pending", 0), meta.get("state_hash")
    if not _count(epoch) or not 0 <= epoch <= MAX_EPOCH:
        raise StateDownloadFailed(f"state has an invalid epoch {_show(epoch)}")
    if not _count(pending) or not 0 <= pending < max(max_pending, 1):
        raise StateDownloadFailed(f"state has an invalid pending count {_show(pending)}")
    if state_hash is None and require_hash:
        raise StateDownloadFailed("state has no digest")
    if state_hash is not None and not (isinstance(state_hash, str) and len(state_hash) <= 64 and _HEX.fullmatch(state_hash)):
        raise StateDownloadFailed(f"state has a malformed digest {_show(state_hash)}")
    names = [_TENSOR_NAMES[i] if i < len(_TENSOR_NAMES) else f"tensor {i}" for i in range(len(expected_shapes))]
    if not isinstance(tensors, (list, tuple)):
        raise StateDownloadFailed(f"state tensors come as a {type(tensors).__name__}, not a list")
    if len(tensors) != len(names):
        raise StateDownloadFailed(f"state has {len(tensors)} tensors, expected {len(names)} ({', '.join(names)})")
    for name, shape, t in zip(names, expected_shapes, tensors):
        if not (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type == "cpu"
                and t.dtype == torch.float32 and t.shape == tuple(shape)):
            raise StateDownloadFailed(f"state {name} is not a float32 tensor of shape {tuple(shape)}")
        if t.requires_grad:
            raise StateDownloadFailed(f"state {name} requires grad")
        if not torch.isfinite(t).all():
            raise StateDownloadFailed(f"state {name} contain NaN or Inf")
    if state_hash is not None and state_digest(epoch, *tensors, pending=pending) != state_hash:
        raise StateDownloadFailed("state does not match its digest")
    return StateHeader(epoch=epoch, pending=pending, state_hash=state_hash)


class OuterState:
    """Global parameters, outer momentum and epoch, with the outer optimizer that advances them.

    ``delay`` is DN's ``N`` (contributions per momentum update); the other optimizers ignore it.
    """

    def __init__(self, params: torch.Tensor, *, optimizer: str, lr: float, momentum: float, delay: int = 1, epoch: int = 0):
        if optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"unknown outer optimizer '{optimizer}': choose one of {', '.join(OUTER_OPTIMIZERS)}")
        if delay < 1:
            raise ValueError("the delayed Nesterov delay must be at least 1 contribution")
        self.params = params.detach().to(torch.float32).clone()
        self.momentum_buffer = torch.zeros_like(self.params)
        self.optimizer, self.lr, self.momentum, self.delay = optimizer, lr, momentum, delay
        # DN only: the plain steps' (k/N) delta summed since the last momentum update, and how
        # many contributions they hold. Part of the shared state (digest, downloads, checkpoints).
        self.buffer = torch.zeros_like(self.params) if optimizer == "delayed_nesterov" else None
        self.pending = 0
        self.epoch = epoch
        self._state_hash: str | None = None  # memo of digest(); step() and load() clear it

    @classmethod
    def for_run(cls, params: torch.Tensor, run) -> "OuterState":
        """The outer state a peer of ``run`` (a :class:`~p2pdiloco.config.RunConfig`) starts from."""
        return cls(params, optimizer=run.outer_optimizer, lr=run.outer_lr, momentum=run.outer_momentum, delay=run.dn_delay)

    def checkpoint_fields(self) -> dict:
        """Copies of everything a checkpoint needs to restore this state with :meth:`load_checkpoint`."""
        fields = dict(epoch=self.epoch, state_hash=self.state_hash, pending=self.pending,
                      params=self.params.clone(), momentum=self.momentum_buffer.clone())
        if self.buffer is not None:
            fields["buffer"] = self.buffer.clone()
        return fields

    def load_checkpoint(self, saved: dict) -> None:
        """Restore from :meth:`checkpoint_fields` (as saved), checking the digest."""
        tensors = [saved.get("params"), saved.get("momentum")] + ([saved.get("buffer")] if self.buffer is not None else [])
        self.load(saved["epoch"], tensors, expected_hash=saved.get("state_hash"), pending=saved.get("pending", 0))

    @property
    def size(self) -> int:
        return self.params.numel()

    def pseudo_gradient(self, local_params: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta_e - theta_local``: what the inner phase moved, pointing like a gradient."""
        return torch.sub(self.params, local_params, out=out)

    @torch.no_grad()
    def step(self, delta: torch.Tensor, contributions: int = 1) -> None:
        """Apply the averaged pseudo-gradient of this epoch (``contributions``: how many peers'
        pseudo-gradients it averages) and advance to the next epoch."""
        if not torch.isfinite(delta).all():  # the last line of defence: a NaN here ends the run
            raise ValueError("refusing an outer step with a non-finite pseudo-gradient")
        mu = self.momentum
        if self.optimizer == "nesterov":
            self.momentum_buffer.mul_(mu).add_(delta)
            self.params.sub_(delta + mu * self.momentum_buffer, alpha=self.lr)
        elif self.optimizer == "delayed_nesterov":
            plain = delta * (contributions / self.delay)  # exactly delta when k = N
            self.buffer.add_(plain)
            self.pending += contributions
            if self.pending >= self.delay:
                self.momentum_buffer.mul_(mu).add_(self.buffer)
                self.params.sub_(plain + mu * self.momentum_buffer, alpha=self.lr)
                self.buffer.zero_()
                self.pending = 0
            else:
                self.params.sub_(plain, alpha=self.lr)
        elif self.optimizer == "slowmo":
            self.momentum_buffer.mul_(mu).add_(delta)
            self.params.sub_(self.momentum_buffer, alpha=self.lr)
        else:
            self.params.sub_(delta, alpha=self.lr)
        self.epoch += 1
        self._state_hash = None

    def digest(self) -> str:
        """:func:`state_digest` of this state."""
        return state_digest(self.epoch, *self.tensors(), pending=self.pending)

    @property
    def state_hash(self) -> str:
        """:meth:`digest`, computed once per state: hashing the whole state costs a pass over
        2 x parameters (1.2 GB at 150M), and peers ask for it on every heartbeat and poll."""
        if self._state_hash is None:
            self._state_hash = self.digest()
        return self._state_hash

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors, in the order :meth:`load` takes them: parameters, momentum and,
        for ``delayed_nesterov``, the buffer."""
        return [self.params, self.momentum_buffer] + ([self.buffer] if self.buffer is not None else [])

    def meta(self) -> dict:
        """The state's scalars, as served to newcomers and saved in checkpoints."""
        return dict(epoch=self.epoch, pending=self.pending, state_hash=self.state_hash)

    def load(self, epoch: int, tensors, expected_hash: str | None = None, pending: int = 0) -> None:
        """Replace the state with a downloaded one (``tensors`` as :meth:`tensors` lists them), after
        checking them with :meth:`validate` (digest included if given); a state that fails a check
        leaves this one untouched."""
        tensors = list(tensors)
        header = self.validate(dict(epoch=epoch, pending=pending, state_hash=expected_hash), tensors, require_hash=False)
        self.adopt(header, tensors)

    def validate(self, meta: Any, tensors: Any, *, fingerprint: str | None = None, require_hash: bool = True) -> StateHeader:
        """:func:`validate_state` for a state of this one's layout (number and shape of tensors,
        and whether a pending count is possible); reads nothing that changes, so no lock needed."""
        return validate_state(
            meta, tensors, fingerprint=fingerprint, expected_shapes=[tuple(self.params.shape)] * len(self.tensors()),
            max_pending=self.delay if self.buffer is not None else 1, require_hash=require_hash,
        )

    @torch.no_grad()
    def adopt(self, header: StateHeader, tensors: Sequence[torch.Tensor]) -> None:
        """Replace the state with ``tensors``, which :meth:`validate` accepted with ``header``."""
        for mine, theirs in zip(self.tensors(), tensors):
            mine.copy_(theirs)
        self.epoch, self.pending = header.epoch, header.pending
        self._state_hash = header.state_hash  # verified to be their digest (or None: computed when asked)
