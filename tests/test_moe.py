"""Mixture-of-experts models (issue 26): every expert's matrices compressed as linears, on the tokens the router
sends it, the router untouched, the output in the model's own fused layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from compress import experts, models
from compress.calibration.data import calibration_batches
from compress.calibration.stats import Gram, reconstruction_error
from compress.cli import app
from compress.config import Pattern, PruneConfig, Recipe
from compress.pipeline import compress_sequential
from compress.pruning import InputStats
from compress.weights import compress_weight
from tests.conftest import VOCAB, outlier_inputs

runner = CliRunner()
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MOE = {  # tiny configs of transformers' own MoE families: 2 layers, 4-8 experts, top-2
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, **ATTENTION),
    "mixtral": dict(intermediate_size=32, num_local_experts=4, **ATTENTION),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=4, layer_types=["sliding_attention", "full_attention"],
                    **ATTENTION),  # transposed, gate and up interleaved, biases, clamped SwiGLU
    "deepseek_v3": dict(moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8, **ATTENTION),
}
TOP_K = 2


def build_moe(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {"intermediate_size": 128, **MOE[family], **overrides}  # dense MLPs (DeepSeek's first block, shared experts) or experts
    config = AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB,
                                  max_position_embeddings=256, num_experts_per_tok=TOP_K, **kw)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 or ("experts" in name and "bias" in name):
                p.normal_(0, 0.05)
    return model


def _save(family: str, folder, tokenizer):
    model = build_moe(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _prune(model_dir, out, calib, *extra):
    return runner.invoke(app, ["prune", str(model_dir), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
                               "--seqlen", "32", "--device", "cpu", *extra])


def _expert_weights(model) -> dict[str, torch.Tensor]:
    """``{block.experts.e.matrix: (out, in)}``: ``model``'s experts as the pipeline sees them (unfused in place)."""
    experts.unfuse_experts(model)
    return {f"{name}.{e}.{matrix}": getattr(moe[e], matrix).weight.detach()
            for name, moe in experts.expert_blocks(model).items() for e in range(moe.num_experts) for matrix in experts.MATRICES}


@pytest.mark.parametrize("family", MOE)
def test_experts_as_linears_compute_and_store_what_the_fused_module_does(family):
    model = build_moe(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused_logits = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_blocks = sum(experts.is_fused_experts(m) for m in model.modules())
    assert experts.unfuse_experts(model) == n_blocks > 0
    moes = experts.expert_blocks(model)
    assert all(isinstance(getattr(m[e], matrix), torch.nn.Linear) for m in moes.values()
               for e in range(m.num_experts) for matrix in experts.MATRICES)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fused_logits, rtol=1e-5, atol=1e-5)
    unfused_state = model.state_dict()  # the fused names and tensors, as the checkpoint holds them
    assert list(unfused_state) == list(state) and all(torch.equal(unfused_state[k], state[k]) for k in state)
    again = build_moe(family, seed=5)
    experts.unfuse_experts(again)
    again.load_state_dict(state)  # a checkpoint's fused tensors, split into the experts' linears
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, fused_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_wanda_2_4_prunes_every_expert_on_its_routed_tokens_and_leaves_the_router(family, tmp_path, tokenizer, calib_txt):
    original = _save(family, tmp_path / "dense", tokenizer)
    out = tmp_path / "pruned"
    result = _prune(tmp_path / "dense", out, calib_txt, "--method", "wanda", "--pattern", "2:4")
    assert result.exit_code == 0, result.output
    written = set().union(*(safe_open(str(f), "pt").keys() for f in out.glob("*.safetensors")))
    saved = set(safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt").keys())
    # the checkpoint's own layout, streamed block by block (per expert for Qwen-MoE and DeepSeek, fused for
    # gpt-oss); Mixtral's hub names (block_sparse_moe.experts.0.w1) are transformers' to convert: loaded whole
    assert (written == saved) == (family != "mixtral")
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers reads it as the same architecture
    assert type(pruned) is type(original)
    before, after = original.state_dict(), pruned.state_dict()
    assert list(after) == list(before)
    weights = _expert_weights(pruned)
    assert len(weights) == 3 * sum(m.gate_up_proj.shape[0] for m in original.modules() if experts.is_fused_experts(m))
    for name, W in weights.items():  # exact 2:4 along the input of every expert matrix
        kept = (W.reshape(W.shape[0], -1, 4) != 0).sum(-1)
        assert int(kept.max()) == 2 and int(kept.min()) == 2, name
    routers = [k for k in before if k.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "router.weight"))]
    assert routers and all(torch.equal(after[k], before[k]) for k in routers)
    layers = {r["name"]: r for r in json.loads((out / "compression.json").read_text())["report"]["layers"]}
    gate_rows = [r for n, r in layers.items() if ".experts." in n and n.endswith("gate_proj")]
    assert len(gate_rows) == len(weights) // 3
    moe_blocks = {n.split(".experts.")[0] for n in layers if ".experts." in n}
    # each token of the 4 x 32 reaches TOP_K experts of every MoE block: the routed counts add up exactly
    assert sum(r["tokens"] for r in gate_rows) == TOP_K * 4 * 32 * len(moe_blocks)
    assert all(not r["data_free"] for r in gate_rows if r["tokens"] >= 16)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_sparsegpt_with_gptq_on_experts_keeps_16_levels_per_group(family, tmp_path, tokenizer, calib_txt):
    _save(family, tmp_path / "dense", tokenizer)
    out = tmp_path / "pruned"
    result = _prune(tmp_path / "dense", out, calib_txt, "--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g16")
    assert result.exit_code == 0, result.output
    for name, W in _expert_weights(AutoModelForCausalLM.from_pretrained(out)).items():
        levels = max(len(torch.unique(group)) for group in W.reshape(-1, 16))
        assert levels <= 16 and int((W.reshape(W.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name


def test_experts_below_the_token_minimum_fall_back_to_magnitude(tmp_path, tokenizer, calib_txt):
    original = _save("qwen3_moe", tmp_path / "dense", tokenizer)
    out = tmp_path / "pruned"
    result = _prune(tmp_path / "dense", out, calib_txt, "--method", "wanda", "--sparsity", "0.5", "--moe-min-tokens",
                    "100000")
    assert result.exit_code == 0, result.output
    assert "compressed without data (magnitude / RTN)" in result.output
    before, after = _expert_weights(original), _expert_weights(AutoModelForCausalLM.from_pretrained(out))
    for name, W in before.items():  # identity statistics: Wanda's score is |W|, per row
        drop = W.abs().argsort(dim=1)[:, : W.shape[1] // 2]
        assert torch.equal(after[name], W.scatter(1, drop, 0.0)), name
    layers = json.loads((out / "compression.json").read_text())["report"]["layers"]
    assert all(r["data_free"] for r in layers if ".experts." in r["name"])
    assert not any(r["data_free"] for r in layers if ".experts." not in r["name"])


def test_all_tokens_calibration_feeds_every_expert_every_token(tmp_path, tokenizer, calib_txt):
    _save("mixtral", tmp_path / "dense", tokenizer)
    out = tmp_path / "pruned"
    result = _prune(tmp_path / "dense", out, calib_txt, "--method", "sparsegpt", "--sparsity", "0.5",
                    "--moe-calibration", "all")
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "compression.json").read_text())
    experts_rows = [r for r in metadata["report"]["layers"] if ".experts." in r["name"]]
    assert experts_rows and all(r["tokens"] == 4 * 32 for r in experts_rows)
    assert metadata["moe"] == {"blocks": 2, "calibration": "all", "min_tokens": 16}


def test_moe_models_refuse_what_llama_cpp_computes_otherwise_and_bad_options(tmp_path, tokenizer, calib_txt):
    _save("qwen3_moe", tmp_path / "dense", tokenizer)
    unnormalized = _prune(tmp_path / "dense", tmp_path / "q.gguf", calib_txt, "--quant", "w8g32", "--format", "gguf")
    assert unnormalized.exit_code == 2 and "renormalizes the top-k routing weights" in unnormalized.output
    assert not (tmp_path / "q.gguf").exists()
    bad = _prune(tmp_path / "dense", tmp_path / "q", calib_txt, "--method", "wanda", "--sparsity", "0.5",
                 "--moe-calibration", "some")
    assert bad.exit_code == 2 and "--moe-calibration 'some' is not one of routed, all" in bad.output


def test_routed_gram_matrices_equal_a_plain_loop_and_methods_order_per_expert():
    """One Qwen3-MoE block on inputs with outlier channels: the inputs each expert's linears receive (hooks, as
    the pipeline's) give the Gram matrix of the tokens the router's top-k sends it, computed here by a plain
    loop; on them SparseGPT's error < Wanda's < magnitude's for every expert."""
    model = build_moe("qwen3_moe")
    experts.unfuse_experts(model)
    moe = model.model.layers[0].mlp
    x = outlier_inputs(256, 64, seed=3)
    grams = {}
    handles = [getattr(moe.experts[e], m).register_forward_pre_hook(
        lambda _mod, a, key=(e, m): grams.setdefault(key, Gram(a[0].shape[-1])).update(a[0]))
        for e in range(moe.experts.num_experts) for m in ("gate_proj", "down_proj")]
    with torch.no_grad():
        moe(x.unsqueeze(0))
        _, _, chosen = moe.gate(x)  # (tokens, k) expert indexes
    for h in handles:
        h.remove()
    recipes = {m: Recipe(prune=PruneConfig(method=m, pattern=Pattern(sparsity=0.5))) for m in ("magnitude", "wanda", "sparsegpt")}
    for e in range(moe.experts.num_experts):
        tokens = [t for t in range(x.shape[0]) if e in chosen[t].tolist()]  # the plain loop
        if len(tokens) < 8:
            continue
        X = x[tokens]
        expert = moe.experts[e]
        with torch.no_grad():
            H = F.silu(X @ expert.gate_proj.weight.T) * (X @ expert.up_proj.weight.T)  # down_proj's input
        torch.testing.assert_close(grams[(e, "gate_proj")].finalize(), X.T @ X / len(tokens), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grams[(e, "down_proj")].finalize(), H.T @ H / len(tokens), rtol=1e-4, atol=1e-6)
        G = grams[(e, "gate_proj")].finalize()
        W = expert.gate_proj.weight.detach().float()
        error = {m: reconstruction_error(W, compress_weight(W, InputStats(G), r).W, G) for m, r in recipes.items()}
        assert error["sparsegpt"] < error["wanda"] < error["magnitude"], (e, error)


def test_activation_thresholds_reach_the_experts_inputs(tmp_path, tokenizer, calib_txt):
    import compress

    _save("qwen3_moe", tmp_path / "dense", tokenizer)
    out = tmp_path / "sparse-acts"
    result = _prune(tmp_path / "dense", out, calib_txt, "--act-sparsity", "0.4")
    assert result.exit_code == 0, result.output
    model = compress.load(str(out))  # the thresholds name experts' linears: the experts are linears again
    expert_hooks = {n: h for n, h in model.compress_sparsifiers.items() if ".experts." in n}
    assert len(expert_hooks) == sum(3 * m.num_experts for m in experts.expert_blocks(model).values()) == 2 * 8 * 3
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3)))
    zeros = sum(int(h.zeros) for h in expert_hooks.values())
    total = sum(int(h.total) for h in expert_hooks.values())
    assert total > 0 and 0.2 < zeros / total < 0.6


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_packed_experts_run_on_the_kernels_and_compute_what_the_dense_export_does(family, tmp_path, tokenizer, calib_txt):
    import compress
    from compress.kernels import ops as kops
    from compress.kernels.linear import PackedLinear

    _save(family, tmp_path / "dense-in", tokenizer)
    recipe = ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"]
    for fmt in ("dense", "packed"):
        result = _prune(tmp_path / "dense-in", tmp_path / fmt, calib_txt, *recipe, "--format", fmt)
        assert result.exit_code == 0, result.output
    packed = compress.load(str(tmp_path / "packed"))
    moes = experts.expert_blocks(packed)
    assert moes and all(isinstance(getattr(m[e], matrix), PackedLinear) for m in moes.values()
                        for e in range(m.num_experts) for matrix in experts.MATRICES)
    table = json.loads((tmp_path / "packed" / "compression.json").read_text())["packed"]
    assert {v["layout"] for k, v in table.items() if ".experts." in k} == {"Q4Sparse24"}
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    experts.unfuse_experts(dense)
    for name, m in packed.named_modules():  # the packed run fits its scales in fp16, the dense run in fp32
        if isinstance(m, PackedLinear):
            dense.get_submodule(name).weight.data = m.weight_packed.unpack()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    kops.set_act_precision("fp32")  # the kernels on fp32 inputs: the dense export's arithmetic
    try:
        with torch.no_grad():
            torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
            one = packed(ids[:, :1]).logits  # batch 1: the GEMV kernels
            torch.testing.assert_close(one, dense(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)
    finally:
        kops.set_act_precision("int8")


@pytest.mark.parametrize("extra", [["--allocation", "owl"], ["--refine", "dsnot"]])
def test_owl_and_dsnot_run_on_experts(extra, tmp_path, tokenizer, calib_txt):
    """OWL scores the experts with the tokens they got (an expert routed none has no score) and DSnoT refines
    each expert's mask on its own routed inputs."""
    _save("qwen3_moe", tmp_path / "dense", tokenizer)
    result = _prune(tmp_path / "dense", tmp_path / "out", calib_txt, "--method", "wanda", "--sparsity", "0.5", *extra)
    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "out" / "compression.json").read_text())
    experts_rows = [r for r in metadata["report"]["layers"] if ".experts." in r["name"]]
    assert len(experts_rows) == 2 * 8 * 3
    if extra[0] == "--allocation":  # per-block sparsities around the target, the mean kept
        blocks = metadata["recipe"]["prune"]["block_sparsity"]
        assert len(blocks) == 2 and sum(blocks) / 2 == pytest.approx(0.5, abs=1e-6)
    weighted = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in experts_rows)
    assert weighted / sum(r["shape"][0] * r["shape"][1] for r in experts_rows) == pytest.approx(0.5, abs=0.05)


def test_gguf_of_a_pruned_qwen3_moe_stacks_the_experts_and_llama_cpp_runs_it(tmp_path, tokenizer, calib_txt):
    """llama.cpp's qwen3moe: each block's experts as one (experts, out, in) tensor per matrix (ffn_*_exps) in Q8_0
    holding exactly the dense export's weights, the router as ffn_gate_inp; llama.cpp's greedy tokens are
    transformers' on the dense export."""
    import subprocess

    from tests.test_gguf import _gpt2_bytes, _read, llama_cpp_bin

    folder = tmp_path / "dense-in"
    build_moe("qwen3_moe", norm_topk_prob=True).save_pretrained(folder)  # llama.cpp's qwen3moe renormalizes
    tokenizer.save_pretrained(folder)
    flags = ["--method", "wanda", "--pattern", "2:4", "--quant", "w8g32"]
    assert (r := _prune(folder, tmp_path / "m.gguf", calib_txt, *flags, "--format", "gguf")).exit_code == 0, r.output
    tensors, fields = _read(tmp_path / "m.gguf")
    assert fields["general.architecture"].contents() == "qwen3moe"
    assert fields["qwen3moe.expert_count"].contents() == 8 and fields["qwen3moe.expert_used_count"].contents() == TOP_K
    recipe = Recipe.from_dict(json.loads(fields["compress.compression_json"].contents())["recipe"])
    reference, folder_tokenizer = models.load(str(folder))  # the run in memory, scales in fp16 as GGUF's
    experts.unfuse_experts(reference)
    compress_sequential(reference, calibration_batches(folder_tokenizer, recipe.calib)[0], recipe, scale_dtype=torch.float16)
    for i in range(2):
        mlp = reference.model.layers[i].mlp
        for matrix, ours in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            kind, stacked = tensors[f"blk.{i}.{ours}.weight"]
            expected = torch.stack([getattr(mlp.experts[e], matrix).weight.detach() for e in range(8)])
            assert kind == "Q8_0" and torch.equal(stacked.reshape(expected.shape), expected), (i, matrix)
            assert int((expected.reshape(-1, 4) != 0).sum(-1).max()) == 2  # 2:4 in the file
        assert torch.equal(tensors[f"blk.{i}.ffn_gate_inp.weight"][1].reshape(8, 64), mlp.gate.weight.detach().half().float())
    if llama_cpp_bin() is None:
        return
    prompt = "The game was released in"
    cmd = [str(llama_cpp_bin() / "llama-completion"), "-m", str(tmp_path / "m.gguf"), "-p", prompt, "-n", "12", "--temp",
           "0", "-no-cnv", "--no-display-prompt", "--special", "-t", "1", "--ignore-eos", "--no-warmup"]
    for _ in range(10):  # llama.cpp's log thread can drop the tail of a fast run's output: rerun
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        if b"perf_print" in proc.stderr:
            break
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        new = reference.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    to_byte = _gpt2_bytes()
    expected = b"".join(bytes(to_byte[c] for c in tokenizer.convert_ids_to_tokens(i)) for i in new)
    assert len(new) == 12 and proc.stdout.removesuffix(b"\n\n") == expected, (proc.stdout, expected)


def test_compressed_tensors_names_each_expert_and_loads_in_transformers(tmp_path, tokenizer, calib_txt):
    _save("qwen3_moe", tmp_path / "dense-in", tokenizer)
    recipe = ["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4g32"]
    for fmt in ("dense", "compressed-tensors"):
        result = _prune(tmp_path / "dense-in", tmp_path / fmt, calib_txt, *recipe, "--format", fmt)
        assert result.exit_code == 0, result.output
    names = set().union(*(safe_open(str(f), "pt").keys() for f in (tmp_path / "compressed-tensors").glob("*.safetensors")))
    assert "model.layers.0.mlp.experts.7.down_proj.weight_packed" in names  # vLLM's per-expert names
    config = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate" in config["ignore"]  # the router stays dense
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors")(ids).logits
    assert (got - want).abs().max() < 1e-3
