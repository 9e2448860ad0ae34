"""Packed layouts round-trip; every kernel (each ISA path the CPU has) matches the pure-torch reference."""

import dataclasses

import pytest
import torch

from compress.config import QuantConfig
from compress.kernels import ops as kops
from compress.kernels import reference
from compress.kernels.build import ops as compiled
from compress.kernels.formats import PACKED_SCALE_DTYPE, Q4Dense, Q4InputMajor, Q4Sparse24
from compress.quant.grid import QuantGrid

SHAPES = [(37, 256, 64), (50, 512, 128), (16, 96, 32), (70, 64, 64)]  # (out, in, group): odd outs, one-group rows


def _quantized(out, n_in, group, symmetric, sparse24=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n_in, generator=gen)
    if sparse24:
        keep = torch.zeros(out, n_in // 4, 4, dtype=torch.bool)
        keep.scatter_(-1, torch.rand(out, n_in // 4, 4, generator=gen).argsort(-1)[..., :2], True)
        keep[0, 0] = False  # a run with no non-zero at all
        W = W * keep.reshape(out, n_in)
    grid = QuantGrid.fit(W, QuantConfig(4, group, symmetric=symmetric), scale_dtype=PACKED_SCALE_DTYPE)  # as runs that pack
    codes = grid.encode(W)
    return codes, grid, grid.decode(codes)


def _fp32_scales(layout):
    """``layout`` with fp32 scales and zero points: as folders packed before fp16 scales (and what the
    fp32-input kernels read)."""
    return dataclasses.replace(layout, scale=layout.scale.float(), zero=None if layout.zero is None else layout.zero.float())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_layouts_round_trip_exactly(shape, symmetric):
    codes, grid, W = _quantized(*shape, symmetric)
    assert torch.equal(Q4Dense.pack(codes, grid.scale, grid.zero, grid.group_size).unpack(), W)
    codes, grid, W = _quantized(*shape, symmetric, sparse24=True)
    packed = Q4Sparse24.pack(codes, grid.scale, grid.zero, grid.group_size)
    assert torch.equal(packed.unpack(), W)
    assert (packed.unpack() == 0).sum() >= W.numel() // 2
    codes, grid, W = _quantized(*shape, symmetric)
    assert torch.equal(Q4InputMajor.pack(codes, grid.scale, grid.zero, grid.group_size).unpack(), W)


def test_input_major_layout_keeps_each_inputs_weights_contiguous():
    codes, grid, W = _quantized(200, 64, 32, True)  # 200 outputs: padded to 208 (13 tiles: blocks of 8 and 5)
    packed = Q4InputMajor.pack(codes, grid.scale, None, 32)
    assert packed.data.shape == (64 * 13 * 8,) and packed.scale.shape == (2, 208)
    assert packed.nbytes == 64 * 208 // 2 + 2 * 208 * 2  # fp16 scales
    for i in (0, 17, 63):  # input i: 64 bytes in the first block, 40 in the second; low nibble output 16t+k
        runs = [packed.data[i * 64 : (i + 1) * 64], packed.data[64 * 64 + i * 40 : 64 * 64 + (i + 1) * 40]]
        u = torch.cat([torch.stack([r.reshape(-1, 8) & 0xF, r.reshape(-1, 8) >> 4], dim=1).reshape(-1) for r in runs])
        assert torch.equal(u[:200].to(torch.int16) - 8, codes[:, i].to(torch.int16))


def test_sparse24_layout_stores_three_bits_per_weight_plus_scales():
    codes, grid, _ = _quantized(4096 // 16, 4096, 128, True, sparse24=True)
    dense, sparse = (cls.pack(codes, grid.scale, None, 128) for cls in (Q4Dense, Q4Sparse24))
    scales = 256 * 32 * 2  # fp16
    assert dense.scale.dtype == sparse.scale.dtype == torch.float16
    assert dense.nbytes == 256 * 4096 // 2 + scales and sparse.nbytes == 256 * 4096 * 3 // 8 + scales


def test_sparse24_refuses_three_nonzeros_in_a_run():
    codes, grid, _ = _quantized(16, 64, 64, True)
    with pytest.raises(ValueError, match="2 non-zero"):
        Q4Sparse24.pack(codes, grid.scale, grid.zero, 64)


def _isa_levels():
    kernels = compiled()
    if kernels is None:
        pytest.skip("no compiled kernels here (no C++ compiler)")
    best = int(kernels.isa())
    return kernels, best


def _close(y, ref):
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_kernels_match_the_reference(isa, shape, symmetric):
    out, n_in, group = shape
    gen = torch.Generator().manual_seed(1)
    dense = Q4Dense.pack(*(lambda c, g, _: (c, g.scale, g.zero, group))(*_quantized(*shape, symmetric)))
    sparse = Q4Sparse24.pack(*(lambda c, g, _: (c, g.scale, g.zero, group))(*_quantized(*shape, symmetric, True)))
    d32, s32 = _fp32_scales(dense), _fp32_scales(sparse)  # the fp32-input kernels read fp32 scales
    for batch in (1, 2, 3, 4, 7, 16):
        x = torch.randn(batch, n_in, generator=gen)
        _close(isa.q4_dense_mm(x, d32.data, d32.scale, d32.zero, out, group), reference.q4_dense_mm(x, dense))
        if group % 8 == 0:
            _close(isa.q4_sparse24_mm(x, s32.data, s32.pos, s32.scale, s32.zero, out, group),
                   reference.q4_sparse24_mm(x, sparse))
        for precision in kops.ACT_PRECISIONS:  # the product binds fp32 copies of fp16 scales for the fp32 kernels
            kops.set_act_precision(precision)
            levels = kops.ACT_LEVELS[precision] if group % 32 == 0 else 0
            expected = reference.q4_dense_i8_mm(x, dense, levels) if levels else reference.q4_dense_mm(x, dense)
            _close(kops.quantized_product(dense)(x), expected)
        kops.set_act_precision("int8")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(37, 256, 64), (50, 512, 128), (16, 96, 32), (70, 64, 64), (33, 1024 + 96, 32)])
def test_integer_kernel_matches_its_reference(isa, shape, symmetric):
    """int8 inputs per block of 32, integer dot products: the kernel equals x rounded the same way times W."""
    out, n_in, group = shape
    gen = torch.Generator().manual_seed(4)
    codes, grid, W = _quantized(*shape, symmetric)
    dense = Q4Dense.pack(codes, grid.scale, grid.zero, group)
    for batch in (1, 2, 3, 4, 7, 16):
        x = torch.randn(batch, n_in, generator=gen) * torch.rand(batch, n_in // 32, 1, generator=gen).mul(9).exp().repeat(
            1, 1, 32).reshape(batch, n_in)  # block magnitudes over four orders
        x[0, :32] = 0  # a block of zeros: scale 0
        x[-1, 5] = 1e4  # an outlier: the rest of its block rounds to few levels
        old = _fp32_scales(dense)  # fp32 storage of the same scales: the same products, bit for bit
        for levels in (1, 2):
            y = isa.q4_dense_i8_mm(x, dense.data, dense.scale, dense.zero, out, group, levels)
            _close(y, reference.q4_dense_i8_mm(x, dense, levels))
            assert torch.equal(isa.q4_dense_i8_mm(x, old.data, old.scale, old.zero, out, group, levels), y)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(37, 256, 64), (16, 96, 32), (70, 64, 64), (33, 1024 + 96, 32)])
def test_sparse_integer_kernel_matches_its_reference(isa, shape, symmetric):
    """2:4 on int8 inputs: each kept code meets the input at its own position (gathered per row)."""
    out, n_in, group = shape
    gen = torch.Generator().manual_seed(8)
    codes, grid, W = _quantized(*shape, symmetric, sparse24=True)
    sparse = Q4Sparse24.pack(codes, grid.scale, grid.zero, group)
    for batch in (1, 2, 3, 4, 7, 16):
        x = torch.randn(batch, n_in, generator=gen) * torch.rand(batch, n_in, generator=gen).mul(4).exp()
        x[0, 32:64] = 0
        old = _fp32_scales(sparse)
        for levels in (1, 2):
            y = isa.q4_sparse24_i8_mm(x, sparse.data, sparse.pos, sparse.scale, sparse.zero, out, group, levels)
            _close(y, reference.q4_sparse24_i8_mm(x, sparse, levels))
            assert torch.equal(isa.q4_sparse24_i8_mm(x, old.data, old.pos, old.scale, old.zero, out, group, levels), y)


def test_integer_kernel_rounds_the_input_exactly_as_the_reference(isa):
    """Codes 1 on the diagonal, 0 elsewhere, scales 1: each output is one rounded input, so any difference in
    the per-block int8 rounding (scale, ties, clamping) shows as an exact mismatch."""
    n = 96
    codes = torch.eye(n, dtype=torch.int8)
    dense = Q4Dense.pack(codes, torch.ones(n, n // 32), None, 32)
    x = torch.randn(16, n, generator=torch.Generator().manual_seed(5)) * 3
    x[1, :32] = 0
    x[2, 40] = -50.0
    y = isa.q4_dense_i8_mm(x, dense.data, dense.scale, None, n, 32)
    assert torch.equal(y, reference.int8_rows(x))
    assert not torch.equal(y, x) and float((y - x).abs().max()) <= float(x.abs().max()) / 127 / 2 * 1.0001
    y2 = isa.q4_dense_i8_mm(x, dense.data, dense.scale, None, n, 32, 2)  # the second level rounds what the first left
    assert torch.equal(y2, reference.int8_rows(x, levels=2))
    assert float((y2 - x).abs().max()) <= float(x.abs().max()) / 127 / 2 / 127 / 2 * 1.0001


def test_two_level_rounding_is_closer_to_fp32_inputs(isa):
    """int8x2 rounds what int8 left over: on inputs with an outlier per block its product is two orders of
    magnitude closer to the fp32-input product than int8's."""
    codes, grid, W = _quantized(64, 512, 32, True)
    dense = Q4Dense.pack(codes, grid.scale, grid.zero, 32)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(9))
    x[:, ::32] *= 60  # one outlier per block: the others round to a few int8 levels
    exact = x @ W.t()
    one, two = (isa.q4_dense_i8_mm(x, dense.data, dense.scale, dense.zero, 64, 32, levels) for levels in (1, 2))
    assert float((two - exact).abs().max()) < float((one - exact).abs().max()) / 100


def test_act_precision_chooses_the_gemv_path():
    kernels, _ = _isa_levels()
    codes, grid, W = _quantized(64, 256, 32, True)
    packed = Q4Dense.pack(codes, grid.scale, grid.zero, 32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    big = torch.randn(2, 20, 256, generator=torch.Generator().manual_seed(7))  # prefill: BLAS on the rounded input
    assert kops.act_precision() == "int8"
    _close(kops.q4_dense_mm(x, packed), reference.q4_dense_i8_mm(x, packed))
    _close(kops.q4_dense_mm(big, packed), reference.int8_rows(big.reshape(40, 256)).reshape(big.shape) @ W.t())
    try:
        kops.set_act_precision("int8x2")
        _close(kops.q4_dense_mm(x, packed), reference.q4_dense_i8_mm(x, packed, 2))
        _close(kops.q4_dense_mm(big, packed), reference.int8_rows(big.reshape(40, 256), levels=2).reshape(big.shape) @ W.t())
        kops.set_act_precision("fp32")
        _close(kops.q4_dense_mm(x, packed), x @ W.t())
        _close(kops.q4_dense_mm(big, packed), big @ W.t())
    finally:
        kops.set_act_precision("int8")
    with pytest.raises(ValueError, match="'int4': use one of int8, int8x2, fp32"):
        kops.set_act_precision("int4")
    codes16, grid16, W16 = _quantized(64, 256, 16, True)
    g16 = Q4Dense.pack(codes16, grid16.scale, None, 16)
    _close(kops.q4_dense_mm(x, g16), x @ W16.t())  # groups of 16: no integer kernel, fp32 input


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_dequantization_is_exactly_the_layouts_unpack(shape, symmetric):
    kernels, _ = _isa_levels()
    out, n_in, group = shape
    codes, grid, W = _quantized(*shape, symmetric)
    dense = Q4Dense.pack(codes, grid.scale, grid.zero, group)
    assert torch.equal(kernels.q4_unpack(dense.data, None, dense.scale, dense.zero, out, group), dense.unpack())
    codes, grid, W24 = _quantized(*shape, symmetric, sparse24=True)
    sparse = Q4Sparse24.pack(codes, grid.scale, grid.zero, group)
    unpacked = kernels.q4_unpack(sparse.data, sparse.pos, sparse.scale, sparse.zero, out, group)
    assert torch.equal(unpacked, sparse.unpack())
    x = torch.randn(3, 40, n_in)  # prefill-sized: the wrappers dequantize and call the BLAS
    rounded = reference.int8_rows(x.reshape(-1, n_in)).reshape(x.shape) if group % 32 == 0 else x  # as the GEMV
    _close(kops.q4_dense_mm(x, dense), rounded @ W.t())
    _close(kops.q4_sparse24_mm(x, sparse), rounded @ W24.t())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES + [(1536, 576, 64), (200, 64, 32)])
def test_input_major_kernel_skips_zero_inputs_exactly(isa, shape, symmetric):
    out, n_in, group = shape
    gen = torch.Generator().manual_seed(3)
    codes, grid, W = _quantized(*shape, symmetric)
    packed = Q4InputMajor.pack(codes, grid.scale, grid.zero, group)
    f32 = _fp32_scales(packed)  # the fp32-input kernel reads fp32 scales
    for batch in (1, 2, 5, 16):
        x = torch.randn(batch, n_in, generator=gen) * (torch.rand(batch, n_in, generator=gen) > 0.5)
        x[:, :3] = 0  # inputs no batch row needs
        if n_in > group:
            x[:, group : 2 * group] = 0  # a whole group skipped
        y = isa.q4_input_major_mm(x, f32.data, f32.scale, f32.zero, out, group)
        _close(y, reference.q4_input_major_mm(x, packed))
        _close(y, x @ W.t())
    x = torch.zeros(1, n_in)  # nothing live: zero outputs
    assert torch.equal(isa.q4_input_major_mm(x, f32.data, f32.scale, f32.zero, out, group), torch.zeros(1, out))
    assert torch.equal(isa.q4_input_major_unpack(f32.data, f32.scale, f32.zero, out, group), packed.unpack())
    big = torch.randn(2, 20, n_in, generator=gen)  # prefill-sized: the wrapper dequantizes and calls the BLAS
    rounded = reference.int8_rows(big.reshape(-1, n_in)).reshape(big.shape) if group % 32 == 0 else big  # as the GEMV
    _close(kops.q4_input_major_mm(big, packed), rounded @ W.t())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(37, 256, 64), (16, 96, 32), (200, 64, 32), (256, 1024 + 96, 32), (576, 576, 64),
                                   (448, 256, 128)])
def test_input_major_integer_kernel_matches_its_reference(isa, shape, symmetric):
    """int8 inputs, input-major weights: only the inputs that round to non-zero are read, two at a time; every
    output tile (64-output chunks and the odd tiles after them) equals the rounded input times W."""
    out, n_in, group = shape
    gen = torch.Generator().manual_seed(9)
    codes, grid, W = _quantized(*shape, symmetric)
    packed = Q4InputMajor.pack(codes, grid.scale, grid.zero, group)
    assert packed.scale.dtype == PACKED_SCALE_DTYPE
    old = _fp32_scales(packed)
    for batch in (1, 2, 3, 5, 16):
        x = torch.randn(batch, n_in, generator=gen) * torch.rand(batch, n_in, generator=gen).mul(4).exp()
        x = x * (torch.rand(batch, n_in, generator=gen) > 0.4)  # activation sparsity, a different mask per row
        x[0, 32:64] = 0  # a block with nothing live
        x[-1, 64:96] = 3.0  # a full block of equal inputs: 16 pairs of q = 127, past int16 without widening
        x[-1, 1] = 1e-3 * float(x[-1, :32].abs().max())  # non-zero, rounds to 0: skipped
        for levels in (1, 2):
            y = isa.q4_input_major_i8_mm(x, packed.data, packed.scale, packed.zero, out, group, levels)
            _close(y, reference.q4_input_major_i8_mm(x, packed, levels))
            assert torch.equal(isa.q4_input_major_i8_mm(x, old.data, old.scale, old.zero, out, group, levels), y)
    ones = Q4InputMajor.pack(torch.full((64, 64), 7, dtype=torch.int8), torch.ones(64, 2), None, 32)
    x = torch.full((1, 64), 3.0)  # u = 15 and q = 127 everywhere: 32 x 1905 per output, exact in int32
    assert torch.equal(isa.q4_input_major_i8_mm(x, ones.data, ones.scale, None, 64, 32), torch.full((1, 64), 7.0 * 3 * 64))
    for precision in kops.ACT_PRECISIONS:  # the product takes the integer kernel unless fp32 is asked for
        kops.set_act_precision(precision)
        x = torch.randn(2, n_in, generator=gen) * (torch.rand(2, n_in, generator=gen) > 0.5)
        levels = kops.ACT_LEVELS[precision]
        expected = reference.q4_input_major_i8_mm(x, packed, levels) if levels else reference.q4_input_major_mm(x, packed)
        _close(kops.quantized_product(packed)(x), expected)
    kops.set_act_precision("int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_sparse_kernel_matches_the_reference(isa, dtype):
    gen = torch.Generator().manual_seed(2)
    for n_in, out in ((64, 37), (300, 1000), (17, 16)):
        wt = torch.randn(n_in, out, generator=gen).to(dtype)
        for batch in (1, 2, 5, 16):
            x = torch.randn(batch, n_in, generator=gen) * (torch.rand(batch, n_in, generator=gen) > 0.5)
            x[:, :3] = 0  # inputs no batch row needs
            _close(isa.act_sparse_mm(x, wt), reference.act_sparse_mm(x, wt))
            _close(reference.act_sparse_mm(x, wt), x @ wt.float())


def test_wrappers_fall_back_to_the_reference_without_kernels(monkeypatch):
    codes, grid, W = _quantized(37, 128, 32, True)
    packed = Q4Dense.pack(codes, grid.scale, grid.zero, 32)
    x = torch.randn(2, 3, 128)  # any leading shape
    kops.set_act_precision("fp32")  # the reference multiplies fp32 inputs
    try:
        with_kernels = kops.q4_dense_mm(x, packed)
    finally:
        kops.set_act_precision("int8")
    monkeypatch.setattr(kops, "ops", lambda: None)
    without = kops.q4_dense_mm(x, packed)
    assert without.shape == (2, 3, 37)
    _close(without, x @ W.t())
    _close(with_kernels, without)
    big = torch.randn(40, 128)  # a prefill-sized batch goes to the reference either way
    _close(kops.q4_dense_mm(big, packed), big @ W.t())


def test_large_block_cache_hands_freed_blocks_back_within_its_cap():
    from compress.kernels import allocator

    kernels, _ = _isa_levels()
    a = torch.randn(512, 1024)  # 2 MiB
    with allocator.reuse_large_blocks(8 << 20) as active:
        assert active
        b = a * 2
        address = b.data_ptr()
        del b
        c = a * 3
        assert c.data_ptr() == address and torch.equal(c, a * 3)  # the freed block came back, rewritten
        seen = kernels.cpu_cache_stats()[:2]
        small = torch.ones(10) * 2  # under min_bytes: torch's own allocator, the cache never sees it
        assert kernels.cpu_cache_stats()[:2] == seen and torch.equal(small, torch.full((10,), 2.0))
        many = [torch.empty(1 << 20) for _ in range(6)]  # 4 MiB each: 24 MiB freed, 8 MiB may stay
        del many
        hits, misses, cached, cap = kernels.cpu_cache_stats()
        assert hits >= 1 and cap == 8 << 20 and 0 < cached <= cap
    hits_after, _, cached_after, cap_after = kernels.cpu_cache_stats()
    assert cached_after == 0 and cap_after == 0  # emptied and torch's allocator back
    d = a * 4  # allocated by torch's allocator again; c (from the cache) frees through its own deleter
    del c
    assert torch.equal(d, a * 4) and kernels.cpu_cache_stats()[2] == 0


@pytest.mark.skipif(compiled() is None, reason="no C++ compiler: the reference path is used")
def test_a_built_library_is_loaded_without_building_again(tmp_path):
    """Another process (as from another checkout) finds the library in the cache folder named after the
    sources and loads it; cpp_extension.load, which would rebuild it, is not called."""
    import os
    import subprocess
    import sys

    script = ("import torch.utils.cpp_extension as ext\n"
              "def refuse(*a, **k): raise AssertionError('rebuilt')\n"
              "ext.load = refuse\n"
              "from compress.kernels.build import ops\n"
              "assert ops() is not None and ops().isa() >= 0\n")
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
