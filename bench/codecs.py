"""Codec benchmark: quality, bytes and speed of every pseudo-gradient codec against fp32.

    .venv/bin/python bench/codecs.py throughput            # encode/decode MB/s, 25M values
    .venv/bin/python bench/codecs.py quality --seeds 3     # final val loss per codec, in-process lab
    .venv/bin/python bench/codecs.py swarm                 # real peers: bytes per round, consistency
    sudo .venv/bin/python bench/codecs.py netem            # all-reduce of 25M values, 50 Mbit/s + 40 ms

Each part prints a table and writes ``OUT/<part>.json`` (``--out``, default ``runs/codecs``).

quality
    The tiny CPU recipe trained by N simulated peers in one process, in turn: each peer runs H
    inner steps (the peers' own ``InnerOptimizer`` and ``TokenStream``), then the pseudo-gradients
    go through the same arithmetic as the consistent all-reduce: the vector is cut into N slices,
    slice j is reduced by peer j; every other peer's part is encoded and decoded with the codec
    (``Codec.roundtrip``), peer j's own part is not; the weighted mean is taken in fp32 and
    encoded once more; every peer applies the decoded average with the same ``OuterState``.
    Deterministic, so every codec sees the same seed, data and tokens, and the difference to
    fp32 is paired by seed; the fp32 arm's seed-to-seed spread is printed beside it.
swarm
    ``p2pdiloco simulate`` per codec (real peers, real all-reduce): bytes sent and received per
    peer and round as measured at the all-reduce, encode/decode seconds, and whether every peer
    held the same state at every epoch.
netem
    Three averagers in network namespaces whose links are shaped in user space (TUN devices,
    see ``bench/wan.py``) to 50 Mbit/s each way and 20 ms one-way delay per node (40 ms between
    two peers), average a 25M-value vector; the round time per codec (median of the rounds after
    the first, which also dials the other members over the slow links and is reported apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from p2pdiloco import codecs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL = list(codecs.CODECS)


# ----------------------------------------------------------------------------- throughput
def throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.values, generator=g) * 1e-3
    mb = x.numel() * 4 / 1e6  # MB of fp32 input, for both directions
    rows = {}
    for name in args.codecs:
        codec = codecs.make_codec(name)
        enc, dec = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            payload = codec.encode(x)
            t1 = time.perf_counter()
            codec.decode(payload, x.numel())
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        rows[name] = dict(encode_mb_s=mb / statistics.median(enc), decode_mb_s=mb / statistics.median(dec),
                          bytes_per_value=len(payload) / x.numel(), ratio_vs_fp32=4 * x.numel() / len(payload))
        print(f"{name:>10}: encode {rows[name]['encode_mb_s']:7.0f} MB/s  decode {rows[name]['decode_mb_s']:7.0f} MB/s  "
              f"{rows[name]['bytes_per_value']:.4f} B/value ({rows[name]['ratio_vs_fp32']:.2f}x smaller)", flush=True)
    return dict(values=args.values, threads=args.threads, repeats=args.repeats, codecs=rows)


# ----------------------------------------------------------------------------- quality (lab)
def _consistent_average(codec: codecs.Codec, deltas: list[torch.Tensor], weights: list[float]):
    """The consistent all-reduce's arithmetic, in one process: returns (average, residuals)."""
    n = len(deltas)
    bounds = [round(i * deltas[0].numel() / n) for i in range(n + 1)]
    average = torch.empty_like(deltas[0])
    residuals = [torch.zeros_like(d) for d in deltas]
    total = sum(weights)
    for j in range(n):  # peer j reduces slice j
        lo, hi = bounds[j], bounds[j + 1]
        acc = torch.zeros(hi - lo)
        for i, (d, w) in enumerate(zip(deltas, weights)):
            part = d[lo:hi]
            if i != j:
                sent = codec.roundtrip(part)
                residuals[i][lo:hi] = part - sent
                part = sent
            acc += part * (w / total)
        average[lo:hi] = codec.roundtrip(acc)
    return average, residuals


def lab_run(config: str, codec_name: str, seed: int, peers: int, epochs: int, error_feedback: bool, cache: str) -> dict:
    from p2pdiloco import corpus, data, inner, model
    from p2pdiloco.config import load_recipe
    from p2pdiloco.outer import OuterState, flatten_parameters, load_flat_parameters

    recipe = load_recipe(config, [f"run.seed={seed}", f"run.model.init_seed={seed}"])
    run = recipe.run
    cache_dir = Path(cache).expanduser()
    corpus.prepare(run.data, run.model.vocab_size, cache_dir)
    device = torch.device("cpu")
    workers = []
    for i in range(peers):
        m = model.build_model(run.model)
        stream = data.TokenStream(run.data, run.model.vocab_size, cache_dir, shard_key=f"peer{i}", seed=seed * 1000 + i)
        workers.append((m, inner.InnerOptimizer(m, run.inner, device, False), stream))
    probe = workers[0][0]
    val_batches = workers[0][2].val_batches()
    outer = OuterState(flatten_parameters(probe), optimizer=run.outer_optimizer, lr=run.outer_lr, momentum=run.outer_momentum)
    codec = codecs.make_codec(codec_name)
    residuals = [torch.zeros(outer.size) for _ in range(peers)] if error_feedback else None
    curve = [(0, model.evaluate(probe, val_batches, device, False))]
    tokens_per_step = run.data.batch_size * run.data.seq_len
    for epoch in range(epochs):
        deltas = []
        for i, (m, opt, stream) in enumerate(workers):
            load_flat_parameters(m, outer.params)
            for step in range(run.inner_steps):
                opt.step(stream.next_batch(), epoch * run.inner_steps + step)
            delta = outer.pseudo_gradient(flatten_parameters(m))
            deltas.append(delta + residuals[i] if residuals else delta)
        average, dropped = _consistent_average(codec, deltas, [1.0] * peers)
        if residuals:
            residuals = dropped
        outer.step(average)
        load_flat_parameters(probe, outer.params)
        curve.append((epoch + 1, model.evaluate(probe, val_batches, device, False)))
    return dict(codec=codec_name, seed=seed, error_feedback=error_feedback, val_curve=curve, val_loss_final=curve[-1][1],
                tokens=epochs * peers * run.inner_steps * tokens_per_step)


def quality(args) -> dict:
    torch.set_num_threads(args.threads)
    arms = [(c, False) for c in args.codecs] + [(c, True) for c in args.error_feedback]
    runs = []
    for seed in range(args.seeds):
        for codec_name, ef in arms:
            t0 = time.monotonic()
            r = lab_run(args.config, codec_name, seed, args.peers, args.epochs, ef, args.cache)
            runs.append(r)
            print(f"seed {seed} {codec_name}{'+ef' if ef else ''}: val {r['val_curve'][0][1]:.4f} -> {r['val_loss_final']:.4f}"
                  f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    base = {r["seed"]: r["val_loss_final"] for r in runs if r["codec"] == "none" and not r["error_feedback"]}
    spread = statistics.stdev(base.values()) if len(base) > 1 else float("nan")
    table = {}
    for codec_name, ef in arms:
        mine = {r["seed"]: r["val_loss_final"] for r in runs if r["codec"] == codec_name and r["error_feedback"] == ef}
        diffs = [100 * (mine[s] - base[s]) / base[s] for s in mine if s in base]
        table[codec_name + ("+ef" if ef else "")] = dict(
            val_loss_final=statistics.mean(mine.values()),
            diff_pct_mean=statistics.mean(diffs), diff_pct_max=max(diffs, key=abs),
        )
    print(f"\n{args.peers} peers, {args.epochs} epochs x H={load_h(args.config)}, {args.seeds} seed(s); "
          f"fp32 final val loss {statistics.mean(base.values()):.4f}, seed-to-seed std {spread:.4f} "
          f"({100 * spread / statistics.mean(base.values()):.2f} %)")
    print(f"{'codec':>14} {'val loss':>9} {'vs fp32 (paired, mean)':>24} {'worst seed':>11}")
    for name, row in table.items():
        print(f"{name:>14} {row['val_loss_final']:9.4f} {row['diff_pct_mean']:+23.3f}% {row['diff_pct_max']:+10.3f}%")
    return dict(config=args.config, peers=args.peers, epochs=args.epochs, seeds=args.seeds, fp32_seed_std=spread,
                arms=table, runs=runs)


def load_h(config: str) -> int:
    from p2pdiloco.config import load_recipe

    return load_recipe(config).run.inner_steps


# ----------------------------------------------------------------------------- swarm
def swarm(args) -> dict:
    rows = {}
    for name in args.codecs:
        out = Path(args.out) / f"swarm-{name}"
        cmd = [sys.executable, "-m", "p2pdiloco", "simulate", args.config, "--peers", str(args.peers), "--epochs",
               str(args.epochs), "--out", str(out), "--set", f"run.compression={name}"]
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        s = json.loads((out / "summary.json").read_text())
        rows[name] = dict(
            consistent=s["consistent"], epochs=s["epochs_completed"], val_loss_final=s["val_loss_final"],
            bytes_sent_per_round=s["bytes_sent_per_round"], bytes_received_per_round=s["bytes_received_per_round"],
            encode_s=s["encode_s_total"], decode_s=s["decode_s_total"], wall_s=time.monotonic() - t0,
        )
    fp32 = rows.get("none", {}).get("bytes_sent_per_round")
    print(f"\n{'codec':>10} {'sent/round':>12} {'recv/round':>12} {'vs fp32':>8} {'enc s':>7} {'dec s':>7} {'states':>10} {'val':>7}")
    for name, r in rows.items():
        ratio = fp32 / r["bytes_sent_per_round"] if fp32 and r["bytes_sent_per_round"] else float("nan")
        r["ratio_vs_fp32"] = ratio
        print(f"{name:>10} {r['bytes_sent_per_round'] / 1e6:10.2f}MB {r['bytes_received_per_round'] / 1e6:10.2f}MB "
              f"{ratio:7.2f}x {r['encode_s']:7.2f} {r['decode_s']:7.2f} {'identical' if r['consistent'] else 'DIFFER':>10} "
              f"{r['val_loss_final']:7.3f}")
    return dict(config=args.config, peers=args.peers, epochs=args.epochs, codecs=rows)


# ----------------------------------------------------------------------------- netem
def netem(args) -> dict:
    from wan import allreduce_over_wan  # noqa: E402  (bench/wan.py: namespaces need root)

    rows = allreduce_over_wan(args.codecs, values=args.values, rate_bps=args.rate_mbit * 1e6, delay_s=args.delay_ms / 1e3,
                              rounds=args.rounds, out=Path(args.out))
    fp32 = rows.get("none", {}).get("seconds")
    print(f"\n{args.values / 1e6:.0f}M values, 3 peers, {args.rate_mbit:.0f} Mbit/s each way, {2 * args.delay_ms:.0f} ms between peers")
    print(f"{'codec':>10} {'all-reduce s':>13} {'vs fp32':>8} {'sent/peer':>10} {'enc s':>6} {'dec s':>6} {'1st round s':>12} {'failed':>7}")
    for name, r in rows.items():
        print(f"{name:>10} {r['seconds']:13.2f} {fp32 / r['seconds'] if fp32 else float('nan'):7.2f}x {r['bytes_sent'] / 1e6:8.1f}MB "
              f"{r['encode_s']:6.2f} {r['decode_s']:6.2f} {r['first_round_s']:12.2f} {r['rounds_failed']:7d}")
    return dict(values=args.values, rate_mbit=args.rate_mbit, delay_ms_one_way_per_node=args.delay_ms, codecs=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["throughput", "quality", "swarm", "netem"])
    ap.add_argument("--codecs", nargs="+", default=ALL, choices=ALL)
    ap.add_argument("--out", default=str(ROOT / "runs" / "codecs"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.toml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--values", type=int, default=25_000_000, help="throughput and netem: pseudo-gradient size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--error-feedback", nargs="*", default=["4bit"], choices=ALL, help="quality: codecs also run with error feedback")
    ap.add_argument("--cache", default="~/.cache/p2pdiloco")
    ap.add_argument("--rate-mbit", type=float, default=50.0)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="netem: one-way delay per node (two nodes: twice this)")
    ap.add_argument("--rounds", type=int, default=4, help="netem: rounds per codec; the first (cold) one is reported apart")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    result = dict(throughput=throughput, quality=quality, swarm=swarm, netem=netem)[args.part](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.part}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / (args.part + '.json')}")


if __name__ == "__main__":
    main()
