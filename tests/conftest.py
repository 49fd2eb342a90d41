"""Fixtures shared by every test folder, and the test tiers.

Every test belongs to exactly one tier, a marker given by its folder:

- ``unit``  (tests/unit): one process, seconds; a few run a short CLI subprocess or a DHT node.
- ``swarm`` (tests/swarm): real peers (DHT, averager, ``p2pd``) in separate processes on loopback.
- ``e2e``   (tests/e2e): the command line as a user runs it, and the benchmark smoke run.

``quick`` marks a few representative swarm and e2e tests. The README's ``pytest -q`` runs
``(unit or quick) and not slow`` (pyproject's addopts); ``.ci/run`` runs that, then every other
swarm and e2e test. ``slow`` tests run only when the ``-m`` expression names ``slow``.
Naming files or node ids (``pytest tests/swarm/test_faults.py``) without ``-m`` runs every test
they hold, whatever its tier (slow ones aside).
"""

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TEST_CONFIG = str(TESTS.parent / "configs" / "test.toml")

TIERS = ("unit", "swarm", "e2e")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Tokenizer and tokenized corpus of the test recipe, prepared once for all peers."""
    from p2pdiloco import corpus
    from p2pdiloco.config import load_recipe

    cache = tmp_path_factory.mktemp("p2pdiloco-cache")
    recipe = load_recipe(TEST_CONFIG)
    corpus.prepare(recipe.run.data, recipe.run.model.vocab_size, cache)
    return cache


def _default_markexpr(config) -> str | None:
    """The ``-m`` expression of pyproject's addopts (the README command's selection)."""
    args = config.getini("addopts")  # already split as a shell would
    for flag, value in zip(args, args[1:]):
        if flag == "-m":
            return value
    return None


def pytest_configure(config):
    # Paths or node ids named on the command line, without a -m of one's own: run what they name,
    # not only its quick tests (the default selection is for the whole suite).
    source = getattr(config, "args_source", None)
    if source is not None and source == pytest.Config.ArgsSource.ARGS:
        default = _default_markexpr(config)
        if default is not None and config.option.markexpr == default:
            config.option.markexpr = "not slow"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by markers: the tier markers must be on
def pytest_collection_modifyitems(config, items):
    untiered = []
    for item in items:
        own = [m.name for m in item.iter_markers() if m.name in TIERS]
        try:
            folder = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            folder = None
        tier = folder if folder in TIERS else None
        if tier is None or any(name != tier for name in own):
            untiered.append(f"{item.nodeid} (folder {folder!r}, markers {own})")
        else:
            item.add_marker(tier)
    if untiered:
        # CI runs the suite tier by tier: a test of no tier, or of two, would run never or twice.
        raise pytest.UsageError("tests outside the tiers (tests/unit, tests/swarm, tests/e2e, one tier "
                                "marker at most, the folder's): " + "; ".join(untiered))
    if "slow" not in (config.option.markexpr or ""):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
