"""A peer's checkpoint: written atomically, checked before use.

One file, ``DIR/checkpoint.pt``, holds what a peer needs to continue where it stopped: the global
state (parameters, outer momentum, epoch and its digest), the inner AdamW state, the data
position and the run config's fingerprint. It also carries the run config itself (``config``,
``RunConfig.canonical()``) and the tokenizer's files (``tokenizer``: file name -> text), so that
``p2pdiloco export`` can rebuild the model and its tokenizer from this one file on any machine
(older checkpoints lack both: export then asks for the recipe).

It is written to a temporary file in the same folder, flushed and fsynced, then renamed over the
old one (and the folder fsynced): a crash at any point leaves either the previous checkpoint or
the new one, never a torn file.

On resume the peer still asks the swarm first: if the swarm moved on while it was away it
downloads the newer state instead of rolling anyone back (see ``Peer._sync_with_swarm``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from p2pdiloco.errors import CheckpointError

FILENAME = "checkpoint.pt"
FORMAT = 1


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory).expanduser() / FILENAME


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (tensors and plain values) as the folder's checkpoint."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state, format=FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def read(path: str | Path) -> dict[str, Any]:
    """The checkpoint file at ``path``, whatever run it belongs to. Raises :class:`CheckpointError`
    naming the problem and the fix if it is unreadable or not a p2pdiloco checkpoint."""
    path = Path(path)
    try:
        # weights_only: a checkpoint may come from another machine; it must not run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}): move it away to start fresh, or restore a backup"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a p2pdiloco checkpoint of format {FORMAT}: move it away")
    return state


def load(directory: str | Path, *, fingerprint: str, size: int) -> dict[str, Any] | None:
    """The folder's checkpoint, or None if there is none. Raises :class:`CheckpointError` naming
    the problem and the fix if it is unreadable or belongs to another run config."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    state = read(path)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to another run config (fingerprint {state.get('fingerprint')}, this one "
            f"{fingerprint}): use another --checkpoint-dir, or the config it was made with"
        )
    for key in ("params", "momentum"):
        tensor = state.get(key)
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (size,) or tensor.dtype != torch.float32:
            raise CheckpointError(f"checkpoint {path} has a malformed '{key}': move it away to start fresh")
    return state


def tokenizer_files(folder: str | Path) -> dict[str, str]:
    """The files of a tokenizer folder written by ``save_pretrained`` (JSON and text, a few MB at
    most), to embed in a checkpoint as ``{file name: text}``.

    Embedding them in ``checkpoint.pt`` rather than writing a folder beside it keeps the checkpoint
    one atomically written file, which can be copied alone to another machine and exported there.
    """
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(Path(folder).iterdir()) if f.is_file()}
