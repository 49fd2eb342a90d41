"""Where a peer's epoch records go: a JSON-lines file, TensorBoard, Weights & Biases.

The peer builds one record (a flat dict) per event of its run: an outer step, a state download,
the start. :class:`Sinks` hands each record to every sink switched on:

``JsonlSink`` (``join --metrics-file F``)
    One JSON object per line, appended, the record as it is. Always available; ``simulate``
    and the tests read these files.
``TensorBoardSink`` (``peer.tensorboard_dir``; ``pip install 'p2pdiloco[tensorboard]'``)
    Event files under ``DIR/<run name>/<short peer id>``, so each peer is a run of its own in
    TensorBoard's run selector.
``WandbSink`` (``peer.wandb_project``; ``pip install 'p2pdiloco[wandb]'``)
    One Weights & Biases run per peer, named by its peer id and grouped by the run's name.
    wandb's own environment variables apply: ``WANDB_MODE=offline`` (files only, sync later
    with ``wandb sync``), ``WANDB_DIR``, ``WANDB_ENTITY``, ``WANDB_API_KEY``.

TensorBoard and wandb log the record's numbers (``int`` and ``float`` fields, under the
record's own key names) as scalars against the epoch; text and lists (the event name, the state
digest, the group's members) are left to the JSON-lines file. Their packages are imported only
when switched on: :func:`require_packages` checks that they are installed before the peer starts,
so a missing one is a one-line error instead of a crash after the first epoch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from p2pdiloco.errors import ConfigError

log = logging.getLogger("p2pdiloco")

# (config switch, module to import, pip extra): the optional sinks and what each needs
_EXTRAS = {"tensorboard_dir": ("tensorboard", "tensorboard"), "wandb_project": ("wandb", "wandb")}
# Record fields that are the axes of every scalar, not scalars themselves.
_AXES = ("epoch", "time")


class Sink(Protocol):
    """Receives every epoch record of one peer."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def numeric_fields(record: dict[str, Any]) -> dict[str, float | int]:
    """The record's numbers, axes (``epoch``, ``time``) excluded: what plotting sinks log.

    ``bool`` is an ``int`` in Python but a flag, not a measurement: left out like strings,
    lists and ``None`` (a value not measured this epoch, e.g. ``val_loss`` between evaluations).
    """
    return {
        key: value
        for key, value in record.items()
        if key not in _AXES and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _missing(switch: str) -> ConfigError:
    module, extra = _EXTRAS[switch]
    return ConfigError(
        f"peer.{switch} is set but the '{module}' package is not installed: "
        f"pip install 'p2pdiloco[{extra}]' (or unset peer.{switch})"
    )


def require_packages(peer_cfg) -> None:
    """Raise :class:`ConfigError` if a switched-on sink's package is not installed.

    Only looks the package up (no import: importing wandb or TensorBoard takes a second); a
    broken installation still fails with the same message when the sink opens.
    """
    for switch, (module, _extra) in _EXTRAS.items():
        if getattr(peer_cfg, switch) and importlib.util.find_spec(module) is None:
            raise _missing(switch)


class JsonlSink:
    """Appends each record as one JSON object per line to ``path``.

    The file is opened for each record: records are rare (one per epoch), and a reader tailing
    the file (``simulate``'s progress, a test) sees each complete line as soon as it is written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars per record in a TensorBoard event file, at ``global_step = epoch``."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard_dir") from None
        self.log_dir = Path(log_dir).expanduser()
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict[str, Any]) -> None:
        for key, value in numeric_fields(record).items():
            self.writer.add_scalar(key, value, global_step=record["epoch"], walltime=record.get("time"))
        self.writer.flush()  # one record per epoch: cheap, and the file is current if the peer is killed

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One wandb run per peer; every scalar is plotted against ``epoch``.

    ``epoch`` is declared wandb's x-axis (``define_metric``) rather than passed as ``step=``:
    wandb drops a row whose step is not above the last one, and a peer can log two records at
    one epoch (a state download, then the outer step).
    """

    def __init__(self, project: str, *, name: str, group: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb_project") from None
        try:
            # console="off": wandb must not wrap stderr, which the live console view owns.
            self.run = wandb.init(project=project, name=name, group=group, config=config, job_type="peer",
                                  settings=wandb.Settings(console="off"))
        except Exception as e:
            raise ConfigError(
                f"wandb could not start a run in project '{project}' ({e}): run `wandb login`, "
                "or set WANDB_MODE=offline to keep the run in files"
            ) from None
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(dict(numeric_fields(record), epoch=record["epoch"]))

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """Every sink of one peer. A sink that fails is dropped with a warning: losing a plot must
    never stop a peer that the rest of the swarm is averaging with."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def write(self, record: dict[str, Any]) -> None:
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as e:
                log.warning("metrics: %s failed (%r); no more records go there", type(sink).__name__, e)
                self.sinks.remove(sink)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []  # idempotent: a second close does nothing
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:
                log.debug("metrics: closing %s: %r", type(sink).__name__, e)


def open_sinks(peer_cfg, metrics_file: str | Path | None, *, run_name: str, peer_id: str,
               config: dict[str, Any] | None = None) -> Sinks:
    """The sinks switched on by ``--metrics-file`` and ``peer_cfg`` (a :class:`PeerConfig`).

    ``config`` (the run config, with whatever else identifies the peer) goes to wandb's run
    config, so runs can be filtered by it.
    """
    require_packages(peer_cfg)
    short_id = peer_id[-6:]  # as the log lines name peers
    sinks: list[Sink] = []
    try:
        if metrics_file:
            sinks.append(JsonlSink(metrics_file))
        if peer_cfg.tensorboard_dir:
            sinks.append(TensorBoardSink(Path(peer_cfg.tensorboard_dir).expanduser() / run_name / short_id))
        if peer_cfg.wandb_project:
            sinks.append(WandbSink(peer_cfg.wandb_project, name=short_id, group=run_name,
                                   config=dict(config or {}, peer_id=peer_id)))
    except BaseException:
        Sinks(sinks).close()  # a TensorBoard writer opened before wandb failed
        raise
    return Sinks(sinks)
