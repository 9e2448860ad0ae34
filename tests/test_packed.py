"""``--format packed``: compress's own layouts, loaded by ``compress.load`` onto the kernels, compute what the
dense export of the same compressed weights computes."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import compress
from compress.cli import app
from compress.kernels import ops as kops
from compress.kernels.linear import PackedLinear

runner = CliRunner()


def _prune(model_dir, out, calib, *extra):
    return runner.invoke(app, ["prune", str(model_dir), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
                               "--seqlen", "32", "--device", "cpu", *extra])


@pytest.fixture
def fp32_inputs():
    """The kernels multiply fp32 inputs (the reference path), not int8-rounded ones, for exact comparisons."""
    kops.set_act_precision("fp32")
    yield
    kops.set_act_precision("int8")


def _holding_packed_weights(exported, packed):
    """The dense export given the packed run's weights and activation thresholds: what the packed model must
    compute. (The packed run fits its scales in fp16, which its layouts store, the dense run in fp32.)"""
    for name, m in packed.named_modules():
        if isinstance(m, PackedLinear):
            exported.get_submodule(name).weight.data = m.weight_packed.unpack()  # a tied embedding shares it
    for name, hook in getattr(packed, "compress_sparsifiers", {}).items():
        exported.compress_sparsifiers[name].t = hook.t.clone()
    return exported


@pytest.mark.parametrize("recipe,layout", [
    (["--quant", "w4g16"], "Q4Dense"),
    (["--quant", "w4g16", "--quant-asym"], "Q4Dense"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"], "Q4Sparse24"),
    # activation thresholds: the input-major layout, whose kernel skips the weights of zeroed inputs
    (["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32", "--act-sparsity", "0.5"], "Q4InputMajor"),
])
def test_packed_folder_computes_what_the_dense_export_computes(recipe, layout, saved_model, calib_txt, tmp_path,
                                                               fp32_inputs):
    model_dir = saved_model("llama")
    dense, packed = tmp_path / "dense", tmp_path / "packed"
    assert _prune(model_dir, dense, calib_txt, *recipe).exit_code == 0
    result = _prune(model_dir, packed, calib_txt, *recipe, "--format", "packed")
    assert result.exit_code == 0, result.output

    table = json.loads((packed / "compression.json").read_text())["packed"]
    assert len(table) == 14 and {v["layout"] for v in table.values()} == {layout}
    exported, model = compress.load(str(dense)), compress.load(str(packed))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert len(linears) == 14 and all(m.layout.__name__ == layout for m in linears.values())
    assert not any("proj.weight" in n for n, _ in model.named_parameters())  # no dense copy of packed weights
    assert len(model.compress_sparsifiers) == (14 if "--act-sparsity" in recipe else 0)
    # the packed run fits its scales in fp16 (what the layout stores), the dense one in the model's fp32: codes
    # move where that tips a rounding, and later blocks calibrate on slightly different inputs; both runs' weights
    # are as far from the original ones (a wrong code or scale layout would be ~100% off)
    original = compress.load(str(model_dir))
    for name, m in linears.items():
        W0 = original.get_submodule(name).weight
        packed_error = float((m.weight_packed.unpack() - W0).norm())
        assert packed_error < 1.05 * float((exported.get_submodule(name).weight - W0).norm()), name
    reference = _holding_packed_weights(exported, model)

    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits  # 24-token prefill: the reference path
        ref = reference(ids).logits
        torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
        step = model(ids[:, :1]).logits  # one token: the kernels
        torch.testing.assert_close(step, ref[:, :1], rtol=1e-4, atol=1e-4)
        greedy = model.generate(ids[:, :4], max_new_tokens=8, do_sample=False)
        assert torch.equal(greedy, reference.generate(ids[:, :4], max_new_tokens=8, do_sample=False))
        kops.set_act_precision("int8")  # where the layout has an integer kernel: inputs rounded per block of 32
        step = model(ids[:, :1]).logits
        assert float((step - ref[:, :1]).abs().max()) < 0.02 * float(ref.abs().max())


def test_info_and_eval_read_a_packed_folder(saved_model, calib_txt, tmp_path):
    out = tmp_path / "packed"
    assert _prune(saved_model("llama"), out, calib_txt, "--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32",
                  "--format", "packed").exit_code == 0
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    rows = {r["name"]: r for r in json.loads(info.output)["layers"]}
    q_proj = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj["nm"] == "2:4" and q_proj["bits"] == 4 and q_proj["sparsity"] >= 0.5
    assert q_proj["bytes"] == 64 * 64 * 3 // 8 + 64 * 2 * 2  # 3 bits per weight + one fp16 scale per group
    storage = json.loads((out / "compression.json").read_text())["storage"]
    assert storage["linears_stored"] == sum(r["bytes"] for r in rows.values() if r["in_block"])
    result = runner.invoke(app, ["eval", str(out), "--ppl", str(calib_txt), "--seqlen", "32", "--limit", "2"])
    assert result.exit_code == 0, result.output


def test_generate_runs_a_packed_folder_on_the_kernels(saved_model, calib_txt, tmp_path):
    out = tmp_path / "packed"
    assert _prune(saved_model("llama"), out, calib_txt, "--quant", "w4g16", "--format", "packed").exit_code == 0
    threads = torch.get_num_threads()
    result = runner.invoke(app, ["generate", str(out), "the of and", "--max-new-tokens", "5", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads  # --threads holds for the call only: a library caller keeps its own
    assert result.output.startswith("the of and") and "5 new tokens" in result.output
    bad = runner.invoke(app, ["generate", str(out), "x", "--max-new-tokens", "0"])
    assert bad.exit_code == 2 and "--max-new-tokens 0 must be at least 1" in bad.output
    bad = runner.invoke(app, ["generate", str(out), "x", "--act-precision", "int4"])
    assert bad.exit_code == 2 and "act precision 'int4': use one of int8, int8x2, fp32" in bad.output
    bad = runner.invoke(app, ["generate", str(out), "x"], env={"COMPRESS_ACT_PRECISION": "fp16"})
    assert bad.exit_code == 2 and "COMPRESS_ACT_PRECISION: act precision 'fp16'" in bad.output
    try:
        for precision in ("int8x2", "fp32"):
            result = runner.invoke(app, ["generate", str(out), "the of and", "--max-new-tokens", "3", "--act-precision", precision])
            assert result.exit_code == 0 and kops.act_precision() == precision, result.output
    finally:
        kops.set_act_precision("int8")


def test_bench_measures_a_packed_folder_against_its_dense_twin_and_original(saved_model, calib_txt, tmp_path):
    out = tmp_path / "packed"
    assert _prune(saved_model("llama"), out, calib_txt, "--method", "sparsegpt", "--pattern", "2:4", "--quant",
                  "w4g32", "--format", "packed").exit_code == 0
    result = runner.invoke(app, ["bench", str(out), "--threads", "1", "--new-tokens", "4", "--repeats", "1",
                                 "--compile", "--json", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["same_first_32_tokens_as_dense_export"] is True
    one = data["by_threads"]["1"]
    contenders = {"compressed", "dense export", "dense original"}
    assert set(one["decode_tokens_per_s"]) == contenders | {f"{name} (compiled)" for name in contenders}
    packed = json.loads((out / "compression.json").read_text())["packed"]
    shapes = {tuple(info["shape"]) for info in packed.values()}
    rows = one["gemv"]  # one row per distinct (layout, shape, group) of the packed linears, each a real one
    assert {tuple(r["shape"]) for r in rows} == shapes and len(rows) == len(shapes)
    assert all(r["layer"] in packed and packed[r["layer"]]["layout"] == r["layout"] == "Q4Sparse24" for r in rows)
    for r in rows:  # the bandwidth is the layer's stored bytes over its measured time
        assert r["GBps"] == pytest.approx(r["bytes"] / r["ms"]["ours"] / 1e6)
        n_out, n_in = r["shape"]
        dense_w4 = n_out * n_in // 2 + n_out * (n_in // r["group_size"]) * 2  # 4-bit codes + fp16 scales
        assert r["bytes"] < dense_w4  # 2:4 keeps half the codes, 2-bit positions for them


def test_bench_times_llama_bench_on_a_gguf_beside_the_packed_model(saved_model, calib_txt, tmp_path, monkeypatch):
    """``--gguf``: llama.cpp's decode speed from its own llama-bench (here a stand-in script that records its
    arguments), at the same thread count and token count, printed with the ratio; a missing file exits 2."""
    out, gguf, seen = tmp_path / "packed", tmp_path / "model-q4_0.gguf", tmp_path / "args.txt"
    assert _prune(saved_model("llama"), out, calib_txt, "--quant", "w4g32", "--format", "packed").exit_code == 0
    gguf.write_bytes(b"GGUF")
    fake = tmp_path / "llama-bench"
    fake.write_text(f'#!/bin/sh\necho "$@" > {seen}\necho \'[{{"avg_ts": 123.5}}]\'\n')
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_BENCH", str(fake))
    result = runner.invoke(app, ["bench", str(out), "--threads", "1", "--new-tokens", "4", "--repeats", "1",
                                 "--gguf", str(gguf)])
    assert result.exit_code == 0, result.output
    assert seen.read_text().split() == ["-m", str(gguf), "-p", "0", "-n", "4", "-t", "1", "-r", "1", "-o", "json"]
    assert re.search(r"llama.cpp \(GGUF\) +123.5 tokens/s .*compressed \(fastest\) is [0-9.]+x llama.cpp", result.output)
    missing = runner.invoke(app, ["bench", str(out), "--gguf", str(tmp_path / "none.gguf")])
    assert missing.exit_code == 2 and "none.gguf" in missing.output and "is not a file" in missing.output


@pytest.mark.parametrize("family", ["llama-tied", "llama"])
def test_quantized_lm_head_stays_tied_and_matches_the_dense_export(family, saved_model, calib_txt, tmp_path):
    model_dir = saved_model(family)
    recipe = ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32", "--quant-lm-head"]
    dense, packed = tmp_path / "dense", tmp_path / "packed"
    assert _prune(model_dir, dense, calib_txt, *recipe).exit_code == 0
    assert _prune(model_dir, packed, calib_txt, *recipe, "--format", "packed").exit_code == 0

    table = json.loads((packed / "compression.json").read_text())["packed"]
    tied = family == "llama-tied"
    assert table["lm_head"]["tied_embedding"] == ("model.embed_tokens" if tied else None)
    reference, model = compress.load(str(dense)), compress.load(str(packed))
    head = reference.lm_head.weight
    assert max(len(torch.unique(g)) for g in head.reshape(-1, 32)) <= 16  # on a 4-bit grid in the dense export too
    assert (reference.model.embed_tokens.weight.data_ptr() == head.data_ptr()) == tied
    assert isinstance(model.lm_head, PackedLinear)
    model.tie_weights()  # lm-eval's HFLM calls it: a no-op, the packed weights carry the tie
    reference = _holding_packed_weights(reference, model)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        step = reference(ids[:, :1]).logits
        int8 = model(ids[:, :1]).logits  # the decode step's lm_head (Q4Dense g32) on the integer kernel
        kops.set_act_precision("fp32")
        try:
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model(ids[:, :1]).logits, step, rtol=1e-4, atol=1e-4)
        finally:
            kops.set_act_precision("int8")
        assert not torch.equal(int8, step) and float((int8 - step).abs().max()) < 0.02 * float(step.abs().max())


@pytest.mark.parametrize("recipe", [
    ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"],
    ["--quant", "w4g32"],  # Q4Dense g32: the integer kernel
    ["--quant", "w4g32", "--act-sparsity", "0.5", "--act-positions", "8,16"],  # input-major, sparsifier hooks, bands
])
def test_compiled_decoding_gives_the_eager_tokens(recipe, saved_model, calib_txt, tmp_path):
    """The lean decoder traces the packed linears' kernels through their fake implementations (and the activation
    sparsifiers' thresholds, position bands included); the compiled decode steps on a static cache
    pick the tokens the eager model picks, for
    every length of one bucket, and count the zeroed activations as the eager model does."""
    from compress.bench import _LEAN, greedy

    out = tmp_path / "packed"
    assert _prune(saved_model("llama"), out, calib_txt, *recipe, "--format", "packed").exit_code == 0
    model = compress.load(str(out))
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    eager = greedy(model, ids, 12)
    hooks = model.compress_sparsifiers
    eager_counts = {name: (int(h.zeros), int(h.total)) for name, h in hooks.items()}
    assert torch.equal(greedy(model, ids, 12, compiled=True), eager)
    assert model in _LEAN  # the lean decoder, sparsifiers and their position bands traced into its step
    for name, h in hooks.items():  # the compiled run counted what the eager one did: 5 + 11 tokens' inputs
        zeros, total = eager_counts[name]
        assert int(h.total) == 2 * total and int(h.zeros) == pytest.approx(2 * zeros, rel=0.01)
    assert torch.equal(greedy(model, ids, 7, compiled=True), eager[:7])  # same bucket: no recompile needed
    kops.set_act_precision("int8x2")  # a step of its own, compiled for the two-level rounding
    try:
        assert torch.equal(greedy(model, ids, 12, compiled=True), greedy(model, ids, 12))
    finally:
        kops.set_act_precision("int8")
    result = runner.invoke(app, ["generate", str(out), "the of and", "--max-new-tokens", "4", "--compile"])
    assert result.exit_code == 0, result.output
    assert "4 new tokens" in result.output


@pytest.mark.parametrize("recipe", [["--quant", "w4g32"], ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"]])
def test_siblings_reading_one_input_are_one_product(recipe, saved_model, calib_txt, tmp_path):
    """q|k|v and gate|up are multiplied as one packed matrix: the members' buffers are views of one tensor, and
    the logits (prefill and decode steps) are bit-identical to the members' own products."""
    out = tmp_path / "packed"
    assert _prune(saved_model("llama"), out, calib_txt, *recipe, "--format", "packed").exit_code == 0
    model = compress.load(str(out))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert all(m._shared is not None for m in [*qkv, mlp.gate_proj, mlp.up_proj])
    assert attn.o_proj._shared is None and mlp.down_proj._shared is None
    storage = {m.packed_data.untyped_storage().data_ptr() for m in qkv}
    assert len(storage) == 1 and qkv[1].packed_data.data_ptr() > qkv[0].packed_data.data_ptr()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = [model(ids).logits, model(ids[:, :1]).logits]
        greedy = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False)
        for m in model.modules():
            if isinstance(m, PackedLinear):
                m._shared = None
        assert torch.equal(fused[0], model(ids).logits) and torch.equal(fused[1], model(ids[:, :1]).logits)
        assert torch.equal(greedy, model.generate(ids[:, :4], max_new_tokens=6, do_sample=False))
