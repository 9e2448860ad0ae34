"""Quantization through the CLI: dense and compressed-tensors exports, their loaders, and bad input."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()


def _prune(model_dir, out, calib, *extra):
    args = ["prune", str(model_dir), "--out", str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", *extra]
    return runner.invoke(app, args)


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({name: fh.get_tensor(name) for name in fh.keys()})
    return out


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_compressed_tensors_export_loads_in_transformers_with_the_dense_exports_logits(family, saved_model,
                                                                                      calib_txt, tmp_path):
    # symmetric only: transformers 5.23 + compressed-tensors 0.20 size the packed asymmetric zero point as if it
    # were unpacked (llm-compressor#1618); asymmetric exports are checked with compressed-tensors' own
    # dequantizer below
    model_dir = saved_model(family)
    recipe = ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"]
    dense, ct = tmp_path / "dense", tmp_path / "ct"
    assert (r := _prune(model_dir, dense, calib_txt, *recipe)).exit_code == 0, r.output
    assert (r := _prune(model_dir, ct, calib_txt, *recipe, "--format", "compressed-tensors")).exit_code == 0, r.output

    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert config["sparsity_config"] == {}
    tensors = _tensors(ct)
    q_proj = "model.layers.0.self_attn.q_proj"
    assert f"{q_proj}.weight" not in tensors
    assert tensors[f"{q_proj}.weight_packed"].dtype == torch.int32
    assert tensors[f"{q_proj}.weight_packed"].shape == (64, 64 * 4 // 32)
    assert tensors[f"{q_proj}.weight_scale"].shape == (64, 2)
    assert f"{q_proj}.weight_zero_point" not in tensors
    storage = json.loads((ct / "compression.json").read_text())["storage"]
    assert storage["ratio"] < 0.2

    for folder, stored_bits in ((ct, 4), (dense, 32)):
        info = runner.invoke(app, ["info", str(folder), "--json"])
        assert info.exit_code == 0, info.output
        rows = [r for r in json.loads(info.output)["layers"] if r["in_block"]]
        assert rows and all(r["nm"] == "2:4" and r["bits"] == 4 and r["group_size"] == 32 for r in rows), rows
        bits_per_weight = 8 * sum(r["bytes"] for r in rows) / sum(r["shape"][0] * r["shape"][1] for r in rows)
        assert stored_bits <= bits_per_weight < stored_bits + 1.1  # + one fp32 scale per 32 weights

    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(ct)(ids).logits
    assert (got - want).abs().max() < 1e-3


@pytest.mark.parametrize("quant", [["w8g64", "--quant-asym"], ["w4g32", "--quant-asym"], ["w4", "--quant-sym"]])
def test_compressed_tensors_own_dequantizer_gives_the_dense_exports_weights(quant, saved_model, calib_txt, tmp_path):
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    model_dir = saved_model("llama")
    recipe = ["--method", "wanda", "--sparsity", "0.5", "--quant", quant[0], quant[1]]
    dense, ct = tmp_path / "dense", tmp_path / "ct"
    assert _prune(model_dir, dense, calib_txt, *recipe).exit_code == 0
    assert _prune(model_dir, ct, calib_txt, *recipe, "--format", "compressed-tensors").exit_code == 0
    convert_checkpoint(str(ct), str(tmp_path / "deq"), CompressedTensorsDequantizer(str(ct), dtype=torch.float32))
    want, got = _tensors(dense), _tensors(tmp_path / "deq")
    linears = [n for n in want if ".layers." in n and n.endswith("proj.weight")]
    assert linears
    for name in linears:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        assert torch.equal(got[name] == 0, want[name] == 0), name


def test_quantize_only_with_rtn_and_gptq(saved_model, calib_txt, tmp_path):
    model_dir = saved_model("qwen2")
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        result = _prune(model_dir, out, calib_txt, "--quant", "w4g32", "--quant-method", method)
        assert result.exit_code == 0, result.output
        meta = json.loads((out / "compression.json").read_text())
        assert meta["recipe"]["prune"] is None and meta["recipe"]["quant"]["method"] == method
        assert all(layer["bits"] == 4 and layer["group_size"] == 32 for layer in meta["report"]["layers"])
        weights = _tensors(out)["model.layers.0.mlp.down_proj.weight"]  # in_features 128: 4 groups of 32
        distinct = [len(torch.unique(g)) for g in weights.reshape(-1, 32)]
        assert max(distinct) <= 16


@pytest.mark.parametrize("extra,message", [
    (["--quant", "w4g128"], "group size 128 does not divide in_features 64 (model.layers.0.self_attn.q_proj): "
                            "use --quant w4g64"),
    (["--quant", "w9g64"], "--quant w9: bits must be in 2..8"),
    (["--quant", "w3g32", "--format", "compressed-tensors"], "vLLM loads 4 or 8-bit weights, not 3"),
    (["--quant", "w4g16", "--format", "compressed-tensors"], "group sizes (32, 64, 128) or per channel, not 16"),
    (["--sparsity", "0.5", "--format", "compressed-tensors"], "add --quant"),
    (["--quant", "w8g32", "--format", "packed"], "--format packed stores 4-bit"),
    (["--sparsity", "0.5", "--format", "packed"], "--format packed stores 4-bit"),
    (["--quant", "w4g32", "--format", "compressed-tensors", "--ignore", "q_proj"], "--ignore splits"),
    (["--pattern", "g16"], "also give --sparsity"),
    ([], "nothing to do"),
])
def test_bad_quant_input_is_one_line_exit_2_nothing_written(extra, message, saved_model, calib_txt, tmp_path):
    out = tmp_path / "out"
    result = _prune(saved_model("llama"), out, calib_txt, *extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_compressed_tensors_refuses_conv1d_before_work(saved_model, calib_txt, tmp_path):
    result = _prune(saved_model("gpt2"), tmp_path / "o", calib_txt, "--quant", "w4g32", "--format", "compressed-tensors")
    assert result.exit_code == 2 and "needs nn.Linear" in result.output
