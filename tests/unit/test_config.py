from pathlib import Path

import pytest

from p2pdiloco.config import CONFIGS_DIR, diff_keys, load_recipe
from p2pdiloco.errors import ConfigError

ROOT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(ROOT_CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    recipe = load_recipe(str(path))
    assert len(recipe.run.fingerprint()) == 16


def test_bundled_configs_are_the_repository_configs():
    assert sorted(p.name for p in CONFIGS_DIR.glob("*.toml")) == sorted(p.name for p in ROOT_CONFIGS.glob("*.toml"))
    assert {"tiny-cpu.toml", "test.toml"} <= {p.name for p in ROOT_CONFIGS.glob("*.toml")}


def test_default_recipe_is_tiny_cpu():
    assert load_recipe(None).run.name == "tiny-shakespeare"


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\ninner_stepz = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'run.inner_stepz'"):
        load_recipe(str(bad))


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match="run.outer_lr"):
        load_recipe("test", ["run.outer_lr=-1"])
    with pytest.raises(ConfigError, match="run.compression"):
        load_recipe("test", ["run.compression=zip"])


def test_malformed_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(str(tmp_path / "missing.toml"))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="min_group_size"):
        load_recipe("test", ["run.min_group_size=8", "run.target_group_size=4"])
    with pytest.raises(ConfigError, match="request_s"):
        load_recipe("test", ["run.averaging.request_s=5"])


def test_overrides_are_typed_and_bad_keys_rejected():
    recipe = load_recipe("test", ["run.inner_steps=20", "run.compression=blockwise8", "peer.port=31337"])
    assert recipe.run.inner_steps == 20 and recipe.run.compression == "blockwise8" and recipe.peer.port == 31337
    with pytest.raises(ConfigError, match="must start with"):
        load_recipe("test", ["inner_steps=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe("test", ["run.inner_steps"])


def test_fingerprint_is_stable_and_ignores_peer_choices():
    a = load_recipe("test")
    b = load_recipe("test", ["peer.port=4000", "peer.threads=2", "peer.devices=cpu"])
    assert a.run.fingerprint() == b.run.fingerprint() == load_recipe("test").run.fingerprint()
    c = load_recipe("test", ["run.outer_lr=0.5"])
    assert c.run.fingerprint() != a.run.fingerprint()
    assert diff_keys(c.run.canonical(), a.run.canonical()) == ["run.outer_lr: ours=0.5 swarm=0.7"]


def test_config_reference_doc_is_up_to_date():
    from p2pdiloco.config import reference_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == reference_markdown(), "regenerate: python -m p2pdiloco.config > docs/config.md"
