"""Activation-threshold sparsity: streaming quantiles, calibration in the driver, thresholds at inference."""

import json

import pytest
import torch
from typer.testing import CliRunner

import compress
from compress.activations.histogram import AbsHistogram
from compress.activations.thresholds import Sparsifier, thresholds
from compress.cli import app
from compress.config import ActConfig, Pattern, PruneConfig, Recipe
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


@pytest.mark.parametrize("method", ["teal", "chess", "wina"])
@pytest.mark.parametrize("attention", [True, False])
def test_thresholds_give_the_calibrated_sparsity_on_the_calibration_inputs(method, attention):
    X = _samples(seed=1)
    W = torch.randn(32, X.shape[1])
    hist = AbsHistogram(X.shape[1])
    hist.update(X)
    t = thresholds(hist, method, 0.4, W, attention)
    hook = Sparsifier(t)
    (x_sparse,) = hook(None, (X,))
    assert hook.sparsity == pytest.approx(0.4, abs=0.003)
    assert float((x_sparse == 0).float().mean()) == pytest.approx(hook.sparsity)
    assert torch.equal(x_sparse[x_sparse != 0], X[x_sparse != 0])  # what survives is untouched
    if method == "wina":  # one threshold on |x_j|·‖W[:, j]‖
        score = X.abs() * torch.linalg.vector_norm(W, dim=0)
        assert float(score[x_sparse == 0].max()) <= float(score[x_sparse != 0].min()) * (1 + 1e-5)
    if method != "wina":  # without an up projection CHESS, like TEAL, has one threshold on |x|
        assert float(X.abs()[x_sparse == 0].max()) <= float(X.abs()[x_sparse != 0].min())


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
