#!/usr/bin/env python
"""What robust aggregation costs and buys, with 0 and with 1 of 4 peers hostile.

    python bench/robust.py --quick --out /tmp/robust_quick   # all three parts, small budgets: ~3 min
    python bench/robust.py --out runs/robust                 # the full figures: ~20 min on 2 cores
    python bench/robust.py --quick --parts c                 # one part (a, b, c: comma-separated)

For each ``run.aggregation.method`` (mean, norm_bound, trimmed_mean, centered_clip):

a. final validation loss (the lab, ``configs/bench-cpu.toml``, 4 workers, lock-step DiLoCo): every
   arm has the same seeds, data shards and token budget; with 1 hostile worker (the last) it
   trains normally but sends 1000x its pseudo-gradient (``scale``) or, in full mode also, Gaussian
   noise 100x its RMS (``random``): the swarm tests' ``send:scale`` / ``send:random`` faults. The
   figures: final val loss per seed and its mean, the ratio to the honest ``mean`` arm, and how
   often the reducers flagged the hostile worker and an honest one (false positives). An arm
   "diverged" when a round's average was not finite (the lab ends it there, as the outer step
   ends a real run) or its final loss is above the untrained model's.
b. time per round (real processes: 4 peers, each with its DHT, averager process and p2pd, on
   loopback; ``bench/robust_worker.py``) averaging a vector of the ``tiny-cpu`` recipe's size
   (4,212,992 values, fp32), 0 and 1 hostile (``scale``): the median seconds of a round
   (matchmaking and all-reduce; the first round of each averager, which also dials the others,
   is left out and reported apart), the ratio to ``mean``, the relative error of the result to
   the honest peers' mean, and whether every peer got byte-identical averages.
c. the rule alone: :func:`p2pdiloco.robust.aggregate` on one 131,072-value part (hivemind's fp32
   part) of 4 senders, one thread, median of many repetitions, and the ratio to ``mean``.

Writes ``results.json`` and ``report.md`` in ``--out`` and prints a table per part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from p2pdiloco import robust  # noqa: E402
from p2pdiloco.lab import LabArm, run_arm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import machine  # noqa: E402  (the same machine line as the bench suite's reports)

METHODS = robust.METHODS
WORKERS = 4
LAB_CONFIG = "configs/bench-cpu.toml"
PART_VALUES = 131_072  # hivemind's 512 KB part of fp32 values: what one robust.aggregate call sees

MODES = {
    # the story end to end in a few minutes: few rounds, one seed, the scale attack only
    "quick": dict(steps=120, inner_steps=20, seeds=1, evals=2, attacks=("scale",), rounds=4, passes=1, reps=100),
    # lock-step H = 20 for 15 rounds per arm, 2 seeds, both attacks; real rounds in two passes
    # over the rules (interleaved, so a burst of load on the machine hits every rule alike)
    "full": dict(steps=300, inner_steps=20, seeds=2, evals=4, attacks=("scale", "random"), rounds=5, passes=2, reps=400),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def finite(x) -> float | None:
    """``x`` for JSON: None where it is NaN or infinite."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# ----------------------------------------------------------------------------- a. the lab
def lab_arms(mode: dict) -> list[tuple[str, str, int, str]]:
    """(arm name, method, hostile, attack) of part a."""
    arms = [(f"{m}/honest", m, 0, "scale") for m in METHODS]
    for attack in mode["attacks"]:
        arms += [(f"{m}/1 {attack}", m, 1, attack) for m in METHODS]
    return arms


def run_lab(mode: dict, cache: str) -> dict:
    steps, h = mode["steps"], mode["inner_steps"]
    arms = {}
    for name, method, hostile, attack in lab_arms(mode):
        runs = []
        for seed in range(mode["seeds"]):
            # one cosine over the arm's own budget, so a short quick run still ends at a low lr
            overrides = (f"run.inner_steps={h}", f"run.inner.total_steps={steps}", f"run.aggregation.method={method}")
            spec = LabArm(name, mode="sync", overrides=overrides, workers=WORKERS, steps=steps, speeds="homogeneous",
                          evals=mode["evals"], hostile=hostile, attack=attack)
            r = run_arm(spec, LAB_CONFIG, seed, cache=cache)
            initial = r["val_curve"][0][3]
            r["diverged"] = bool(r["diverged"] or not math.isfinite(r["val_loss_final"]) or r["val_loss_final"] > initial)
            log(f"lab {name}, seed {seed}: val {r['val_loss_final']:.4f}{' (diverged)' if r['diverged'] else ''}, "
                f"{r['rounds']} rounds, flagged hostile {r['flag_rate_hostile']}, honest {r['flag_rate_honest']:.2f}, "
                f"{r['wall_s']:.0f} s")
            runs.append(r)
        arms[name] = summarize_lab(method, hostile, attack, runs)
    base = arms["mean/honest"]["val_loss_mean"]
    for a in arms.values():
        a["ratio_to_honest_mean"] = None if a["val_loss_mean"] is None or base is None else a["val_loss_mean"] / base
    return dict(config=LAB_CONFIG, workers=WORKERS, steps=steps, inner_steps=h, seeds=list(range(mode["seeds"])), arms=arms)


def summarize_lab(method: str, hostile: int, attack: str, runs: list[dict]) -> dict:
    finals = [r["val_loss_final"] for r in runs]

    def rate(key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.mean(values) if values else None

    return dict(
        method=method, hostile=hostile, attack=attack if hostile else None,
        val_loss_mean=finite(statistics.mean(finals)) if all(map(math.isfinite, finals)) else None,
        val_loss_seeds=[finite(f) for f in finals],
        diverged=any(r["diverged"] for r in runs), diverged_seeds=[r["diverged"] for r in runs],
        flag_rate_hostile=rate("flag_rate_hostile"), flag_rate_honest=rate("flag_rate_honest"),
        rounds=statistics.mean(r["rounds"] for r in runs), tokens=runs[0]["tokens"],
        wall_s=statistics.mean(r["wall_s"] for r in runs),
        val_curves=[[[c[0], finite(c[3])] for c in r["val_curve"]] for r in runs],
    )


# ----------------------------------------------------------------------------- b. real rounds
def tiny_cpu_size() -> int:
    from p2pdiloco.config import load_recipe
    from p2pdiloco.model import build_model
    from p2pdiloco.outer import flatten_parameters

    return flatten_parameters(build_model(load_recipe(str(ROOT / "configs/tiny-cpu.toml")).run.model)).numel()


def run_rounds(mode: dict, out: Path) -> dict:
    """Four real peers (bench/robust_worker.py) through every (rule, hostile) case; the medians."""
    folder = out / "rounds"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("*.barrier"), *folder.glob("rank*.json")]:
        stale.unlink()
    size = tiny_cpu_size()
    cases = [dict(name=f"{m}-h{h}-p{p}", method=m, hostile=h, attack="scale")
             for p in range(mode["passes"]) for h in (0, 1) for m in METHODS]
    plan = folder / "plan.json"
    plan.write_text(json.dumps(dict(size=size, workers=WORKERS, rounds=mode["rounds"], cases=cases)))
    worker = ROOT / "bench" / "robust_worker.py"
    env = dict(os.environ)
    env.pop("P2PDILOCO_FAULT", None)  # the worker sets it per case

    def start(rank: int, *peers: str, **kw) -> subprocess.Popen:
        logfile = open(folder / f"rank{rank}.log", "w")
        return subprocess.Popen([sys.executable, str(worker), str(plan), str(rank), *peers], env=env,
                                stderr=logfile, start_new_session=True, **kw)

    started = time.perf_counter()
    procs = [start(0, stdout=subprocess.PIPE, text=True)]
    try:
        addr = procs[0].stdout.readline().strip()
        if not addr.startswith("/ip4/"):
            raise SystemExit(f"the first averaging peer did not start: see {folder}/rank0.log")
        procs += [start(rank, addr, stdout=subprocess.DEVNULL) for rank in range(1, WORKERS)]
        limit = 120 + len(cases) * (30 + 20 * mode["rounds"])  # far above what a case takes
        for p in procs:
            p.wait(timeout=max(1.0, limit - (time.perf_counter() - started)))
    finally:
        for p in procs:  # by process group: each peer's DHT, averager and p2pd go with it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    rows = []
    for rank in range(WORKERS):
        path = folder / f"rank{rank}.json"
        if not path.exists():
            raise SystemExit(f"averaging peer {rank} wrote no records: see {folder}/rank{rank}.log")
        rows += json.loads(path.read_text())
    log(f"real rounds: {len(cases)} cases x {mode['rounds']} rounds in {time.perf_counter() - started:.0f} s")
    return dict(size=size, workers=WORKERS, rounds_per_case=mode["rounds"], passes=mode["passes"],
                cases=summarize_rounds(rows, mode), wall_s=time.perf_counter() - started)


def summarize_rounds(rows: list[dict], mode: dict) -> dict:
    """Per (rule, hostile): medians over peers and rounds, first rounds apart."""
    summary = {}
    for h in (0, 1):
        for m in METHODS:
            mine = [r for r in rows if r["case"].startswith(f"{m}-h{h}-")]
            ok = [r for r in mine if "seconds" in r]
            timed = [r["seconds"] for r in ok if r["round"] > 0]
            first = [r["seconds"] for r in ok if r["round"] == 0]
            honest = [r for r in ok if not r["hostile_peer"]]
            hostile_ranks = set(range(WORKERS - h, WORKERS))
            rounds = {(r["case"], r["round"]) for r in mine}
            consistent = all(len({r["digest"] for r in ok if (r["case"], r["round"]) == key}) == 1 for key in rounds)
            summary[f"{m}/h{h}"] = dict(
                method=m, hostile=h, round_s_median=statistics.median(timed) if timed else None,
                round_s_samples=len(timed), first_round_s_median=statistics.median(first) if first else None,
                error_median=finite(statistics.median(r["error"] for r in honest)) if honest else None,
                failed=len(mine) - len(ok), consistent=consistent and len(ok) == len(mine),
                # as the honest peers see it: the share of their rounds where the hostile one was flagged
                flag_rate_hostile=(statistics.mean(bool(set(r["flagged_ranks"]) & hostile_ranks) for r in honest)
                                   if h and honest else None),
                flag_rate_honest=(statistics.mean(len(set(r["flagged_ranks"]) - hostile_ranks - {r["rank"]}) > 0 for r in honest)
                                  if honest else None),
            )
    for h in (0, 1):
        base = summary[f"mean/h{h}"]["round_s_median"]
        for m in METHODS:
            s = summary[f"{m}/h{h}"]
            s["ratio_to_mean"] = s["round_s_median"] / base if base and s["round_s_median"] else None
    return summary


# ----------------------------------------------------------------------------- c. the rule alone
def time_aggregate(reps: int) -> dict:
    """``robust.aggregate`` on one part of 4 senders, honest and with one sending 1000x."""
    torch.set_num_threads(1)  # one reducer's share of a busy peer: and the least noisy figure
    g = torch.Generator().manual_seed(0)
    common = torch.randn(PART_VALUES, generator=g)
    honest = [common + 0.3 * torch.randn(PART_VALUES, generator=g) for _ in range(WORKERS)]
    cases = {"honest": honest, "1 scale": [*honest[:-1], 1000 * honest[-1]]}
    rows = {}
    for m in METHODS:
        rows[m] = {}
        for label, parts in cases.items():
            for _ in range(max(3, reps // 20)):  # warm-up: allocator and caches
                robust.aggregate(parts, [1.0] * WORKERS, m)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                robust.aggregate(parts, [1.0] * WORKERS, m)
                times.append(time.perf_counter() - t)
            rows[m][label] = statistics.median(times)
    for m in METHODS:
        for label in cases:
            rows[m][f"{label}_ratio"] = rows[m][label] / rows["mean"][label]
    return dict(values=PART_VALUES, senders=WORKERS, reps=reps, threads=1, seconds=rows)


# ----------------------------------------------------------------------------- the report
def _loss(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _rate(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def tables(results: dict) -> str:
    lines = []
    lab = results.get("lab")
    if lab:
        lines += [f"### a. Final validation loss (lab, `{lab['config']}`, {lab['workers']} workers, lock-step, "
                  f"H = {lab['inner_steps']}, {lab['steps']} steps per worker, seeds {lab['seeds']})", "",
                  "| arm | val loss (mean) | per seed | vs honest mean | hostile flagged | honest flagged | rounds |",
                  "|---|---|---|---|---|---|---|"]
        for name, a in lab["arms"].items():
            mean = "**diverged**" if a["diverged"] and a["val_loss_mean"] is None else _loss(a["val_loss_mean"])
            if a["diverged"] and a["val_loss_mean"] is not None:
                mean += " (**diverged**)"
            seeds = ", ".join("diverged" if v is None else f"{v:.4f}" for v in a["val_loss_seeds"])
            ratio = "n/a" if a["ratio_to_honest_mean"] is None else f"{a['ratio_to_honest_mean']:.3f}x"
            lines.append(f"| `{name}` | {mean} | {seeds} | {ratio} | {_rate(a['flag_rate_hostile'])} | "
                         f"{_rate(a['flag_rate_honest'])} | {a['rounds']:.0f} |")
        lines.append("")
    rounds = results.get("rounds")
    if rounds:
        lines += [f"### b. Time per round (real peers: {rounds['workers']} processes on loopback, {rounds['size']:,} fp32 values, "
                  f"{rounds['passes']} pass(es) x {rounds['rounds_per_case']} rounds per rule, first round apart)", "",
                  "| rule | hostile | round s (median) | vs mean | first round s | error vs honest mean | hostile flagged | honest flagged | consistent |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in rounds["cases"].values():
            med = "failed" if s["round_s_median"] is None else f"{s['round_s_median']:.2f} (n={s['round_s_samples']})"
            ratio = "n/a" if s["ratio_to_mean"] is None else f"{s['ratio_to_mean']:.2f}x"
            first = "n/a" if s["first_round_s_median"] is None else f"{s['first_round_s_median']:.2f}"
            err = "n/a" if s["error_median"] is None else f"{s['error_median']:.3g}"
            ok = "yes" if s["consistent"] else f"**no** ({s['failed']} failed)"
            lines.append(f"| `{s['method']}` | {s['hostile']} | {med} | {ratio} | {first} | {err} | "
                         f"{_rate(s['flag_rate_hostile'])} | {_rate(s['flag_rate_honest'])} | {ok} |")
        lines.append("")
    agg = results.get("aggregate")
    if agg:
        lines += [f"### c. `robust.aggregate` alone ({agg['values']:,} values x {agg['senders']} senders, "
                  f"{agg['threads']} thread, median of {agg['reps']})", "",
                  "| rule | honest ms | vs mean | 1 scale ms | vs mean |", "|---|---|---|---|---|"]
        for m, s in agg["seconds"].items():
            lines.append(f"| `{m}` | {1e3 * s['honest']:.3f} | {s['honest_ratio']:.1f}x | {1e3 * s['1 scale']:.3f} | "
                         f"{s['1 scale_ratio']:.1f}x |")
        lines.append("")
    return "\n".join(lines)


def report(results: dict) -> str:
    meta = results["meta"]
    head = (f"Robust aggregation benchmark (`{meta['mode']}`), made by `{meta['command']}` on {meta['machine']} "
            f"({meta['finished']}, {meta['wall_s'] / 60:.1f} min).\n\n")
    return head + tables(results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small budgets: the whole story in a few minutes")
    ap.add_argument("--parts", default="a,b,c", help="comma-separated subset of a (lab), b (real rounds), c (the rule alone)")
    ap.add_argument("--seeds", type=int, help="part a: seeds per arm (default: the mode's)")
    ap.add_argument("--steps", type=int, help="part a: inner steps per worker (default: the mode's)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="part a: torch threads of the lab")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "robust", help="where results.json and report.md go")
    ap.add_argument("--cache", default=os.environ.get("P2PDILOCO_CACHE", "~/.cache/p2pdiloco"), help="tokenizer and data cache")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b", "c"}:
        print(f"robust: --parts takes a, b and c, not {args.parts!r}", file=sys.stderr)
        return 2
    name = "quick" if args.quick else "full"
    mode = dict(MODES[name])
    mode.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v})
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {}
    if "c" in parts:  # first: the cheapest and the most sensitive to load
        log("c. robust.aggregate alone ...")
        results["aggregate"] = time_aggregate(mode["reps"])
    if "a" in parts:
        log(f"a. lab arms: {len(lab_arms(mode))} arms x {mode['seeds']} seed(s) ...")
        torch.set_num_threads(args.threads)
        results["lab"] = run_lab(mode, str(Path(args.cache).expanduser()))
    if "b" in parts:
        log("b. real rounds ...")
        results["rounds"] = run_rounds(mode, args.out)
    command = shlex.join(["python", "bench/robust.py", *(argv if argv is not None else sys.argv[1:])])
    results["meta"] = dict(mode=name, parts=sorted(parts), settings=mode, command=command, machine=machine(),
                           finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall_s=time.perf_counter() - started)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    text = report(results)
    (args.out / "report.md").write_text(text)
    print("\n" + tables(results))
    log(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'} ({results['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
