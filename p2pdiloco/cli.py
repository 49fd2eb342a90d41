"""The ``p2pdiloco`` command line. Heavy imports (torch, hivemind) happen inside the commands,
so ``p2pdiloco --help`` answers at once."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from p2pdiloco import __version__
from p2pdiloco.errors import P2PDilocoError

app = typer.Typer(
    name="p2pdiloco",
    help="Train one language model together over the internet: DiLoCo over a hivemind swarm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Override a config field, e.g. --set run.inner_steps=20 (repeatable)."
PEERS_HELP = (
    "A peer of the run (a coordinator, another peer, or a hivemind-dht node): its multiaddr, a file of multiaddrs "
    "(a coordinator's --addrs-file), or the NAME of a bootstrap list (peers/README.md); repeatable."
)
SECRET_HELP = (
    "A closed run's secret: a file holding it (default: $P2PDILOCO_RUN_SECRET). Never pass the secret itself "
    "on the command line; see docs/security.md."
)
NAT_HELP = (
    "auto (default), public, client, relay or local: how this peer takes part behind NAT (peer.nat; see peers/README.md)."
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _fail(err: P2PDilocoError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def _resolve_peers(values: list[str], config: Optional[str] = None) -> tuple[list[str], Optional[str]]:
    """``--peers`` values as multiaddrs; with no CONFIG, the recipe a named bootstrap list expects."""
    from p2pdiloco import bootstrap

    found = bootstrap.resolve(values)
    if config is None and found.recipe:
        logging.getLogger("p2pdiloco").info("recipe %s, as the bootstrap list %s expects", found.recipe, found.sources[0])
        config = found.recipe
    return found.addrs, config


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


@app.command()
def coordinator(
    port: int = typer.Option(0, help="TCP port to listen on (fix it so others can dial the same address)."),
    host: str = typer.Option("127.0.0.1", help="Listen address: 0.0.0.0 for peers on other machines."),
    public_host: Optional[str] = typer.Option(None, help="Address other peers should dial (behind NAT/Docker)."),
    identity: Optional[Path] = typer.Option(None, help="Private key file for a stable peer id (created if absent)."),
    addrs_file: Optional[Path] = typer.Option(None, help="Write this node's multiaddrs here, one per line."),
    startup_timeout: float = typer.Option(30.0, help="Seconds to wait for the DHT to start."),
    backup: Optional[str] = typer.Option(
        None, help="Keep a copy of this run's state (a recipe), so the run survives every volunteer leaving."
    ),
    backup_dir: Path = typer.Option(Path("p2pdiloco-backup"), help="Folder for the --backup copy (reloaded on restart)."),
    backup_every: int = typer.Option(1, min=1, help="Refresh the --backup copy every N epochs of the swarm."),
    set_: list[str] = typer.Option([], "--set", help="Override a field of the --backup recipe (repeatable)."),
    dashboard_port: Optional[int] = typer.Option(
        None, min=0, max=65535, help="Serve the web dashboard on this port (off by default; 0 = any free port)."
    ),
    dashboard_host: str = typer.Option(
        "127.0.0.1", help="Listen address of the dashboard: loopback unless you mean to publish it (read-only)."
    ),
    dashboard_refresh: float = typer.Option(5.0, min=0.5, help="Seconds between the dashboard's reads of the DHT."),
    secret_file: Optional[Path] = typer.Option(None, help=SECRET_HELP),
    log_level: str = typer.Option("info", envvar="P2PDILOCO_LOG_LEVEL"),
) -> None:
    """Run a long-lived bootstrap peer: a stable address for volunteers to join through. Ctrl+C stops it."""
    _setup_logging(log_level)
    from p2pdiloco.auth import load_secret
    from p2pdiloco.coordinator import run_coordinator

    try:
        secret = load_secret(secret_file)
        keep = None
        if backup:
            from p2pdiloco.config import load_recipe

            keep = (load_recipe(backup, list(set_)), backup_dir, backup_every)
        run_coordinator(
            host=host, port=port, public_host=public_host, identity=identity, addrs_file=addrs_file,
            timeout=startup_timeout, backup=keep,
            dashboard=None if dashboard_port is None else (dashboard_host, dashboard_port, dashboard_refresh),
            secret=secret,
        )
    except P2PDilocoError as e:
        _fail(e)


@app.command()
def join(
    config: Optional[str] = typer.Argument(None, help="Recipe: a TOML file or a bundled name (default: tiny-cpu)."),
    peers: list[str] = typer.Option([], "--peers", help=PEERS_HELP),
    max_epochs: Optional[int] = typer.Option(None, help="Leave after the swarm reaches this epoch."),
    metrics_file: Optional[Path] = typer.Option(None, help="Append one JSON object per completed epoch here."),
    export: Optional[Path] = typer.Option(None, help="On exit, save the global model here (save_pretrained)."),
    port: Optional[int] = typer.Option(None, help="TCP port (peer.port); 0 = any free port."),
    host: Optional[str] = typer.Option(None, help="Listen address (peer.host); 0.0.0.0 to accept remote peers."),
    public_host: Optional[str] = typer.Option(None, help="Address others should dial (peer.public_host)."),
    nat: Optional[str] = typer.Option(None, help=NAT_HELP),
    identity: Optional[Path] = typer.Option(None, help="Private key file for a stable peer id (peer.identity)."),
    checkpoint_dir: Optional[Path] = typer.Option(
        None, help="Checkpoint here every epoch and on exit; resume from it on restart (peer.checkpoint_dir)."
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    secret_file: Optional[Path] = typer.Option(None, help=SECRET_HELP),
    log_level: str = typer.Option("info", envvar="P2PDILOCO_LOG_LEVEL"),
) -> None:
    """Become a peer of the run described by CONFIG: find the swarm, catch up, train, average."""
    from p2pdiloco import supervise

    if supervise.needed():  # in a terminal: Ctrl+C must reach only the peer's main process
        raise typer.Exit(supervise.run_supervised(sys.argv[1:]))
    _setup_logging(log_level)
    from p2pdiloco.config import load_recipe

    overrides = list(set_)
    flags = (("port", port), ("host", host), ("public_host", public_host), ("nat", nat), ("identity", identity),
             ("checkpoint_dir", checkpoint_dir))
    for key, value in flags:
        if value is not None:
            overrides.append(f"peer.{key}={value!s}" if key == "port" else f'peer.{key}="{value!s}"')
    try:
        peers, config = _resolve_peers(peers, config)
        recipe = load_recipe(config, overrides)
        if not peers:
            logging.getLogger("p2pdiloco").info("no --peers given: starting a new run '%s' alone", recipe.run.name)
        from p2pdiloco.peer import run_peer

        run_peer(
            recipe,
            initial_peers=peers,
            max_epochs=max_epochs,
            metrics_file=str(metrics_file) if metrics_file else None,
            export_dir=str(export) if export else None,
            secret_file=str(secret_file) if secret_file else None,
        )
    except P2PDilocoError as e:
        _fail(e)


@app.command()
def simulate(
    config: Optional[str] = typer.Argument(None, help="Recipe (default: tiny-cpu)."),
    peers: int = typer.Option(2, "--peers", min=1, help="Number of peer processes."),
    epochs: int = typer.Option(5, min=1, help="Epochs (outer steps) to train."),
    out: Path = typer.Option(Path("runs/simulate"), help="Folder for metrics, logs, summary.json and the plot."),
    timeout: Optional[float] = typer.Option(None, help="Give up after this many seconds (default: sized from the recipe)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    speeds: Optional[str] = typer.Option(
        None, help="EMULATION: each peer's speed as a fraction of this machine's, e.g. 1,0.5,0.25 (peers sleep "
        "after each step; sets peer.emulate_speed)."
    ),
    dashboard_port: Optional[int] = typer.Option(
        None, min=1, max=65535, help="Serve the coordinator's web dashboard on this port of 127.0.0.1 while it runs."
    ),
) -> None:
    """Start a coordinator and N peers on this machine, train, and summarize (the main job)."""
    _setup_logging("warning")
    from p2pdiloco.simulate import parse_speeds, run_simulation

    try:
        summary = run_simulation(config, overrides=list(set_), num_peers=peers, epochs=epochs, out=out, timeout=timeout,
                                 speeds=parse_speeds(speeds, peers), dashboard_port=dashboard_port)
    except P2PDilocoError as e:
        _fail(e)
    if not summary["consistent"] or summary["epochs_completed"] < epochs:
        raise typer.Exit(1)


CHECKPOINT_HELP = "A checkpoint: a folder saved by join --checkpoint-dir (simulate: OUT/checkpoint) or its checkpoint.pt."
OLD_CONFIG_HELP = "Only for checkpoints that carry no run config (older ones): the recipe they were trained with."
CACHE_HELP = "Tokenizer cache, for checkpoints that carry no tokenizer (default: $P2PDILOCO_CACHE or ~/.cache/p2pdiloco)."


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr say nothing here
    hf_logging.set_verbosity_error()


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help=CHECKPOINT_HELP),
    outdir: Path = typer.Argument(..., help="Write the Hugging Face model folder here (new or empty)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTDIR if it holds an earlier export."),
    config: Optional[str] = typer.Option(None, help=OLD_CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help="With --config: its overrides the run was trained with."),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
) -> None:
    """Save a checkpoint's global model as a Hugging Face folder (weights, config, tokenizer) that
    AutoModelForCausalLM and AutoTokenizer load offline."""
    _setup_logging("warning")
    try:
        _quiet_transformers()
        from p2pdiloco.export import export_checkpoint

        done = export_checkpoint(checkpoint, outdir, force=force, cache_dir=cache_dir, recipe=config, overrides=list(set_))
    except P2PDilocoError as e:
        _fail(e)
    typer.echo(f"exported the global model of epoch {done['epoch']} of run '{done['run'] or '?'}' "
               f"({done['parameters']:,} parameters) to {done['outdir']}")


@app.command()
def sample(
    model: Path = typer.Argument(..., help=CHECKPOINT_HELP[:-1] + ", or a folder written by export."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Text to continue (repeatable; none = from scratch)."),
    max_new_tokens: int = typer.Option(100, min=1, help="Tokens to generate per prompt (at most up to the context)."),
    # the defaults of export.TEMPERATURE and TOP_K, restated: importing that module here would load torch
    temperature: float = typer.Option(0.8, min=0.0, help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(50, min=0, help="Sample among the K likeliest tokens; 0 = all."),
    seed: int = typer.Option(0, help="Random seed: the same seed and prompts give the same text."),
    device: str = typer.Option("auto", help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N."),
    config: Optional[str] = typer.Option(None, help=OLD_CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help="With --config: its overrides the run was trained with."),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_HELP),
) -> None:
    """Print text generated by a checkpoint's global model (or an exported one), one sample per prompt."""
    _setup_logging("warning")
    try:
        _quiet_transformers()
        from p2pdiloco.export import generate, load_for_sampling, resolve_device

        lm, tokenizer = load_for_sampling(model, device=resolve_device(device), cache_dir=cache_dir, recipe=config,
                                          overrides=list(set_))
        texts = generate(lm, tokenizer, list(prompt) or [""], max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, seed=seed)
    except P2PDilocoError as e:
        _fail(e)
    typer.echo(("\n" + "-" * 40 + "\n").join(texts))  # samples contain blank lines: a rule tells them apart


@app.command()
def status(
    peers: list[str] = typer.Option(..., "--peers", help=PEERS_HELP),
    run: Optional[str] = typer.Option(None, help="Only this run (default: every run the DHT knows)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    timeout: float = typer.Option(15.0, help="Seconds to wait for the DHT."),
    secret_file: Optional[Path] = typer.Option(None, help=SECRET_HELP),
) -> None:
    """Print the runs' peers, their epochs and throughput, read from the DHT."""
    _setup_logging("warning")
    from p2pdiloco.auth import load_secret
    from p2pdiloco.coordinator import print_status

    try:
        print_status(_resolve_peers(peers)[0], run=run, as_json=as_json, timeout=timeout, secret=load_secret(secret_file))
    except P2PDilocoError as e:
        _fail(e)


@app.command()
def doctor(
    config: Optional[str] = typer.Argument(None, help="Recipe to check this machine for (default: tiny-cpu)."),
    peers: list[str] = typer.Option([], "--peers", help=PEERS_HELP + " Also checks that they answer and can dial you back."),
    port: Optional[int] = typer.Option(None, help="The TCP port you will join with (peer.port)."),
    host: Optional[str] = typer.Option(None, help="The listen address you will join with (peer.host)."),
    public_host: Optional[str] = typer.Option(None, help="The address you will announce (peer.public_host)."),
    nat: Optional[str] = typer.Option(None, help=NAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    timeout: float = typer.Option(15.0, min=1.0, help="Seconds for each network check."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check this machine for a recipe (Python, torch/CUDA, bitsandbytes, numpy, hivemind, RAM, disk,
    port; with --peers, the network) and say what to fix. Exits non-zero if a check fails."""
    _setup_logging("error")
    from p2pdiloco.config import load_recipe

    overrides = list(set_)
    for key, value in (("port", port), ("host", host), ("public_host", public_host), ("nat", nat)):
        if value is not None:
            overrides.append(f"peer.{key}={value!s}" if key == "port" else f'peer.{key}="{value!s}"')
    try:
        addrs, config = _resolve_peers(peers, config)
        recipe = load_recipe(config, overrides)
        if addrs:
            from p2pdiloco.dht import validate_multiaddrs

            addrs = validate_multiaddrs(addrs)
    except P2PDilocoError as e:
        _fail(e)
    from p2pdiloco import doctor as checks

    found = checks.run_checks(recipe, peers=addrs, timeout=timeout)
    checks.report(found, as_json)
    if any(c.status == checks.FAIL for c in found):
        raise typer.Exit(1)


def main() -> None:
    # hivemind's averager and DHT are forked processes; keep "fork" even where Python's default changes.
    os.environ.setdefault("HIVEMIND_COLORS", "0")
    app()
