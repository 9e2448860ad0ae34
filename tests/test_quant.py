import pytest
import torch

from compress.calibration.stats import Gram
from compress.config import Pattern, PruneConfig, QuantConfig, Recipe
from compress.kernels.formats import pack_int32, unpack_int32
from compress.pruning import InputStats
from compress.quant import gptq, rtn
from compress.quant.grid import QuantGrid
from compress.reports import QuantizedWeight
from compress.weights import compress_weight
from tests.conftest import outlier_inputs


def _layer(n_out=32, n_in=64, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=gen)
    X = outlier_inputs(2048, n_in, seed=seed)
    gram = Gram(n_in, dtype=dtype)
    gram.update(X)
    return W, X, InputStats(gram.finalize())


def _error(W, W_hat, X):
    return float(torch.linalg.norm((W - W_hat.float()) @ X.T) / torch.linalg.norm(W @ X.T))


def _slow_pack(codes, bits):
    """Bit by bit: code i of each run of 32 at bits i*b.. of the run, words little-endian, as Python ints."""
    rows = []
    for row in codes.tolist():
        row = [c + (1 << (bits - 1)) for c in row] + [0] * (-len(row) % 32)
        words = []
        for r in range(0, len(row), 32):
            stream = 0
            for i, c in enumerate(row[r : r + 32]):
                stream |= c << (i * bits)
            words += [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(bits)]
        n_words = -(-codes.shape[1] * bits // 32)
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words[:n_words]])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [32, 40, 576, 7])
def test_pack_matches_bitwise_reference_and_round_trips(bits, cols):
    gen = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, cols), generator=gen).to(torch.int8)
    packed = pack_int32(codes, bits)
    torch.testing.assert_close(packed, _slow_pack(codes, bits), rtol=0, atol=0)
    assert torch.equal(unpack_int32(packed, bits, codes.shape), codes)
    along_rows = pack_int32(codes.t().contiguous(), bits, dim=0)
    assert along_rows.shape == (-(-cols * bits // 32), 3)
    assert torch.equal(unpack_int32(along_rows, bits, (cols, 3), dim=0), codes.t())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 6, 33])
def test_quantized_weight_holds_small_codes_as_nibbles_and_gives_them_back(bits, cols):
    gen = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=gen).to(torch.int8)
    grid = QuantGrid(torch.ones(5, 1), None, bits, cols)
    held = QuantizedWeight(codes, grid)
    assert torch.equal(held.codes, codes) and held.codes.dtype == torch.int8
    assert held.held_bytes == (5 * -(-cols // 2) if bits <= 4 else codes.numel())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 16])
def test_round_to_nearest_is_within_half_a_step_and_keeps_zeros(bits, symmetric, group):
    W = torch.randn(8, 64) * torch.linspace(0.1, 3, 64)
    W[:, ::5] = 0  # pruned weights
    W[3, :16] = 0  # a whole zero group
    grid = QuantGrid.fit(W, QuantConfig(bits, group, symmetric, scale="minmax"))
    codes = grid.encode(W)
    assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
    W_hat = grid.decode(codes)
    step = grid.scale.repeat_interleave(grid.group_size, dim=1)
    # the symmetric grid's largest weight sits exactly half a step beyond the last code: allow fp32 rounding
    assert ((W_hat - W).abs() <= step / 2 + 1e-6 * W.abs().amax()).all()
    assert (W_hat[W == 0] == 0).all()
    assert torch.equal(grid.decode(grid.encode(W_hat)), W_hat)  # every weight on the grid


@pytest.mark.parametrize("spec,message", [("w9g64", "2..8"), ("w1", "2..8"), ("w4g1", "at least 2"),
                                          ("int4", "not wBgG"), ("w4g", "not wBgG")])
def test_quant_spec_errors_name_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.parse(spec)


def test_quant_spec_parses_bits_and_groups():
    assert QuantConfig.parse("w4g64") == QuantConfig(4, 64)
    assert QuantConfig.parse("W8").group_size == 0


def _slow_gptq(W, H, grid, order, damp=0.01, shrink=0.0):
    """OBQ: columns in ``order``, each rounded, its error spread through an explicitly eliminated H⁻¹, fp64;
    ``H``'s off-diagonal scaled by ``1 - shrink`` first."""
    W, H = W.double().clone(), H.double().clone()
    H = (1 - shrink) * H + shrink * torch.diag(H.diagonal())
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    for i in order:
        q = grid.round_column(W[:, i], i).double()
        err = (W[:, i] - q) / Hinv[i, i]
        W -= torch.outer(err, Hinv[i, :])  # eliminated columns have zero rows in Hinv: untouched
        W[:, i] = q
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return W


@pytest.mark.parametrize("actorder,shrink", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_gptq_matches_slow_obq_reference(actorder, shrink):
    W, _, stats = _layer(n_out=12, n_in=40, dtype=torch.float64)
    cfg = QuantConfig(4, 8, actorder=actorder, blocksize=16, hessian_shrink=shrink)
    result, grid = gptq.quantize(W, stats, cfg)
    order = gptq.activation_order(stats.G.diagonal()).tolist() if actorder else list(range(40))
    slow = _slow_gptq(W, stats.G, grid, order, shrink=shrink)
    torch.testing.assert_close(result.W, slow, rtol=1e-6, atol=1e-8)
    assert torch.equal(grid.decode(grid.encode(result.W.float())), result.W.float())  # every weight on the grid


def test_fully_shrunk_gptq_is_round_to_nearest_and_shrinkage_orders_the_calibration_error():
    W, X, stats = _layer()
    rtn_W, rtn_grid = rtn.quantize(W, stats, QuantConfig(4, 16, method="rtn"))
    errors = []
    for shrink in (0.0, 0.5, 1.0):
        result, grid = gptq.quantize(W, stats, QuantConfig(4, 16, hessian_shrink=shrink))
        errors.append(_error(W, result.W.float(), X))
    assert torch.equal(grid.scale, rtn_grid.scale)
    assert torch.equal(result.W.float(), rtn_W)  # a diagonal Hessian feeds no error forward
    assert errors[0] < errors[1] < errors[2]  # on the calibration inputs themselves, plain GPTQ fits closest


@pytest.mark.parametrize("spec", ["w4g16", "w3g32", "w4", "w8g16"])
def test_gptq_error_below_rtn_on_correlated_inputs(spec):
    for seed in range(3):
        W, X, stats = _layer(seed=seed)
        rtn = compress_weight(W, stats, Recipe(quant=QuantConfig.parse(spec, method="rtn")))
        ours = compress_weight(W, stats, Recipe(quant=QuantConfig.parse(spec, method="gptq")))
        assert _error(W, ours.W, X) < _error(W, rtn.W, X), (spec, seed)
        assert torch.equal(ours.grid.decode(ours.codes), ours.W)


@pytest.mark.parametrize("quant_method", ["rtn", "gptq"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_then_quantize_keeps_the_mask_exactly(method, quant_method):
    W, _, stats = _layer()
    recipe = Recipe(PruneConfig(method, Pattern.parse(pattern="2:4"), blocksize=32),
                    QuantConfig(4, 16, symmetric=False, method=quant_method))
    out = compress_weight(W, stats, recipe)
    kept = (out.W != 0).reshape(32, -1, 4).sum(-1)
    assert (kept <= 2).all()
    assert int((out.W == 0).sum()) >= W.numel() // 2
    assert torch.equal(out.grid.decode(out.codes), out.W.float())


def test_joint_sparsegpt_gptq_beats_pruning_then_rtn_and_is_exactly_2_4():
    joint, sequential = [], []
    for seed in range(3):
        W, X, stats = _layer(seed=seed)
        prune = PruneConfig("sparsegpt", Pattern.parse(pattern="2:4"), blocksize=32)
        a = compress_weight(W, stats, Recipe(prune, QuantConfig(4, 16)))
        b = compress_weight(W, stats, Recipe(prune, QuantConfig(4, 16, method="rtn")))
        assert ((a.W != 0).reshape(32, -1, 4).sum(-1) <= 2).all()
        joint.append(_error(W, a.W, X))
        sequential.append(_error(W, b.W, X))
    assert sum(joint) < sum(sequential), (joint, sequential)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_group_sparsity_prunes_whole_runs(method):
    W, _, stats = _layer()
    out = compress_weight(W, stats, Recipe(PruneConfig(method, Pattern.parse(0.5, "g8"), blocksize=32)))
    runs = (out.W != 0).reshape(32, -1, 8)
    all_or_nothing = runs.all(-1) | (~runs).all(-1)
    assert all_or_nothing.all()
    assert int((~runs).all(-1).sum()) == runs.shape[0] * runs.shape[1] // 2


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (3, True)])
def test_searched_scales_never_round_a_group_worse_than_min_max(bits, symmetric):
    from tests.conftest import outlier_inputs

    X = outlier_inputs(512, 128, seed=3)
    d = (X ** 2).mean(0)  # (in,) the inputs' mean squares: the Hessian's diagonal
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(4)) * torch.rand(48, 1) + 0.01 * torch.randn(48, 128)
    W[W.abs() < 0.05] = 0  # pruned weights
    cfg = dict(bits=bits, group_size=32, symmetric=symmetric)
    minmax = QuantGrid.fit(W, QuantConfig(**cfg, scale="minmax"))
    search = QuantGrid.fit(W, QuantConfig(**cfg, scale="search"), importance=d)

    e = d * torch.sqrt((W ** 2).mean(1, keepdim=True) + W ** 2)  # (out, in): the search's error weights

    def group_error(grid):  # (out, groups): sum_j e_j (w_j - round(w_j))^2
        return (((grid.round(W) - W) ** 2 * e).reshape(48, 4, 32)).sum(-1)

    assert (group_error(search) <= group_error(minmax) * (1 + 1e-6)).all()
    assert group_error(search).sum() < 0.95 * group_error(minmax).sum()  # and clearly better overall
    assert (search.round(W)[W == 0] == 0).all()  # zero is on every grid: pruned weights stay pruned
    codes = search.encode(W)
    assert codes.min() >= search.qmin and codes.max() <= search.qmax


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_searched_symmetric_grid_puts_the_extreme_on_the_far_code_whatever_its_sign(sign):
    W = sign * torch.tensor([[-1.0, 0.5, 0.25, -0.125] * 8])  # (1, 32): the extreme is -sign
    search = QuantGrid.fit(W, QuantConfig(bits=4, group_size=32, scale="search"))
    assert float(search.scale[0, 0]) == pytest.approx(sign / 8)  # the extreme on code -8: every weight exact
    assert search.encode(W).min() == -8
    minmax = QuantGrid.fit(W, QuantConfig(bits=4, group_size=32, scale="minmax"))
    assert torch.equal(search.round(W), W) and not torch.equal(minmax.round(W), W)


def _slow_signed_search(w, e, bits, scale_dtype):
    """One group ``w`` ``(g,)``, error weights ``e``, plain Python: the min-max grid, then each candidate step
    (the extreme on code ``-(2^(b-1) + k 2^(b-1)/80)``, ``|k| <= 9``), its codes, their weighted least-squares scale; the
    least error wins, earlier candidates on ties. Returns ``(scale, round_scale)``."""
    edge, qmin, qmax = 2 ** (bits - 1), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w, e = w.double().tolist(), e.double().tolist()
    fp = lambda x: float(torch.tensor(x, dtype=torch.float32).to(scale_dtype).float())  # noqa: E731
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    amax = max(abs(x) for x in w)
    extreme = max(w, key=abs)
    codes = lambda step: [min(max(round(f32(x / step)), qmin), qmax) for x in w]  # noqa: E731
    error = lambda s, q: sum(ej * (x - qj * s) ** 2 for x, qj, ej in zip(w, q, e))  # noqa: E731
    best = fp(amax / ((2 ** bits - 1) / 2))
    best = (best, best, error(best, codes(best)))
    for k in range(-9, 10):
        step = f32(-extreme / f32(edge + k * (edge / 80)))
        q = codes(step)
        den = sum(ej * qj * qj for qj, ej in zip(q, e))
        scale = fp(sum(ej * x * qj for x, qj, ej in zip(w, q, e)) / den) if den > 0 else step
        err = error(scale, q)
        if err < best[2] * (1 - 1e-9):
            best = (scale, step, err)
    return best[:2]


@pytest.mark.parametrize("bits,scale_dtype", [(4, torch.float16), (4, torch.float32), (8, torch.float16)])
def test_signed_search_matches_a_slow_reference(bits, scale_dtype):
    from tests.conftest import outlier_inputs

    d = (outlier_inputs(256, 64, seed=5) ** 2).mean(0)  # (in,)
    W = torch.randn(6, 64, generator=torch.Generator().manual_seed(6)) * 0.05
    W[0, :32] = 0  # an all-zero group
    grid = QuantGrid.fit(W, QuantConfig(bits=bits, group_size=32, scale="search"), scale_dtype, importance=d)
    sigma2 = (W ** 2).mean(1, keepdim=True)  # (out, 1)
    e = d * torch.sqrt(sigma2 + W ** 2)  # (out, in): llama.cpp's error weights
    for row in range(6):
        for g in range(2):
            cols = slice(32 * g, 32 * g + 32)
            if not W[row, cols].any():
                assert float(grid.encode(W)[row, cols].abs().sum()) == 0
                continue
            scale, step = _slow_signed_search(W[row, cols], e[row, cols], bits, scale_dtype)
            assert float(grid.scale[row, g]) == pytest.approx(scale, rel=1e-5), (row, g)
            assert float(grid.round_scale[row, g]) == pytest.approx(step, rel=1e-5), (row, g)
