"""Blockwise 8-bit moments: the codec's error bounds, and SpectralAdam(state_dtype=torch.uint8)."""

import pytest
import torch
from conftest import fit, sine_mlp

from stiefel_sct import SpectralAdam, orthonormality_error
from stiefel_sct import adam as adam_module
from stiefel_sct.quant import BLOCK, dequantize, n_blocks, quantize_, quantized_zeros


def _wide_range(numel, seed=0, signed=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.exp2(torch.randint(-12, 3, (numel,), generator=gen).float())
    return x if signed else x.square()


@pytest.mark.parametrize("numel", [BLOCK, 5 * BLOCK + 17, 3])
def test_round_trip_error_is_bounded_relative_to_each_value(numel):
    for signed in (True, False):
        x = _wide_range(numel, signed=signed)
        x[::7] = 0.0
        codes, scales = quantized_zeros(x)
        quantize_(x, codes, scales, signed)
        assert codes.dtype == torch.uint8 and codes.shape == x.shape and scales.numel() == n_blocks(numel)
        y = dequantize(codes, scales, signed)
        assert bool((y[::7] == 0).all())  # zeros stay exactly zero
        blocks = torch.nn.functional.pad(x.abs(), (0, n_blocks(numel) * BLOCK - numel)).view(-1, BLOCK)
        block_max = blocks.amax(-1).repeat_interleave(BLOCK)[:numel]
        # the sign is kept; within the coded range (2^-15 of the block's largest entry, on sqrt(v)
        # for v) the error is at most half a mantissa step: 1/16 (m, 3 bits), (1 + 1/32)^2 - 1 (v)
        assert bool(((torch.sign(y) == torch.sign(x)) | (y == 0)).all())
        floor = (2.0 ** -15 * block_max) if signed else (2.0 ** -15 * block_max.sqrt()) ** 2
        coded = x.abs() > floor
        rel = ((y - x).abs() / x.abs())[coded]
        assert float(rel.max()) <= (0.0625 if signed else 0.0635) + 1e-6
        below = (y - x).abs()[~coded]
        assert below.numel() == 0 or float(below.max()) <= float(floor.max())


def test_a_block_keeps_its_largest_entry_exactly():
    x = _wide_range(BLOCK)
    codes, scales = quantized_zeros(x)
    quantize_(x, codes, scales, True)
    i = int(x.abs().argmax())
    assert float(dequantize(codes, scales, True)[i]) == float(x[i])


def test_chunked_8bit_update_equals_the_whole_tensor_update(monkeypatch):
    def run():
        torch.manual_seed(0)
        p = torch.randn(300, 301)  # > one chunk, ragged last block
        opt = SpectralAdam([p.requires_grad_()], lr=1e-2, state_dtype=torch.uint8, amsgrad=True)
        for s in range(3):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s))
            opt.step()
        return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}

    chunked = run()
    monkeypatch.setattr(adam_module, "_CHUNK_8BIT", 1 << 30)
    whole = run()
    assert torch.equal(chunked[0], whole[0])
    assert all(torch.equal(chunked[1][k], whole[1][k]) for k in chunked[1])


def test_8bit_state_is_a_quarter_of_fp32_and_trains_the_sine_mlp():
    model, x, y = sine_mlp()
    opt = SpectralAdam(model.parameters(), lr=1e-2, state_dtype=torch.uint8)
    _, last = fit(model, opt, x, y, 1500)
    assert last < 2e-3  # a constant predictor scores ~0.5; fp32 moments reach < 1e-3
    assert orthonormality_error(model[2].U) < 1e-5
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    param_elems = sum(p.numel() for p in model.parameters())
    assert state_bytes <= 2 * param_elems * (1 + 4 / BLOCK) + 8 * len(opt.state)  # two moments, 1 byte + scales


def test_8bit_state_needs_sct_mode():
    with pytest.raises(ValueError, match="8-bit"):
        SpectralAdam([torch.zeros(3, requires_grad=True)], mode="riemannian", state_dtype=torch.uint8)
    with pytest.raises(TypeError, match="state_dtype"):
        SpectralAdam([torch.zeros(3, requires_grad=True)], state_dtype=torch.int8)
