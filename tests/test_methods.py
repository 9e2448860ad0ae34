import pytest
import torch

from compress.calibration import stats as stats_mod
from compress.calibration.stats import Gram, SquaredNorms, reconstruction_error
from compress.config import Pattern, PruneConfig
from compress.pruning import METHODS, InputStats, masks, sparsegpt, wanda
from tests.conftest import outlier_inputs


def _layer(n_out=48, n_in=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=gen)
    X = outlier_inputs(2048, n_in, seed=seed)
    gram = Gram(n_in)
    gram.update(X)
    return W, X, InputStats(gram.finalize())


def _direct_error(W, W_hat, X):
    return float(torch.linalg.norm((W - W_hat) @ X.T) / torch.linalg.norm(W @ X.T))


def test_gram_diagonal_is_naive_mean_sum_of_squares_and_chunking_is_exact():
    X = outlier_inputs(1000, 24)
    g = Gram(24)
    g.update(X[:300].reshape(3, 100, 24), chunk=7)
    g.update(X[300:], chunk=128)
    naive = torch.tensor([sum(float(x) ** 2 for x in X[:, j]) for j in range(24)]) / 1000
    torch.testing.assert_close(g.finalize().diagonal(), naive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.finalize(), X.T @ X / 1000, rtol=1e-4, atol=1e-4)


def test_upper_triangle_gram_with_row_panels_equals_full_product():
    from compress.calibration.stats import _add_upper_gram_

    X = outlier_inputs(300, 50)
    g = Gram(50)
    g.update(X)  # narrow: one product
    acc = torch.zeros(50, 50)
    _add_upper_gram_(acc, X, min_split=8, parts=3)  # wide path on a small matrix
    g._sum = acc
    torch.testing.assert_close(g.finalize(), X.T @ X / 300, rtol=1e-4, atol=1e-4)
    sq = SquaredNorms(50)
    sq.update(X)
    torch.testing.assert_close(sq.finalize(), g.finalize().diagonal(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(stats_mod.resolve_precision("auto", "cpu") != "bf16", reason="bf16 products need a CPU with AMX")
def test_bf16_gram_products_are_the_fp32_sums_of_bf16_rounded_inputs():
    X = outlier_inputs(4096, 1100)  # wide enough for the row-panel path too
    exact, fast = Gram(1100), Gram(1100, products="bf16")
    exact.update(X)
    fast.update(X)
    rounded = X.bfloat16().double()
    torch.testing.assert_close(fast.finalize().double(), rounded.T @ rounded / 4096, rtol=1e-5, atol=1e-5)
    G = exact.finalize()
    assert 1e-6 < float(torch.linalg.norm(fast.finalize() - G) / torch.linalg.norm(G)) < 1e-3
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # the setting is back as it was


def test_gram_precision_choices():
    assert stats_mod.resolve_precision("auto", "cuda") == "fp32"
    assert stats_mod.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match=r"--gram-precision 'fp16' is not one of auto, fp32, bf16"):
        stats_mod.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="resolve it first"):
        Gram(8, products="auto")


def test_reconstruction_error_from_gram_equals_direct():
    W, X, stats = _layer()
    W_hat = W * (torch.rand_like(W) > 0.5)
    assert reconstruction_error(W, W_hat, stats.G) == pytest.approx(_direct_error(W, W_hat, X), rel=1e-3)


def test_wanda_score_is_weight_times_column_norm():
    W, X, stats = _layer()
    norms = X.pow(2).sum(0).sqrt()
    s = wanda.score(W, stats.sq)
    torch.testing.assert_close(s / s.max(), (W.abs() * norms) / (W.abs() * norms).max(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern.parse(pattern="2:4"), Pattern.parse(pattern="4:8")])
def test_quality_ordering_on_outlier_inputs(pattern):
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        errs = []
        for seed in range(3):
            W, X, stats = _layer(seed=seed)
            W_hat = METHODS[name].apply(W, stats, PruneConfig(name, pattern, blocksize=32))
            errs.append(_direct_error(W, W_hat, X))
        errors[name] = sum(errs) / len(errs)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4"])
def test_nm_holds_exactly_after_every_method(name, spec):
    W, _, stats = _layer()
    W_hat = METHODS[name].apply(W, stats, PruneConfig(name, Pattern.parse(pattern=spec)))
    n, m = map(int, spec.split(":"))
    assert ((W_hat != 0).reshape(W.shape[0], -1, m).sum(-1) <= n).all()
    assert int((W_hat == 0).sum()) == W.numel() * (m - n) // m  # random weights: no accidental zeros


def _slow_sparsegpt(W, H, sparsity, blocksize, damp=0.01):
    """OBS column by column with an explicit Gaussian elimination of H⁻¹ (no Cholesky, no lazy batches), fp64."""
    W, H = W.double().clone(), H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    n_in = W.shape[1]
    # diagonal of H⁻¹ after eliminating columns 0..i-1: the saliency denominators
    d2, E = [], Hinv.clone()
    for i in range(n_in):
        d2.append(float(E[i, i]))
        E = E - torch.outer(E[:, i], E[i, :]) / E[i, i]
    d2 = torch.tensor(d2, dtype=torch.float64)
    keep = torch.ones_like(W, dtype=torch.bool)
    for b in range(0, n_in, blocksize):
        sal = W[:, b : b + blocksize] ** 2 / d2[b : b + blocksize]
        keep[:, b : b + blocksize] = masks.prune_lowest(sal.reshape(1, -1), round(sal.numel() * sparsity)).reshape(sal.shape)
        for i in range(b, min(b + blocksize, n_in)):
            q = W[:, i] * keep[:, i]
            err = (W[:, i] - q) / Hinv[i, i]
            W[:, i:] -= torch.outer(err, Hinv[i, i:])
            W[:, i] = q
            Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return W


def test_sparsegpt_matches_slow_obs_reference():
    W, _, stats = _layer(n_out=16, n_in=40)
    G = stats.G.double()
    Hinv, dead = sparsegpt.inverse_hessian_factor(G, 0.01)
    fast = sparsegpt.solve(W.double(), Hinv, Pattern(0.5), blocksize=16, dead=dead).W
    slow = _slow_sparsegpt(W, G, 0.5, blocksize=16)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-8)


def test_sparsegpt_handles_dead_inputs_and_singular_hessian():
    W, X, _ = _layer(n_in=32)
    X[:, [3, 17]] = 0  # dead channels
    X[:, 5] = X[:, 6]  # duplicated channel: H singular without dampening
    g = Gram(32)
    g.update(X)
    W_hat = METHODS["sparsegpt"].apply(W, InputStats(g.finalize()), PruneConfig("sparsegpt", Pattern(0.5), dampening=0.0))
    assert torch.isfinite(W_hat).all()
    assert (W_hat[:, [3, 17]] == 0).all()
    assert int((W_hat == 0).sum()) == W.numel() // 2


def test_shared_inputs_factor_hessian_once():
    _, _, stats = _layer()
    a = stats.hessian_inverse_factor(0.01)
    assert stats.hessian_inverse_factor(0.01) is a


def test_squared_norms_over_uneven_updates_equal_the_exact_column_norms():
    X = outlier_inputs(700, 24)
    sq = SquaredNorms(24)
    for part in X.split([5, 300, 128, 267]):  # tails shorter and longer than the accumulator's panel
        sq.update(part.to(torch.bfloat16) if len(part) == 5 else part)
    exact = torch.cat([X[:5].to(torch.bfloat16).float(), X[5:]]).double().square().mean(dim=0)
    torch.testing.assert_close(sq.finalize().double(), exact, rtol=1e-5, atol=0)
