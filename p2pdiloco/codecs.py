"""Pseudo-gradient codecs: how a slice of the pseudo-gradient travels in the all-reduce.

Every codec turns a float32 vector into bytes and back. All of them are p2pdiloco's own wire
formats (hivemind's ``runtime_pb2.Tensor`` is only the envelope): the ``dtype`` field carries a
tag such as ``p2pdiloco/4bit``, ``size`` the shape and ``buffer`` the payload. Owning the format
gives three things hivemind's codecs do not:

- a 4-bit type (hivemind's wire has only 8- and 16-bit ones);
- strict validation of every received part: the tag, the shape and the exact payload length are
  checked before anything is allocated, so a malformed part fails its round instead of crashing
  or misleading the receiver;
- decoding that depends only on the bytes received: scales and lookup tables travel with the data
  or are constants of this module, and decoding is one table lookup and one multiply per value, so
  every member of a group decodes the reducer's average to the same float32 bits whatever its
  hardware or library versions.

The codecs (``run.compression``):

============  ===========================================================  ============
name          format                                                        bytes/value
============  ===========================================================  ============
none          float32                                                       4
fp16          IEEE half, clamped to ±65504                                  2
bf16          bfloat16 (fp32's range, 8 bits of mantissa)                   2
blockwise8    bitsandbytes' blockwise dynamic 8-bit: one uint8 code per     ≈ 1.004
              value, one fp32 absmax per 1024 values, the 256-entry table
4bit          blockwise 4-bit on a normal-quantile grid (NF4-like): two     ≈ 0.516
              codes per byte, one bf16 scale per 128 values
============  ===========================================================  ============

Error bounds (tested): ``none`` is exact; ``fp16``/``bf16`` round to nearest (relative error
2^-11 / 2^-8); the block codecs err by at most half the widest gap of their grid times the block's
absmax (for ``4bit`` 0.14 × absmax, for ``blockwise8`` 0.007 × absmax; bitsandbytes' encoder
rounds to the nearest level up to float error near midpoints).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2

TAG_PREFIX = "p2pdiloco/"
MAX_VALUES = 1 << 34  # a part claiming more values than this is malformed, whatever its payload


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


def _from_bytes(buf: bytes | memoryview, dtype: np.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """``count`` values of ``dtype`` at ``offset`` of ``buf``, as a writable tensor (one copy)."""
    return torch.from_numpy(np.frombuffer(buf, dtype=dtype, count=count, offset=offset).copy())


class Codec(CompressionBase):
    """A p2pdiloco wire format. Subclasses implement ``encode``, ``decode`` and ``payload_size``.

    ``compress``/``extract`` are hivemind's interface (used by its tensor-part container); the
    cumulated ``encode_s``/``decode_s`` say how long this process spent in them.
    """

    name: str = ""
    compression_type = runtime_pb2.CompressionType.NONE  # hivemind's enum has no entry for ours: see ``dtype``

    def __init__(self):
        self.encode_s = 0.0
        self.decode_s = 0.0

    @property
    def tag(self) -> str:
        return TAG_PREFIX + self.name

    # --- the format
    def encode(self, x: torch.Tensor) -> bytes:
        """The payload of the flat float32 vector ``x``."""
        raise NotImplementedError

    def decode(self, payload: bytes, n: int) -> torch.Tensor:
        """The flat float32 vector of ``n`` values that ``payload`` (already length-checked) encodes."""
        raise NotImplementedError

    def payload_size(self, n: int) -> int:
        """Exact payload length in bytes for ``n`` values."""
        raise NotImplementedError

    # --- hivemind's interface
    def compress(self, tensor: torch.Tensor, info: CompressionInfo | None = None, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        started = time.perf_counter()
        payload = self.encode(tensor.detach().reshape(-1).float())
        self.encode_s += time.perf_counter() - started
        return runtime_pb2.Tensor(buffer=payload, size=list(tensor.shape), dtype=self.tag, compression=self.compression_type)

    def extract(self, serialized: runtime_pb2.Tensor) -> torch.Tensor:
        """Decode a received part; raises ``ValueError`` naming what is wrong with a malformed one."""
        started = time.perf_counter()
        if serialized.dtype != self.tag:
            raise ValueError(f"expected a {self.tag} part, got '{serialized.dtype[:40]}'")
        shape = tuple(serialized.size)  # unsigned on the wire: only the product can be absurd
        # Zero sizes count as 1: (0, 2**32 - 1, 2**32 - 1) holds no value, yet torch computes its
        # strides from the other sizes and fails with a RuntimeError (found by bench/fuzz.py).
        if math.prod(max(d, 1) for d in shape) > MAX_VALUES:
            raise ValueError(f"malformed part shape {shape[:8]}")
        n = math.prod(shape)
        if len(serialized.buffer) != self.payload_size(n):
            raise ValueError(f"{self.tag} part of {n} values has {len(serialized.buffer)} bytes, expected {self.payload_size(n)}")
        values = self.decode(serialized.buffer, n).reshape(shape) if n else torch.zeros(shape)
        self.decode_s += time.perf_counter() - started
        return values

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.payload_size(1 << 20) / (4 << 20)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What a receiver decodes from ``x`` (no timing; for benchmarks and tests)."""
        flat = x.detach().reshape(-1).float()
        return self.decode(self.encode(flat), flat.numel()).reshape(x.shape) if flat.numel() else x.float().clone()

    def __repr__(self):
        return f"{type(self).__name__}()"


class Float32(Codec):
    name = "none"

    def encode(self, x):
        return _to_bytes(x)

    def decode(self, payload, n):
        return _from_bytes(payload, np.float32, n)

    def payload_size(self, n):
        return 4 * n


class Float16(Codec):
    name = "fp16"
    LIMIT = 65504.0  # fp16's largest finite value: clamp rather than turn a large value into inf

    def encode(self, x):
        return _to_bytes(x.clamp(-self.LIMIT, self.LIMIT).half())

    def decode(self, payload, n):
        return _from_bytes(payload, np.float16, n).float()

    def payload_size(self, n):
        return 2 * n


class BFloat16(Codec):
    name = "bf16"

    def encode(self, x):
        return _to_bytes(x.to(torch.bfloat16).view(torch.int16))  # numpy has no bfloat16: ship the bits

    def decode(self, payload, n):
        return _from_bytes(payload, np.int16, n).view(torch.bfloat16).float()

    def payload_size(self, n):
        return 2 * n


class _Blockwise(Codec):
    """Per-block absmax scaling onto a fixed grid of levels in [-1, 1]."""

    BLOCK = 1

    def blocks(self, n: int) -> int:
        return -(-n // self.BLOCK)

    def _scale_blocks(self, values: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
        padded = torch.zeros(self.blocks(n) * self.BLOCK, dtype=torch.float32)
        padded[:n] = values
        return (padded.view(-1, self.BLOCK) * scales[:, None]).reshape(-1)[:n]


class Blockwise8(_Blockwise):
    """bitsandbytes' blockwise quantization on its signed dynamic 8-bit map.

    Encoding runs in bitsandbytes (CPU or CUDA, wherever the tensor is). The payload carries the
    256-entry table (1 KB per part of ~512 KB, 0.2 %) so that decoding needs neither bitsandbytes
    nor the same version of it on every member: it is a lookup and one multiply per value.
    Payload: table (256 × fp32) | absmax per block (fp32) | codes (uint8).
    """

    name = "blockwise8"
    BLOCK = 1024  # smaller blocks follow heavy tails better; 1024 costs 0.4 % of the bytes

    def __init__(self):
        super().__init__()
        import bitsandbytes.functional  # noqa: F401  (import before the averager forks: a lazy import costs 6-9 s mid-round)

    def encode(self, x):
        import bitsandbytes.functional as bnb

        codes, state = bnb.quantize_blockwise(x.contiguous(), blocksize=self.BLOCK)
        return _to_bytes(state.code.float()) + _to_bytes(state.absmax.float()) + _to_bytes(codes)

    def decode(self, payload, n):
        blocks = self.blocks(n)
        table = _from_bytes(payload, np.float32, 256)
        absmax = _from_bytes(payload, np.float32, blocks, offset=1024)
        codes = _from_bytes(payload, np.uint8, n, offset=1024 + 4 * blocks)
        return self._scale_blocks(table[codes.long()], absmax, n)

    def payload_size(self, n):
        return 1024 + 4 * self.blocks(n) + n


# The 16 levels of ``4bit``: quantiles of a standard normal, scaled so the extremes are ±1, with an
# exact zero (7 negative, 0, 8 positive, as NF4 in the QLoRA paper). Pseudo-gradients of AdamW
# inner steps are close to normal within a block, and a normal-quantile grid puts more levels where
# more values are. Written out as constants so every peer decodes with identical float32 levels;
# ``_normal_quantile_levels`` (used by a unit test) shows where they come from.
LEVELS_4BIT = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250729322433472, -0.39491742849349976,
        -0.2844413220882416, -0.18477340042591095, -0.09104997664690018, 0.0,
        0.07958031445741653, 0.16093014180660248, 0.24611225724220276, 0.3379151225090027,
        0.4407097399234772, 0.5626168847084045, 0.722956657409668, 1.0,
    ],
    dtype=torch.float32,
)


def _normal_quantile_levels() -> torch.Tensor:
    """Recompute ``LEVELS_4BIT``: 8 positive and 7 negative normal quantiles, normalized, plus 0."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    edge = 0.5 * (1 / 32 + 1 / 30)  # keeps the outermost quantile finite (as NF4 does)
    positive = normal.icdf(torch.linspace(edge, 0.5, 9, dtype=torch.float64)[:-1].flip(0) * -1 + 1)
    negative = -normal.icdf(torch.linspace(edge, 0.5, 8, dtype=torch.float64)[:-1].flip(0) * -1 + 1)
    levels = torch.cat([negative / negative.abs().max(), torch.zeros(1, dtype=torch.float64), positive / positive.max()])
    return levels.sort().values.float()


class FourBit(_Blockwise):
    """Blockwise 4-bit: per block of 128 values a bf16 scale (the absmax rounded up), then each
    value's nearest level of ``LEVELS_4BIT``; two codes per byte.
    Payload: scales (bf16 bits, int16) | packed codes (uint8, high nibble first)."""

    name = "4bit"
    BLOCK = 128
    _midpoints = (LEVELS_4BIT[1:] + LEVELS_4BIT[:-1]) / 2

    def encode(self, x):
        n, blocks = x.numel(), self.blocks(x.numel())
        padded = torch.zeros(blocks * self.BLOCK, dtype=torch.float32, device=x.device)
        padded[:n] = x
        padded = padded.view(blocks, self.BLOCK)
        absmax = padded.abs().amax(dim=1)
        scales = absmax.to(torch.bfloat16)
        bits = scales.view(torch.int16)
        # Round the scale up (next bf16, i.e. the next bit pattern of a positive number) so every
        # value of the block lies within ±scale and the grid's error bound holds exactly.
        bits = bits + (scales.float() < absmax).to(torch.int16)
        scales = bits.view(torch.bfloat16).float()
        normalized = padded / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        codes = torch.bucketize(normalized.reshape(-1)[:n], self._midpoints.to(x.device)).to(torch.uint8)
        if n % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        packed = (codes[0::2] << 4) | codes[1::2]
        return _to_bytes(bits) + _to_bytes(packed)

    def decode(self, payload, n):
        blocks = self.blocks(n)
        scales = _from_bytes(payload, np.int16, blocks).view(torch.bfloat16).float()
        packed = _from_bytes(payload, np.uint8, (n + 1) // 2, offset=2 * blocks)
        codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]
        return self._scale_blocks(LEVELS_4BIT[codes.long()], scales, n)

    def payload_size(self, n):
        return 2 * self.blocks(n) + (n + 1) // 2


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Float32, Float16, BFloat16, Blockwise8, FourBit)}


def make_codec(name: str) -> Codec:
    """The codec for a run's ``compression`` setting."""
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown compression '{name}': choose one of {', '.join(CODECS)}") from None
