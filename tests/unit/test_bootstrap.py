"""``--peers`` values: multiaddrs, files of multiaddrs (a coordinator's --addrs-file) and named lists."""

import subprocess
import sys

import pytest

from p2pdiloco import bootstrap
from p2pdiloco.errors import SwarmError

ADDR = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWBmwkafWE2fqfzS96VoTZhvcXJaT1PJ4wrnLTzPPqGqGu"
OTHER = "/ip4/127.0.0.1/tcp/31338/p2p/12D3KooWBmwkafWE2fqfzS96VoTZhvcXJaT1PJ4wrnLTzPPqGqGu"


@pytest.fixture(autouse=True)
def user_peers(tmp_path, monkeypatch):
    folder = tmp_path / "user-peers"
    folder.mkdir()
    monkeypatch.setenv("P2PDILOCO_PEERS_DIR", str(folder))
    return folder


def test_multiaddrs_pass_through_in_order_without_duplicates():
    assert bootstrap.resolve([ADDR, OTHER, ADDR]).addrs == [ADDR, OTHER]


def test_addrs_file_one_per_line_with_comments(tmp_path):
    f = tmp_path / "coordinator.addrs"
    f.write_text(f"# written by p2pdiloco coordinator --addrs-file\n{ADDR}\n\n{OTHER}  # the second\n")
    found = bootstrap.resolve([str(f)])
    assert found.addrs == [ADDR, OTHER] and found.recipe is None and found.sources == [str(f)]


def test_empty_addrs_file_is_refused(tmp_path):
    f = tmp_path / "empty.addrs"
    f.write_text("# nothing yet\n")
    with pytest.raises(SwarmError, match="lists no multiaddr"):
        bootstrap.resolve([str(f)])


def test_named_list_from_the_user_folder_with_its_recipe(user_peers):
    (user_peers / "myrun.toml").write_text(f'description = "mine"\nrecipe = "test"\naddrs = ["{ADDR}"]\n')
    found = bootstrap.resolve(["myrun"])
    assert found.addrs == [ADDR] and found.recipe == "test"
    assert "myrun" in bootstrap.known_names()


def test_user_list_shadows_a_bundled_one(user_peers):
    (user_peers / "example.toml").write_text(f'addrs = ["{ADDR}"]\n')
    assert bootstrap.resolve(["example"]).addrs == [ADDR]


def test_the_bundled_example_documents_the_format_and_is_refused():
    text = (bootstrap.BUNDLED_DIR / "example.toml").read_text()
    assert "203.0.113." in text and "example = true" in text  # a documentation address (RFC 5737), marked
    with pytest.raises(SwarmError, match="format example"):
        bootstrap.resolve(["example"])


def test_bundled_lists_use_only_documentation_addresses():
    """No invented live addresses ship with the package: every bundled list is a marked example
    on RFC 5737 documentation ranges, until a real public run exists."""
    import tomllib

    for path in bootstrap.BUNDLED_DIR.glob("*.toml"):
        data = tomllib.loads(path.read_text())
        if data.get("example"):
            for addr in data["addrs"]:
                assert addr.split("/")[2].startswith(("192.0.2.", "198.51.100.", "203.0.113.")), (path, addr)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(SwarmError) as e:
        bootstrap.resolve(["no-such-run"])
    assert "known lists: example" in str(e.value) and "NAME.toml" in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SwarmError, match="no such file"):
        bootstrap.resolve([str(tmp_path / "gone.addrs")])


@pytest.mark.parametrize("content,problem", [
    ("addrs = [", "not valid TOML"),
    ("addrs = []", "non-empty list"),
    ('addrs = ["x"]\nbogus = 1', "unknown key 'bogus'"),
    ('addrs = ["x"]\nrecipe = 3', "'recipe' must be a string"),
])
def test_malformed_lists_name_the_problem(tmp_path, content, problem):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(SwarmError, match=problem):
        bootstrap.resolve([str(f)])


def test_lists_of_different_recipes_are_different_runs(user_peers):
    (user_peers / "a.toml").write_text(f'recipe = "test"\naddrs = ["{ADDR}"]\n')
    (user_peers / "b.toml").write_text(f'recipe = "tiny-cpu"\naddrs = ["{OTHER}"]\n')
    with pytest.raises(SwarmError, match="different recipes"):
        bootstrap.resolve(["a", "b"])


def test_cli_unknown_name_is_one_line(user_peers):
    r = subprocess.run([sys.executable, "-m", "p2pdiloco", "status", "--peers", "no-such-run"], capture_output=True, text=True)
    assert r.returncode == 4
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "known lists: example" in r.stderr


def test_bundled_folder_ships_the_launch_recipes():
    recipes = bootstrap.BUNDLED_DIR / "recipes"
    assert {"coordinator.service", "volunteer.sh", "cloud-docker.sh"} <= {p.name for p in recipes.iterdir()}
    for script in ("volunteer.sh", "cloud-docker.sh"):
        subprocess.run(["bash", "-n", str(recipes / script)], check=True)  # valid shell syntax


def test_join_without_config_takes_the_recipe_of_the_named_list(user_peers):
    from p2pdiloco.cli import _resolve_peers

    (user_peers / "myrun.toml").write_text(f'recipe = "test"\naddrs = ["{ADDR}"]\n')
    assert _resolve_peers(["myrun"]) == ([ADDR], "test")
    assert _resolve_peers(["myrun"], "tiny-cpu") == ([ADDR], "tiny-cpu")  # an explicit CONFIG wins
