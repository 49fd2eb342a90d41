"""Fixtures shared by every test folder."""

from pathlib import Path

import pytest

TEST_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "test.toml")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Tokenizer and tokenized corpus of the test recipe, prepared once for all peers."""
    from p2pdiloco import data
    from p2pdiloco.config import load_recipe

    cache = tmp_path_factory.mktemp("p2pdiloco-cache")
    recipe = load_recipe(TEST_CONFIG)
    data.prepare(recipe.run.data, recipe.run.model.vocab_size, cache)
    return cache
