"""`p2pdiloco export` and `sample` as a user runs them, on a checkpoint a real `join` saved.

The checkpoint file is copied alone into a fresh folder and exported with an empty tokenizer
cache: it must carry everything export needs. The export is then loaded with plain transformers,
offline, and compared with the p2pdiloco model built from the checkpoint's global parameters.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from p2pdiloco.simulate import _cli
from tests.conftest import TEST_CONFIG

pytestmark = pytest.mark.e2e  # a real peer (DHT, p2pd) saves the checkpoint

SENTENCE = "To be, or not to be: that is the question."


def _offline_env(tmp_path: Path) -> dict:
    empty_cache = tmp_path / "empty-cache"  # where a tokenizer would come from if the checkpoint lacked one
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", P2PDILOCO_CACHE=str(empty_cache))


def _run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """A CLI command in a session of its own; whatever it left running is killed with it."""
    proc = subprocess.Popen([*_cli(), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a peer's DHT process and p2pd must not outlive the test
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def checkpoint_copy(tmp_path_factory, data_cache) -> Path:
    """A peer's checkpoint after one epoch, as the lone checkpoint.pt of a new folder."""
    tmp = tmp_path_factory.mktemp("export")
    r = _run(["join", TEST_CONFIG, "--max-epochs", "1", "--checkpoint-dir", str(tmp / "peer"),
              "--set", f'peer.cache_dir="{data_cache}"'], dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    copy = tmp / "copied"
    copy.mkdir()
    shutil.copy(tmp / "peer" / "checkpoint.pt", copy / "checkpoint.pt")
    return copy


@pytest.fixture(scope="module")
def exported(checkpoint_copy, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("exported")
    out = tmp / "model"
    r = _run(["export", str(checkpoint_copy), str(out)], _offline_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip()
    assert line.startswith("exported the global model of epoch 1 of run 'test' (") and line.endswith(f"parameters) to {out}")
    assert not (tmp / "empty-cache").exists(), "export read the cache although the checkpoint carries the tokenizer"
    return out


def test_export_round_trips_through_transformers(exported, checkpoint_copy, data_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2pdiloco import corpus
    from p2pdiloco.config import RunConfig, load_recipe
    from p2pdiloco.model import build_model
    from p2pdiloco.outer import load_flat_parameters

    state = torch.load(checkpoint_copy / "checkpoint.pt", weights_only=True)
    run = RunConfig.model_validate(state["config"])  # the embedded config is the recipe's, exactly
    assert run == load_recipe(TEST_CONFIG).run and run.fingerprint() == state["fingerprint"] and state["epoch"] == 1
    ours = build_model(run.model).eval()
    probe = torch.arange(16)[None]
    with torch.no_grad():
        initial = ours(probe).logits
    load_flat_parameters(ours, state["params"])  # the global parameters of epoch 1

    theirs = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == SENTENCE
    cached = corpus.load_tokenizer(run.data, run.model.vocab_size, data_cache)
    assert ids[0].tolist() == cached(SENTENCE)["input_ids"]
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(ids).logits
        trained = theirs(probe).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(trained, initial), "the export holds the initial weights, not the global ones"


def test_sample_prints_text_from_the_checkpoint_and_from_its_export(exported, checkpoint_copy, tmp_path):
    env = _offline_env(tmp_path)
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "24", "--seed", "1", "--device", "cpu"]
    from_checkpoint = _run(["sample", str(checkpoint_copy / "checkpoint.pt"), *args], env)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-3000:]
    text = from_checkpoint.stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text.removeprefix("ROMEO:").strip()) > 0, text
    from_export = _run(["sample", str(exported), *args], env)
    assert from_export.returncode == 0, from_export.stderr[-3000:]
    assert from_export.stdout == from_checkpoint.stdout  # same weights, tokenizer and seed: same text


def test_export_errors_are_one_line_and_leave_files_alone(exported, checkpoint_copy, tmp_path):
    env = _offline_env(tmp_path)
    missing = _run(["export", str(tmp_path / "no-such-checkpoint"), str(tmp_path / "out")], env)
    assert missing.returncode == 6
    assert missing.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'no-such-checkpoint'} does not exist: give a checkpoint folder (join "
        "--checkpoint-dir, simulate's OUT/checkpoint, a coordinator's --backup-dir) or its checkpoint.pt"
    ]
    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    taken = _run(["export", str(checkpoint_copy), str(exported)], env)
    assert taken.returncode == 8
    assert taken.stderr.strip().splitlines() == [
        f"error: {exported} already holds a model: give a new folder, or pass --force to replace it"
    ]
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before
