"""The breadth check (issue 26): every family a user is likely to bring, dense and mixture-of-experts, prunes
with Wanda 2:4 and with SparseGPT + GPTQ, every decoder linear and expert compressed (only routers left dense),
and the output evaluates."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from compress.cli import app
from tests.conftest import VOCAB, build
from tests.test_moe import MOE, build_moe

runner = CliRunner()
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
DENSE = {  # model_type -> config beyond SMALL (transformers' own classes, random weights)
    "llama": dict(intermediate_size=128, num_key_value_heads=2),
    "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
    "qwen3": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "mistral": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "phi3": dict(intermediate_size=128, num_key_value_heads=2),  # fused qkv_proj and gate_up_proj
    "olmo2": dict(intermediate_size=128, num_key_value_heads=2),
    "gpt_neox": dict(intermediate_size=128),
    "falcon": dict(),
}
RECIPES = {"wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
           "sparsegpt+gptq": ["--method", "sparsegpt", "--sparsity", "0.5", "--quant", "w4g16"]}
ROUTERS = ("mlp.gate.weight", "mlp.router.weight", "mlp.shared_expert_gate.weight")


def _model(family: str):
    if family in MOE:
        return build_moe(family)
    if family in ("gpt2", "opt"):
        return build(family)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **SMALL, **DENSE[family])).eval()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", [*DENSE, "gpt2", "opt", *MOE])
def test_every_family_prunes_every_linear_and_evaluates(family, recipe, tmp_path, tokenizer, calib_txt):
    folder, out = tmp_path / family, tmp_path / "out"
    _model(family).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = runner.invoke(app, ["prune", str(folder), "--out", str(out), "--calib", str(calib_txt), "--nsamples", "4",
                                 "--seqlen", "32", "--device", "cpu", *RECIPES[recipe]])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression.json").read_text())["report"]
    assert set(report["coverage"]["other"]) <= set(ROUTERS), report["coverage"]  # nothing but routers left
    for layer in report["layers"]:
        assert layer["sparsity"] >= 0.5 - 1e-6 or layer["data_free"], layer["name"]
    assert (not any(".experts." in r["name"] for r in report["layers"])) == (family not in MOE)
    scored = runner.invoke(app, ["eval", str(out), "--ppl", str(calib_txt), "--seqlen", "32", "--limit", "2",
                                 "--json", str(tmp_path / "ppl.json")])
    assert scored.exit_code == 0, scored.output
    assert math.isfinite(json.loads((tmp_path / "ppl.json").read_text())["ppl"])
