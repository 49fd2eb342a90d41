"""``p2pdiloco doctor``: check a volunteer's machine for a recipe and say what to fix.

Every check yields a :class:`Check` (``ok``, ``warn`` or ``fail``, what was found, and the fix).
A check that crashes is itself reported as a failure, so the report is always complete. The
network checks (``--peers``) start a throwaway ``p2pd`` on the chosen port and ask the run's
peers to dial it back (see :mod:`p2pdiloco.nat`: hivemind's own "validate" ping cannot tell).

Memory and disk needs are estimates from the recipe (parameter count, optimizer and outer state,
data, activations), not measurements: :func:`estimate` documents each term.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from p2pdiloco.config import ModelConfig, Recipe

OK, WARN, FAIL = "ok", "warn", "fail"
GPU_RECIPE_PARAMS = 50_000_000  # above this, a CPU peer would take hours per epoch
PROCESS_OVERHEAD = 1.5e9  # RSS of the peer's processes besides the state: torch, transformers, DHT, averager, p2pd
P2PD_CHECK_S = 10.0  # running `p2pd -h` once


@dataclasses.dataclass
class Check:
    name: str
    status: str  # ok / warn / fail
    detail: str
    fix: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


# ---------------------------------------------------------------- estimates
def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the recipe's ``LlamaForCausalLM``, from its config alone (no torch).

    Embeddings V x h (and a separate head unless tied); per layer: q and o projections h x h,
    k and v projections h x (kv_heads x head_dim), the gated MLP 3 x h x i, two RMSNorms; a final
    RMSNorm. Llama has no biases.
    """
    h, v, i = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    kv = (cfg.num_kv_heads or cfg.num_heads) * (h // cfg.num_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * per_layer + h


@dataclasses.dataclass
class Needs:
    params: int
    device_bytes: float  # on the training device: weights, gradients, AdamW moments, activations
    host_bytes: float  # in RAM besides the device: outer state, round buffers, processes (+ device if CPU)
    disk_bytes: float  # in the cache folder and checkpoint folder
    activation_bytes: float
    terms: dict[str, float]


def estimate(recipe: Recipe, on_gpu: bool, bf16: bool, data_cached: bool) -> Needs:
    """What one peer of ``recipe`` needs (rough, on the safe side).

    - training device: fp32 weights + gradients + AdamW's two moments = 16 bytes/parameter, plus
      activations of one micro-batch: per token about 34 bytes x hidden x layers (bf16; twice
      that in fp32) and 12 bytes x vocabulary for the logits and their gradient;
    - host RAM: the outer state (global parameters and momentum, 8 bytes/parameter, 12 with
      delayed Nesterov's buffer), a round's buffers (the averager's shared buffer, the
      pseudo-gradient, the local parameters it was measured to, the average: 16), a state being
      served to a newcomer (a copy of the outer state), error feedback's residuals (8), plus
      about 1.5 GB for the processes; with a CPU device, the training device's share too;
    - disk: the tokenized corpus (local corpora: about half their text size; a streamed hub
      dataset: its tokenizer sample) unless already cached, and with a checkpoint folder two
      checkpoints at once during the atomic rewrite (outer state + AdamW + residual).
    """
    run, peer = recipe.run, recipe.peer
    p = count_parameters(run.model)
    dn = run.outer_optimizer == "delayed_nesterov"
    rows = peer.micro_batch_size or run.data.batch_size
    tokens = rows * run.data.seq_len
    per_token = (34 if bf16 else 68) * run.model.hidden_size * run.model.num_layers + 12 * run.model.vocab_size
    activations = tokens * per_token
    outer = (12 if dn else 8) * p
    terms = dict(
        training=16 * p, activations=activations, outer_state=outer, round_buffers=16 * p,
        serving=outer, error_feedback=8 * p if run.error_feedback else 0, processes=PROCESS_OVERHEAD,
    )
    device = terms["training"] + activations
    host = outer + terms["round_buffers"] + terms["serving"] + terms["error_feedback"] + PROCESS_OVERHEAD
    if not on_gpu:
        host += device
    data = 0.0 if data_cached else _data_bytes(run.data)
    checkpoint = 2 * ((12 if dn else 8) * p + 8 * p + (4 * p if run.error_feedback else 0)) if peer.checkpoint_dir else 0.0
    terms.update(data=data, checkpoint=checkpoint)
    return Needs(params=p, device_bytes=device, host_bytes=host, disk_bytes=data + checkpoint,
                 activation_bytes=activations, terms=terms)


def _data_bytes(cfg) -> float:
    if cfg.source == "shakespeare":
        return 20e6
    if cfg.source == "text_files" and cfg.path:
        folder = Path(cfg.path).expanduser()
        files = folder.rglob("*.txt") if folder.is_dir() else []
        return sum(f.stat().st_size for f in files) / 2 + 10e6
    return 2.0 * cfg.tokenizer_train_chars + 50e6  # a hub dataset: the BPE sample, and the streaming cache


# ---------------------------------------------------------------- checks
def check_python() -> Check:
    v = sys.version_info
    text = f"Python {v.major}.{v.minor}.{v.micro}"
    if (3, 10) <= (v.major, v.minor) <= (3, 12):
        return Check("python", OK, text)
    return Check("python", FAIL, text + " (p2pdiloco supports 3.10-3.12)",
                 "use Python 3.10, 3.11 or 3.12 (hivemind 1.1.12 and torch wheels are built for them)")


def check_torch(recipe: Recipe) -> tuple[list[Check], dict]:
    """torch, CUDA and the device the recipe's peer would train on."""
    import torch

    from p2pdiloco.errors import ConfigError
    from p2pdiloco.model import resolve_devices, use_bf16

    checks = []
    cuda = torch.cuda.is_available()
    built = torch.version.cuda or "none (CPU build)"
    checks.append(Check("torch", OK, f"torch {torch.__version__}, CUDA build {built}", data=dict(version=torch.__version__)))
    try:
        devices = resolve_devices(recipe.peer)
        device = devices[0]
        bf16 = use_bf16(recipe.peer, device)
    except ConfigError as e:
        problem, _, fix = str(e).rpartition(": ")  # our errors end with ": the fix"
        checks.append(Check("device", FAIL, problem or str(e), fix))
        return checks, dict(on_gpu=False, bf16=False, gpu_total=None, devices=[])
    info = dict(on_gpu=device.type == "cuda", bf16=bf16, gpu_total=None, devices=[str(d) for d in devices])
    if len(devices) > 1:
        checks.append(Check("devices", OK, f"{len(devices)} local workers, one per device ({', '.join(map(str, devices))}): "
                            "one peer, the recipe's batch split among them", data=dict(devices=info["devices"])))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_total"] = props.total_memory
        free, _ = torch.cuda.mem_get_info(device)
        info["gpu_free"] = free
        checks.append(Check(
            "cuda", OK,
            f"{props.name} ({device}), {_gb(props.total_memory)} ({_gb(free)} free), compute {props.major}.{props.minor}, "
            f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'}; training in {'bf16' if bf16 else 'fp32'}",
            data=dict(device=props.name, total=props.total_memory, free=free, bf16=torch.cuda.is_bf16_supported()),
        ))
    elif cuda:
        checks.append(Check("cuda", OK, f"{torch.cuda.get_device_name(0)} present, but peer.devices = {recipe.peer.devices}: training on CPU"))
    else:
        params = count_parameters(recipe.run.model)
        if params > GPU_RECIPE_PARAMS:
            checks.append(Check("cuda", WARN, f"no CUDA GPU: this {params / 1e6:.0f}M-parameter recipe would train on the CPU, "
                                "far too slowly to keep up with GPU peers",
                                "run it on a machine with an NVIDIA GPU and a CUDA build of torch, or join a CPU recipe (tiny-cpu)"))
        else:
            checks.append(Check("cuda", OK, f"no CUDA GPU: training on CPU ({params / 1e6:.1f}M parameters: fine on a CPU)"))
    return checks, info


def check_bitsandbytes(recipe: Recipe, on_gpu: bool) -> Check:
    """bitsandbytes imports, the run's codec round-trips on CPU (as on the wire), and, with a GPU,
    blockwise quantization runs on it."""
    import torch

    needed = recipe.run.compression in ("blockwise8", "4bit")
    bad = FAIL if needed else WARN
    why = f"run.compression = {recipe.run.compression}" + (" needs it" if needed else " does not need it")
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb
    except Exception as e:
        return Check("bitsandbytes", bad, f"cannot import bitsandbytes ({type(e).__name__}: {e}); {why}",
                     "pip install 'bitsandbytes>=0.43' (a CPU machine needs no CUDA for it)")
    from p2pdiloco.codecs import make_codec

    x = torch.randn(3 * 4096 + 17, generator=torch.Generator().manual_seed(0))
    try:
        codec = make_codec(recipe.run.compression)
        back = codec.extract(codec.compress(x))
        err = float((back - x).norm() / x.norm())
        if not math.isfinite(err) or err > 0.2:
            raise ValueError(f"relative error {err:.3g}")
    except Exception as e:
        return Check("bitsandbytes", FAIL, f"bitsandbytes {bitsandbytes.__version__}: the {recipe.run.compression} codec "
                     f"does not round-trip ({type(e).__name__}: {e})", "reinstall bitsandbytes, and keep numpy < 2.4")
    detail = f"bitsandbytes {bitsandbytes.__version__}; {recipe.run.compression} codec round-trips on CPU (error {err:.2g})"
    if on_gpu:
        try:
            g = x.cuda()
            codes, state = bnb.quantize_blockwise(g, blocksize=4096)
            gerr = float((bnb.dequantize_blockwise(codes, state) - g).norm() / g.norm())
            if not math.isfinite(gerr) or gerr > 0.05:
                raise ValueError(f"relative error {gerr:.3g}")
            detail += f"; blockwise 8-bit runs on the GPU (error {gerr:.2g})"
        except Exception as e:
            return Check("bitsandbytes", WARN, detail + f"; but not on the GPU ({type(e).__name__}: {str(e)[:120]})",
                         "install a bitsandbytes build for this CUDA version (the codecs run on CPU anyway)")
    return Check("bitsandbytes", OK, detail)


def check_numpy() -> Check:
    import numpy

    parts = tuple(int(p) for p in numpy.__version__.split(".")[:2] if p.isdigit())
    if parts >= (2, 4):
        return Check("numpy", FAIL, f"numpy {numpy.__version__}: hivemind 1.1.12's 8-bit codecs break on decode from 2.4",
                     "pip install 'numpy<2.4'")
    return Check("numpy", OK, f"numpy {numpy.__version__} (< 2.4)")


def check_hivemind() -> list[Check]:
    from importlib.metadata import version
    from importlib.resources import files

    checks = []
    try:
        found = version("hivemind")
    except Exception:
        return [Check("hivemind", FAIL, "hivemind is not installed", "pip install hivemind==1.1.12")]
    if found == "1.1.12":
        checks.append(Check("hivemind", OK, f"hivemind {found}"))
    else:
        checks.append(Check("hivemind", FAIL, f"hivemind {found}: p2pdiloco's all-reduce subclasses private parts of 1.1.12",
                            "pip install hivemind==1.1.12"))
    p2pd = Path(str(files("hivemind") / "hivemind_cli" / "p2pd"))
    if not p2pd.is_file():
        checks.append(Check("p2pd", FAIL, f"no p2pd daemon at {p2pd}",
                            "the PyPI wheel ships it for x86-64 Linux; elsewhere build it: HIVEMIND_BUILDGO=1 pip install hivemind==1.1.12"))
        return checks
    if not os.access(p2pd, os.X_OK):
        checks.append(Check("p2pd", FAIL, f"{p2pd} is not executable", f"chmod +x {p2pd}"))
        return checks
    try:
        out = subprocess.run([str(p2pd), "-h"], capture_output=True, text=True, timeout=P2PD_CHECK_S)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        checks.append(Check("p2pd", FAIL, f"{p2pd} does not run ({type(e).__name__}: {e})",
                            "the bundled binary is for x86-64 Linux: build it for this platform with HIVEMIND_BUILDGO=1"))
        return checks
    if "hostAddrs" not in text:
        checks.append(Check("p2pd", FAIL, f"{p2pd} runs but is not the libp2p daemon hivemind expects",
                            "reinstall hivemind==1.1.12"))
    else:
        checks.append(Check("p2pd", OK, f"{p2pd} runs"))
    return checks


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_resources(recipe: Recipe, device_info: dict) -> list[Check]:
    from p2pdiloco import corpus

    cache = Path(recipe.peer.cache_dir).expanduser()
    try:
        cached = corpus.cache_folder(recipe.run.data, recipe.run.model.vocab_size, cache).is_dir()
    except Exception:  # e.g. a text_files path that does not exist yet: the data check belongs to join
        cached = False
    needs = estimate(recipe, on_gpu=device_info["on_gpu"], bf16=device_info["bf16"], data_cached=cached)
    summary = dict(params=needs.params, **{k: int(v) for k, v in needs.terms.items()})
    checks = [Check("model", OK, f"{needs.params / 1e6:.1f}M parameters ({recipe.run.name}); one micro-batch's activations "
                    f"about {_gb(needs.activation_bytes)}", data=summary)]
    available = _mem_available()
    what = f"about {_gb(needs.host_bytes)} needed (outer state, round buffers, processes" + (
        ", and training on CPU)" if not device_info["on_gpu"] else ")")
    if available is None:
        checks.append(Check("ram", WARN, f"free RAM unknown; {what}", "check it by hand (free -g)"))
    elif available < needs.host_bytes:
        checks.append(Check("ram", FAIL, f"{_gb(available)} available, {what}",
                            "free memory, use a machine with more RAM, or a smaller recipe" +
                            ("; on CPU, a smaller --set peer.micro_batch_size lowers activations" if not device_info["on_gpu"] else ""),
                            data=dict(available=available, needed=int(needs.host_bytes))))
    else:
        status = WARN if available < 1.25 * needs.host_bytes else OK
        checks.append(Check("ram", status, f"{_gb(available)} available, {what}",
                            "little headroom: close other programs" if status == WARN else "",
                            data=dict(available=available, needed=int(needs.host_bytes))))
    if device_info["on_gpu"] and device_info.get("gpu_total"):
        total = device_info["gpu_total"]
        what = f"about {_gb(needs.device_bytes)} needed (16 bytes/parameter + activations of a micro-batch of " \
               f"{recipe.peer.micro_batch_size or recipe.run.data.batch_size})"
        if total < needs.device_bytes:
            rows = recipe.peer.micro_batch_size or recipe.run.data.batch_size
            checks.append(Check("gpu memory", FAIL, f"{_gb(total)} on the GPU, {what}",
                                f"use a smaller micro-batch: --set peer.micro_batch_size={max(1, rows // 2)}"))
        else:
            checks.append(Check("gpu memory", OK, f"{_gb(total)} on the GPU, {what}"))
    folders = {cache: needs.terms["data"]}
    if recipe.peer.checkpoint_dir:
        ckpt = Path(recipe.peer.checkpoint_dir).expanduser()
        folders[ckpt] = folders.get(ckpt, 0.0) + needs.terms["checkpoint"]
    by_device: dict[int, tuple[Path, float, list[str]]] = {}
    for folder, need in folders.items():
        base = _existing_parent(folder)
        dev = base.stat().st_dev
        prev = by_device.get(dev, (base, 0.0, []))
        by_device[dev] = (prev[0], prev[1] + need, prev[2] + [str(folder)])
    for base, need, names in by_device.values():
        free = shutil.disk_usage(base).free
        what = f"{_gb(free)} free for {', '.join(names)}, about {_gb(need)} needed" + (" (data already cached)" if cached else "")
        if not os.access(base, os.W_OK):
            checks.append(Check("disk", FAIL, f"{base} is not writable", "choose another folder: --set peer.cache_dir=DIR"))
        elif free < need:
            checks.append(Check("disk", FAIL, what, "free disk space, or point peer.cache_dir / --checkpoint-dir elsewhere"))
        else:
            status = WARN if free < 1.5 * need + 1e9 else OK
            checks.append(Check("disk", status, what, "little headroom" if status == WARN else "",
                                data=dict(free=free, needed=int(need))))
    return checks


def check_port(host: str, port: int) -> Check:
    from p2pdiloco.nat import is_loopback

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # like p2pd (Go sets SO_REUSEADDR): a port in TIME_WAIT is not "in use"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            bound = s.getsockname()[1]
    except OSError as e:
        fix = "choose another --port, or stop the program using it" if e.errno in (98, 48) else \
            "use an address of this machine (0.0.0.0 for every interface) and a port you may bind (>= 1024 unless root)"
        return Check("port", FAIL, f"cannot listen on {host}:{port} ({e.strerror or e})", fix)
    if port == 0 and not is_loopback(host):
        return Check("port", WARN, f"{host}: any free port (got {bound} this time)",
                     "fix --port (e.g. 31338) so others can dial the same address every time, and forward it if behind NAT")
    if is_loopback(host):
        return Check("port", OK, f"can listen on {host}:{port or bound}{'' if port else ' (any free port)'}; loopback: "
                     "reachable from this machine only (--host 0.0.0.0 for others)")
    return Check("port", OK, f"can listen on {host}:{port}")


def check_network(peers: Sequence[str], host: str, port: int, public_host: str | None, nat_mode: str,
                  timeout: float) -> list[Check]:
    """Reach the run's peers, have them dial this machine back, and say what ``--nat auto`` picks."""
    from p2pdiloco import nat

    try:
        probe = nat.probe(peers, host, port, timeout)
    except Exception as e:
        return [Check("peers", FAIL, f"could not start a probe on {host}:{port} ({type(e).__name__}: {e})",
                      "free the port (another peer running?) or choose another --port")]
    checks = []
    for a in probe.answers:
        short = a.peer if len(a.peer) < 60 else a.peer[:36] + "…" + a.peer[-12:]
        if a.connected:
            checks.append(Check("peer reachable", OK, f"{short}: connected in {a.rtt_s * 1000:.0f} ms"))
        else:
            checks.append(Check("peer reachable", FAIL, f"{short}: {a.detail}",
                                "check the address (a coordinator prints it), that the peer runs, and outbound TCP"))
            continue
        if a.reachable:
            checks.append(Check("inbound", OK, f"{short} dialed this machine back at {a.observed}:{probe.port} on a fresh connection"))
        elif a.reachable is False:
            fix = "listen on every interface: --host 0.0.0.0" if nat.is_loopback(host) else \
                f"forward TCP {probe.port} to this machine (router or cloud firewall), or join with --nat client"
            checks.append(Check("inbound", FAIL if nat_mode in ("public", "relay") else WARN,
                                f"{short} could not dial this machine back: {a.detail}", fix))
        else:
            checks.append(Check("inbound", WARN, f"{short}: {a.detail}",
                                "ask a p2pdiloco peer or coordinator of the run (plain hivemind nodes cannot dial back)"))
        if a.observed and a.local:
            if a.behind_nat:
                detail = f"{short} sees this machine as {a.observed}, which sends from {a.local}: address translation (NAT)"
            else:
                detail = f"{short} sees this machine at {a.observed}, its own address: no NAT on that path"
            checks.append(Check("nat", OK, detail))
    checks.append(Check(
        "libp2p", OK,
        f"announces {', '.join(probe.announced) or 'nothing'}; its AutoNAT verdict is not available "
        "(p2pd's control API exposes identify, connect, peer list and streams only): the dial-back above is the test",
    ))
    choice = nat.resolve(nat_mode, host=host, port=port, public_host=public_host, initial_peers=peers, timeout=timeout,
                         probed=probe)
    advice = dict(client="fine for training; a client reduces no slice and serves no state",
                  local="loopback only: for a swarm on this machine")
    checks.append(Check("join mode", OK, f"join --nat {nat_mode} would run as {choice.mode}: {choice.reason}",
                        advice.get(choice.mode, "")))
    return checks


def check_run_config(recipe: Recipe, peers: Sequence[str], timeout: float) -> Check:
    """Whether the run's published config matches this recipe (read only; publishes nothing)."""
    from p2pdiloco import swarm
    from p2pdiloco.dht import start_dht, stop_dht
    from p2pdiloco.config import diff_keys

    dht = start_dht(peers, client_mode=True, timeout=timeout)
    try:
        found = dht.get(swarm.config_key(recipe.run.name), latest=True, return_future=True).result(timeout=timeout)
    finally:
        stop_dht(dht)
    existing = found.value if found is not None and isinstance(found.value, dict) else None
    mine = recipe.run.fingerprint()
    if not existing:
        return Check("run config", WARN, f"run '{recipe.run.name}' has published no config yet (no peer is training)",
                     "fine if you start it; else check run.name against the run's recipe")
    if existing.get("fingerprint") == mine:
        return Check("run config", OK, f"run '{recipe.run.name}': same config as the swarm ({mine})")
    theirs = existing.get("config") if isinstance(existing.get("config"), dict) else {}
    diffs = diff_keys(recipe.run.canonical(), theirs) or ["(unreadable)"]
    return Check("run config", FAIL, f"run '{recipe.run.name}' differs in: {'; '.join(diffs[:5])}",
                 "use the run's recipe (its [run] section must be identical)")


def _guard(name: str, fn: Callable[[], Any]) -> list[Check]:
    """Run one check; a crash becomes a failure that says so instead of ending the report."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the report must list every check
        return [Check(name, FAIL, f"the check crashed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      "report this with the output of `p2pdiloco doctor --json`")]
    return out if isinstance(out, list) else [out]


def run_checks(recipe: Recipe, *, peers: Sequence[str] = (), timeout: float = 15.0) -> list[Check]:
    """Every check for ``recipe`` on this machine, with the network ones when ``peers`` are given."""
    peer = recipe.peer
    checks = _guard("python", check_python)
    device_info = dict(on_gpu=False, bf16=False, gpu_total=None)

    def torch_checks():
        found, info = check_torch(recipe)
        device_info.update(info)
        return found

    checks += _guard("torch", torch_checks)
    checks += _guard("bitsandbytes", lambda: check_bitsandbytes(recipe, device_info["on_gpu"]))
    checks += _guard("numpy", check_numpy)
    checks += _guard("hivemind", check_hivemind)
    checks += _guard("resources", lambda: check_resources(recipe, device_info))
    checks += _guard("port", lambda: check_port(peer.host, peer.port))
    if peers:
        checks += _guard("peers", lambda: check_network(peers, peer.host, peer.port, peer.public_host, peer.nat, timeout))
        checks += _guard("run config", lambda: check_run_config(recipe, peers, timeout))
    return checks


def report(checks: list[Check], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(dict(ok=not any(c.status == FAIL for c in checks), checks=[dataclasses.asdict(c) for c in checks]), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    style = {OK: "green", WARN: "yellow", FAIL: "bold red"}
    table = Table(title="p2pdiloco doctor", show_lines=False)
    for col in ("check", "status", "found", "fix"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", c.detail, c.fix)
    console = Console() if sys.stdout.isatty() else Console(width=160)  # piped: one line per check where it fits
    console.print(table)
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    console.print(f"{failed} failed, {warned} warning(s), {len(checks) - failed - warned} ok")

