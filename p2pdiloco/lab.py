"""The lab: many simulated workers in one process, in turn, on a virtual clock.

Reproducing a paper's table needs many arms and seeds; on two CPU cores real multi-process runs
compete for the same cores and cannot show wall-clock effects. The lab runs ``k`` workers one
after the other in one process (each with its own model copy, AdamW state and data shard) and keeps
time on a **virtual clock**: each worker takes ``step_s[w]`` virtual seconds per inner step and a
round costs ``latency_s + bytes / bandwidth``. The Asynchronous Local-SGD paper measured its
results the same way (a deterministic simulation with faked device times).

Everything that decides the numbers is the real peers' code, not a re-implementation:

- the model (:func:`p2pdiloco.model.build_model`), data shards (:class:`p2pdiloco.data.TokenStream`),
  inner AdamW and its schedule (:class:`p2pdiloco.inner.InnerOptimizer`);
- the outer optimizers and epoch-keyed state (:class:`p2pdiloco.outer.OuterState`: nesterov,
  delayed_nesterov, sgd, slowmo), the DyLU rule (:func:`p2pdiloco.pace.dylu_steps`);
- the codecs (:func:`p2pdiloco.codecs.make_codec`) on both legs of the all-reduce, as
  :mod:`p2pdiloco.averaging` does: the reducer of a slice averages its own part in fp32 with the
  decoded parts of the others, weighted by tokens, and encodes the average **once**
  (:func:`reduce`); with a robust ``run.aggregation`` it combines them with the reducers' own
  :func:`p2pdiloco.robust.aggregate`, part by part.

Hostile peers (``LabArm.hostile``) train like the others but send what the swarm tests' faults
send (``send:scale``, ``send:random``), so the lab can show what robust aggregation costs and buys.

Modes (:class:`LabArm`):

``single``
    One worker, no communication (DiLoCo's "1 worker" baseline).
``sync``
    Lock-step DiLoCo: every worker runs ``H`` (or its DyLU share of ``H``) steps from the same
    ``theta_e``; the round averages all of them; one outer step.
``async``
    The async paper's Algorithm 2 with a grace period: a worker that finishes waits at most
    ``grace_s`` virtual seconds for others to finish; that group's average is one outer step with
    ``contributions = len(group)`` (``delayed_nesterov`` counts them); its members restart from
    the new state, the others keep training from the (now stale) state they pulled, and their
    pseudo-gradient is measured against the exact base they started from. ``grace_s = 0`` with
    ``nesterov`` is naive asynchronous DiLoCo: every arrival is its own outer step.

The budget of every arm is the same number of worker steps (tokens): ``steps`` per worker.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from pathlib import Path
from typing import Callable, Literal

import torch

from p2pdiloco import data, faults, inner, model, pace, robust
from p2pdiloco.codecs import Codec, make_codec
from p2pdiloco.config import AggregationConfig, Recipe, load_recipe
from p2pdiloco.outer import OuterState, flatten_parameters, load_flat_parameters

# Speed profiles, in virtual seconds per inner step of each worker. "notebook" is the official
# async Local-SGD notebook's 4 devices (a 5.7x spread).
SPEED_PROFILES = {
    "homogeneous": [1.0, 1.0, 1.0, 1.0],
    "notebook": [0.58, 0.75, 1.51, 3.33],
}

# hivemind's DEFAULT_PART_SIZE_BYTES, which the averager keeps: a reducer's slice reaches it in
# parts of this many bytes after compression, and a robust rule runs on each part on its own.
PART_SIZE_BYTES = 2**19


@dataclasses.dataclass(frozen=True)
class LabArm:
    """One arm of an experiment.

    Attributes:
        name: the arm's name in reports.
        mode: ``single``, ``sync`` or ``async`` (see the module docstring).
        overrides: ``--set`` overrides of the recipe's ``[run]`` (inner_steps, outer_optimizer,
            compression, ...), exactly as a real peer would take them.
        workers: simulated peers ``k`` (``single`` uses 1).
        steps: inner steps per worker: the token budget is ``workers * steps`` batches.
        speeds: virtual seconds per step of each worker (a profile name of ``SPEED_PROFILES`` or a list).
        grace_s: ``async``: how long (virtual s) the first finisher of a round waits for others.
        dylu: run ``floor(H * v / v_fastest)`` steps per epoch (``pace.dylu_steps``).
        latency_s, bandwidth_mbit: the virtual cost of a round: latency + bytes sent / bandwidth.
        evals: about how many evaluations of the global parameters along the run.
        hostile: how many workers (the last ones) are hostile: they train normally, but each
            round send, instead of their pseudo-gradient, 1000x it (``attack="scale"``) or Gaussian
            noise 100x its RMS (``"random"``): the ``send:scale`` and ``send:random`` faults of
            :meth:`p2pdiloco.averaging.PseudoGradientAverager.average`. ``run.aggregation.method``
            (an override) decides what the reducers make of it.
    """

    name: str
    mode: Literal["single", "sync", "async"] = "sync"
    overrides: tuple[str, ...] = ()
    workers: int = 4
    steps: int = 600
    speeds: str | tuple[float, ...] = "homogeneous"
    grace_s: float = 0.0
    dylu: bool = False
    latency_s: float = 0.1
    bandwidth_mbit: float = 100.0
    evals: int = 12
    hostile: int = 0
    attack: Literal["scale", "random"] = "scale"

    def speed_list(self) -> list[float]:
        speeds = list(SPEED_PROFILES[self.speeds] if isinstance(self.speeds, str) else self.speeds)
        k = 1 if self.mode == "single" else self.workers
        if len(speeds) < k:
            speeds = (speeds * k)[:k]
        return speeds[:k]


def shard_keys(count: int, num_shards: int) -> list[str]:
    """``count`` shard keys (``worker0``, ...) that select distinct data shards where there are
    enough (a real peer's shard comes from its peer id; the lab picks keys that do not collide)."""
    keys, used, candidate = [], set(), 0
    while len(keys) < count:
        key = f"worker{len(keys)}" if candidate == 0 else f"worker{len(keys)}-{candidate}"
        shard = data.shard_for(key, num_shards)
        if shard not in used or len(used) >= num_shards or candidate > 10_000:
            keys.append(key)
            used.add(shard)
            candidate = 0
        else:
            candidate += 1
    return keys


def slices(n: int, parts: int) -> list[slice]:
    """The contiguous slices of an ``n``-vector owned by each of ``parts`` reducers (equal sizes)."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def reduce(deltas: list[torch.Tensor], weights: list[float], codec: Codec,
           aggregation: AggregationConfig | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
    """The consistent all-reduce of :mod:`p2pdiloco.averaging`, in one process.

    Member ``j`` reduces slice ``j``: its own part in fp32, every other member's part through
    ``codec`` (sender leg), the weighted mean in fp32, then the mean through ``codec`` once
    (reducer leg), which every member decodes to the same values. Returns the average, the
    payload bytes each member sent (its parts to the other reducers, its average to the others)
    and the members the reducers' robust rule flagged. A group of one is an asynchronous arrival
    at a server (the async paper's model): its pseudo-gradient goes through ``codec`` once and
    costs one payload.

    A robust ``aggregation`` (a method other than ``mean``) replaces the weighted mean by
    :func:`robust.aggregate` on the same pieces, as :class:`p2pdiloco.averaging.runner.RobustPartReducer`
    does (:func:`_aggregate_slice`). ``mean`` keeps the running sum below: its numbers are those
    of every lab result before robust rules existed.
    """
    n = len(deltas)
    if n == 1:  # a lone arrival (async): its pseudo-gradient still crosses the wire once, encoded
        return codec.decode(codec.encode(deltas[0]), deltas[0].numel()), [codec.payload_size(deltas[0].numel())], []
    robust_rule = aggregation is not None and aggregation.method != "mean"
    total = float(sum(weights))
    out = torch.empty_like(deltas[0])
    sent = [0] * n
    flagged: set[int] = set()
    for j, part in enumerate(slices(deltas[0].numel(), n)):
        size = part.stop - part.start
        pieces = [delta[part] if i == j else codec.decode(codec.encode(delta[part]), size) for i, delta in enumerate(deltas)]
        for i in range(n):
            if i != j:
                sent[i] += codec.payload_size(size)
        if robust_rule:
            acc, hit = _aggregate_slice(pieces, weights, aggregation, codec)
            flagged.update(hit)
        else:
            acc = torch.zeros(size, dtype=torch.float32)
            for piece, w in zip(pieces, weights):
                acc.add_(piece, alpha=w / total)
        out[part] = codec.decode(codec.encode(acc), size)
        sent[j] += (n - 1) * codec.payload_size(size)
    return out, sent, sorted(flagged)


def _aggregate_slice(pieces: list[torch.Tensor], weights: list[float], aggregation: AggregationConfig,
                     codec: Codec) -> tuple[torch.Tensor, set[int]]:
    """One reducer's slice through the run's robust rule, one hivemind part at a time; returns
    it and the members flagged on at least half of its parts (``RobustPartReducer.flagged``).

    The real reducer sees its slice as parts of ``PART_SIZE_BYTES`` after compression, and the
    rule's medians and norms are those of each part: the lab cuts the slice the same way (from
    the slice's start; hivemind cuts the whole vector, so boundaries can differ by a part).
    """
    part_values = max(1, int(PART_SIZE_BYTES / (4 * codec.estimate_compression_ratio(None))))
    acc = torch.empty_like(pieces[0])
    counts = [0] * len(pieces)
    starts = range(0, acc.numel(), part_values)
    for start in starts:
        part = slice(start, start + part_values)
        result, hit = robust.aggregate_with([p[part] for p in pieces], weights, aggregation)
        acc[part] = result
        for i in hit:
            counts[i] += 1
    return acc, {i for i, c in enumerate(counts) if c and 2 * c >= len(starts)}


class _Worker:
    """A simulated peer: its own model copy, AdamW state and data shard."""

    def __init__(self, recipe: Recipe, key: str, cache: Path, init: torch.Tensor, step_s: float):
        run = recipe.run
        self.model = model.build_model(run.model)
        load_flat_parameters(self.model, init)
        self.opt = inner.InnerOptimizer(self.model, run.inner, torch.device("cpu"), bool(recipe.peer.bf16))
        self.stream = data.TokenStream(run.data, run.model.vocab_size, cache, shard_key=key, seed=run.seed)
        self.tokens_per_step = run.data.batch_size * run.data.seq_len
        self.step_s = step_s
        self.steps_done = 0
        self.base: torch.Tensor | None = None  # the global parameters this phase started from
        self.base_epoch = 0
        self.phase_steps = 0
        self.hostile = False  # sends an attack instead of its pseudo-gradient (LabArm.hostile)
        self.rounds = 0  # rounds it took part in, and those in which a reducer flagged it
        self.flagged = 0

    def start(self, params: torch.Tensor, epoch: int) -> None:
        self.base, self.base_epoch = params.clone(), epoch
        load_flat_parameters(self.model, params)

    def train(self, steps: int, first_global_step: int) -> None:
        for j in range(steps):
            self.opt.step(self.stream.next_batch(), first_global_step + j)
        self.steps_done += steps

    def delta(self) -> torch.Tensor:
        return self.base - flatten_parameters(self.model)

    def close(self) -> None:
        self.stream.close()


def run_arm(arm: LabArm, config: str, seed: int, cache: str | Path | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Run one arm with one seed; returns its figures (``val_curve`` rows are ``[tokens, virtual s, bytes per peer, val loss]``).

    ``seed`` sets both the data order (``run.seed``) and the initial parameters
    (``run.model.init_seed``), as a different run of the swarm would.

    A round whose average is not finite ends the arm, as the outer step would end a real run:
    ``diverged`` is then true and ``val_loss_final`` NaN (the curve keeps what was measured).
    ``flag_rate_hostile`` and ``flag_rate_honest`` are the shares of their rounds in which the
    reducers flagged hostile and honest workers (None without any such worker).
    """
    started = time.perf_counter()
    k = 1 if arm.mode == "single" else arm.workers
    if not 0 <= arm.hostile < k:
        raise ValueError(f"{arm.name}: hostile must be between 0 and workers - 1 (got {arm.hostile} of {k} workers)")
    overrides = [*arm.overrides, f"run.seed={seed}", f"run.model.init_seed={seed}", f"run.target_group_size={k}",
                 "run.min_group_size=1"]
    recipe = load_recipe(config, overrides)
    run = recipe.run
    cache = Path(cache or recipe.peer.cache_dir).expanduser()
    lab = _Lab(arm, recipe, k, cache, progress)
    try:
        lab.evaluate(force=True)
        if arm.mode == "async":
            lab.run_async()
        else:
            lab.run_sync()
        if lab.curve[-1][0] != lab.tokens:
            lab.evaluate(force=True)
    finally:
        for w in lab.workers:
            w.close()
    staleness, groups = lab.staleness, lab.group_sizes

    def flag_rate(workers: list[_Worker]) -> float | None:
        rounds = sum(w.rounds for w in workers)
        return sum(w.flagged for w in workers) / rounds if rounds else None

    return dict(
        arm=arm.name, seed=seed, mode=arm.mode, clock="virtual", workers=k,
        val_curve=lab.curve, val_loss_final=float("nan") if lab.diverged else lab.curve[-1][3], tokens=lab.tokens,
        bytes_per_peer=lab.bytes_per_peer, rounds=lab.rounds, virtual_s=lab.clock, wall_s=time.perf_counter() - started,
        mean_staleness=sum(staleness) / max(1, len(staleness)), mean_group_size=sum(groups) / max(1, len(groups)),
        aggregation=run.aggregation.method, hostile=arm.hostile, attack=arm.attack if arm.hostile else None,
        diverged=lab.diverged, flagged_rounds=[w.flagged for w in lab.workers],
        flag_rate_hostile=flag_rate([w for w in lab.workers if w.hostile]),
        flag_rate_honest=flag_rate([w for w in lab.workers if not w.hostile]),
        run_fingerprint=run.fingerprint(),
    )


class _Lab:
    """The state of one arm's run: workers, the global outer state, and what has been spent
    (tokens of all workers, virtual seconds, mean bytes sent per worker)."""

    def __init__(self, arm: LabArm, recipe: Recipe, k: int, cache: Path, progress):
        self.arm, self.run, self.k, self.progress = arm, recipe.run, k, progress
        self.bf16 = bool(recipe.peer.bf16)
        self.codec = make_codec(self.run.compression)
        self.eval_model = model.build_model(self.run.model)
        self.outer = OuterState.for_run(flatten_parameters(self.eval_model), self.run)
        self.speeds = arm.speed_list()
        keys = shard_keys(k, self.run.data.num_shards)
        self.workers = [_Worker(recipe, key, cache, self.outer.params, self.speeds[i]) for i, key in enumerate(keys)]
        for w in self.workers[k - arm.hostile:]:  # the last ones; none when hostile = 0
            w.hostile = True
        self.noise = torch.Generator().manual_seed(self.run.seed)  # the random attack's, for reproducible arms
        self.diverged = False  # a round's average was not finite: the arm ended there
        self.val = self.workers[0].stream.val_batches()
        self.budget = arm.steps * k  # worker steps: the same token budget for every arm
        self.eval_every = max(1, self.budget // max(1, arm.evals))
        self.next_eval = 0
        self.tokens, self.clock, self.bytes_per_peer, self.rounds = 0, 0.0, 0.0, 0
        self.landed_steps = 0  # worker steps whose phases the outer state has taken in
        self.staleness: list[int] = []
        self.group_sizes: list[int] = []
        self.curve: list[list[float]] = []  # [tokens, virtual s, bytes per peer, val loss]

    @property
    def steps_done(self) -> int:
        return sum(w.steps_done for w in self.workers)

    def evaluate(self, force: bool = False) -> None:
        if not force and self.steps_done < self.next_eval:
            return
        load_flat_parameters(self.eval_model, self.outer.params)
        loss = model.evaluate(self.eval_model, self.val, torch.device("cpu"), self.bf16)
        self.curve.append([self.tokens, round(self.clock, 3), self.bytes_per_peer, loss])
        self.next_eval = self.steps_done + self.eval_every
        if self.progress:
            self.progress(f"{self.arm.name}: {self.steps_done}/{self.budget} worker steps, val {loss:.3f}")

    def phase(self, w: _Worker) -> int:
        """Start ``w`` on the current global state and train one phase; returns its steps."""
        h = self.run.inner_steps
        steps = pace.dylu_steps(h, 1 / w.step_s, [1 / s for s in self.speeds], self.run.min_inner_steps) if self.arm.dylu else h
        steps = min(steps, self.budget - self.steps_done)
        # The schedule is keyed to global progress, as a real peer's is (epoch x H there): the
        # worker steps the global state holds (landed in outer steps) over k, so that no arm's
        # schedule runs faster than another's, and lock-step workers share one point of it.
        first = self.landed_steps // self.k
        w.start(self.outer.params, self.outer.epoch)
        if steps > 0:
            w.train(steps, first)
        w.phase_steps = steps
        self.tokens += w.tokens_per_step * steps
        return steps

    def apply(self, group: list[_Worker]) -> float:
        """One round: reduce the group's pseudo-gradients and take the outer step; returns its
        virtual seconds (latency + the busiest member's bytes over the bandwidth)."""
        self.landed_steps += sum(w.phase_steps for w in group)
        if self.arm.mode == "single":  # plain training: the worker's parameters are the model
            self.outer.params.copy_(flatten_parameters(group[0].model))
            return 0.0
        deltas = [self.attack(w.delta()) if w.hostile else w.delta() for w in group]
        weights = [float(w.tokens_per_step * w.phase_steps) for w in group]
        avg, sent, flagged = reduce(deltas, weights, self.codec, self.run.aggregation)
        for i, w in enumerate(group):
            w.rounds += 1
            w.flagged += i in flagged
        if not torch.isfinite(avg).all():  # OuterState.step would refuse it and end a real run
            self.diverged = True
            return 0.0
        self.staleness += [self.outer.epoch - w.base_epoch for w in group]
        self.group_sizes.append(len(group))
        self.outer.step(avg, contributions=len(group))
        self.rounds += 1
        self.bytes_per_peer += sum(sent) / self.k  # the mean over workers of what each sent
        return self.arm.latency_s + 8 * max(sent) / (self.arm.bandwidth_mbit * 1e6) if len(group) > 1 else 0.0

    def attack(self, delta: torch.Tensor) -> torch.Tensor:
        """What a hostile worker sends instead of ``delta``: the ``send:scale`` and ``send:random``
        faults of :meth:`p2pdiloco.averaging.PseudoGradientAverager.average` (:func:`faults.corrupt`)."""
        return faults.corrupt(delta, self.arm.attack, generator=self.noise)

    def run_sync(self) -> None:
        while self.steps_done < self.budget and not self.diverged:
            compute = max(self.phase(w) * w.step_s for w in self.workers)
            self.clock += compute + self.apply(self.workers)
            self.evaluate()

    def run_async(self) -> None:
        """Algorithm 2 of the async paper with a grace period, on the virtual clock.

        A worker's phase is computed when it starts (its result depends only on the state it
        pulled and its own AdamW state and data) and lands at ``start + steps * step_s``. Events
        are taken in time order, ties to the lower worker index, so a run is deterministic.
        """
        events: list[tuple[float, int]] = []

        def launch(i: int, now: float) -> None:
            steps = self.phase(self.workers[i])
            if steps > 0:
                heapq.heappush(events, (now + steps * self.workers[i].step_s, i))

        for i in range(self.k):
            launch(i, 0.0)
        grace = self.arm.grace_s
        while events and not self.diverged:
            arrivals = [heapq.heappop(events)]
            while grace > 0 and events and events[0][0] <= arrivals[0][0] + grace:
                arrivals.append(heapq.heappop(events))  # finished within the grace period: same round
            # the round starts when everyone still training has arrived, or when the grace runs out
            complete = not events
            start = arrivals[-1][0] if complete or grace <= 0 else arrivals[0][0] + grace
            group = sorted(i for _, i in arrivals)
            self.clock = max(start, self.clock) + self.apply([self.workers[i] for i in group])
            self.evaluate()
            for i in group:
                launch(i, self.clock)
