"""Inner-loop overhead: p2pdiloco's inner step against a bare PyTorch training loop.

    python bench/inner_loop.py                       # tiny-cpu, 1 thread
    python bench/inner_loop.py --config test --steps 50 --rounds 7
    python bench/inner_loop.py --workers 2           # and C: one peer on 2 local workers (2 CPU processes, or 2 GPUs)

Both loops train the same model (same init) in one process, interleaved A B A B ... so that
machine noise hits both alike. tokens/s and s/step come from the median step time of each loop
over all rounds (robust to bursts of load from other processes); the round min/max columns show
how much the machine wandered.

  A  bare PyTorch: plain AdamW; forward, backward, clip, step, zero_grad on batches built beforehand.
  B  p2pdiloco:    ``TokenStream.next_batch()`` + ``InnerOptimizer.step()``, exactly as a peer calls them.
  C  (``--workers N``) the same peer on N local workers (``peer.devices``: N CPU processes of
     ``--threads`` threads each, or the first N GPUs): ``LocalWorkers.step()``, the recipe's global
     batch split among them, gradients averaged by DDP. C/B is the multi-device speed-up.

Target: B within 2 % of A (ratio B/A >= 0.98).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from p2pdiloco.config import load_recipe  # noqa: E402
from p2pdiloco.data import TokenStream  # noqa: E402
from p2pdiloco.inner import InnerOptimizer  # noqa: E402
from p2pdiloco.model import build_model, count_parameters, resolve_device, use_bf16  # noqa: E402

TARGET = 0.98


def bare_loop(model, batches, cfg, device, bf16):
    """A: the loop anyone would write first."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def run(steps: int) -> list[float]:
        times = []
        for i in range(steps):
            start = time.perf_counter()
            x = batches[i % len(batches)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad()
            loss.item()  # a real loop logs its loss (and this waits for the GPU)
            times.append(time.perf_counter() - start)
        return times

    return run


def p2pdiloco_loop(model, stream, cfg, device, bf16, micro):
    """B: what a peer runs between two averaging rounds."""
    inner = InnerOptimizer(model, cfg, device, bf16, micro)
    step = [0]

    def run(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            inner.step(stream.next_batch(), step[0])  # returns a float: waits for the GPU
            step[0] += 1
            times.append(time.perf_counter() - start)
        return times

    return run


def workers_loop(workers):
    """C: one peer on several local devices."""
    step = [0]

    def run(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            workers.step(step[0])
            step[0] += 1
            times.append(time.perf_counter() - start)
        return times

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny-cpu", help="recipe name or TOML path (default: tiny-cpu)")
    parser.add_argument("--steps", type=int, default=5, help="steps per loop per round")
    parser.add_argument("--rounds", type=int, default=8, help="A/B rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--cache-dir", default=None, help="tokenizer/corpus cache (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=0, help="also C: one peer on this many local workers (0: off)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.config, args.overrides)
    run, peer = recipe.run, recipe.peer
    device = resolve_device(peer)
    bf16 = use_bf16(peer, device)
    cache = Path(args.cache_dir or peer.cache_dir).expanduser()
    stream = TokenStream(run.data, run.model.vocab_size, cache, shard_key="bench", seed=run.seed)
    batches = [stream.next_batch() for _ in range(16)]  # A's pre-built batches, from the same data
    model_a = build_model(run.model).to(device)
    model_b = build_model(run.model).to(device)
    loops = {
        "A": bare_loop(model_a, batches, run.inner, device, bf16),
        "B": p2pdiloco_loop(model_b, stream, run.inner, device, bf16, peer.micro_batch_size),
    }
    workers = None
    if args.workers:
        from p2pdiloco.model import resolve_devices
        from p2pdiloco.workers import LocalWorkers

        spec = f"cpu:{args.workers}" if device.type == "cpu" else ",".join(f"cuda:{i}" for i in range(args.workers))
        peer = peer.model_copy(update={"devices": spec, "threads": args.threads})
        workers = LocalWorkers(run, peer, cache, "bench", resolve_devices(peer))
        loops["C"] = workers_loop(workers)
    step_tokens = run.data.batch_size * run.data.seq_len
    print(f"config {args.config}: {count_parameters(model_a) / 1e6:.2f}M parameters, batch {run.data.batch_size} x "
          f"{run.data.seq_len}, device {device}, bf16 {bf16}, threads {torch.get_num_threads()}, "
          f"{args.steps} steps x {args.rounds} rounds (+1 warm-up round)")
    rates: dict[str, list[float]] = {name: [] for name in loops}  # tokens/s of each round
    steps: dict[str, list[float]] = {name: [] for name in loops}  # seconds of every step
    for r in range(args.rounds + 1):
        for name, loop in loops.items():
            times = loop(args.steps)
            if r > 0:
                rates[name].append(step_tokens * len(times) / sum(times))
                steps[name] += times
    print()
    print(f"{'loop':<26}{'tokens/s':>10}{'s/step':>9}{'round min':>11}{'round max':>11}")
    labels = {"A": "A bare PyTorch", "B": "B p2pdiloco inner loop", "C": f"C p2pdiloco, {args.workers} workers"}
    for name in loops:
        med_step = statistics.median(steps[name])
        print(f"{labels[name]:<26}{step_tokens / med_step:>10,.0f}{med_step:>9.3f}"
              f"{min(rates[name]):>11,.0f}{max(rates[name]):>11,.0f}")
    # the verdict uses median step times: robust to bursts of load from other processes
    ratio = statistics.median(steps["A"]) / statistics.median(steps["B"])
    paired = [b / a for a, b in zip(rates["A"], rates["B"])]
    print()
    print(f"ratio B/A, tokens/s from median step times: {ratio:.3f}")
    print(f"ratio B/A, median of the per-round ratios:  {statistics.median(paired):.3f}   "
          f"(rounds: {' '.join(f'{x:.2f}' for x in paired)})")
    print(f"target: within 2 % (B/A >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    if workers is not None:
        speedup = statistics.median(steps["B"]) / statistics.median(steps["C"])
        paired = [c / b for b, c in zip(rates["B"], rates["C"])]
        print(f"ratio C/B ({args.workers} local workers over 1), from median step times: {speedup:.3f}   "
              f"(rounds: {' '.join(f'{x:.2f}' for x in paired)})")
        workers.close()
    stream.close()


if __name__ == "__main__":
    main()
