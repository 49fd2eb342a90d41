"""export.py on checkpoints built in-process: what it accepts, what it refuses, and how it writes.

The real path (a `join` that saves a checkpoint, `p2pdiloco export` and `sample` as subprocesses,
loading with plain transformers) is in tests/e2e/test_export.py.
"""

from __future__ import annotations

import pytest
import torch

from p2pdiloco import checkpoint, corpus, export
from p2pdiloco.config import RunConfig
from p2pdiloco.errors import CheckpointError, ConfigError, ExportError
from p2pdiloco.model import build_model
from p2pdiloco.outer import OuterState, flatten_parameters


@pytest.fixture(scope="module")
def saved_state(test_recipe, data_cache) -> dict:
    """What Peer.save_checkpoint writes, for the test recipe after one (made-up) outer step."""
    run = test_recipe.run
    outer = OuterState.for_run(flatten_parameters(build_model(run.model)), run)
    outer.step(torch.full((outer.size,), 1e-3))  # the global parameters now differ from the init
    folder = corpus.prepare(run.data, run.model.vocab_size, data_cache) / corpus.TOKENIZER_DIR
    return dict(fingerprint=run.fingerprint(), inner=None, data=None, config=run.canonical(),
                tokenizer=checkpoint.tokenizer_files(folder), **outer.checkpoint_fields())


def _save(tmp_path, state, name="ck"):
    checkpoint.save(tmp_path / name, state)
    return tmp_path / name


def test_the_saved_run_config_round_trips_through_pydantic(test_recipe):
    run = test_recipe.run
    again = RunConfig.model_validate(run.canonical())
    assert again == run and again.fingerprint() == run.fingerprint()


def test_a_checkpoint_exports_its_global_parameters_and_tokenizer(tmp_path, saved_state, data_cache, test_recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = _save(tmp_path, saved_state)
    done = export.export_checkpoint(ck / checkpoint.FILENAME, tmp_path / "out", cache_dir=tmp_path / "no-cache")
    assert done["epoch"] == 1 and done["run"] == "test"
    assert not (tmp_path / "no-cache").exists(), "the tokenizer must come from the checkpoint, not the cache"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert torch.equal(flatten_parameters(model), saved_state["params"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    ids = tokenizer("Shall I compare thee")["input_ids"]
    cached = corpus.load_tokenizer(test_recipe.run.data, test_recipe.run.model.vocab_size, data_cache)
    assert ids and ids == cached("Shall I compare thee")["input_ids"] and tokenizer.decode(ids) == "Shall I compare thee"
    assert model.config.use_cache and model.generation_config.do_sample and model.config.eos_token_id == tokenizer.eos_token_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"], "a temporary folder was left behind"


def test_an_older_checkpoint_needs_its_recipe_and_the_cache(tmp_path, saved_state, data_cache):
    old = {k: v for k, v in saved_state.items() if k not in ("config", "tokenizer")}
    ck = _save(tmp_path, old)
    with pytest.raises(CheckpointError, match="carries no run config.*pass --config"):
        export.read_checkpoint(ck)
    with pytest.raises(ConfigError, match="is not the run config of checkpoint"):
        export.read_checkpoint(ck, "test", ["run.outer_lr=0.5"])
    export.export_checkpoint(ck, tmp_path / "out", recipe="test", cache_dir=data_cache)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()


def test_missing_foreign_corrupt_and_damaged_checkpoints_are_refused(tmp_path, saved_state):
    with pytest.raises(CheckpointError, match="does not exist"):
        export.read_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint.pt"):
        export.read_checkpoint(tmp_path / "empty")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a p2pdiloco checkpoint"):
        export.read_checkpoint(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        export.read_checkpoint(tmp_path / "garbage.pt")
    damaged = dict(saved_state, params=saved_state["params"] + 1)
    with pytest.raises(CheckpointError, match="does not match its digest"):
        export.read_checkpoint(_save(tmp_path, damaged, "damaged"))


def test_an_outdir_is_replaced_only_when_it_holds_an_earlier_export(tmp_path, saved_state):
    ck = _save(tmp_path, saved_state)
    out = tmp_path / "out"
    export.export_checkpoint(ck, out)
    with pytest.raises(ExportError, match="already holds a model.*--force"):
        export.export_checkpoint(ck, out)
    (out / "note.txt").write_text("mine")
    export.export_checkpoint(ck, out, force=True)
    assert not (out / "note.txt").exists() and (out / "config.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not empty and holds no earlier model export"):
        export.export_checkpoint(ck, other, force=True)
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ExportError, match="is a file"):
        export.check_outdir(tmp_path / "a-file", force=True)
    export.check_outdir(tmp_path / "empty-or-new", force=False)


def test_a_checkpoint_and_its_export_sample_the_same_text(tmp_path, saved_state):
    ck = _save(tmp_path, saved_state)
    export.export_checkpoint(ck, tmp_path / "out")
    cpu = export.resolve_device("cpu")
    texts = []
    for source in (ck, tmp_path / "out"):
        model, tokenizer = export.load_for_sampling(source, device=cpu)
        texts.append(export.generate(model, tokenizer, ["ROMEO:", ""], max_new_tokens=8, seed=3))
    assert texts[0] == texts[1]
    assert texts[0][0].startswith("ROMEO:")
    greedy = export.generate(model, tokenizer, ["ROMEO:"], max_new_tokens=500, temperature=0)  # capped at the context
    assert len(tokenizer(greedy[0])["input_ids"]) <= model.config.max_position_embeddings
    with pytest.raises(ExportError, match="shorten it"):
        export.generate(model, tokenizer, ["word " * 200], max_new_tokens=1)
    with pytest.raises(ExportError, match="is not a device"):
        export.resolve_device("toaster")
