import json

import pytest
import torch
from transformers import AutoModelForCausalLM, T5Config, T5Model
from typer.testing import CliRunner

from compress.calibration.stats import resolve_precision
from compress.cli import app
from compress.evals.perplexity import perplexity
from tests.conftest import FAMILIES, build

runner = CliRunner()


def _prune(model_dir, out, calib, *extra):
    args = ["prune", str(model_dir), "--out", str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", *extra]
    return runner.invoke(app, args)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_info_eval_round_trip(family, saved_model, calib_txt, tmp_path):
    model_dir = saved_model(family)
    out = tmp_path / "pruned"
    result = _prune(model_dir, out, calib_txt, "--method", "sparsegpt", "--pattern", "2:4")
    assert result.exit_code == 0, result.output
    summary = result.output.splitlines()
    assert any(line.split()[:2] == ["all", str(len(json.loads((out / "compression.json").read_text())["report"]["layers"]))]
               for line in summary), result.output

    meta = json.loads((out / "compression.json").read_text())
    assert meta["recipe"]["prune"]["method"] == "sparsegpt"
    assert meta["recipe"]["gram_precision"] == resolve_precision("auto", "cpu")  # resolved, not "auto"
    assert meta["recipe"]["forward_precision"] == resolve_precision("auto", "cpu")
    assert meta["calibration"]["nsamples"] == 4 and len(meta["calibration"]["token_sha256"]) == 64
    assert {"name", "target_sparsity", "sparsity", "rel_error", "seconds"} <= set(meta["report"]["layers"][0])
    assert set(meta["versions"]) >= {"torch", "transformers", "compress"}

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(reloaded(ids).logits, dense(ids).logits)
    if family == "llama-tied":
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()

    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    table = json.loads(info.output)
    assert table["block_linears_sparsity"] == pytest.approx(0.5, abs=1e-6)
    linear_rows = [r for r in table["layers"] if r["in_block"]]
    assert linear_rows and (family == "gpt2" or all(r["nm"] == "2:4" for r in linear_rows))

    result_json = tmp_path / "ppl.json"
    ev = runner.invoke(app, ["eval", str(out), "--ppl", str(calib_txt), "--seqlen", "32", "--limit", "3",
                             "--device", "cpu", "--json", str(result_json)])
    assert ev.exit_code == 0, ev.output
    res = json.loads(result_json.read_text())
    assert res["windows"] == 3 and res["seqlen"] == 32 and res["tokens"] == 96
    assert res["compression"]["recipe"]["prune"]["method"] == "sparsegpt"


def test_saved_folder_gives_the_same_logits_as_the_pruned_model_in_memory(saved_model, calib_txt, tmp_path, tokenizer):
    from compress import models, pipeline
    from compress.calibration.data import calibration_batches
    from compress.config import CalibConfig, Pattern, PruneConfig, Recipe

    model_dir = saved_model("llama")
    out = tmp_path / "w"
    assert _prune(model_dir, out, calib_txt, "--sparsity", "0.5").exit_code == 0
    lm, tok = models.load(str(model_dir))
    tokens, _ = calibration_batches(tok, CalibConfig(str(calib_txt), 4, 32, 0))
    pipeline.compress_sequential(lm, tokens, Recipe(PruneConfig("wanda", Pattern(0.5))))
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, lm(ids).logits)


def test_perplexity_matches_naive_per_token_loop(saved_model, calib_txt, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(saved_model("opt")).eval()
    res = perplexity(model, tokenizer, str(calib_txt), seqlen=16, limit=3)
    ids = tokenizer(calib_txt.read_text(), return_tensors="pt").input_ids[0, : 3 * 16].reshape(3, 16)
    nll = []
    with torch.no_grad():
        for window in ids:
            logp = torch.log_softmax(model(window[None]).logits[0], -1)
            nll += [-float(logp[t, window[t + 1]]) for t in range(15)]
    assert res.ppl == pytest.approx(float(torch.tensor(nll).mean().exp()), rel=1e-5)
    assert (res.windows, res.tokens, res.predicted_tokens) == (3, 48, 45)


@pytest.fixture
def existing_out(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "1.5"], "--sparsity 1.5 is outside (0, 1)"),
    (["--pattern", "4:2"], "--pattern 4:2 needs 0 < N < M"),
    (["--pattern", "3:7"], "3:7 needs in_features divisible by 7, got 64"),
    (["--sparsity", "0.5", "--method", "obs"], "--method 'obs' is not one of magnitude, wanda, sparsegpt"),
    (["--sparsity", "0.5", "--nsamples", "100000"], "fewer than --nsamples 100000"),
    (["--sparsity", "0.5", "--calib", "/nonexistent/calib.txt"], "source '/nonexistent/calib.txt' is neither a file"),
    (["--sparsity", "0.5", "--gram-precision", "fp16"], "--gram-precision 'fp16' is not one of auto, fp32, bf16"),
    (["--sparsity", "0.5", "--forward-precision", "half"], "--forward-precision 'half' is not one of auto, fp32, bf16"),
    (["--quant", "w4g0"], "write w4 for one scale per output channel"),
    (["--quant", "w4g1"], "a group holds at least 2 weights"),
    (["--quant", "w4g32", "--quant-hessian-shrink", "1.5"], "--quant-hessian-shrink 1.5 is outside [0, 1]"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(extra, message, saved_model, calib_txt, tmp_path):
    out = tmp_path / "out"
    args = ["prune", str(saved_model("llama")), "--out", str(out), "--calib", str(calib_txt), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_refused_and_untouched(saved_model, calib_txt, existing_out):
    result = _prune(saved_model("llama"), existing_out, calib_txt, "--sparsity", "0.5")
    assert result.exit_code == 2 and "exists: pass --overwrite" in result.output
    assert [p.name for p in existing_out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_only_after_success(saved_model, calib_txt, tmp_path):
    out = tmp_path / "out"
    assert _prune(saved_model("llama"), out, calib_txt, "--sparsity", "0.3").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    failing = _prune(saved_model("llama"), out, calib_txt, "--pattern", "3:7", "--overwrite")
    assert failing.exit_code == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    ok = _prune(saved_model("llama"), out, calib_txt, "--sparsity", "0.5", "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "compression.json").read_text())["recipe"]["prune"]["pattern"]["sparsity"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_missing_model_non_causal_model_and_unreadable_calib(tmp_path, calib_txt, tokenizer, saved_model):
    out = tmp_path / "o"
    missing = _prune(tmp_path / "nope", out, calib_txt, "--sparsity", "0.5")
    assert missing.exit_code == 2 and "does not exist" in missing.output

    t5 = tmp_path / "t5"
    T5Model(T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16, vocab_size=320)).save_pretrained(t5)
    tokenizer.save_pretrained(t5)
    non_causal = _prune(t5, out, calib_txt, "--sparsity", "0.5")
    assert non_causal.exit_code == 2 and "is not a causal LM" in non_causal.output

    bare = tmp_path / "no-tokenizer"
    build("llama").save_pretrained(bare)  # weights and config, no tokenizer files
    untokenized = _prune(bare, out, calib_txt, "--sparsity", "0.5")
    assert untokenized.exit_code == 2 and "has no tokenizer" in untokenized.output, untokenized.output

    binary = tmp_path / "calib.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    unreadable = _prune(saved_model("llama"), out, binary, "--sparsity", "0.5")
    assert unreadable.exit_code == 2 and "cannot read" in unreadable.output
    assert not out.exists()


def test_jsonl_calibration(saved_model, tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 20}) for _ in range(20)))
    result = _prune(saved_model("gpt2"), tmp_path / "o", calib, "--sparsity", "0.3", "--method", "magnitude")
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    result = _prune(saved_model("gpt2"), tmp_path / "o2", bad, "--sparsity", "0.3")
    assert result.exit_code == 2 and "has no string field 'text'" in result.output
