"""Baseline: hivemind's own ``hivemind.Optimizer``, configured as close to DiLoCo as it allows.

``k`` separate processes on loopback, each with its own ``hivemind.DHT`` (worker 0 is the initial
peer; the others bootstrap from the multiaddrs it writes to a file) and its own
``hivemind.Optimizer`` around the very same inner AdamW as a p2pdiloco peer (same parameter
groups, weight decay on matrices only, same LR schedule, same gradient clipping), on the same data
shards as the lab's workers (:func:`p2pdiloco.lab.shard_keys`). No mocks.

How it is configured (hivemind 1.1.12, ``hivemind/optim/optimizer.py``):

* ``use_local_updates=True``: an AdamW step on the local gradients every step, no gradient averaging.
* ``target_batch_size = workers * H * batch_size``, ``batch_size_per_step = batch_size``: hivemind's
  epoch ends when the swarm has processed ``workers * H`` batches, i.e. after about ``H`` local
  steps of each peer; at every epoch end (``average_state_every=1``) the peers average their
  *parameters* (``average_opt_statistics=()``: the AdamW moments stay local, as in DiLoCo).
* ``delay_state_averaging=False`` (and no delayed optimizer step, ``offload_optimizer=False``):
  the averaging round is blocking, so a peer waits for the others at each epoch end (lock-step
  rounds, like DiLoCo's synchronous outer step) and the averaged parameters replace the local ones.
* Group of all peers (``target_group_size=workers``), fp32 on the wire (``NoCompression``), and the
  recipe's timeouts (``run.averaging``) for matchmaking, one all-reduce and one round.

That is FedAvg / local SGD with parameter averaging: an outer step with learning rate 1 and no
outer momentum, *not* DiLoCo's Nesterov outer optimizer. Epoch boundaries are hivemind's: its
progress tracker counts the swarm's samples through the DHT (polled every 0.1-1 s here) and ends
an epoch early when its ETA extrapolation says so. So an epoch is not exactly ``H`` steps of every
peer: a faster (or better scheduled) peer runs more steps of it, and an epoch shorter than the
tracker's polling (the tiny test model) comes at irregular steps. The first epoch tends to end
after a handful of steps, since hivemind's first speed estimate covers forward and backward only.

What this harness adds around hivemind's normal flow (files in ``out_dir``):

* barriers at the start: every worker runs its first step once all have built their optimizer;
  then, as hivemind publishes a peer only once it has samples, all wait until every tracker sees
  the whole swarm (else each peer counts an epoch alone and never averages), re-publish a fresh
  progress record and go on together;
* the end: a worker that has run its ``steps`` keeps taking part in hivemind's epoch updates until
  every worker is done: when its tracker says the epoch is over it runs
  ``Optimizer._update_global_epoch`` (private), which is what its next ``opt.step()`` would have
  done, without the local step; it announces such a round in a file and the other finished workers
  join it, so that nobody waits in a round for a peer that left. Then, if any worker has local
  steps not averaged with all the others (or its last round failed), all of them run one final
  epoch update together, so that the final model is an average, as DiLoCo's final outer step
  would leave it (``final_param_max_diff``: fp32 all-reduce, about 1e-9 apart).

Bytes: ``bytes_per_peer`` is what the loopback interface carried during the arm
(``/proc/net/dev``: DHT, progress tracker and all-reduce), over ``k``. Run as root, the workers live
in a private network namespace of their own (``unshare``/``nsenter``), so that counter holds the
swarm's traffic alone; else it is the host's loopback, shared with anything else running
(``bytes_scope`` says which). ``bytes_per_peer_payload`` is the butterfly all-reduce's analytic
``2 (n-1)/n x 4 x parameters`` per averaging round of ``n`` peers (worker 0's rounds).

    python bench/hivemind_baseline.py configs/test.toml --workers 2 --steps 40 --seed 0 --out /tmp/hm
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from baselines import loopback_tx_bytes  # noqa: E402  (bench/, this script's folder)

ARM = "hivemind_optimizer"
MADDRS_FILE = "hivemind_maddrs.json"
SPEC_FILE = "hivemind_spec.json"


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _wait_for(predicate, timeout: float, what: str, period: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the worker process


class _RoundCounter(logging.Handler):
    """Counts hivemind's own reports of parameter-averaging rounds (state_averager._do) and of
    state downloads (a peer found out of sync)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.group_sizes: list[int] = []  # one entry per successful averaging round
        self.failed = 0
        self.out_of_sync = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        if msg.startswith("Averaged parameters with "):
            try:
                self.group_sizes.append(int(msg.split()[3]))
            except (IndexError, ValueError):
                self.group_sizes.append(0)
        elif msg.startswith("Averaging failed with"):
            self.failed += 1
        elif msg.startswith("Peer is out of sync"):
            self.out_of_sync += 1


def _worker(index: int, spec_path: str) -> None:
    # bitsandbytes first: a lazy import inside hivemind would otherwise land in an averaging round
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # not needed with NoCompression; only the timing of round 1 suffers
        print(f"[worker {index}] bitsandbytes not importable ({e!r}); continuing", flush=True)
    import torch

    torch.set_num_threads(1)  # k processes share this machine's cores
    import hivemind
    from hivemind.compression import NoCompression

    from p2pdiloco import data, inner, model
    from p2pdiloco.dht import maddrs_of, start_dht, stop_dht
    from p2pdiloco.config import load_recipe
    from p2pdiloco.lab import shard_keys

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out_dir"])
    workers, steps, evals = spec["workers"], spec["steps"], spec["evals"]
    deadline = spec["deadline"]  # wall clock (time.time()) by which the parent kills everything

    def left(margin: float = 15.0) -> float:
        return max(1.0, deadline - time.time() - margin)

    counter = _RoundCounter()
    for name in ("hivemind.optim.state_averager", "hivemind.optim.optimizer"):
        logging.getLogger(name).addHandler(counter)

    run = load_recipe(spec["config"], spec["overrides"]).run
    av = run.averaging
    H, bs, seq = run.inner_steps, run.data.batch_size, run.data.seq_len

    # --- DHT: worker 0 is the initial peer; the others dial its visible multiaddrs
    maddrs_file = out / MADDRS_FILE
    if index == 0:
        dht = start_dht((), host="127.0.0.1", port=0, timeout=60)
        _write_json_atomic(maddrs_file, maddrs_of(dht))
    else:
        initial = _wait_for(lambda: _read_json(maddrs_file), min(180.0, left()), f"{maddrs_file}")
        dht = start_dht(initial, host="127.0.0.1", port=0, timeout=60)
    print(f"[worker {index}] DHT up: {maddrs_of(dht)}", flush=True)

    net = model.build_model(run.model)
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": run.inner.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    stream = data.TokenStream(run.data, run.model.vocab_size, spec["cache"],
                              shard_key=shard_keys(workers, run.data.num_shards)[index], seed=run.seed)
    val = stream.val_batches() if index == 0 else None

    def make_adamw(param_groups):  # the inner optimizer of p2pdiloco/inner.py
        return torch.optim.AdamW(param_groups, lr=inner.lr_at(run.inner, 0), betas=tuple(run.inner.betas), fused=True)

    opt = hivemind.Optimizer(
        dht=dht,
        run_id=spec["run_id"],
        target_batch_size=workers * H * bs,  # an epoch = about H local steps of every peer
        batch_size_per_step=bs,
        params=groups,
        optimizer=make_adamw,
        use_local_updates=True,  # local AdamW step every step; parameters averaged at epoch ends
        offload_optimizer=False,  # the optimizer works on the model's own parameters
        delay_optimizer_step=False,
        delay_grad_averaging=False,
        delay_state_averaging=False,  # blocking round: averaged params replace local ones (no delta rule)
        average_state_every=1,  # average at every epoch
        average_opt_statistics=(),  # AdamW moments stay local (DiLoCo keeps inner state per peer)
        state_averaging_compression=NoCompression(),
        load_state_compression=NoCompression(),
        matchmaking_time=av.matchmaking_s,
        averaging_timeout=av.round_s,  # matchmaking + all-reduce of one round
        allreduce_timeout=av.allreduce_s,
        next_chunk_timeout=av.next_chunk_s,
        load_state_timeout=av.round_s,  # only if a peer falls out of sync (hivemind retries this forever)
        averager_opts=dict(
            target_group_size=workers,  # a group forms as soon as every peer is there
            min_group_size=2,
            request_timeout=av.request_s,
            initialize_optimizer=False,  # else hivemind runs one AdamW step with zero grads (bumps step count)
        ),
        # read the others' progress more often than hivemind's defaults (0.5-10 s; 3 s when alone), so
        # that an epoch ends closer to H local steps of every peer (more DHT traffic, in bytes_per_peer)
        tracker_opts=dict(min_refresh_period=0.1, max_refresh_period=1.0, default_refresh_period=0.5),
        shutdown_timeout=5,
        verbose=True,  # INFO logs: "Averaged parameters with N peers", which _RoundCounter counts
    )
    inner_opt = opt.opt  # the torch AdamW hivemind wraps (opt.param_groups returns copies)

    # --- start barrier: nobody trains alone while the others still import and bootstrap
    (out / f"hivemind_ready{index}").write_text("1")
    _wait_for(lambda: all((out / f"hivemind_ready{i}").exists() for i in range(workers)),
              min(240.0, left()), "every worker's start")
    opt.tracker.performance_ema.reset_timer()  # hivemind's speed estimate (its epoch ETA) starts now

    tokens_per_step = workers * bs * seq  # all workers, one local step each
    every = max(1, steps // max(1, evals))
    curve: list[list[float]] = []
    marks: list[list] = []  # per curve point: [local step, hivemind epoch, right after an averaging round]
    last_eval = None
    started = time.perf_counter()

    def evaluate(step: int, averaged: bool) -> None:
        nonlocal last_eval
        key = (step, opt.local_epoch, len(counter.group_sizes))
        if key == last_eval:
            return
        last_eval = key
        loss = model.evaluate(net, val, torch.device("cpu"), False)
        sent = (loopback_tx_bytes() - spec["tx0"]) / workers
        curve.append([step * tokens_per_step, round(time.perf_counter() - started, 3), sent, loss])
        marks.append([step, opt.local_epoch, averaged])
        print(f"[worker 0] step {step} epoch {opt.local_epoch} val_loss {loss:.4f}"
              f"{' (after averaging)' if averaged else ''}", flush=True)

    if index == 0:
        evaluate(0, False)
    train_losses, discovery_s, dirty = [], 0.0, False

    def averaged_all(rounds_before: int) -> bool:
        """Whether a round since ``rounds_before`` averaged the parameters of every worker."""
        return len(counter.group_sizes) > rounds_before and counter.group_sizes[-1] >= workers

    for step in range(steps):
        for group in inner_opt.param_groups:
            group["lr"] = inner.lr_at(run.inner, step)
        batch = stream.next_batch()
        loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run.inner.grad_clip)
        epoch_before, rounds_before, t = opt.local_epoch, len(counter.group_sizes), time.perf_counter()
        opt.step()  # local AdamW step; at an epoch end also the (blocking) parameter averaging round
        opt.zero_grad()
        train_losses.append(loss.item())
        if step == 0:
            # hivemind's tracker publishes a peer only once it has samples: after the first step, wait
            # until every tracker sees the whole swarm, else each one counts an epoch alone (no averaging)
            t_wait = time.perf_counter()
            _wait_for(lambda: opt.tracker.global_progress.num_peers >= workers, min(120.0, left()),
                      f"hivemind's progress tracker to see all {workers} peers")
            (out / f"hivemind_seen{index}").write_text("1")  # and all go on together
            _wait_for(lambda: all((out / f"hivemind_seen{i}").exists() for i in range(workers)),
                      min(120.0, left()), "every worker's tracker to see the swarm")
            # the wait is not training: re-publish our record (fresh time, speed timer reset), else
            # hivemind extrapolates everyone's samples over the wait and ends epoch 0 at once
            opt.tracker.report_local_progress(opt.local_epoch, opt.tracker.local_progress.samples_accumulated)
            (out / f"hivemind_fresh{index}").write_text("1")
            _wait_for(lambda: all((out / f"hivemind_fresh{i}").exists() for i in range(workers)),
                      min(120.0, left()), "every worker's fresh progress record")
            time.sleep(0.1)
            seen = opt.tracker.global_progress
            try:  # one fetch of the swarm's progress after that (every max_refresh_period = 1 s at most)
                _wait_for(lambda: opt.tracker.global_progress is not seen, 5.0, "a progress fetch", period=0.02)
            except TimeoutError:
                pass
            discovery_s = time.perf_counter() - t_wait
        dirty = not averaged_all(rounds_before)  # a local step since the last average of all peers
        if opt.local_epoch != epoch_before:
            print(f"[worker {index}] step {step + 1}: epoch {epoch_before} -> {opt.local_epoch}, "
                  f"{'averaged' if len(counter.group_sizes) > rounds_before else 'NOT averaged'} "
                  f"(step took {time.perf_counter() - t:.2f} s)", flush=True)
        if index == 0:
            if opt.local_epoch != epoch_before:
                evaluate(step + 1, len(counter.group_sizes) > rounds_before)
            elif (step + 1) % every == 0:
                evaluate(step + 1, False)
        if time.time() > deadline - 10:
            raise TimeoutError(f"worker {index}: out of time at step {step}")
    train_s = time.perf_counter() - started

    # --- the end. hivemind's epochs do not end at the same local step on every peer (a faster peer
    # has run more steps when the swarm's samples reach target_batch_size), so peers finish their
    # steps at different points of an epoch.
    # (1) Until every worker has finished, take part in hivemind's epoch updates whenever our tracker
    #     says the epoch is over (what our next opt.step() would have done, without the local step):
    #     a peer still training may be waiting in a round for us. Such a round is announced by a
    #     file, so that the others join it, even after all have finished.
    # (2) Once every worker has settled, if any has local steps not averaged with all the others
    #     (or a round failed), all run one last epoch update together: the final model is an average.
    def files(prefix: str):
        found = [_read_json(out / f"{prefix}{i}.json") for i in range(workers)]
        return found if all(d is not None for d in found) else None

    def foreign_rounds() -> set[str]:
        found = set()
        for i in range(workers):
            token = _read_json(out / f"hivemind_serving{i}.json") if i != index else None
            if token:
                found.add(token)
        return found

    def epoch_update(why: str) -> bool:
        nonlocal dirty
        rounds_before, t = len(counter.group_sizes), time.perf_counter()
        print(f"[worker {index}] after its steps: {why}; epoch {opt.local_epoch}, "
              f"{opt.tracker.local_progress.samples_accumulated} samples pending, dirty={dirty}", flush=True)
        opt._update_global_epoch(None)  # hivemind's own epoch update: averaging round + epoch + 1
        ok = averaged_all(rounds_before)
        dirty = dirty and not ok
        print(f"[worker {index}] ... {'averaged with all' if ok else 'NOT averaged with all'} in "
              f"{time.perf_counter() - t:.1f} s, now epoch {opt.local_epoch}", flush=True)
        if index == 0:
            evaluate(steps, len(counter.group_sizes) > rounds_before)
        return ok

    served, joined = 0, set()  # joined: the others' announced rounds we took part in (or saw during ours)
    serving = out / f"hivemind_serving{index}.json"
    _write_json_atomic(out / f"hivemind_done{index}.json", dict(epoch=opt.local_epoch))
    end_deadline = time.monotonic() + left(av.round_s + 20)
    final_round = False
    try:
        while True:
            if time.monotonic() > end_deadline:
                raise TimeoutError("timed out waiting for every worker to finish its steps")
            all_done = files("hivemind_done") is not None
            waiting = foreign_rounds() - joined
            if all_done and not waiting:
                break
            if waiting or (not all_done and opt.tracker.ready_to_update_epoch):
                joined |= waiting
                served += 1
                if not waiting:  # we start this round: announce it
                    _write_json_atomic(serving, f"{index}-{served}")
                try:
                    epoch_update(f"joining {sorted(waiting)}" if waiting else "hivemind's epoch is over")
                finally:
                    serving.unlink(missing_ok=True)
                joined |= foreign_rounds()  # concurrent rounds met in one group
            time.sleep(0.05)
        _write_json_atomic(out / f"hivemind_settled{index}.json", dict(epoch=opt.local_epoch, dirty=dirty))
        settled = _wait_for(lambda: files("hivemind_settled"), max(1.0, end_deadline - time.monotonic()),
                            "every worker to settle")
        if any(d["dirty"] for d in settled):
            final_round = epoch_update(f"final round (dirty: {[d['dirty'] for d in settled]})")
    except TimeoutError as e:
        print(f"[worker {index}] no final round: {e}", flush=True)
    if index == 0:
        evaluate(steps, final_round)
    wall = time.perf_counter() - started

    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()
    torch.save(flat, out / f"hivemind_params{index}.pt")
    result = dict(
        worker=index, steps=steps, local_epoch=opt.local_epoch, rounds_ok=len(counter.group_sizes),
        group_sizes=counter.group_sizes, rounds_failed=counter.failed, out_of_sync=counter.out_of_sync,
        final_round=final_round, served_after_end=served, dirty_at_end=dirty, discovery_s=discovery_s, train_s=train_s, wall_s=wall, params=model.count_parameters(net),
        train_loss_first=train_losses[0] if train_losses else None,
        train_loss_last=train_losses[-1] if train_losses else None,
    )
    if index == 0:
        result.update(curve=curve, marks=marks, fingerprint=run.fingerprint())
    _write_json_atomic(out / f"hivemind_result{index}.json", result)
    print(f"[worker {index}] done: {json.dumps({k: v for k, v in result.items() if k not in ('curve', 'marks')})}",
          flush=True)

    try:
        opt.shutdown()
    except Exception as e:
        print(f"[worker {index}] optimizer shutdown: {e!r}", flush=True)
    stop_dht(dht)
    stream.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: hivemind's leftover threads must not hold the exit


# ----------------------------------------------------------------------------- the arm


class _NetNamespace:
    """A private network namespace with only loopback up, so that its loopback counter holds the
    swarm's traffic alone (this machine's loopback also carries whatever else runs on it).

    Needs root and ``unshare``/``nsenter``/``ip`` (as the netem tests do); else, or with
    ``P2PDILOCO_BENCH_NETNS=0``, the arm runs on the host's loopback and says so (``bytes_scope``).
    """

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self) -> bool:
        import shutil

        if os.environ.get("P2PDILOCO_BENCH_NETNS", "1") == "0" or os.geteuid() != 0:
            return False
        if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
            return False
        try:
            self.proc = subprocess.Popen(
                ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
            if self.proc.stdout.readline().strip() == b"up":  # EOF at once if unshare failed
                return True
        except OSError:
            pass
        self.stop()
        return False

    @property
    def dev(self) -> str:
        return f"/proc/{self.proc.pid}/net/dev" if self.proc else "/proc/net/dev"

    def prefix(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", "--"] if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None



def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group (its DHT and averager processes, ``p2pd``) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: pgid == the worker's pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_hivemind_optimizer(config: str, overrides: list[str], workers: int, steps: int, seed: int,
                           cache: str, out_dir: str, evals: int = 12, timeout_s: float = 900) -> dict:
    """Train with ``hivemind.Optimizer`` over ``workers`` processes for ``steps`` local steps each;
    returns the arm's figures (the lab's fields; ``clock`` is ``wall``).

    Raises RuntimeError (naming the worker's log, ``out_dir/hivemind_worker{i}.log``) if a worker
    fails, TimeoutError if the arm runs past ``timeout_s``; every worker's process group is killed
    and reaped in any case.
    """
    import torch

    from p2pdiloco import corpus
    from p2pdiloco.config import load_recipe

    if workers < 2:
        raise ValueError("hivemind.Optimizer needs at least 2 workers to average anything")
    overrides = [*overrides, f"run.seed={seed}", f"run.model.init_seed={seed}"]
    recipe = load_recipe(config, overrides)
    run = recipe.run
    corpus.prepare(run.data, run.model.vocab_size, cache)  # once, before k processes want it
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for pattern in ("hivemind_ready*", "hivemind_seen*", "hivemind_fresh*", "hivemind_serving*", "hivemind_done*", "hivemind_settled*", "hivemind_result*", "hivemind_params*", MADDRS_FILE):
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)

    netns = _NetNamespace()
    isolated = netns.start()
    started_wall, started = time.time(), time.perf_counter()
    tx0 = loopback_tx_bytes(netns.dev)
    spec = dict(config=str(config), overrides=overrides, workers=workers, steps=steps, seed=seed, cache=str(cache),
                out_dir=str(out), evals=evals, tx0=tx0, deadline=started_wall + timeout_s,
                run_id=f"hmopt_{os.getpid()}_{seed}_{int(started_wall) % 100000}")
    spec_path = out / SPEC_FILE
    _write_json_atomic(spec_path, spec)

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    logs = [out / f"hivemind_worker{i}.log" for i in range(workers)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(workers):
            with open(logs[i], "wb") as log:
                procs.append(subprocess.Popen(
                    [*netns.prefix(), sys.executable, str(Path(__file__).resolve()), "--worker", str(i),
                     "--spec", str(spec_path)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT), env=env,
                    start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i = failed[0]
                raise RuntimeError(f"hivemind worker {i} failed (exit {codes[i]}): see {logs[i]}\n"
                                   + _tail(logs[i]))
            if all(c == 0 for c in codes):
                break
            if time.perf_counter() - started > timeout_s:
                slow = [i for i, c in enumerate(codes) if c is None]
                raise TimeoutError(f"hivemind arm ran past {timeout_s:.0f} s; workers {slow} still running: see "
                                   + ", ".join(str(logs[i]) for i in slow))
            time.sleep(0.2)
    finally:
        try:
            for p in procs:  # also the leftover DHT/averager/p2pd of workers that exited cleanly
                _kill_group(p)
            wall = time.perf_counter() - started
            measured = (loopback_tx_bytes(netns.dev) - tx0) / workers
        finally:
            netns.stop()

    results = []
    for i in range(workers):
        res = _read_json(out / f"hivemind_result{i}.json")
        if res is None:
            raise RuntimeError(f"hivemind worker {i} exited without a result: see {logs[i]}\n" + _tail(logs[i]))
        results.append(res)
    flats = [torch.load(out / f"hivemind_params{i}.pt") for i in range(workers)]
    diff = max(float((f - flats[0]).abs().max()) for f in flats[1:])

    w0 = results[0]
    n_params = w0["params"]
    payload = sum(2 * (n - 1) / n * n_params * 4 for n in w0["group_sizes"] if n > 1)
    tokens = workers * steps * run.data.batch_size * run.data.seq_len
    curve = [[tok, t, b, loss] for tok, t, b, loss in w0["curve"]]
    return dict(
        arm=ARM, seed=seed, mode="hivemind", clock="wall", workers=workers, val_curve=curve,
        val_loss_final=curve[-1][3], tokens=tokens, bytes_per_peer=measured, bytes_per_peer_payload=payload,
        bytes_scope="private netns loopback" if isolated else "host loopback (shared with anything else running)",
        rounds=w0["local_epoch"], rounds_averaged=w0["rounds_ok"], wall_s=wall, train_s=w0["wall_s"],
        final_param_max_diff=diff, run_fingerprint=run.fingerprint(),
        inner_steps=run.inner_steps, val_marks=w0["marks"],
        per_worker=[{k: v for k, v in r.items() if k not in ("curve", "marks", "fingerprint")} for r in results],
    )


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":
    import argparse

    if len(sys.argv) > 1 and sys.argv[1] == "--worker":  # hidden entry point of the worker processes
        wp = argparse.ArgumentParser()
        wp.add_argument("--worker", type=int, required=True)
        wp.add_argument("--spec", required=True)
        wa = wp.parse_args()
        try:
            _worker(wa.worker, wa.spec)
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # at once: a failed worker must not wait on its DHT's threads and processes
        os._exit(0)

    ap = argparse.ArgumentParser(description="hivemind.Optimizer baseline (local AdamW + parameter averaging, loopback)")
    ap.add_argument("config")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evals", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/p2pdiloco"))
    ap.add_argument("--out", default="/tmp/hm")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="recipe override KEY=VALUE")
    a = ap.parse_args()
    print(json.dumps(run_hivemind_optimizer(a.config, a.overrides, a.workers, a.steps, a.seed, a.cache, a.out,
                                            evals=a.evals, timeout_s=a.timeout), indent=1))
