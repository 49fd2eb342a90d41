"""``--peers`` values: multiaddrs, files of multiaddrs, and named bootstrap lists.

Each ``--peers`` value is one of:

- a multiaddr, ``/ip4/HOST/tcp/PORT/p2p/PEER_ID``;
- a file with one multiaddr per line (blank lines and ``#`` comments ignored): what
  ``p2pdiloco coordinator --addrs-file F`` writes, so ``join --peers coordinator.addrs`` works;
- a TOML file or the NAME of one: ``~/.config/p2pdiloco/peers/NAME.toml`` (or
  ``$P2PDILOCO_PEERS_DIR``) first, then the lists shipped in the package's ``peers/`` folder.

A bootstrap list (``peers/README.md`` documents it)::

    description = "what the run trains, who runs the coordinator"
    recipe = "c4-150m"          # the recipe its peers run (join uses it when no CONFIG is given)
    addrs = ["/ip4/203.0.113.5/tcp/31337/p2p/PEER_ID"]
    example = true              # a format example with documentation addresses: never dialed

Nothing here touches the network: the addresses are checked by
:func:`p2pdiloco.dht.validate_multiaddrs` afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Sequence

from p2pdiloco.errors import SwarmError

BUNDLED_DIR = Path(__file__).resolve().parent / "peers"
MULTIADDR_STARTS = ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr", "p2p")  # else "/..." is a file path


def user_dir() -> Path:
    """Where a volunteer keeps bootstrap lists of their own (searched before the bundled ones)."""
    if os.environ.get("P2PDILOCO_PEERS_DIR"):
        return Path(os.environ["P2PDILOCO_PEERS_DIR"]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser()
    return config_home / "p2pdiloco" / "peers"


@dataclasses.dataclass
class Bootstrap:
    """The multiaddrs that ``--peers`` values resolved to, and the recipe a named list expects."""

    addrs: list[str]
    recipe: str | None = None
    sources: list[str] = dataclasses.field(default_factory=list)  # the files read, for messages


def known_names() -> list[str]:
    """Names of the bootstrap lists ``--peers NAME`` can use (user's first, bundled after)."""
    names: set[str] = set()
    for folder in (user_dir(), BUNDLED_DIR):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.toml"))
    return sorted(names)


def _find(name: str) -> Path | None:
    for folder in (user_dir(), BUNDLED_DIR):
        path = folder / f"{name.removesuffix('.toml')}.toml"
        if path.is_file():
            return path
    return None


def read_list(path: Path) -> Bootstrap:
    """Read a TOML bootstrap list; raise :class:`SwarmError` naming the problem and the fix."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SwarmError(f"--peers {path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SwarmError(f"--peers {path}: not valid TOML ({e}): fix the file's syntax") from None
    unknown = sorted(set(data) - {"description", "recipe", "addrs", "example", "run"})
    if unknown:
        raise SwarmError(f"--peers {path}: unknown key '{unknown[0]}': use description, recipe, run, addrs, example")
    addrs = data.get("addrs")
    if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
        raise SwarmError(f"--peers {path}: 'addrs' must be a non-empty list of multiaddr strings")
    recipe = data.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise SwarmError(f"--peers {path}: 'recipe' must be a string (a bundled recipe name or a path)")
    if data.get("example", False) is not False:
        raise SwarmError(
            f"--peers {path.stem} is a format example with documentation addresses, not a live run: "
            f"pass a coordinator's multiaddr or its --addrs-file (no public run is listed yet)"
        )
    return Bootstrap(addrs=list(addrs), recipe=recipe, sources=[str(path)])


def read_addrs_file(path: Path) -> Bootstrap:
    """One multiaddr per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SwarmError(f"--peers {path}: cannot read it ({e})") from None
    addrs = [line.split("#", 1)[0].strip() for line in lines]
    addrs = [a for a in addrs if a]
    if not addrs:
        raise SwarmError(f"--peers {path}: the file lists no multiaddr: expected one /ip4/HOST/tcp/PORT/p2p/PEER_ID per line")
    return Bootstrap(addrs=addrs, sources=[str(path)])


def resolve(values: Sequence[str]) -> Bootstrap:
    """Expand every ``--peers`` value into multiaddrs (see the module docstring for the forms).

    The recipe is the one named by the lists given, if any (two lists naming different recipes
    are refused: they are different runs).
    """
    out = Bootstrap(addrs=[])
    for value in values:
        value = value.strip()
        if value.startswith("/") and value.split("/")[1] in MULTIADDR_STARTS and not Path(value).is_file():
            if value not in out.addrs:
                out.addrs.append(value)
            continue
        path = Path(value).expanduser()
        if path.is_file():
            found = read_list(path) if path.suffix == ".toml" else read_addrs_file(path)
        elif os.sep in value or (value.endswith((".toml", ".addrs", ".txt")) and not _find(value)):
            raise SwarmError(f"--peers {value}: no such file: give a multiaddr, a file of multiaddrs or a known name")
        else:
            listed = _find(value)
            if listed is None:
                names = ", ".join(known_names()) or "(none)"
                raise SwarmError(
                    f"--peers '{value}' is not a multiaddr, a file or a known bootstrap list: known lists: {names} "
                    f"(add your own as {user_dir()}/NAME.toml)"
                )
            found = read_list(listed)
        if found.recipe and out.recipe and found.recipe != out.recipe:
            raise SwarmError(f"--peers: the lists given expect different recipes ({out.recipe}, {found.recipe}): they are different runs")
        out.recipe = out.recipe or found.recipe
        out.addrs += [a for a in found.addrs if a not in out.addrs]
        out.sources += found.sources
    return out
