"""OWL's layer-wise allocation, DSnoT's refinement and self-generated calibration (issue 8)."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from compress import models, weights
from compress.calibration.selfgen import generate_calibration, nucleus, sample
from compress.calibration.stats import Gram, SquaredNorms, reconstruction_error
from compress.cli import app
from compress.config import CalibConfig, Pattern, PruneConfig, Recipe
from compress.pipeline import compress_sequential, outlier_ratios
from compress.pruning import METHODS, InputStats, dsnot, owl, swap, wanda
from tests.conftest import build, outlier_inputs

runner = CliRunner()


def _shifted_layer(n_out=48, n_in=64, seed=0):
    """A layer whose inputs have outlier channels and non-zero channel means (as LLM activations do)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=gen)
    X = outlier_inputs(2048, n_in, seed=seed) + 2 * torch.randn(n_in, generator=gen)
    gram, norms = Gram(n_in), SquaredNorms(n_in, with_mean=True)
    gram.update(X)
    norms.update(X)
    return W, X, InputStats(gram.finalize(), norms.finalize(), norms.mean())


def test_squared_norms_mean_is_the_channel_mean():
    X = outlier_inputs(1000, 24) + 3
    norms = SquaredNorms(24, with_mean=True)
    norms.update(X[:333], rows=16)
    norms.update(X[333:], rows=16)
    torch.testing.assert_close(norms.mean(), X.mean(0), rtol=1e-5, atol=1e-5)
    assert SquaredNorms(24).mean() is None


@pytest.mark.parametrize("method,pattern", [("wanda", Pattern(0.6)), ("wanda", Pattern(0.7)), ("wanda", Pattern(0.5, 2, 4)),
                                            ("sparsegpt", Pattern(0.6)), ("sparsegpt", Pattern(0.5, 4, 8)),
                                            ("magnitude", Pattern(0.7))])
def test_dsnot_keeps_the_counts_and_never_raises_the_error(method, pattern):
    W, X, stats = _shifted_layer(seed=3)
    cfg = PruneConfig(method, pattern)
    W_hat = METHODS[method].apply(W, stats, cfg)
    refined = dsnot.refine(W, W_hat, stats.G, stats.mean, stats.sq, pattern, cycles=50)

    assert torch.equal((refined == 0).sum(1), (W_hat == 0).sum(1))  # zeros per row
    if pattern.is_nm:
        groups = (refined != 0).reshape(W.shape[0], -1, pattern.m).sum(-1)
        assert (groups == pattern.n).all()  # still exactly N of every M
    changed = (refined != W_hat) & (refined != 0)
    assert changed.any() and torch.equal(refined[changed], W[changed])  # revived weights take their dense values
    nonzero = refined != 0  # everything else is as the method left it (SparseGPT's updates too)
    assert ((refined == W_hat) | (refined == W))[nonzero].all()

    before = reconstruction_error(W, W_hat, stats.G)
    after = reconstruction_error(W, refined, stats.G)
    assert after <= before
    assert after < before  # swaps were found and taken (changed.any() above), each lowering the error
    direct = lambda Wh: float(torch.linalg.norm((W - Wh) @ X.T))  # noqa: E731 - the error from the tokens themselves
    assert direct(refined) <= direct(W_hat) * (1 + 1e-5)


def test_dsnot_moves_the_expected_error_towards_zero_and_stops_on_a_converged_row():
    W, _, stats = _shifted_layer(seed=5)
    W_hat = METHODS["wanda"].apply(W, stats, PruneConfig("wanda", Pattern(0.6)))
    refined = dsnot.refine(W, W_hat, stats.G, stats.mean, stats.sq, Pattern(0.6))
    e_before = ((W - W_hat) @ stats.mean).abs()
    e_after = ((W - refined) @ stats.mean).abs()
    assert float(e_after.mean()) < float(e_before.mean())
    again = dsnot.refine(W, refined, stats.G, stats.mean, stats.sq, Pattern(0.6), cycles=1)
    assert reconstruction_error(W, again, stats.G) <= reconstruction_error(W, refined, stats.G)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dsnot_goes_on_down_the_ranking_past_a_refused_proposal(method):
    """A row whose best-ranked swap would raise the exact error sets that candidate aside and tries the next."""
    W, _, stats = _shifted_layer(seed=4)
    pattern = Pattern(0.6)
    W_hat = METHODS[method].apply(W, stats, PruneConfig(method, pattern))
    fit = METHODS[method].updates_weights
    first = dsnot.refine(W, W_hat, stats.G, stats.mean, stats.sq, pattern, cycles=1, fit=fit)
    full = dsnot.refine(W, W_hat, stats.G, stats.mean, stats.sq, pattern, cycles=50, fit=fit)
    refused_first = (first == W_hat).all(1)  # rows whose first proposal was refused (or had none)
    assert (refused_first & (full != W_hat).any(1)).sum() >= 3
    assert reconstruction_error(W, full, stats.G) < reconstruction_error(W, first, stats.G)


@pytest.mark.parametrize("pattern", [Pattern(0.6), Pattern(0.7), Pattern(0.5, 4, 8)])
def test_dsnot_after_sparsegpt_revives_at_fitted_values_and_beats_dense_revival(pattern):
    """SparseGPT's kept weights already compensate for the pruned ones: a weight revived at its dense value
    counts that twice; at the row's error-minimizing value it lowers the error further."""
    dense_errors, fitted_errors, swaps = [], [], 0
    for seed in (3, 4, 5):
        W, _, stats = _shifted_layer(seed=seed)
        W_hat = METHODS["sparsegpt"].apply(W, stats, PruneConfig("sparsegpt", pattern))
        dense = dsnot.refine(W, W_hat, stats.G, stats.mean, stats.sq, pattern)
        fitted = dsnot.refine(W, W_hat, stats.G, stats.mean, stats.sq, pattern, fit=True)
        assert torch.equal((fitted == 0).sum(1), (W_hat == 0).sum(1))
        if pattern.is_nm:
            assert ((fitted != 0).reshape(W.shape[0], -1, pattern.m).sum(-1) == pattern.n).all()
        revived = (W_hat == 0) & (fitted != 0)
        swaps += int(revived.sum())
        assert not (fitted[revived] == W[revived]).any()  # fitted, not dense values
        assert reconstruction_error(W, fitted, stats.G) <= reconstruction_error(W, W_hat, stats.G)
        dense_errors.append(reconstruction_error(W, dense, stats.G))
        fitted_errors.append(reconstruction_error(W, fitted, stats.G))
        # the pipeline's path (weights._prune) fits after SparseGPT and keeps dense values after Wanda
        recipe = Recipe(prune=PruneConfig("sparsegpt", pattern, refine="dsnot"))
        assert torch.equal(weights._prune(W, stats, recipe), fitted)
        wanda_hat = METHODS["wanda"].apply(W, stats, PruneConfig("wanda", pattern))
        recipe = Recipe(prune=PruneConfig("wanda", pattern, refine="dsnot"))
        assert torch.equal(weights._prune(W, stats, recipe),
                           dsnot.refine(W, wanda_hat, stats.G, stats.mean, stats.sq, pattern))
    assert swaps > 0 and sum(fitted_errors) < sum(dense_errors)


def _swap_reference(W, W_hat, G, pattern, cycles):
    """``swap.refine`` one row at a time, each candidate's error computed from scratch (no rank-one updates)."""
    W, W_hat, G = W.double(), W_hat.double().clone(), G.double()
    m = pattern.m if pattern.is_nm else W.shape[1]
    err = lambda row: float((row - W[i]) @ G @ (row - W[i]))  # noqa: E731
    for i in range(W.shape[0]):
        for _ in range(cycles):
            row, best = W_hat[i], None
            g = (row - W[i]) @ G
            for start in range(0, W.shape[1], m):
                cols = range(start, start + m)
                grow = [j for j in cols if row[j] == 0 and G[j, j] > 0]
                keep = [k for k in cols if row[k] != 0]
                if not grow or not keep:
                    continue
                j = max(grow, key=lambda c: float(g[c] ** 2 / G[c, c]))
                k = min(keep, key=lambda c: float(row[c] ** 2 * G[c, c] - 2 * row[c] * g[c]))
                cand = row.clone()
                cand[k] = 0
                cand[j] = -float(((cand - W[i]) @ G)[j]) / float(G[j, j])
                if best is None or err(cand) < err(best):
                    best = cand
            if best is None or not err(best) < err(row) * (1 - 1e-6):
                break
            W_hat[i] = best
    return W_hat.float()


@pytest.mark.parametrize("method,pattern", [("sparsegpt", Pattern(0.6)), ("sparsegpt", Pattern(0.5, 2, 4)),
                                            ("wanda", Pattern(0.7)), ("magnitude", Pattern(0.5, 4, 8))])
def test_swap_equals_its_slow_reference_keeps_the_counts_and_lowers_the_error(method, pattern):
    W, X, stats = _shifted_layer(n_out=12, n_in=32, seed=7)
    W_hat = METHODS[method].apply(W, stats, PruneConfig(method, pattern, blocksize=16))
    refined = swap.refine(W, W_hat, stats.G, pattern, cycles=20)
    reference = _swap_reference(W, W_hat, stats.G, pattern, cycles=20)
    assert torch.equal(refined == 0, reference == 0)  # the same swaps
    torch.testing.assert_close(refined, reference, rtol=1e-5, atol=1e-6)

    assert torch.equal((refined == 0).sum(1), (W_hat == 0).sum(1))  # zeros per row
    if pattern.is_nm:
        groups = (refined != 0).reshape(W.shape[0], -1, pattern.m).sum(-1)
        assert (groups <= pattern.n).all() and torch.equal(groups, (W_hat != 0).reshape(groups.shape + (-1,)).sum(-1))
    assert not torch.equal(refined == 0, W_hat == 0)  # swaps were taken
    direct = lambda Wh: float(torch.linalg.norm((W - Wh) @ X.T))  # noqa: E731 - the error from the tokens themselves
    assert direct(refined) < direct(W_hat)
    rows = lambda Wh: ((W - Wh) @ X.T).norm(dim=1)  # noqa: E731
    assert (rows(refined) <= rows(W_hat) * (1 + 1e-5)).all()  # no row got worse


def test_swap_never_revives_a_dead_channel_and_stops_when_nothing_improves():
    W, _, stats = _shifted_layer(n_out=8, n_in=32, seed=2)
    G = stats.G.clone()
    G[5, :], G[:, 5] = 0, 0  # channel 5 never fires
    W_hat = METHODS["magnitude"].apply(W, InputStats(G, G.diagonal()), PruneConfig("magnitude", Pattern(0.5)))
    W_hat[:, 5] = 0
    refined = swap.refine(W, W_hat, G, Pattern(0.5), cycles=200)
    assert (refined[:, 5] == 0).all()
    assert torch.equal(swap.refine(W, refined, G, Pattern(0.5), cycles=200), refined)  # a fixed point


def test_owl_allocation_keeps_the_mean_exactly_and_prunes_outlier_rich_blocks_less():
    ratios = [0.011, 0.002, 0.030, 0.007, 0.019, 0.002]
    for target, lam in [(0.7, 0.08), (0.6, 0.1), (0.5, 0.0)]:
        alloc = owl.allocate(ratios, target, lam)
        assert abs(sum(alloc) / len(alloc) - target) < 1e-12
        assert max(alloc) - min(alloc) == pytest.approx(2 * lam, abs=1e-12)
        order = sorted(range(len(ratios)), key=ratios.__getitem__)
        assert all(alloc[a] >= alloc[b] for a, b in zip(order, order[1:]))  # more outliers, less pruned
    assert owl.allocate([0.01] * 4, 0.6, 0.08) == [0.6] * 4
    with pytest.raises(ValueError, match="--owl-lambda 0.35"):
        owl.allocate(ratios, 0.7, 0.35)


def test_outlier_ratio_against_a_slow_count():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 9, generator=gen) ** 8, torch.rand(3, 5, generator=gen) ** 3]
    values = [float(v) for s in scores for v in s.flatten()]
    mean = sum(values) / len(values)
    expected = sum(v > 5 * mean for v in values) / len(values)
    assert owl.outlier_ratio(scores, 5) == pytest.approx(expected)
    assert expected > 0


def test_owl_ratios_are_the_dense_models_and_block_sparsities_are_applied():
    model = build("llama", num_hidden_layers=3)
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    ratios = outlier_ratios(model, tokens, 3.0, chunk_samples=2)

    # the same ratios from a plain forward of the dense model with hooks
    prefix, blocks = models.decoder_blocks(model)
    seen: dict[str, SquaredNorms] = {}
    handles = []
    for i, block in enumerate(blocks):
        for name, linear in models.linears(block).items():
            seen[f"{i}.{name}"] = SquaredNorms(models.in_features(linear))
            handles.append(linear.register_forward_pre_hook(lambda _m, a, k=f"{i}.{name}": seen[k].update(a[0])))
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    for i, block in enumerate(blocks):
        scores = [wanda.score(models.weight_view(lin), seen[f"{i}.{n}"].finalize()) for n, lin in models.linears(block).items()]
        assert ratios[i] == pytest.approx(owl.outlier_ratio(scores, 3.0), rel=1e-6)

    alloc = tuple(owl.allocate(ratios, 0.6, 0.1))
    recipe = Recipe(prune=PruneConfig("wanda", Pattern(0.6), allocation="owl", block_sparsity=alloc))
    report = compress_sequential(model, tokens, recipe, chunk_samples=2)
    for layer in report.layers:
        i = int(layer.name.split(".")[2])
        assert layer.target_sparsity == alloc[i]
        in_features = layer.shape[1]
        assert layer.sparsity == pytest.approx(round(in_features * alloc[i]) / in_features, abs=1e-9)


def test_block_sparsities_must_match_the_model_and_the_target():
    with pytest.raises(ValueError, match="average 0.65, not --sparsity 0.6"):
        PruneConfig("wanda", Pattern(0.6), allocation="file", block_sparsity=(0.6, 0.7))
    with pytest.raises(ValueError, match="needs --sparsity alone, not --pattern 2:4"):
        PruneConfig("wanda", Pattern(0.5, 2, 4), allocation="owl")
    model = build("llama", num_hidden_layers=3)
    recipe = Recipe(prune=PruneConfig("wanda", Pattern(0.6), allocation="file", block_sparsity=(0.5, 0.7)))
    with pytest.raises(ValueError, match="2 block sparsities for a model of 3 decoder blocks"):
        compress_sequential(model, torch.zeros(1, 8, dtype=torch.long), recipe)


def test_self_calibration_is_seeded_exact_length_and_recorded(tokenizer):
    model = build("llama")
    cfg = CalibConfig("self", nsamples=5, seqlen=24, seed=3, temperature=0.8, top_p=0.9)
    tokens, manifest = generate_calibration(model, tokenizer, cfg, batch_size=2)
    again, _ = generate_calibration(model, tokenizer, cfg, batch_size=2)
    other, _ = generate_calibration(model, tokenizer, CalibConfig("self", 5, 24, seed=4), batch_size=2)
    assert tokens.shape == (5, 24) and torch.equal(tokens, again) and not torch.equal(tokens, other)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[:, 1:] != tokenizer.eos_token_id).all()  # EOS held back until seqlen
    assert manifest.source == "self" and manifest.generation == {"start_token": tokenizer.bos_token_id,
                                                                  "temperature": 0.8, "top_p": 0.9}
    state = torch.get_rng_state()  # the caller's random stream is not consumed
    counts = []
    one_batch, _ = generate_calibration(model, tokenizer, cfg, batch_size=5, on_tokens=counts.append)
    assert torch.equal(state, torch.get_rng_state())
    assert counts == [5 * step for step in range(1, 24)]  # every sampling step reported, for the bar's ETA
    assert one_batch.shape == (5, 24) and (one_batch[:, 1:] != tokenizer.eos_token_id).all()


def _nucleus_by_full_sort(probs, top_p):
    out = torch.zeros_like(probs)
    for r, row in enumerate(probs):
        mass = 0.0
        for j in row.argsort(descending=True).tolist():
            if mass >= top_p:
                break
            out[r, j] = row[j]
            mass += float(row[j])
    return out


def test_nucleus_equals_the_full_sort_inside_and_beyond_its_top_k():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen, dtype=torch.float64)
    logits[:3] *= 6  # peaked rows: their nucleus fits in a few tokens; flat rows need the full sort
    probs = logits.softmax(-1)
    for top_p in (0.3, 0.9, 0.999):
        expected = _nucleus_by_full_sort(probs, top_p)
        for top_k in (4, 50):
            assert torch.equal(nucleus(probs, top_p, top_k=top_k), expected), (top_p, top_k)
    assert (nucleus(probs, 0.9, top_k=4) > 0).sum(-1)[3:].min() > 4  # the flat rows did go past the top 4


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_self_calibration_samples_what_the_uncached_model_predicts(family, tokenizer):
    """The cached sampling loop draws each token from the distribution a full forward over the sample so far
    gives (same generator, same draws): the KV cache and positions are used right in every family."""
    model = build(family)
    cfg = CalibConfig("self", nsamples=3, seqlen=12, seed=5, temperature=0.7, top_p=0.8)
    tokens, _ = generate_calibration(model, tokenizer, cfg)
    gen = torch.Generator().manual_seed(5)
    ids = tokens[:, :1].clone()
    with torch.no_grad():
        for pos in range(1, 12):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            logits[:, tokenizer.eos_token_id] = float("-inf")
            ids = torch.cat([ids, sample(logits, 0.7, 0.8, gen)[:, None]], dim=1)
    assert torch.equal(ids, tokens)


def _prune(model_dir, out, *extra, calib=None):
    args = ["prune", str(model_dir), "--out", str(out), "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
            *(["--calib", str(calib)] if calib else []), *extra]
    return runner.invoke(app, args)


@pytest.mark.parametrize("pattern", [Pattern(0.6), Pattern(0.5, 2, 4)])
def test_pipeline_swap_refinement_lowers_each_layers_error_and_keeps_the_pattern(pattern):
    tokens = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))
    plain, refined = build("llama"), build("llama")
    cfg = PruneConfig("sparsegpt", pattern, blocksize=16)
    exact = dict(gram_precision="fp32", forward_precision="fp32")
    r0 = compress_sequential(plain, tokens, Recipe(cfg, **exact))
    r1 = compress_sequential(refined, tokens, Recipe(replace(cfg, refine="swap"), **exact))
    assert [r.sparsity for r in r1.layers] == [r.sparsity for r in r0.layers]
    # q/k/v of block 0 see the same inputs either way: there the refinement can only lower the error
    first = [(a.rel_error, b.rel_error) for a, b in zip(r0.layers, r1.layers) if ".0.self_attn." in a.name][:3]
    assert len(first) == 3 and all(after <= before for before, after in first)
    assert sum(r.rel_error for r in r1.layers) < sum(r.rel_error for r in r0.layers)
    if pattern.is_nm:
        for name, lin in models.linears(models.decoder_blocks(refined)[1][1]).items():
            W = models.weight_view(lin)
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name


def test_cli_owl_dsnot_and_self_calibration_end_to_end(saved_model, calib_txt, tmp_path):
    model_dir = saved_model("llama")
    out = tmp_path / "owl"
    result = _prune(model_dir, out, "--sparsity", "0.6", "--allocation", "owl", "--owl-lambda", "0.1", "--owl-m", "3",
                    "--refine", "dsnot", calib=calib_txt)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "compression.json").read_text())
    alloc = meta["recipe"]["prune"]["block_sparsity"]
    assert len(alloc) == 2 and sum(alloc) / 2 == pytest.approx(0.6, abs=1e-12) and alloc[0] != alloc[1]
    assert len(meta["owl_outlier_ratios"]) == 2 and meta["recipe"]["prune"]["refine"] == "dsnot"

    again = tmp_path / "from-file"  # an OWL run's allocation, reused from its compression.json
    result = _prune(model_dir, again, "--allocation", str(out / "compression.json"), calib=calib_txt)
    assert result.exit_code == 0, result.output
    assert json.loads((again / "compression.json").read_text())["recipe"]["prune"]["block_sparsity"] == alloc

    selfcal = tmp_path / "self"
    result = _prune(model_dir, selfcal, "--sparsity", "0.5", "--calib", "self", "--self-temperature", "0.7")
    assert result.exit_code == 0, result.output
    calibration = json.loads((selfcal / "compression.json").read_text())["calibration"]
    assert calibration["source"] == "self" and calibration["generation"]["temperature"] == 0.7


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "0.6", "--allocation", "owlish"], "--allocation 'owlish' is neither uniform, owl nor a readable JSON"),
    (["--sparsity", "0.7", "--allocation", "owl", "--owl-lambda", "0.4"], "--owl-lambda 0.4 must be in [0, 0.3)"),
    (["--pattern", "2:4", "--allocation", "owl"], "needs --sparsity alone, not --pattern 2:4"),
    (["--sparsity", "0.6", "--refine", "dsnoot"], "--refine 'dsnoot' is not one of dsnot"),
    (["--pattern", "g16", "--sparsity", "0.5", "--refine", "dsnot"], "not with --pattern g16"),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--quant", "w4g32", "--refine", "dsnot"], "one pass: use --quant-method rtn"),
    (["--sparsity", "0.5", "--calib", "self", "--self-top-p", "1.5"], "--self-top-p 1.5 is outside (0, 1]"),
])
def test_bad_options_are_one_line_exit_2(extra, message, saved_model, calib_txt, tmp_path):
    out = tmp_path / "out"
    calib = None if "self" in extra else calib_txt
    result = _prune(saved_model("llama"), out, *extra, calib=calib)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()
