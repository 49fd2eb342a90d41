"""p2pdiloco/data.py: the token streams (shards, order, validation batches, resuming); preparation is in test_corpus.py."""

import json

import numpy as np
import pytest
import torch

import p2pdiloco.data as data
from p2pdiloco.config import load_recipe
from p2pdiloco.corpus import _is_val_doc, load_tokenizer
from p2pdiloco.data import TokenStream, shard_for


def keys_for_every_shard(num_shards: int) -> dict[int, str]:
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < num_shards:
        keys.setdefault(shard_for(f"peer-{i}", num_shards), f"peer-{i}")
        i += 1
    return keys


def stream(recipe, cache, key="peer-a", seed=0) -> TokenStream:
    return TokenStream(recipe.run.data, recipe.run.model.vocab_size, cache, shard_key=key, seed=seed)


def hf_recipe(files, *extra):
    return load_recipe("test", ["run.data.source=hf", "run.data.path=json",
                                f"run.data.data_files={json.dumps([str(f) for f in files])}", *extra])


# ----------------------------------------------------------------------------- local corpus


def test_val_split_is_disjoint_from_every_shard(test_recipe, data_cache):
    cfg = test_recipe.run.data
    val_lo, val_hi = stream(test_recipe, data_cache)._impl.val_bounds
    spans = []
    for shard, key in sorted(keys_for_every_shard(cfg.num_shards).items()):
        s = stream(test_recipe, data_cache, key)
        assert s.shard == shard
        lo, hi = s._impl.bounds
        assert 0 <= lo < hi <= val_lo
        spans.append((lo, hi))
        for _ in range(3):  # every window of two passes lies inside the shard
            s._impl._set_pass(s._impl._pass + 1, 0)
            assert s._impl._starts.min() >= lo and s._impl._starts.max() + cfg.seq_len <= hi
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # shards do not overlap
    assert (val_hi - val_lo) >= cfg.val_fraction * val_hi
    val = stream(test_recipe, data_cache).val_batches()
    assert len(val) == cfg.val_batches and all(b.shape == (cfg.batch_size, cfg.seq_len) for b in val)
    other = stream(test_recipe, data_cache, keys_for_every_shard(cfg.num_shards)[3]).val_batches()
    assert all(torch.equal(a, b) for a, b in zip(val, other))  # the same on every peer


def test_same_key_same_batches_different_keys_different_shards(test_recipe, data_cache):
    a, b = stream(test_recipe, data_cache, "peer-a"), stream(test_recipe, data_cache, "peer-a")
    for _ in range(5):
        x = a.next_batch()
        assert x.dtype == torch.int64 and x.shape == (8, 32)
        assert torch.equal(x, b.next_batch())
    shards = {shard_for(f"peer-{i}", 8) for i in range(20)}
    assert len(shards) >= 4
    c = stream(test_recipe, data_cache, keys_for_every_shard(8)[(a.shard + 1) % 8])
    assert not torch.equal(c.next_batch(), stream(test_recipe, data_cache, "peer-a").next_batch())
    assert not torch.equal(stream(test_recipe, data_cache, seed=1).next_batch(),
                           stream(test_recipe, data_cache, seed=0).next_batch())


def test_state_dict_resumes_exactly_across_passes(data_cache):
    recipe = load_recipe("test", ["run.data.num_shards=400"])  # ~6k tokens a shard: a pass is ~20 batches
    s = stream(recipe, data_cache)
    for _ in range(7):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.next_batch() for _ in range(50)]
    assert s.state_dict()["pass"] >= 2
    resumed = stream(recipe, data_cache)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()) for x in expected)
    with pytest.raises(ValueError, match="shard"):
        stream(recipe, data_cache, key="another-peer-with-another-shard-0").load_state_dict({**state, "shard": -1})


def test_passes_are_reshuffled_and_shifted(data_cache):
    recipe = load_recipe("test", ["run.data.num_shards=400"])
    s = stream(recipe, data_cache)
    first = s._impl._starts.copy()
    s._impl._set_pass(1, 0)
    assert not np.array_equal(np.sort(first), np.sort(s._impl._starts))


def test_next_batch_is_cheap(test_recipe, data_cache):
    import time

    # tiny-cpu's batch shape (16 x 128) on the test corpus
    s = stream(load_recipe("test", ["run.model.max_seq_len=128", "run.data.seq_len=128", "run.data.batch_size=16"]),
               data_cache)
    s.next_batch()
    start = time.perf_counter()
    for _ in range(200):
        s.next_batch()
    assert (time.perf_counter() - start) / 200 < 2e-3  # a tiny-cpu step is ~1 s


# ----------------------------------------------------------------------------- hf streaming


def test_hf_source_on_local_jsonl(jsonl_file, data_cache):
    recipe = hf_recipe([jsonl_file])
    with stream(recipe, data_cache) as s:
        batch = s.next_batch()
        assert batch.shape == (8, 32) and batch.dtype == torch.int64 and int(batch.max()) < 512
        val = s.val_batches()
        assert len(val) == 2 and all(v.shape == (8, 32) for v in val)
    with stream(recipe, data_cache, keys_for_every_shard(8)[(s.shard + 1) % 8]) as other:
        assert all(torch.equal(a, b) for a, b in zip(val, other.val_batches()))
        assert not torch.equal(other.next_batch(), batch)


def test_hf_held_out_documents_are_never_trained_on(jsonl_file, data_cache):
    recipe = hf_recipe([jsonl_file], "run.data.val_fraction=0.3", "run.data.num_shards=1")
    docs = [json.loads(line)["text"] for line in jsonl_file.read_text().splitlines()]
    val_docs = [d for d in docs if _is_val_doc(d, 0.3)]
    assert 0 < len(val_docs) < len(docs)
    tok = load_tokenizer(recipe.run.data, 512, data_cache)
    with stream(recipe, data_cache) as s:
        train_windows = {tuple(row.tolist()) for _ in range(40) for row in s.next_batch()}
    val_windows = set()
    for doc in val_docs:
        ids = tok(doc)["input_ids"]
        val_windows |= {tuple(ids[i:i + 32]) for i in range(0, len(ids) - 32)}
    assert train_windows and not train_windows & val_windows


@pytest.mark.parametrize("by_files", [False, True])
def test_hf_state_dict_resumes_exactly(jsonl_file, data_cache, monkeypatch, by_files):
    monkeypatch.setattr(data, "_DOCS_PER_ENCODE", 4)  # many small blocks: resumes land mid-stream
    files = [jsonl_file, jsonl_file] if by_files else [jsonl_file]
    recipe = hf_recipe(files, "run.data.batch_size=64", f"run.data.num_shards={2 if by_files else 4}")
    with stream(recipe, data_cache) as s:
        assert s._impl._by_files is by_files
        states, batches = [], []
        for _ in range(40):
            states.append(json.loads(json.dumps(s.state_dict())))
            batches.append(s.next_batch())
    assert any(st["ds"] is not None for st in states) and any(st["block"] > 0 for st in states)
    for k in (5, 23):
        with stream(recipe, data_cache) as resumed:
            resumed.load_state_dict(states[k])
            assert all(torch.equal(resumed.next_batch(), b) for b in batches[k:k + 8])


def test_c4_recipe_loader_on_local_json_files(c4_like_dir, tmp_path):
    # exactly the override of the recipe's header; the corpus is tiny, so every batch of 512 x 1024
    # tokens spans many passes over this peer's shard (1/64 of ~2k documents)
    recipe = load_recipe("c4-150m", ["run.data.path=json",
                                     f"run.data.data_files=[\"{c4_like_dir}/c4-train.*.json.gz\"]"])
    cfg = recipe.run.data
    with TokenStream(cfg, recipe.run.model.vocab_size, tmp_path / "cache", "peer-a", recipe.run.seed) as s:
        batch = s.next_batch()
        assert batch.shape == (cfg.batch_size, 1024) and int(batch.max()) < 32000
        assert s.val_batches()[0].shape == (cfg.batch_size, 1024)
