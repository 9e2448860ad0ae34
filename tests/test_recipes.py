"""Recipes as files and as one library call: every field round-trips, a compression.json reproduces its run,
flags override a file, and a model whose blocks are mostly not linears is refused unless asked."""

import json
from dataclasses import fields

import pytest
import torch
from typer.testing import CliRunner

import compress
from compress import recipes
from compress.cli import app
from compress.config import ActConfig, CalibConfig, Pattern, PruneConfig, QuantConfig, Recipe

runner = CliRunner()
COMMON = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]

EVERY_FIELD = [  # together, every field of every config away from its default
    Recipe(prune=PruneConfig("wanda", Pattern(0.55), scope="matrix", blocksize=64, dampening=0.02, allocation="file",
                             owl_m=4.0, owl_lambda=0.05, block_sparsity=(0.5, 0.6), refine="dsnot", refine_cycles=7,
                             refine_var_power=0.5),
           quant=QuantConfig(bits=3, group_size=32, symmetric=False, method="rtn", actorder=False, dampening=0.02,
                             blocksize=64, scale="minmax", hessian_shrink=0.25),
           ignore=("lm_head", r"mlp\.down"), calib=CalibConfig("calib.txt", 16, 64, 3, 0.9, 0.8),
           act=ActConfig(0.3, method="wina", targets=("mlp",), per_layer={"model.layers.0.mlp.up_proj": 0.2},
                         prefill="dense", positions="64,256", scale="none"),
           quant_lm_head=True, gram_precision="fp32", forward_precision="bf16"),
    Recipe(prune=PruneConfig("sparsegpt", Pattern(0.5), allocation="owl", block_sparsity=(0.45, 0.55))),
    Recipe(prune=PruneConfig("sparsegpt", Pattern(0.5, n=2, m=4)), quant=QuantConfig(bits=4, group_size=64)),
    Recipe(prune=PruneConfig("magnitude", Pattern(0.5, group=16), scope="row"), gram_precision="bf16"),
    Recipe(quant=QuantConfig(bits=8)),
]


def test_every_field_of_a_recipe_is_set_by_the_cases_below():
    for cls, instance in ((PruneConfig, EVERY_FIELD[0].prune), (QuantConfig, EVERY_FIELD[0].quant),
                          (ActConfig, EVERY_FIELD[0].act), (CalibConfig, EVERY_FIELD[0].calib)):
        defaults = {f.name: f.default for f in fields(cls)}
        same = [name for name, default in defaults.items() if getattr(instance, name) == default]
        assert same == [], (cls.__name__, same)
    assert all(getattr(EVERY_FIELD[0], f.name) != f.default for f in fields(Recipe)
               if f.name not in ("prune", "quant", "calib", "act"))


@pytest.mark.parametrize("recipe", EVERY_FIELD, ids=str)
def test_a_recipe_round_trips_through_json_yaml_and_the_command_line_flags(recipe, tmp_path):
    import yaml

    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipes.from_flags(recipes.to_flags(recipe)) == recipe
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe.to_dict()))))
    assert recipes.read(path) == (recipe, None)


def _weights(folder):
    """Every tensor's bytes and every file's metadata (safetensors writes a metadata map in no fixed order,
    so whole files are not compared)."""
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            found[path.name] = (fh.metadata(), {name: (fh.get_tensor(name).dtype, fh.get_tensor(name).shape,
                                                       fh.get_tensor(name).view(-1).view(torch.uint8).numpy().tobytes())
                                                for name in fh.keys()})
    return found


@pytest.mark.parametrize("extra", [
    ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g16", "--format", "packed"],
    ["--method", "wanda", "--sparsity", "0.6", "--allocation", "owl", "--act-sparsity", "0.4", "--act-method", "teal"],
], ids=["packed 2:4 w4", "owl + teal"])
def test_a_compression_json_reproduces_its_run(extra, saved_model, calib_txt, tmp_path):
    model, first, again = saved_model("llama"), tmp_path / "first", tmp_path / "again"
    result = runner.invoke(app, ["prune", str(model), "--calib", str(calib_txt), *COMMON, *extra, "--out", str(first)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["prune", str(model), "--recipe", str(first / "compression.json"), "--device", "cpu",
                                 "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert _weights(again) == _weights(first)
    meta = [json.loads((f / "compression.json").read_text()) for f in (first, again)]
    assert meta[0]["recipe"] == meta[1]["recipe"] and meta[0]["format"] == meta[1]["format"]


def test_flags_given_on_the_command_line_override_the_file(saved_model, calib_txt, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"prune:\n  method: wanda\n  pattern: {{sparsity: 0.5}}\ncalib:\n  source: {calib_txt}\n"
                    f"  nsamples: 4\n  seqlen: 32\n")
    for extra, check in ((["--sparsity", "0.6"], lambda r: r["prune"]["pattern"]["sparsity"] == 0.6),
                         (["--pattern", "2:4"], lambda r: (r["prune"]["pattern"]["n"], r["prune"]["pattern"]["m"]) == (2, 4)),
                         (["--quant", "w4g16", "--quant-method", "rtn"], lambda r: r["quant"]["method"] == "rtn"),
                         ([], lambda r: r["prune"]["pattern"]["sparsity"] == 0.5 and r["calib"]["nsamples"] == 4)):
        out = tmp_path / f"out{len(extra)}{extra[:1]}"
        result = runner.invoke(app, ["prune", str(saved_model("llama")), "--recipe", str(path), "--device", "cpu",
                                     *extra, "--out", str(out)])
        assert result.exit_code == 0, result.output
        recipe = json.loads((out / "compression.json").read_text())["recipe"]
        assert recipe["prune"]["method"] == "wanda" and check(recipe), (extra, recipe)


@pytest.mark.parametrize("text,suffix,message", [
    ("prune: {metod: wanda}\n", ".yaml", "unknown keys in recipe.prune: ['metod']"),
    ("prune: [wanda\n", ".yaml", "is not a readable YAML or JSON file"),
    ("- wanda\n", ".yaml", "holds no mapping"),
    ('{"prune": {"method": "wanda", "pattern": {"sparsity": 1.5}}}', ".json", "--sparsity 1.5 is outside (0, 1)"),
    ('{"prune": {"method": "wanda"}}', ".json", "recipe.prune needs a pattern"),
])
def test_a_bad_recipe_file_is_one_line(text, suffix, message, saved_model, tmp_path):
    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(saved_model("llama")), "--recipe", str(path), "--out", str(out)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
    assert str(path) in errors[0] and not out.exists()


def test_the_library_call_writes_what_the_command_writes(saved_model, calib_txt, tmp_path):
    model = saved_model("llama")
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    result = runner.invoke(app, ["prune", str(model), "--method", "sparsegpt", "--sparsity", "0.5", "--quant", "w4g16",
                                 "--calib", str(calib_txt), *COMMON, "--out", str(cli_out)])
    assert result.exit_code == 0, result.output
    recipe = Recipe(prune=PruneConfig("sparsegpt", Pattern(0.5)), quant=QuantConfig.parse("w4g16"),
                    calib=CalibConfig(str(calib_txt), nsamples=4, seqlen=32))
    report = compress.prune(str(model), recipe, lib_out, device="cpu", progress=False)
    assert _weights(lib_out) == _weights(cli_out)
    stored = json.loads((cli_out / "compression.json").read_text())["report"]["layers"]
    assert [(r.name, r.sparsity, r.rel_error) for r in report.layers] == [
        (r["name"], r["sparsity"], r["rel_error"]) for r in stored]


def _moe(family: str):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                                                  num_experts=8, head_dim=16))
    return MixtralForCausalLM(MixtralConfig(**common, intermediate_size=128, num_local_experts=4))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_experts_are_compressed_and_the_rest_reported(family, tokenizer, calib_txt, tmp_path):
    model = tmp_path / family
    _moe(family).save_pretrained(model)
    tokenizer.save_pretrained(model)
    args = ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib_txt), *COMMON]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    coverage = json.loads((tmp_path / "out" / "compression.json").read_text())["report"]["coverage"]
    assert coverage["compressed_share"] > 0.9 and set(coverage["other"]) == {"mlp.gate.weight"}  # the router


def test_weights_no_linear_holds_are_refused_unless_allowed_and_reported(tokenizer, calib_txt, tmp_path, monkeypatch):
    """Experts in a layout compress cannot present as linears stay fused: over half the blocks' weights."""
    from compress import experts

    monkeypatch.setattr(experts, "is_fused_experts", lambda module: False)
    model = tmp_path / "qwen3_moe"
    _moe("qwen3_moe").save_pretrained(model)
    tokenizer.save_pretrained(model)
    args = ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib_txt), *COMMON]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "refused")])
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert refused.exit_code == 2 and len(errors) == 1, refused.output
    assert "mlp.experts.gate_up_proj" in errors[0] and "mlp.experts.down_proj" in errors[0]
    assert "--allow-partial" in errors[0] and not (tmp_path / "refused").exists()

    allowed = runner.invoke(app, [*args, "--allow-partial", "--out", str(tmp_path / "allowed")])
    assert allowed.exit_code == 0, allowed.output
    coverage = json.loads((tmp_path / "allowed" / "compression.json").read_text())["report"]["coverage"]
    assert coverage["other_share"] > 0.5 and coverage["compressed_share"] + coverage["other_share"] == pytest.approx(1)
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(coverage["other"])
