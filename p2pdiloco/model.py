"""The causal language model: a Llama-style decoder built from config with ``transformers``.

Nothing is downloaded. Every peer builds the same initial parameters from ``ModelConfig.init_seed``,
byte for byte, on any machine (see :func:`build_model`), so the first peers of a run agree on θ_0
without exchanging it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import zlib

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from p2pdiloco.config import ModelConfig, PeerConfig
from p2pdiloco.errors import ConfigError

INIT_STD = 0.02  # Llama's initializer_range

# Initial weights are a sum of 4 uniform 15-bit integers (Irwin-Hall, n = 4), centred and scaled
# to INIT_STD. Only integer arithmetic and one IEEE multiply are involved, so the result is
# identical on every CPU. torch.randn is not: its float32 kernel has an AVX2 path whose values
# differ from the scalar path (e.g. ARM or ATEN_CPU_CAPABILITY=default) in the last bits.
_LANES, _LANE_BITS = 4, 15
_LANE_MAX = (1 << _LANE_BITS) - 1
_IH_MEAN = _LANES * _LANE_MAX / 2
_IH_STD = math.sqrt(_LANES * ((_LANE_MAX + 1) ** 2 - 1) / 12)
_CHUNK = 1 << 22


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=INIT_STD,
        use_cache=False,  # training only; a KV cache per forward would be wasted work
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig) -> LlamaForCausalLM:
    """A freshly initialised fp32 ``LlamaForCausalLM``, identical on every peer for a given config.

    Matrices (projections, MLP, embeddings) get a zero-mean, std-0.02 Irwin-Hall(4) init, a
    bell-shaped law bounded at ±3.46 std, like the truncated normal many trainers use; norm
    weights are 1 and biases 0. Each parameter draws from its own ``torch.Generator`` seeded
    from ``(init_seed, parameter name)``, so the global RNGs are untouched and the values do not
    depend on parameter order.
    """
    with torch.random.fork_rng(devices=[]):  # the constructor's own init consumes the global RNG
        model = LlamaForCausalLM(llama_config(cfg)).float()
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights are listed once
            if param.ndim >= 2:
                _irwin_hall_(param, _param_seed(cfg.init_seed, name), INIT_STD)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()
    model.train()
    return model


def _param_seed(init_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{init_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _irwin_hall_(param: torch.Tensor, seed: int, std: float) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    flat = param.view(-1)
    scale = torch.tensor(std / _IH_STD, dtype=torch.float32)
    for start in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - start)
        bits = torch.randint(0, 1 << (_LANES * _LANE_BITS), (n,), generator=gen, dtype=torch.int64)
        total = bits & _LANE_MAX
        for lane in range(1, _LANES):
            total += (bits >> (lane * _LANE_BITS)) & _LANE_MAX
        # total < 2**17 is exact in fp32, so is the centring; only the multiply rounds
        flat[start : start + n] = (total.to(torch.float32) - _IH_MEAN) * scale


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())  # parameters() already deduplicates


def parameter_digest(model: nn.Module) -> str:
    """A short checksum of all parameters, to compare peers' states cheaply in logs and tests."""
    crc = 0
    for name, param in model.named_parameters():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(param.detach().cpu().contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device, bf16: bool,
             micro_batch_size: int | None = None) -> float:
    """Mean causal-LM loss over equally shaped ``[B, T]`` token batches. Leaves the model in train mode.

    ``micro_batch_size`` splits each batch into chunks of that many rows (the GPU recipes'
    validation batches do not fit in one forward pass).
    """
    if not batches:
        raise ValueError("evaluate() needs at least one batch")
    model.eval()
    try:
        total = torch.zeros((), device=device)
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            for part in batch.split(micro_batch_size or batch.shape[0]):
                with autocast(device, bf16):
                    loss = model(input_ids=part, labels=part).loss
                total += loss.float() * (part.shape[0] / batch.shape[0])
        return total.item() / len(batches)
    finally:
        model.train()


def resolve_devices(peer: PeerConfig) -> list[torch.device]:
    """``peer.devices`` as torch devices, one per local worker of the peer (the first is the peer's
    own process): ``all`` is every visible CUDA GPU, or the CPU if there is none."""
    spec = peer.devices.strip().lower()
    fix = "use all, cpu, cpu:N, cuda, cuda:N or a list such as cuda:0,cuda:2"
    if spec in ("all", "auto"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    if spec.startswith("cpu:"):
        count = spec.removeprefix("cpu:")
        if not count.isdigit() or not 1 <= int(count) <= 64:
            raise ConfigError(f"peer.devices = '{peer.devices}': cpu:N takes a number of workers from 1 to 64")
        return [torch.device("cpu")] * int(count)
    devices = []
    for name in spec.split(","):
        try:
            device = torch.device(name.strip())
        except RuntimeError:
            raise ConfigError(f"peer.devices = '{peer.devices}': '{name.strip()}' is not a device: {fix}") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"peer.devices = '{peer.devices}': '{name.strip()}' is not a device: {fix}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"peer.devices = '{peer.devices}' but no CUDA GPU is visible: use peer.devices=cpu")
            device = torch.device("cuda", device.index or 0)
            if device.index >= torch.cuda.device_count():
                raise ConfigError(f"peer.devices = '{peer.devices}' but only {torch.cuda.device_count()} GPU(s) are visible")
        devices.append(device)
    if len(set(devices)) < len(devices) or (len(devices) > 1 and any(d.type == "cpu" for d in devices)):
        raise ConfigError(f"peer.devices = '{peer.devices}': name each GPU once (several CPU workers: cpu:N)")
    return devices


def resolve_device(peer: PeerConfig) -> torch.device:
    """The device of the peer's own process: the first of ``peer.devices``."""
    return resolve_devices(peer)[0]


def use_bf16(peer: PeerConfig, device: torch.device) -> bool:
    """bf16 autocast: ``peer.bf16`` if set, else on for a CUDA GPU that supports it, off on CPU."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if peer.bf16 and not supported:
            raise ConfigError("peer.bf16 = true but this GPU has no bf16 support: set peer.bf16=false")
        return supported if peer.bf16 is None else peer.bf16
    return bool(peer.bf16)
