"""Activation-threshold sparsity: streaming quantiles, calibration in the driver, thresholds at inference."""

import json

import pytest
import torch
from typer.testing import CliRunner

import compress
from compress.activations.histogram import AbsHistogram
from compress.activations.positions import TokenPositions, band_edges, band_slices
from compress.activations.thresholds import Sparsifier, install, thresholds, token_rms
from compress.cli import app
from compress.config import ActConfig, Recipe
from compress.pipeline import compress_sequential
from tests.conftest import build, outlier_inputs

runner = CliRunner()


def _samples(n=6000, channels=48, seed=0):
    X = outlier_inputs(n, channels, seed=seed)
    X[:, 5] = 0  # a dead channel
    return X


@pytest.mark.parametrize("sparsity", [0.25, 0.4, 0.5, 0.7])
def test_streaming_thresholds_match_exact_quantiles_within_1_percent(sparsity):
    X = _samples()
    hist = AbsHistogram(X.shape[1])
    for part in X.split(1000):
        hist.update(part)
    exact = torch.quantile(X.abs().flatten(), sparsity)
    assert hist.threshold(sparsity) == pytest.approx(float(exact), rel=0.01)
    per_channel = hist.level_thresholds(sparsity)
    exact_channels = torch.quantile(X.abs(), sparsity, dim=0)
    live = exact_channels > 0
    torch.testing.assert_close(per_channel[live], exact_channels[live], rtol=0.01, atol=0)
    w = torch.linspace(0.2, 3.0, X.shape[1])
    exact_weighted = torch.quantile((X.abs() * w).flatten(), sparsity)
    assert hist.threshold(sparsity, w) == pytest.approx(float(exact_weighted), rel=0.01)


@pytest.mark.parametrize("method", ["teal", "chess", "chess-gated", "wina"])
def test_thresholds_give_the_calibrated_sparsity_on_the_calibration_inputs(method):
    X = _samples(seed=1)
    W = torch.randn(32, X.shape[1])
    W[:, 0] *= 4  # one heavy column: WINA keeps more of channel 0
    up = torch.rand(X.shape[1]) + 0.5 if method == "chess-gated" else None  # E|up_j| of a gated MLP
    hist = AbsHistogram(X.shape[1])
    hist.update(X)
    t = thresholds(hist, method.removesuffix("-gated"), 0.4, W, up)
    teal = thresholds(hist, "teal", 0.4, W)
    if method == "chess":  # off a gated MLP's down projection CHESS is TEAL: one threshold
        assert torch.equal(t, teal)
    elif method == "chess-gated":  # channel-wise T / E|up_j|: the product with E|up_j| is one T
        assert torch.allclose(t * up, (t * up)[0].expand_as(t), rtol=1e-5)
    elif method == "wina":  # one T on |x_j|·‖W[:, j]‖: thresholds inversely proportional to the column norms
        norms = torch.linalg.vector_norm(W, dim=0)
        assert torch.allclose(t * norms, (t * norms)[0].expand_as(t), rtol=1e-5) and t[0] < t[1:].min()
    hook = Sparsifier(t)
    (x_sparse,) = hook(None, (X,))
    if method != "chess-gated":  # gated thresholds apply to the gate activations (Sparsifier's up), not to X
        assert hook.sparsity == pytest.approx(0.4, abs=0.003)
    assert float((x_sparse == 0).float().mean()) == pytest.approx(hook.sparsity)
    assert torch.equal(x_sparse[x_sparse != 0], X[x_sparse != 0])  # what survives is untouched
    if method == "wina":  # one threshold on |x_j|·‖W[:, j]‖
        score = X.abs() * torch.linalg.vector_norm(W, dim=0)
        assert float(score[x_sparse == 0].max()) <= float(score[x_sparse != 0].min()) * (1 + 1e-5)
    if method in ("teal", "chess"):  # without an up projection CHESS, like TEAL, has one threshold on |x|
        assert float(X.abs()[x_sparse == 0].max()) <= float(X.abs()[x_sparse != 0].min())
    if method == "chess-gated":  # applied by hand here: what goes is what scores lowest on |x_j|·E|up_j|
        kept = X.abs() >= t
        score = X.abs() * up
        assert float(score[~kept].max()) <= float(score[kept].min()) * (1 + 1e-5)
        assert float((~kept).float().mean()) == pytest.approx(0.4, abs=0.003)


def _tokens(n=8, length=32, seed=0):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["teal", "chess", "wina"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_driver_calibrates_every_targeted_linear_to_its_target(family, method):
    model = build(family)
    report = compress_sequential(model, _tokens(), Recipe(act=ActConfig(0.5, method)))
    assert len(report.act_thresholds) == len(report.layers) > 0
    for layer in report.layers:
        assert layer.act_target == 0.5
        assert layer.act_sparsity == pytest.approx(0.5, abs=0.02), layer.name
        assert layer.sparsity == 0  # weights untouched
    if method == "chess":  # channel-wise on gated MLPs' gate activations only, one threshold elsewhere
        uniform = {name: bool((t == t[0]).all()) for name, t in report.act_thresholds.items()}
        assert all(u == (family != "llama" or not name.endswith("down_proj")) for name, u in uniform.items()), uniform


def test_per_layer_targets_and_target_regex():
    model = build("llama")
    down = "model.layers.1.mlp.down_proj"
    act = ActConfig(0.3, "teal", targets=(r"mlp\.",), per_layer={down: 0.6})
    report = compress_sequential(model, _tokens(), Recipe(act=act))
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name[down].act_sparsity == pytest.approx(0.6, abs=0.02)
    assert by_name["model.layers.0.mlp.gate_proj"].act_sparsity == pytest.approx(0.3, abs=0.02)
    assert by_name["model.layers.0.self_attn.q_proj"].act_target is None
    assert "model.layers.0.self_attn.q_proj" not in report.act_thresholds


def _prune(model_dir, out, calib, *extra):
    return runner.invoke(app, ["prune", str(model_dir), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
                               "--seqlen", "32", "--device", "cpu", *extra])


def _eval(folder, calib, json_out):
    result = runner.invoke(app, ["eval", str(folder), "--ppl", str(calib), "--seqlen", "32", "--limit", "4",
                                 "--device", "cpu", "--json", str(json_out)])
    assert result.exit_code == 0, result.output
    return json.loads(json_out.read_text())


def test_cli_round_trip_with_wanda_and_wina(saved_model, calib_txt, tmp_path):
    model_dir = saved_model("llama")
    out = tmp_path / "both"
    result = _prune(model_dir, out, calib_txt, "--method", "wanda", "--sparsity", "0.5", "--act-sparsity", "0.4",
                    "--act-method", "wina")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "compression.json").read_text())
    assert meta["recipe"]["act"]["method"] == "wina"
    assert all(layer["act_sparsity"] == pytest.approx(0.4, abs=0.02) for layer in meta["report"]["layers"])

    model = compress.load(str(out))
    assert len(model.compress_sparsifiers) == len(meta["report"]["layers"])
    sparse = _eval(out, calib_txt, tmp_path / "sparse.json")
    assert set(sparse["activation_sparsity"]) == set(model.compress_sparsifiers)
    achieved = list(sparse["activation_sparsity"].values())  # on 4 x 32 unseen tokens: near the target, noisy
    assert sum(achieved) / len(achieved) == pytest.approx(0.4, abs=0.05) and all(0.2 < a < 0.6 for a in achieved), achieved

    weights_only = tmp_path / "w"
    assert _prune(model_dir, weights_only, calib_txt, "--method", "wanda", "--sparsity", "0.5").exit_code == 0
    assert sparse["ppl"] != _eval(weights_only, calib_txt, tmp_path / "w.json")["ppl"]


def test_dense_prefill_leaves_teacher_forced_perplexity_unchanged(saved_model, calib_txt, tmp_path):
    model_dir = saved_model("qwen2")
    dense = _eval(model_dir, calib_txt, tmp_path / "dense.json")
    for prefill, same in (("dense", True), ("sparse", False)):
        out = tmp_path / prefill
        assert _prune(model_dir, out, calib_txt, "--act-sparsity", "0.5", "--act-prefill", prefill).exit_code == 0
        ppl = _eval(out, calib_txt, tmp_path / f"{prefill}.json")["ppl"]
        assert (ppl == pytest.approx(dense["ppl"], rel=1e-6)) == same, (prefill, ppl, dense["ppl"])


@pytest.mark.parametrize("extra,message", [
    (["--act-sparsity", "1.5"], "outside (0, 1)"),
    (["--act-sparsity", "0.5", "--act-method", "cats"], "--act-method 'cats' is not one of teal, chess, wina"),
    (["--act-sparsity", "0.5", "--act-targets", "nothing_like_this"], "matches no linear"),
    (["--act-sparsity", "0.5", "--act-prefill", "lazy"], "--act-prefill 'lazy'"),
    (["--act-sparsity", "0.5", "--act-positions", "16,8"], "--act-positions '16,8' must be increasing"),
    (["--act-sparsity", "0.5", "--act-positions", "8,32"], "past the 32-token calibration windows"),
])
def test_bad_activation_input_is_one_line_exit_2(extra, message, saved_model, calib_txt, tmp_path):
    result = _prune(saved_model("llama"), tmp_path / "o", calib_txt, *extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "o").exists()


def test_chess_thresholds_gate_activations_of_gated_mlps_by_mean_up(saved_model, calib_txt, tmp_path):
    model = build("llama")
    report = compress_sequential(model, _tokens(), Recipe(act=ActConfig(0.5, "chess")))
    downs = [n for n in report.act_thresholds if n.endswith("down_proj")]
    assert downs and set(report.gate_space) == set(downs)
    assert all(report.gate_space[d] == d.replace("down_proj", "up_proj") for d in downs)

    out = tmp_path / "chess"
    assert _prune(saved_model("llama"), out, calib_txt, "--act-sparsity", "0.5", "--act-method", "chess").exit_code == 0
    loaded = compress.load(str(out))
    assert all(loaded.compress_sparsifiers[d].up is not None for d in downs)
    ids = torch.randint(3, 300, (2, 32))
    with torch.no_grad():
        loaded(ids)
    down = loaded.compress_sparsifiers[downs[0]]
    assert 0.15 < down.sparsity < 0.85  # gate activations below T / E|up| zeroed on unseen (random) tokens too


def test_histograms_on_a_token_subsample_still_hit_the_target():
    report = compress_sequential(build("llama"), _tokens(n=16), Recipe(act=ActConfig(0.4, "teal")), histogram_tokens=128)
    assert all(layer.act_sparsity == pytest.approx(0.4, abs=0.04) for layer in report.layers)


def test_position_band_edges():
    assert band_edges("auto", 512) == (64, 256)
    assert band_edges("auto", 2048) == (64, 256, 1024)
    assert band_edges("auto", 100) == ()  # too short for a band of its own past 64
    assert band_edges("off", 4096) == ()
    assert band_edges("16, 48", 64) == (16, 48)
    for bad in ("48,16", "0,16", "sixteen"):
        with pytest.raises(ValueError, match="--act-positions"):
            band_edges(bad, 64)
    with pytest.raises(ValueError, match="past the 64-token calibration windows"):
        band_edges("16,64", 64)
    assert ActConfig(0.5).resolved(512).positions == "64,256"
    assert ActConfig(0.5).resolved(64).positions == "off"


def _growing_inputs(n=64, length=96, channels=32, seed=0):
    """Inputs whose magnitude grows with position and settles from position 32 on (as attention outputs)."""
    x = torch.randn(n, length, channels, generator=torch.Generator().manual_seed(seed))
    return x * torch.cat([torch.linspace(0.1, 1.0, 32), torch.ones(length - 32)])[:, None]


def test_position_bands_hold_the_target_at_every_position_and_past_the_calibration_length():
    calib, longer = _growing_inputs()[:, :64], _growing_inputs(seed=1)  # calibrated on 64 positions, served on 96
    edges = (16, 32)
    hists = [AbsHistogram(calib.shape[-1]) for _ in range(len(edges) + 1)]
    for hist, band in zip(hists, band_slices(edges, calib.shape[1])):
        hist.update(calib[:, band])
    W = torch.randn(8, calib.shape[-1])
    banded = Sparsifier(torch.stack([thresholds(h, "teal", 0.5, W) for h in hists]), edges)
    single = AbsHistogram(calib.shape[-1])
    single.update(calib)
    static = Sparsifier(thresholds(single, "teal", 0.5, W))
    (sparse,) = banded(None, (longer,))
    (sparse_static,) = static(None, (longer,))
    zeroed = (sparse == 0).float().mean((0, 2))  # per position
    assert all(float(zeroed[a:b].mean()) == pytest.approx(0.5, abs=0.02) for a, b in ((0, 16), (16, 32), (64, 96)))
    assert float((sparse == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    # one threshold for all positions: most of the small early inputs fall under it, too few of the later ones
    late = float((sparse_static == 0).float()[:, 32:].mean())
    assert late < 0.45 and float((sparse_static == 0).float()[:, :16].mean()) > 0.8


@pytest.mark.parametrize("positions,scale", [("4,12", "none"), ("4,12", "token"), ("off", "none")])
def test_decode_with_a_kv_cache_uses_each_tokens_band(positions, scale):
    """Token by token with a cache, or through generate, a model with banded thresholds computes what one
    forward over the whole sequence computes: each decode step reads its own position's band."""
    model = build("llama")
    recipe = Recipe(act=ActConfig(0.5, "teal", positions=positions, scale=scale))
    report = compress_sequential(model, _tokens(length=24), recipe)
    assert report.act_edges == ((4, 12) if positions != "off" else ())
    assert all(t.dim() == (2 if report.act_edges else 1) for t in report.act_thresholds.values())
    install(model, report.act_thresholds, edges=report.act_edges, token_scale=scale == "token")
    ids = _tokens(n=1, length=20, seed=3)
    with torch.no_grad():
        full = model(ids).logits[0]
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits[0, -1]]
        for i in range(6, 20):
            out = model(ids[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1])
        torch.testing.assert_close(torch.stack(steps), full[5:], rtol=1e-4, atol=1e-4)
        greedy = model.generate(ids[:, :6], max_new_tokens=10, do_sample=False, min_new_tokens=10)
        reference = ids[:, :6]
        for _ in range(10):  # greedy from full forwards, no cache
            reference = torch.cat([reference, model(reference).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, reference)
    # the bands matter for absolute thresholds (this random model's inputs differ in scale from position to
    # position, hardly in shape): thresholds of band 0 everywhere give other logits
    if positions != "off" and scale == "none":
        band0 = {n: t[0] for n, t in report.act_thresholds.items()}
        plain = build("llama")
        install(plain, band0)
        with torch.no_grad():
            assert not torch.allclose(plain(ids).logits[0], full, rtol=1e-3, atol=1e-3)


def test_token_positions_follow_the_shape_the_linear_sees():
    tracker = TokenPositions()
    model = build("llama")
    tracker.attach(model)
    seen = []
    model.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(lambda m, a: seen.append(tracker.of(a[0])))
    with torch.no_grad():
        out = model(_tokens(n=2, length=5), use_cache=True)
        model(_tokens(n=2, length=1), past_key_values=out.past_key_values, use_cache=True)
        model(_tokens(n=2, length=3), position_ids=torch.tensor([[0, 1, 2], [7, 8, 9]]))
    assert [p.tolist() for p in seen] == [[0, 1, 2, 3, 4], [5], [[0, 1, 2], [7, 8, 9]]]
    assert tracker.of(torch.zeros(6, 4)).tolist() == list(range(6))  # outside a model forward: 0..T-1


def test_cli_records_position_bands_and_load_installs_them(saved_model, calib_txt, tmp_path):
    out = tmp_path / "banded"
    result = _prune(saved_model("llama"), out, calib_txt, "--act-sparsity", "0.5", "--act-positions", "8,16")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "compression.json").read_text())
    assert meta["recipe"]["act"]["positions"] == "8,16"
    model = compress.load(str(out))
    assert all(h.edges.tolist() == [8, 16] and h.t.shape[0] == 3 for h in model.compress_sparsifiers.values())
    achieved = _eval(out, calib_txt, tmp_path / "e.json")["activation_sparsity"].values()
    assert sum(achieved) / len(achieved) == pytest.approx(0.5, abs=0.05)
    shown = runner.invoke(app, ["eval", str(out), "--ppl", str(calib_txt), "--seqlen", "32", "--limit", "1"]).output
    assert "every token; thresholds per position band from 0, 8, 16, relative to each token's input RMS)" in shown, shown
    default = tmp_path / "default"  # 32-token windows: too short for auto's first band at 64
    assert _prune(saved_model("llama"), default, calib_txt, "--act-sparsity", "0.5").exit_code == 0
    assert json.loads((default / "compression.json").read_text())["recipe"]["act"]["positions"] == "off"


def _drifting_inputs(n=4000, channels=48, seed=0):
    """Inputs of one shape whose scale differs from token to token by up to 30x (as attention outputs grow with
    position and context), and each token's scale."""
    scale = torch.exp(torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) * 3.4)
    return _samples(n, channels, seed) * scale, scale[:, 0]


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_token_scaled_thresholds_hold_the_target_where_the_input_scale_drifts(method):
    calib, _ = _drifting_inputs()
    served, scale = _drifting_inputs(seed=1)
    served = served * 2.0  # served louder than calibrated
    W = torch.randn(16, calib.shape[1])
    hist = AbsHistogram(calib.shape[1])
    hist.update(calib / token_rms(calib))
    hook = Sparsifier(thresholds(hist, method, 0.4, W), token_scale=True)
    hook(None, (calib,))
    assert hook.sparsity == pytest.approx(0.4, abs=0.003)  # exactly the calibrated sparsity on its own inputs
    (sparse,) = Sparsifier(hook.t[0], token_scale=True)(None, (served,))
    quiet, loud = scale < scale.median(), scale >= scale.median()
    for tokens in (quiet, loud):  # the target holds for quiet and loud tokens alike, and on louder text
        assert float((sparse[tokens] == 0).float().mean()) == pytest.approx(0.4, abs=0.02)
    absolute = AbsHistogram(calib.shape[1])
    absolute.update(calib)
    (plain,) = Sparsifier(thresholds(absolute, method, 0.4, W))(None, (served,))
    # one absolute threshold: far from the target on the louder text, and far more of the quiet tokens than of the loud
    assert float((plain == 0).float().mean()) < 0.3
    assert float((plain[quiet] == 0).float().mean()) > float((plain[loud] == 0).float().mean()) + 0.2


def test_cli_records_the_token_scale_and_load_installs_it(saved_model, calib_txt, tmp_path):
    for scale in ("token", "none"):
        out = tmp_path / scale
        result = _prune(saved_model("llama"), out, calib_txt, "--act-sparsity", "0.5", "--act-scale", scale)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "compression.json").read_text())["recipe"]["act"]["scale"] == scale
        hooks = compress.load(str(out)).compress_sparsifiers
        assert hooks and all(h.token_scale == (scale == "token") for h in hooks.values())
    bad = _prune(saved_model("llama"), tmp_path / "bad", calib_txt, "--act-sparsity", "0.5", "--act-scale", "rms")
    assert bad.exit_code == 2 and "--act-scale 'rms'" in bad.output and not (tmp_path / "bad").exists()
    # a folder from before --act-scale: its recipe has no scale, its thresholds are absolute
    meta_path = tmp_path / "none" / "compression.json"
    meta = json.loads(meta_path.read_text())
    del meta["recipe"]["act"]["scale"]
    meta_path.write_text(json.dumps(meta))
    assert not any(h.token_scale for h in compress.load(str(tmp_path / "none")).compress_sparsifiers.values())


def test_chess_token_scale_follows_the_gate_activations_not_the_up_projections_outliers():
    """CHESS thresholds the gate activations g = x / up; relative to the token's RMS of g, a token whose up
    projection has a huge channel keeps the same gate channels as one without (relative to the RMS of
    x = g·up, that one channel would raise the bound of the whole token)."""
    from compress.activations.thresholds import UpOutput

    g = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).repeat(2, 1)  # two tokens, same gates
    up = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) + 0.5
    up[1, 7] = 300.0  # a massive activation in the second token
    hook = UpOutput()
    hook(None, (), up)
    t = torch.full((64,), 0.8)
    sparsifier = Sparsifier(t, up=hook, token_scale=True)
    (x,) = sparsifier(None, (g * up,))
    kept = x != 0
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], g[0].abs() >= 0.8 * token_rms(g[:1])[0])
    assert 0.2 < float(kept[0].float().mean()) < 0.8
