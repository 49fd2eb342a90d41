"""The token streams a peer trains on: its data shard, in batches, and the held-out validation batches.

:class:`TokenStream` serves ``[batch_size, seq_len]`` token windows of one shard, read from what
:func:`p2pdiloco.corpus.prepare` cached (local corpora) or streamed from the ``hf`` dataset and
tokenized on the fly.

Splits. The validation part is never trained on: for local corpora it is the last
``val_fraction`` of the token stream; for ``hf`` it is ``val_split`` if given, else the documents
whose text hash falls below ``val_fraction`` (a fixed, order-independent choice). The training part
is cut into ``num_shards`` shards; a peer trains on shard ``sha256(shard_key) % num_shards``
(``hf``: a share of the source files when there are at least ``num_shards`` of them, as for C4's
1024, else every ``num_shards``-th document).

Order. Local corpora: the shard is cut into ``seq_len`` windows, visited in a permutation drawn
from ``(seed, shard, pass)``; each pass after the first shifts the window grid by a random offset
so repeated passes do not replay identical windows. ``hf``: documents are read in stream order,
joined with the EOS token and packed into windows; windows are shuffled within blocks of at
least ``max(256, 4 * batch_size)`` windows, from ``(seed, shard, pass, block)``. A background thread
tokenizes ahead so the training loop never waits on it; a shard small enough to keep in memory is
streamed once and reshuffled from memory on later passes.

Resuming. ``state_dict()`` is a small JSON-friendly dict (for ``hf`` it embeds the ``datasets``
stream position, so a resume re-reads at most one block and one source file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pdiloco.config import DataConfig
# a stream reads what corpus.prepare cached, and reads and splits hf documents as the BPE training did
from p2pdiloco.corpus import META_FILE, TOKENIZER_DIR, TOKENS_FILE, _encode_docs, _is_val_doc, _open_hf, _texts, prepare
from p2pdiloco.errors import DataError

_DOCS_PER_ENCODE = 128  # hf: documents tokenized per call (tokenizers parallelises inside a call)
_PREFETCH_BATCHES = 4
_CACHED_SHARD_TOKENS = 1 << 25  # hf: a shard of at most this many tokens is streamed once, then kept


def shard_for(shard_key: str, num_shards: int) -> int:
    """The shard that the peer with this key trains on, the same on every machine."""
    return int(hashlib.sha256(shard_key.encode()).hexdigest(), 16) % num_shards


# ----------------------------------------------------------------------------- the stream


class TokenStream:
    """Batches of ``[batch_size, seq_len]`` token windows from this peer's shard.

    Args:
        cfg: the run's data config.
        vocab_size: the model's vocabulary size (the BPE is trained to it).
        cache_dir: where :func:`prepare` caches the tokenizer and token file.
        shard_key: any stable string for this peer (e.g. its peer id); picks the shard.
        seed: seeds the window order (with the shard and the pass).
    """

    def __init__(self, cfg: DataConfig, vocab_size: int, cache_dir: str | Path, shard_key: str, seed: int):
        self.cfg = cfg
        self.folder = prepare(cfg, vocab_size, cache_dir)
        meta = json.loads((self.folder / META_FILE).read_text())
        self.eos_id: int = meta["eos_id"]
        self.shard = shard_for(shard_key, cfg.num_shards)
        self.seed = seed
        if cfg.source == "hf":
            self._impl: _LocalWindows | _StreamWindows = _StreamWindows(self, Path(cache_dir).expanduser())
        else:
            tokens = np.load(self.folder / TOKENS_FILE, mmap_mode="r")
            self._impl = _LocalWindows(tokens, cfg, self.shard, seed)

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, seq_len]`` int64 batch of training tokens."""
        return self._impl.next_batch()

    def val_batches(self) -> list[torch.Tensor]:
        """``val_batches`` fixed validation batches, the same on every peer."""
        return self._impl.val_batches()

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned (JSON-friendly)."""
        return {"shard": self.shard, "seed": self.seed, **self._impl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shard") != self.shard or state.get("seed") != self.seed:
            raise ValueError(f"data state is for shard {state.get('shard')} / seed {state.get('seed')}, "
                             f"this stream reads shard {self.shard} / seed {self.seed}")
        self._impl.load_state_dict(state)

    def close(self) -> None:
        """Stop the prefetch thread (hf); safe to call more than once."""
        if isinstance(self._impl, _StreamWindows):
            self._impl.stop()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k % 2**64 for k in keys])


class _LocalWindows:
    """Windows of a token array in memory (memory-mapped), for the local corpora."""

    def __init__(self, tokens: np.ndarray, cfg: DataConfig, shard: int, seed: int):
        self.tokens, self.cfg, self.shard, self.seed = tokens, cfg, shard, seed
        n, seq = len(tokens), cfg.seq_len
        n_val = max(seq, math.ceil(n * cfg.val_fraction))
        train_end = n - n_val
        lo, hi = shard * train_end // cfg.num_shards, (shard + 1) * train_end // cfg.num_shards
        if hi - lo < seq:
            raise DataError(f"shard {shard} has {hi - lo} tokens, less than one window of {seq}: "
                            f"lower run.data.num_shards or run.data.seq_len")
        self.bounds = (lo, hi)  # training tokens of this shard: [lo, hi)
        self.val_bounds = (train_end, n)
        self._cols = np.arange(seq, dtype=np.int64)
        self._set_pass(0, 0)

    def _set_pass(self, pass_: int, index: int) -> None:
        lo, hi = self.bounds
        seq = self.cfg.seq_len
        rng = _rng(self.seed, self.shard, pass_)
        offset = int(rng.integers(seq)) if pass_ > 0 else 0
        if (hi - lo - offset) // seq == 0:
            offset = 0
        count = (hi - lo - offset) // seq
        self._starts = lo + offset + seq * rng.permutation(count)
        self._pass, self._index = pass_, index

    def next_batch(self) -> torch.Tensor:
        need = self.cfg.batch_size
        picks = []
        while need:
            if self._index >= len(self._starts):
                self._set_pass(self._pass + 1, 0)
            take = self._starts[self._index : self._index + need]
            self._index += len(take)
            need -= len(take)
            picks.append(take)
        starts = picks[0] if len(picks) == 1 else np.concatenate(picks)
        return torch.from_numpy(self.tokens[starts[:, None] + self._cols].astype(np.int64))

    def val_batches(self) -> list[torch.Tensor]:
        lo, hi = self.val_bounds
        seq, rows = self.cfg.seq_len, self.cfg.batch_size
        count = self.cfg.val_batches * rows
        # evenly spread over the held-out part (overlapping only if it is too short)
        starts = lo + np.linspace(0, hi - lo - seq, count).round().astype(np.int64)
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._cols].astype(np.int64))
        return list(windows.split(rows))

    def state_dict(self) -> dict[str, Any]:
        return {"pass": self._pass, "index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set_pass(int(state["pass"]), int(state["index"]))


class _StreamWindows:
    """Windows packed from a streamed ``datasets`` dataset, tokenized by a background thread."""

    def __init__(self, owner: TokenStream, cache_dir: Path):
        from transformers import PreTrainedTokenizerFast

        self.cfg, self.shard, self.seed, self.eos_id = owner.cfg, owner.shard, owner.seed, owner.eos_id
        self.cache_dir = cache_dir
        self._backend = PreTrainedTokenizerFast.from_pretrained(str(owner.folder / TOKENIZER_DIR)).backend_tokenizer
        self._dtype = np.uint32  # ids of any tokenizer; cast to int64 per batch
        self._base = _open_hf(self.cfg, self.cfg.split, cache_dir)
        # shard by source files when there are enough of them (each peer reads only its files),
        # else by example index (each peer reads everything and keeps every num_shards-th example)
        self._by_files = self._base.num_shards >= self.cfg.num_shards
        self._block = max(256, 4 * self.cfg.batch_size)  # windows per shuffle block
        self._val: list[torch.Tensor] | None = None
        self._state: dict[str, Any] = {"pass": 0, "block": 0, "pos": 0, "ds": None, "raw": 0}
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- consumer side

    def next_batch(self) -> torch.Tensor:
        if self._thread is None:
            self._start()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stop()
        self._state = {k: copy.deepcopy(state[k]) for k in ("pass", "block", "pos", "ds", "raw")}

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=_PREFETCH_BATCHES)
        self._thread = threading.Thread(target=self._produce, args=(copy.deepcopy(self._state), self._queue, self._stop),
                                        name=f"p2pdiloco-data-shard{self.shard}", daemon=True)
        self._thread.start()

    # -- producer side (background thread)

    def _produce(self, state: dict[str, Any], out: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for batch, after in self._batches(state):
                if not put((batch, after)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(err)

    def _batches(self, state: dict[str, Any]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        rows = self.cfg.batch_size
        pending: list[np.ndarray] = []
        npending = 0
        pass_, first_block, skip = state["pass"], state["block"], state["pos"]
        ds_state, raw = state["ds"], state["raw"]
        cached: list[tuple[np.ndarray, dict[str, Any]]] | None = None  # a whole small shard, kept
        while True:
            produced = False
            recording: list | None = [] if cached is None and ds_state is None else None
            recorded = 0
            blocks = cached if cached is not None else self._blocks(pass_, ds_state, raw)
            for block, (windows, at) in enumerate(blocks, start=first_block):
                produced = True
                if recording is not None:
                    recorded += windows.size
                    recording = recording if recorded <= _CACHED_SHARD_TOKENS else None
                    if recording is not None:
                        recording.append((windows, at))
                order = _rng(self.seed, self.shard, pass_, block).permutation(len(windows))
                pos = skip
                skip = 0
                while pos < len(order):
                    take = order[pos : pos + rows - npending]
                    pending.append(windows[take])
                    npending += len(take)
                    pos += len(take)
                    if npending == rows:
                        batch = torch.from_numpy(np.concatenate(pending).astype(np.int64))
                        pending, npending = [], 0
                        yield batch, {"pass": pass_, "block": block, "pos": pos, **copy.deepcopy(at)}
            if not produced:
                raise DataError(f"shard {self.shard} of dataset '{self.cfg.path}' has no training tokens: lower "
                                f"run.data.num_shards or add data")
            # every pass reads the same documents, so a shard that fits in memory is read only once
            cached = cached if cached is not None else recording
            pass_, first_block, skip, ds_state, raw = pass_ + 1, 0, 0, None, 0

    def _shard_stream(self, ds_state: dict | None):
        if self._by_files:
            ds = self._base.shard(num_shards=self.cfg.num_shards, index=self.shard)
        else:
            ds = self._base.shard(num_shards=1, index=0)  # a fresh view, resumable on its own
        if ds_state is not None:
            ds.load_state_dict(ds_state)
        return ds

    def _blocks(self, pass_: int, ds_state: dict | None, raw: int) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        """Blocks of packed windows of one pass, each with the stream position at its start."""
        cfg = self.cfg
        ds = self._shard_stream(ds_state)
        holdout = cfg.val_split is None
        need = self._block * cfg.seq_len
        at = {"ds": ds_state, "raw": raw}
        docs: list[str] = []
        parts: list[np.ndarray] = []
        ntok = 0
        for text in _texts(ds, cfg.text_field):
            index, raw = raw, raw + 1
            if not self._by_files and index % cfg.num_shards != self.shard:
                continue
            if holdout and _is_val_doc(text, cfg.val_fraction):
                continue
            docs.append(text)
            if len(docs) < _DOCS_PER_ENCODE:
                continue
            parts.append(_encode_docs(self._backend, docs, self.eos_id, self._dtype))
            ntok += len(parts[-1])
            docs = []
            if ntok >= need:
                yield self._pack(parts), at
                parts, ntok = [], 0
                at = {"ds": ds.state_dict(), "raw": raw}  # the stream has yielded exactly what we read
        if docs:
            parts.append(_encode_docs(self._backend, docs, self.eos_id, self._dtype))
            ntok += len(parts[-1])
        if ntok >= cfg.seq_len:
            yield self._pack(parts), at

    def _pack(self, parts: list[np.ndarray]) -> np.ndarray:
        tokens = np.concatenate(parts)
        count = len(tokens) // self.cfg.seq_len  # the tail (< one window) is dropped
        return tokens[: count * self.cfg.seq_len].reshape(count, self.cfg.seq_len)

    # -- validation

    def val_batches(self) -> list[torch.Tensor]:
        if self._val is None:
            self._val = self._build_val()
        return self._val

    def _build_val(self) -> list[torch.Tensor]:
        cfg = self.cfg
        need = cfg.val_batches * cfg.batch_size * cfg.seq_len
        parts: list[np.ndarray] = []
        ntok = 0
        for docs in _chunks(self._val_texts(), _DOCS_PER_ENCODE):
            parts.append(_encode_docs(self._backend, docs, self.eos_id, self._dtype))
            ntok += len(parts[-1])
            if ntok >= need:
                break
        if not ntok:
            raise DataError(f"dataset '{cfg.path}' has no validation documents: raise run.data.val_fraction "
                            f"or set run.data.val_split")
        tokens = np.resize(np.concatenate(parts), need)  # a small held-out set is repeated to fill the batches
        return list(torch.from_numpy(tokens.astype(np.int64)).view(-1, cfg.seq_len).split(cfg.batch_size))

    def _val_texts(self) -> Iterator[str]:
        cfg = self.cfg
        if cfg.val_split is not None:
            yield from _texts(_open_hf(cfg, cfg.val_split, self.cache_dir), cfg.text_field)
            return
        for text in _texts(self._base.shard(num_shards=1, index=0), cfg.text_field):
            if _is_val_doc(text, cfg.val_fraction):
                yield text


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
