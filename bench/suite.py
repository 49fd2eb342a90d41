#!/usr/bin/env python
"""The benchmark suite: p2pdiloco against the baselines a user would pick, and the papers' tables
reproduced at small scale, side by side in one run.

    python bench/suite.py --suite full            # BENCHMARKS.md: every arm, 3 seeds (about 40 min on 2 cores)
    python bench/suite.py --suite quick           # the harness end to end in a few minutes (CI runs it)
    python bench/suite.py --suite full --arms ddp,diloco_h50 --seeds 1

Every arm trains the same model on the same data shards from the same seeds for the same token
budget (``steps`` inner steps on each of ``workers`` peers):

=====================  ==========================================================================
arm                    what runs
=====================  ==========================================================================
ddp                    real ``torch.distributed`` DDP (gloo), one process per peer, AdamW, gradients
                       averaged every step (``bench/baselines.py``)
single                 one peer alone, no communication (the lab); a quarter of the tokens
hivemind_optimizer     real ``hivemind.Optimizer``, one process per peer, local AdamW updates and
                       parameter averaging every H = 50 steps (``bench/hivemind_baseline.py``)
diloco_h10/h50/h100    lock-step DiLoCo (Nesterov 0.7/0.9) with H = 10/50/100 (the lab)
diloco_h50_mom0.9      H = 50 with DiLoCo's outer momentum 0.9 (the recipe's is 0.5: see BENCHMARKS.md)
diloco_h50_fp16/bf16   H = 50 with the 16-bit codecs on both legs (the lab)
diloco_h50_blockwise8  H = 50 with the blockwise 8-bit codec on both legs (the lab)
diloco_h50_4bit        H = 50 with the blockwise 4-bit codec (the lab)
fedavg_h50             H = 50, outer SGD lr 1 without momentum (DiLoCo Fig. 6's FedAvg)
naive_async            asynchronous DiLoCo, every arrival its own Nesterov step (the lab)
dn_dylu                asynchronous, delayed Nesterov + dynamic local updates + grace period (the lab)
swarm_h50              the real swarm: ``p2pdiloco simulate`` peers (hivemind DHT and averagers in
                       separate processes), lock-step H = 50: checks that the lab's DiLoCo holds
=====================  ==========================================================================

The lab (:mod:`p2pdiloco.lab`) runs its workers in turn in this process on a virtual clock, with
the peers' own model, data, inner AdamW, outer optimizers and codecs; its workers run at the async
notebook's speeds (0.58, 0.75, 1.51, 3.33 s/step), so its clock shows what heterogeneity costs
lock-step rounds. The real arms (``ddp``, ``hivemind_optimizer``, ``swarm_h50``) share this
machine's cores: their seconds are this machine's wall clock.

Writes to ``--out`` (default ``benchmarks/``): ``results.json`` (per arm: ``val_loss_final``, the
mean over seeds, ``val_loss_std``, ``tokens``, ``bytes_per_peer`` and more; every seed's run),
``curves.png`` (validation loss against tokens, wall clock, virtual clock and bytes per peer) and
``report.md`` (the tables of BENCHMARKS.md, with the machine and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(1, str(ROOT / "bench"))

from p2pdiloco.lab import LabArm, run_arm  # noqa: E402

LAB_ARMS = {
    "single": dict(mode="single"),
    "diloco_h10": dict(overrides=("run.inner_steps=10",)),
    "diloco_h50": dict(overrides=("run.inner_steps=50",)),
    "diloco_h100": dict(overrides=("run.inner_steps=100",)),
    "diloco_h50_mom0.9": dict(overrides=("run.inner_steps=50", "run.outer_momentum=0.9")),  # DiLoCo's own 0.7/0.9
    "diloco_h50_fp16": dict(overrides=("run.inner_steps=50", "run.compression=fp16")),
    "diloco_h50_bf16": dict(overrides=("run.inner_steps=50", "run.compression=bf16")),
    "diloco_h50_blockwise8": dict(overrides=("run.inner_steps=50", "run.compression=blockwise8")),
    "diloco_h50_4bit": dict(overrides=("run.inner_steps=50", "run.compression=4bit")),
    "fedavg_h50": dict(overrides=("run.inner_steps=50", "run.outer_optimizer=sgd", "run.outer_lr=1.0", "run.outer_momentum=0.0")),
    "naive_async": dict(mode="async", overrides=("run.inner_steps=50",), grace_s=0.0),
    # grace: one step of the slowest worker, so DyLU's phases (which end within a step of each
    # other) meet in one round; N = the 4 workers
    "dn_dylu": dict(mode="async", overrides=("run.inner_steps=50", "run.outer_optimizer=delayed_nesterov"), dylu=True,
                    grace_s=3.5),
}
ALL_ARMS = ("ddp", "single", "hivemind_optimizer", *[a for a in LAB_ARMS if a != "single"], "swarm_h50")

SUITES = {
    # the model, data, budget and seeds of BENCHMARKS.md
    "full": dict(config="configs/bench-cpu.toml", workers=4, steps=800, seeds=3, swarm_seeds=1, evals=12),
    # every arm end to end on the test recipe: checks the harness, not the figures
    "quick": dict(config="configs/test.toml", workers=2, steps=200, seeds=1, swarm_seeds=1, evals=4),
}

# The papers' numbers printed beside ours (../shared/reference/algorithms.md §3): perplexities.
PAPER = {
    "diloco_table2": {"single": 16.23, "ddp": 15.30, "diloco": 15.02},  # 150M, k = 8, H = 500
    "async_table1": {"sync": 41.35, "naive_async": 44.27, "dn_dylu": 41.13},  # 20M, k = 4, very heterogeneous
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_one(arm: str, suite: dict, seed: int, cache: str, out: Path) -> dict:
    config, k, steps, evals = suite["config"], suite["workers"], suite["steps"], suite["evals"]
    if arm in LAB_ARMS:
        spec = LabArm(arm, workers=k, steps=steps, speeds="notebook", evals=evals, **LAB_ARMS[arm])
        return run_arm(spec, config, seed, cache=cache, progress=log)
    if arm == "ddp":
        from baselines import run_ddp

        return run_ddp(config, [], k, steps, seed, cache, str(out / "logs"), evals=evals)
    if arm == "hivemind_optimizer":
        from hivemind_baseline import run_hivemind_optimizer

        return run_hivemind_optimizer(config, ["run.inner_steps=50"], k, steps, seed, cache, str(out / "logs"), evals=evals)
    if arm == "swarm_h50":
        return run_swarm(config, k, steps, seed, out / "logs" / f"swarm_seed{seed}", cache)
    raise SystemExit(f"unknown arm '{arm}': choose from {', '.join(ALL_ARMS)}")


def run_swarm(config: str, k: int, steps: int, seed: int, out: Path, cache: str) -> dict:
    """Real peers (``p2pdiloco simulate``), lock-step DiLoCo with H = 50, until the token budget."""
    from p2pdiloco.config import load_recipe
    from p2pdiloco.simulate import read_metrics, run_simulation

    h = 50
    overrides = [f"run.inner_steps={h}", "run.dynamic_local_updates=false", "run.overlap=false",
                 f"run.target_group_size={k}", f"run.min_group_size={k}", f"run.seed={seed}", f"run.model.init_seed={seed}",
                 f'peer.cache_dir="{cache}"']
    run = load_recipe(config, overrides).run
    epochs = max(1, steps // h)
    started = time.perf_counter()
    summary = run_simulation(config, overrides=overrides, num_peers=k, epochs=epochs, out=out, timeout=None)
    tokens_per_epoch = k * h * run.data.batch_size * run.data.seq_len
    # peer 0 evaluates the global parameters after every epoch: its records give the times
    # (seconds from its first evaluation, before any training: start-up is left out, as for DDP)
    evals = {r["epoch"]: r["time"] for r in read_metrics(out / "peer0.jsonl") if r.get("val_loss") is not None}
    seconds = {e: t - min(evals.values()) for e, t in evals.items()}
    sent, curve = 0.0, []
    for r in summary["epochs"]:
        sent += r["bytes_sent"] / k
        if r["val_loss"] is not None:
            curve.append([r["epoch"] * tokens_per_epoch, round(seconds.get(r["epoch"], 0.0), 3), sent, r["val_loss"]])
    if not summary["consistent"]:
        raise SystemExit(f"swarm_h50: the peers' states differed (see {out}/summary.json)")
    return dict(arm="swarm_h50", seed=seed, mode="swarm", clock="wall", workers=k, val_curve=curve,
                val_loss_final=summary["val_loss_final"], tokens=summary["epochs_completed"] * tokens_per_epoch,
                bytes_per_peer=summary["bytes_sent_total"] / k, rounds=summary["epochs_completed"],
                wall_s=time.perf_counter() - started, consistent=summary["consistent"], run_fingerprint=run.fingerprint())


def aggregate(runs: list[dict]) -> dict:
    """One arm's figures over its seeds (``val_loss_std``: sample standard deviation)."""
    finals = [r["val_loss_final"] for r in runs]
    curves = [r["val_curve"] for r in runs]
    if len({len(c) for c in curves}) == 1:  # the same evaluation points on every seed: average them
        curve = [[statistics.mean(c[i][j] for c in curves) for j in range(4)] for i in range(len(curves[0]))]
    else:
        curve = curves[0]
    out = dict(
        val_loss_final=statistics.mean(finals),
        val_loss_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
        val_loss_seeds=finals,
        seeds=[r["seed"] for r in runs],
        tokens=int(statistics.mean(r["tokens"] for r in runs)),
        bytes_per_peer=statistics.mean(r["bytes_per_peer"] for r in runs),
        rounds=statistics.mean(r["rounds"] for r in runs),
        wall_s=statistics.median(r["wall_s"] for r in runs),
        clock=runs[0]["clock"],
        val_curve=curve,
    )
    for key in ("virtual_s", "bytes_per_peer_payload", "mean_staleness", "mean_group_size"):
        if key in runs[0]:
            out[key] = statistics.mean(r[key] for r in runs)
    return out


def _payload(arm: dict) -> float:
    """Bytes per peer as the serialized payload: the lab and the swarm count only that; the real
    baselines also measured loopback (DHT included) and give their payload apart."""
    return arm.get("bytes_per_peer_payload", arm["bytes_per_peer"])


def targets(arms: dict) -> list[dict]:
    """The issue's targets: what was reached, from the aggregated arms present (bytes compared
    payload against payload)."""
    rows = []

    def have(*names):
        return all(n in arms for n in names)

    if have("ddp", "diloco_h50"):
        d, x = arms["ddp"], arms["diloco_h50"]
        gap = (x["val_loss_final"] - d["val_loss_final"]) / d["val_loss_final"]
        rows.append(dict(target="DiLoCo H=50 within 3 % of DDP's final validation loss", value=f"{gap:+.2%}", met=gap <= 0.03))
        ratio = _payload(d) / max(1.0, _payload(x))
        rows.append(dict(target="... with >= 50x fewer bytes per peer", value=f"{ratio:.0f}x", met=ratio >= 50))
    if have("ddp", "diloco_h50_blockwise8"):
        ratio = _payload(arms["ddp"]) / max(1.0, _payload(arms["diloco_h50_blockwise8"]))
        rows.append(dict(target=">= 200x fewer bytes per peer with blockwise8", value=f"{ratio:.0f}x", met=ratio >= 200))
    if have("single", "diloco_h50"):
        s, x = arms["single"], arms["diloco_h50"]
        spread = 2 * max(s["val_loss_std"], x["val_loss_std"])
        margin = s["val_loss_final"] - x["val_loss_final"]
        enough = min(len(s["seeds"]), len(x["seeds"])) > 1  # one seed has no spread to compare with
        rows.append(dict(target="DiLoCo clearly better than one peer alone (by more than 2 sigma)",
                         value=f"{margin:.3f} nats better (2 sigma = {spread:.3f})" if enough else f"{margin:.3f} nats (1 seed: no spread)",
                         met=margin > spread if enough else None))
    if have("hivemind_optimizer", "diloco_h50"):
        h, x = arms["hivemind_optimizer"], arms["diloco_h50"]
        margin = h["val_loss_final"] - x["val_loss_final"]
        ratio = _payload(h) / max(1.0, _payload(x))
        spread = 2 * max(h["val_loss_std"], x["val_loss_std"])
        enough = min(len(h["seeds"]), len(x["seeds"])) > 1
        rows.append(dict(target="p2pdiloco (H=50) ahead of hivemind.Optimizer at equal tokens and bytes (by more than 2 sigma)",
                         value=f"{margin:+.3f} nats (2 sigma = {spread:.3f}); hivemind's payload bytes / ours: {ratio:.2f}x",
                         met=(margin > spread and ratio >= 0.95) if enough else None))
    return rows


def _ppl(loss: float) -> str:
    import math

    return f"{math.exp(loss):.2f}"


def report(results: dict) -> str:
    """The markdown tables of BENCHMARKS.md."""
    arms, meta = results["arms"], results["meta"]
    lines = [f"Suite `{meta['suite']}`, recipe `{meta['config']}`, {meta['workers']} peers x {meta['steps']} inner steps, "
             f"seeds {meta['seeds']}; made by `{meta['command']}` on {meta['machine']} ({meta['finished']}, "
             f"{meta['wall_s'] / 60:.0f} min).", ""]
    lines += ["| arm | val loss (mean ± std over seeds) | ppl | tokens | bytes per peer | rounds | clock s |",
              "|---|---|---|---|---|---|---|"]
    for name in ALL_ARMS:
        if name not in arms:
            continue
        a = arms[name]
        clock = f"{a['virtual_s']:.0f} (virtual)" if "virtual_s" in a else f"{a['wall_s']:.0f} (wall)"
        lines.append(f"| `{name}` | {a['val_loss_final']:.4f} ± {a['val_loss_std']:.4f} (n={len(a['seeds'])}) | "
                     f"{_ppl(a['val_loss_final'])} | {a['tokens']:,} | {a['bytes_per_peer'] / 1e6:,.2f} MB | {a['rounds']:.0f} | {clock} |")
    lines += ["", "### Targets", "", "| target | reached | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'n/a' if t['met'] is None else 'yes' if t['met'] else '**no**'} |" for t in results["targets"]]

    def rel(name, base):
        return f"{(arms[name]['val_loss_final'] - arms[base]['val_loss_final']) / arms[base]['val_loss_final']:+.2%}"

    if all(n in arms for n in ("single", "ddp", "diloco_h50")):
        p = PAPER["diloco_table2"]
        lines += ["", "### DiLoCo Table 2 at small scale (paper: 150M, k = 8, H = 500, C4; ours: the table above)", "",
                  "| method | paper ppl | paper vs 1 worker | ours ppl | ours loss vs 1 worker |", "|---|---|---|---|---|"]
        for label, ours, theirs in (("1 worker", "single", "single"), ("data-parallel", "ddp", "ddp"), ("DiLoCo", "diloco_h50", "diloco")):
            lines.append(f"| {label} | {p[theirs]:.2f} | {(p[theirs] - p['single']) / p['single']:+.1%} | "
                         f"{_ppl(arms[ours]['val_loss_final'])} | {rel(ours, 'single')} |")
    hs = [h for h in ("diloco_h10", "diloco_h50", "diloco_h100") if h in arms]
    if len(hs) > 1 and "diloco_h50" in arms:
        lines += ["", "### DiLoCo Fig. 4, the H sweep (paper: H = 1000 only +2.9 % ppl over H = 50, for 20x less communication)", "",
                  "| H | val loss | vs H = 50 | rounds | bytes per peer |", "|---|---|---|---|---|"]
        for h in hs:
            a = arms[h]
            lines.append(f"| {h.split('_h')[1]} | {a['val_loss_final']:.4f} ± {a['val_loss_std']:.4f} | {rel(h, 'diloco_h50')} | "
                         f"{a['rounds']:.0f} | {a['bytes_per_peer'] / 1e6:.2f} MB |")
    if all(n in arms for n in ("diloco_h50", "naive_async", "dn_dylu")):
        p = PAPER["async_table1"]
        lines += ["", "### Async Local-SGD Table 1 at small scale (paper: 20M, k = 4, very heterogeneous; ours: notebook speeds)", "",
                  "| method | paper ppl | paper vs sync | ours ppl | ours loss vs sync | virtual s | staleness |", "|---|---|---|---|---|---|---|"]
        for label, ours, theirs in (("DiLoCo (sync)", "diloco_h50", "sync"), ("async, naive", "naive_async", "naive_async"),
                                    ("async, DN + DyLU", "dn_dylu", "dn_dylu")):
            a = arms[ours]
            lines.append(f"| {label} | {p[theirs]:.2f} | {(p[theirs] - p['sync']) / p['sync']:+.1%} | {_ppl(a['val_loss_final'])} | "
                         f"{rel(ours, 'diloco_h50')} | {a.get('virtual_s', 0):.0f} | {a.get('mean_staleness', 0):.2f} |")
    if "swarm_h50" in arms and "diloco_h50" in arms:
        s, x = arms["swarm_h50"], arms["diloco_h50"]
        lines += ["", "### The real swarm against the lab (DiLoCo, H = 50)", "",
                  f"Real peers: val loss {s['val_loss_final']:.4f} at {s['tokens']:,} tokens, {s['bytes_per_peer'] / 1e6:.2f} MB sent per peer; "
                  f"the lab: {x['val_loss_final']:.4f} ± {x['val_loss_std']:.4f} at {x['tokens']:,} tokens, "
                  f"{x['bytes_per_peer'] / 1e6:.2f} MB per peer (payload only)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab20")(i) for i, name in enumerate(ALL_ARMS)}  # one colour per arm in every panel
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [(axes[0][0], 0, "tokens (all peers)", None), (axes[0][1], 1, "wall clock s from the first step (real processes)", "wall"),
              (axes[1][0], 1, "virtual s (lab, notebook speeds)", "virtual"), (axes[1][1], 2, "bytes sent per peer", None)]
    for ax, col, label, clock in panels:
        for name, a in results["arms"].items():
            if clock is not None and a["clock"] != clock:
                continue
            pts = [(p[col], p[3]) for p in a["val_curve"] if col != 2 or p[2] > 0]
            if pts:
                ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", ms=3, label=name, color=colors.get(name))
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        if col == 2:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"p2pdiloco benchmarks ({results['meta']['suite']}): mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import torch

    return f"{os.cpu_count()} x {cpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="quick", help="full: BENCHMARKS.md; quick: a few minutes")
    ap.add_argument("--arms", help=f"comma-separated subset of: {', '.join(ALL_ARMS)}")
    ap.add_argument("--seeds", type=int, help="seeds per arm (default: the suite's; the swarm arm runs 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="where results.json, curves.png, report.md go")
    ap.add_argument("--cache", default=os.environ.get("P2PDILOCO_CACHE", "~/.cache/p2pdiloco"), help="tokenizer and data cache")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other arms of an earlier run of the same suite in --out (re-run some arms, or add real ones)")
    ap.add_argument("--rerender", action="store_true", help="only rewrite the report, targets and plot from --out/results.json")
    args = ap.parse_args(argv)
    if args.rerender:
        results = json.loads((args.out / "results.json").read_text())
        return write_reports(results, args.out)
    suite = dict(SUITES[args.suite])
    arms = ALL_ARMS if not args.arms else tuple(a.strip() for a in args.arms.split(","))
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown:
        print(f"suite: unknown arm(s) {', '.join(unknown)}: choose from {', '.join(ALL_ARMS)}", file=sys.stderr)
        return 2
    seeds = args.seeds or suite["seeds"]
    cache = str(Path(args.cache).expanduser())
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the lab runs its workers in turn: use the cores
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in range(suite["swarm_seeds"] if arm == "swarm_h50" else seeds):
            log(f"{arm}, seed {seed} ...")
            r = run_one(arm, suite, seed, cache, args.out)
            log(f"{arm}, seed {seed}: val {r['val_loss_final']:.4f}, {r['tokens']:,} tokens, "
                f"{r['bytes_per_peer'] / 1e6:.2f} MB per peer, {r['wall_s']:.0f} s")
            runs.setdefault(arm, []).append(r)
    command = shlex.join(["python", "bench/suite.py", *(argv if argv is not None else sys.argv[1:])])
    commands, wall = [command], time.perf_counter() - started
    earlier = args.out / "results.json"
    if args.merge and earlier.exists():
        old = json.loads(earlier.read_text())
        if old["meta"]["suite"] != args.suite:
            print(f"suite: {earlier} holds suite '{old['meta']['suite']}', not '{args.suite}': use another --out", file=sys.stderr)
            return 2
        runs = {**{a: rs for a, rs in old["runs"].items() if a not in runs}, **runs}
        commands = [*old["meta"]["commands"], command]
        wall += old["meta"]["wall_s"]
    runs = {a: runs[a] for a in ALL_ARMS if a in runs}  # the report's order
    aggregated = {arm: aggregate(rs) for arm, rs in runs.items()}
    results = dict(
        meta=dict(suite=args.suite, config=suite["config"], workers=suite["workers"], steps=suite["steps"], seeds=seeds,
                  command=" && ".join(commands), commands=commands,
                  machine=machine(), finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall_s=wall),
        arms=aggregated,
        runs=runs,
    )
    return write_reports(results, args.out)


def write_reports(results: dict, out: Path) -> int:
    """Targets into ``results``, then ``results.json``, ``curves.png`` and ``report.md`` in ``out``."""
    results["targets"] = targets(results["arms"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "curves.png")
    text = report(results)
    (out / "report.md").write_text(text)
    print(text)
    log(f"wrote {out / 'results.json'}, {out / 'curves.png'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
