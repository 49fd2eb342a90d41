"""Codecs: round-trip error bounds, strict decoding of received parts, byte budgets, error feedback."""

import pytest
import torch
from hivemind.compression import CompressionInfo

from p2pdiloco import codecs
from p2pdiloco.averaging.runner import SenderCodec

SIZES = [1, 2, 127, 128, 129, 1023, 1024, 1025, 40_001]


def _data(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g) * 1e-3  # pseudo-gradients are small
    # heavy-tailed: Student's t with 1.5 degrees of freedom (infinite variance), plus planted outliers
    z = torch.randn(n, generator=g)
    chi2 = torch.distributions.Chi2(torch.tensor(1.5)).sample((n,))
    x = z / (chi2 / 1.5).sqrt() * 1e-3
    x[:: max(1, n // 7)] *= 1e3
    return x


def _block_bound(codec: codecs._Blockwise, x: torch.Tensor, levels: torch.Tensor, scale_slack: float) -> torch.Tensor:
    """Per-value bound: half the widest gap of the grid times the value's block scale (plus the
    float32 rounding of normalizing by the scale)."""
    half_gap = (levels.sort().values.diff().max() / 2).item()
    n = x.numel()
    padded = torch.zeros(codec.blocks(n) * codec.BLOCK)
    padded[:n] = x.abs()
    absmax = padded.view(-1, codec.BLOCK).amax(dim=1)
    return (absmax * scale_slack * (half_gap + 1e-6)).repeat_interleave(codec.BLOCK)[:n] + 1e-30


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_error_within_each_codecs_bound(kind, n):
    x = _data(kind, n, seed=n)
    assert torch.equal(codecs.Float32().roundtrip(x), x)

    err16 = (codecs.Float16().roundtrip(x) - x).abs()
    assert (err16 <= x.abs() * 2**-11 + 2**-25).all()  # round to nearest; below 2^-14, fp16's subnormal step
    errb16 = (codecs.BFloat16().roundtrip(x) - x).abs()
    assert (errb16 <= x.abs() * 2**-8).all()

    b8 = codecs.Blockwise8()
    table = codecs._from_bytes(b8.encode(x), "float32", 256)
    err8 = (b8.roundtrip(x) - x).abs()
    assert (err8 <= _block_bound(b8, x, table, 1.01)).all()  # bnb's encoder: nearest level up to float error

    b4 = codecs.FourBit()
    err4 = (b4.roundtrip(x) - x).abs()
    assert (err4 <= _block_bound(b4, x, codecs.LEVELS_4BIT, 1 + 2**-7)).all()  # scale rounded up to bf16

    if kind == "normal" and n >= 1024:  # typical error, not just the worst case: relative RMS error
        rms = lambda e: (e.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()  # noqa: E731
        assert rms(err16) < 3e-4 and rms(errb16) < 3e-3 and rms(err8) < 0.02 and rms(err4) < 0.12


def test_extreme_values_stay_finite_and_exact_zeros_stay_zero():
    x = torch.tensor([0.0] * 2048 + [1e30, -1e30, 7e4, -7e4, 1e-40])
    for codec in codecs.CODECS.values():
        y = codec().roundtrip(x)
        assert torch.isfinite(y).all(), codec.name
        assert (y[:2048] == 0).all(), codec.name  # an all-zero block decodes to zeros
    assert codecs.Float16().roundtrip(x)[2048].item() == 65504.0  # clamped, not inf


def test_blockwise8_decoding_matches_bitsandbytes():
    import bitsandbytes.functional as bnb

    x = _data("heavy", 5000)
    codes, state = bnb.quantize_blockwise(x, blocksize=codecs.Blockwise8.BLOCK)
    assert torch.equal(codecs.Blockwise8().roundtrip(x), bnb.dequantize_blockwise(codes, state))


def test_4bit_levels_are_the_normal_quantile_grid():
    assert torch.equal(codecs._normal_quantile_levels(), codecs.LEVELS_4BIT)
    assert codecs.LEVELS_4BIT[0] == -1 and codecs.LEVELS_4BIT[-1] == 1 and (codecs.LEVELS_4BIT == 0).sum() == 1


@pytest.mark.parametrize("name,at_least", [("none", 1.0), ("fp16", 2.0), ("bf16", 2.0), ("blockwise8", 3.9), ("4bit", 7.5)])
def test_payload_is_as_small_as_promised(name, at_least):
    codec = codecs.make_codec(name)
    n = 1 << 17  # a typical part (hivemind cuts parts of ~512 KB after compression)
    assert len(codec.encode(torch.randn(n))) == codec.payload_size(n)
    assert 4 * n / codec.payload_size(n) >= at_least


@pytest.mark.parametrize("name", list(codecs.CODECS))
def test_compress_extract_keeps_shape_and_counts_time(name):
    codec = codecs.make_codec(name)
    x = torch.randn(3, 333)
    msg = codec.compress(x, CompressionInfo.from_tensor(x))
    assert msg.dtype == f"p2pdiloco/{name}"
    y = codec.extract(msg)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(y, codec.roundtrip(x))
    assert codec.encode_s > 0 and codec.decode_s > 0


@pytest.mark.parametrize("name", list(codecs.CODECS))
def test_malformed_parts_are_refused_with_a_reason(name):
    codec = codecs.make_codec(name)
    good = codec.compress(torch.randn(1000))

    def broken(**change):
        msg = type(good)()
        msg.CopyFrom(good)
        for key, value in change.items():
            if key == "size":
                del msg.size[:]
                msg.size.extend(value)
            else:
                setattr(msg, key, value)
        return msg

    with pytest.raises(ValueError, match="expected a p2pdiloco/"):
        codec.extract(broken(dtype="float32"))
    with pytest.raises(ValueError, match="bytes, expected"):
        codec.extract(broken(buffer=good.buffer[:-1]))
    with pytest.raises(ValueError, match="bytes, expected"):
        codec.extract(broken(size=[1001]))
    with pytest.raises(ValueError, match="malformed part shape"):
        codec.extract(broken(size=[1 << 20, 1 << 20]))


def test_unknown_codec_name_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of none, fp16, bf16, blockwise8, 4bit"):
        codecs.make_codec("zip")


def test_sender_codec_records_what_quantization_dropped_at_each_parts_place():
    codec = codecs.FourBit()
    flat = _data("normal", 1000)
    residual = torch.full((1000,), float("nan"))
    sender = SenderCodec(codec, residual)
    info = CompressionInfo.from_tensor(flat, key=0)
    for index, part in enumerate(flat.split(300)):  # as hivemind's container cuts one flat tensor
        sender.compress(part, info.get_part(index, 300))
    assert torch.equal(residual, torch.cat([p - codec.roundtrip(p) for p in flat.split(300)]))
    assert residual.abs().max() > 0


def test_error_feedback_keeps_the_sum_of_what_was_sent_close_to_the_sum_of_the_inputs():
    """With the residual carried to the next round, quantization errors do not accumulate: after T
    rounds the decoded sum differs from the true sum by one residual, not by T errors."""
    codec = codecs.FourBit()
    residual = torch.zeros(4096)
    sent_ef, sent_plain, truth = torch.zeros(4096), torch.zeros(4096), torch.zeros(4096)
    for t in range(50):
        x = _data("normal", 4096, seed=t) + 2e-4  # a constant bias: what plain rounding keeps losing
        truth += x
        sent_plain += codec.roundtrip(x)
        decoded = codec.roundtrip(x + residual)
        residual = x + residual - decoded
        sent_ef += decoded
    err_ef, err_plain = (sent_ef - truth).norm(), (sent_plain - truth).norm()
    assert torch.allclose(sent_ef + residual, truth, atol=1e-6)
    assert err_ef < err_plain / 3, (err_ef, err_plain)
