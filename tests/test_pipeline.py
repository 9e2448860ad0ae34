import pytest
import torch

from compress import models
from compress.blocks import forward_block as _forward
from compress.calibration.stats import Gram, resolve_precision
from compress.config import Pattern, PruneConfig, Recipe
from compress.pipeline import _capture, check, compress_sequential
from compress.pruning import METHODS, InputStats
from tests.conftest import FAMILIES, VOCAB, build


def _tokens(n=6, seqlen=24, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _target_linears(model):
    prefix, blocks = models.decoder_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in models.linears(b).items()}


def _reference_true_sequential(model, tokens, cfg):
    """Slow, obviously correct: for each linear in execution order, run the WHOLE model on the calibration
    tokens with everything before it already compressed, take its input, compress it."""
    order = []
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
               for n, m in _target_linears(model).items()]
    with torch.no_grad():
        model(input_ids=tokens[:1, :4], use_cache=False)
    for h in handles:
        h.remove()
    linears = _target_linears(model)
    for name in order:
        seen = {}
        h = linears[name].register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0]))
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
        h.remove()
        gram = Gram(seen["x"].shape[-1])
        gram.update(seen["x"])
        W = models.weight_view(linears[name])
        W.copy_(METHODS[cfg.method].apply(W.clone(), InputStats(gram.finalize()), cfg))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_driver_equals_pruning_each_layer_on_its_sequential_inputs(family, method):
    tokens = _tokens()
    cfg = PruneConfig(method, Pattern(0.5), blocksize=32)
    ours, ref = build(family), build(family)
    compress_sequential(ours, tokens, Recipe(cfg, gram_precision="fp32", forward_precision="fp32"))  # the reference's
    _reference_true_sequential(ref, tokens, cfg)
    for (name, a), (_, b) in zip(_target_linears(ours).items(), _target_linears(ref).items()):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_chunked_calibration_equals_one_pass(method):
    tokens = _tokens(n=7)
    cfg = PruneConfig(method, Pattern.parse(pattern="2:4"))
    one, chunked = build("qwen2"), build("qwen2")
    # fp32 products and forwards: bf16 ones round inputs that chunked forwards compute a few ulps apart to
    # different bf16 values, and on 168 tokens SparseGPT's inverse Hessian turns that into ~1e-3 weight differences
    recipe = Recipe(cfg, gram_precision="fp32", forward_precision="fp32")
    r1 = compress_sequential(one, tokens, recipe)
    r2 = compress_sequential(chunked, tokens, recipe, chunk_samples=3)
    for (name, a), (_, b) in zip(_target_linears(one).items(), _target_linears(chunked).items()):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5, msg=name)
    assert [r.rel_error for r in r1.layers] == pytest.approx([r.rel_error for r in r2.layers], rel=1e-3)


@pytest.mark.skipif(resolve_precision("auto", "cpu") != "bf16", reason="bf16 products need a CPU with AMX")
def test_bf16_gram_products_prune_as_well_as_fp32_ones():
    tokens = _tokens(n=16, seqlen=64)
    cfg = PruneConfig("sparsegpt", Pattern(0.5))
    exact, fast = build("llama"), build("llama")
    r32 = compress_sequential(exact, tokens, Recipe(cfg, gram_precision="fp32", forward_precision="fp32"))
    r16 = compress_sequential(fast, tokens, Recipe(cfg, gram_precision="bf16", forward_precision="fp32"))
    assert [r.sparsity for r in r16.layers] == [r.sparsity for r in r32.layers]
    assert [r.rel_error for r in r16.layers] == pytest.approx([r.rel_error for r in r32.layers], rel=0.02)
    changed = sum(not torch.equal(a.weight, b.weight) for a, b in zip(_target_linears(exact).values(),
                                                                        _target_linears(fast).values()))
    assert changed > 0  # the products did differ


@pytest.mark.parametrize("bounded", [False, True])
def test_bf16_forwards_prune_about_as_well_as_fp32_ones(bounded):
    tokens = _tokens(n=16, seqlen=64)
    cfg = PruneConfig("sparsegpt", Pattern(0.5))
    exact, fast = build("llama"), build("llama")
    r32 = compress_sequential(exact, tokens, Recipe(cfg, gram_precision="fp32", forward_precision="fp32"), bounded=bounded)
    r16 = compress_sequential(fast, tokens, Recipe(cfg, gram_precision="fp32", forward_precision="bf16"), bounded=bounded)
    assert [r.sparsity for r in r16.layers] == [r.sparsity for r in r32.layers]
    assert [r.rel_error for r in r16.layers] == pytest.approx([r.rel_error for r in r32.layers], rel=0.05)
    # block 0's first group reads the embeddings, the same either way; later groups read bf16 forwards' outputs
    pairs = list(zip(_target_linears(exact).items(), _target_linears(fast).items()))
    assert all(torch.equal(a.weight, b.weight) for (name, a), (_, b) in pairs if name.endswith(".0.self_attn.q_proj"))
    assert sum(not torch.equal(a.weight, b.weight) for (_, a), (_, b) in pairs) >= len(pairs) - 3


def test_bf16_forward_leaves_a_half_precision_model_in_its_dtype():
    model = build("llama").half()
    block = models.decoder_blocks(model)[1][0]
    inputs, _ = _capture(model, _tokens(n=2), torch.device("cpu"), None)
    assert torch.equal(_forward(block, inputs[0], "bf16"), _forward(block, inputs[0], "fp32"))


def test_bf16_forward_keeps_the_hidden_states_dtype_and_is_close():
    model = build("llama")
    block = models.decoder_blocks(model)[1][0]
    inputs, _ = _capture(model, _tokens(n=4), torch.device("cpu"), None)
    exact, fast = _forward(block, inputs[0], "fp32"), _forward(block, inputs[0], "bf16")
    assert fast.dtype == exact.dtype == torch.float32
    assert not torch.equal(fast, exact)
    assert ((fast - exact).norm() / exact.norm()).item() < 2e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_exact_nm_and_keeps_embeddings_dense_and_tied(family):
    model = build(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = compress_sequential(model, _tokens(), Recipe(PruneConfig("sparsegpt", Pattern.parse(pattern="2:4"))))
    linears = _target_linears(model)
    assert len(report.layers) == len(linears) > 0
    for name, lin in linears.items():
        W = models.weight_view(lin)
        assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name
    touched = {f"{n}.weight" for n in linears}
    for name, p in model.named_parameters():
        if name not in touched:
            assert torch.equal(p, before[name]), f"{name} changed"
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (emb.weight is head.weight) == bool(model.config.tie_word_embeddings)
    assert all(0 < r.rel_error < 1 for r in report.layers)
    assert all(r.sparsity == pytest.approx(0.5) for r in report.layers)


def test_ignore_keeps_matching_linears_dense():
    model = build("llama")
    compress_sequential(model, _tokens(), Recipe(PruneConfig("wanda", Pattern(0.5)), ignore=(r"mlp\.down_proj",)))
    for name, lin in _target_linears(model).items():
        zeros = float((lin.weight == 0).float().mean())
        assert zeros == (0.0 if "down_proj" in name else pytest.approx(0.5)), name


def test_check_names_the_indivisible_linear():
    model = build("llama")  # in_features 64 and 128: not divisible by 24
    with pytest.raises(ValueError, match=r"divisible by 24, got 64 \(model.layers.0.self_attn.q_proj\)"):
        check(model, Recipe(PruneConfig("wanda", Pattern.parse(pattern="2:24"))))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_each_row_group_onto_its_grid(family):
    from compress.config import QuantConfig

    model = build(family)
    report = compress_sequential(model, _tokens(), Recipe(PruneConfig("sparsegpt", Pattern.parse(pattern="2:4")),
                                                          QuantConfig(4, 16, symmetric=False)))
    linears = _target_linears(model)
    assert set(report.quantized) == set(linears)
    for name, lin in linears.items():
        W = models.weight_view(lin)  # (out, in), also for GPT-2's transposed Conv1D
        q = report.quantized[name]
        assert q.codes.shape == W.shape
        torch.testing.assert_close(W, q.grid.decode(q.codes))
        torch.testing.assert_close(W, (q.codes.float() - q.grid.zero.repeat_interleave(16, 1)) * q.grid.scale.repeat_interleave(16, 1))
        assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_bounded_blocks_give_exactly_the_one_forward_result(family):
    """Recomputing each group's upstream part per chunk (the memory-bounded mode) feeds the same statistics in
    the same order: identical weights, quantization, activation thresholds and report errors."""
    from compress.config import ActConfig, QuantConfig

    act_method = "chess" if family == "llama" else "wina"  # chess: the gated MLP's up-output hook too
    recipe = Recipe(prune=PruneConfig("sparsegpt", Pattern.parse(pattern="2:4")), quant=QuantConfig(4, 32),
                    act=ActConfig(sparsity=0.4, method=act_method))
    tokens = _tokens()
    reports, weights = [], []
    for bounded in (False, True):
        model = build(family)
        reports.append(compress_sequential(model, tokens, recipe, chunk_samples=2, bounded=bounded))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, W in weights[0].items():
        assert torch.equal(W, weights[1][name]), name
    assert [(r.name, r.rel_error, r.act_sparsity) for r in reports[0].layers] == \
           [(r.name, r.rel_error, r.act_sparsity) for r in reports[1].layers]
    for name, t in reports[0].act_thresholds.items():
        assert torch.equal(t, reports[1].act_thresholds[name]), name


def test_memory_plan_goes_bounded_over_budget_and_refuses_what_cannot_fit():
    from compress.pipeline import plan_memory

    model = build("llama")  # hidden 64, intermediate 128, fp32
    free = plan_memory(model, 128, 512, None)
    assert not free.bounded and free.boundary == 128 * 512 * 64 * 4
    assert free.parked > free.bounded_need > 2 * free.boundary - 1
    fits = plan_memory(model, 128, 512, free.parked + free.block_weights)
    assert not fits.bounded
    tight = plan_memory(model, 128, 512, free.bounded_need + free.block_weights)
    assert tight.bounded and "bounded" in tight.describe()
    with pytest.raises(ValueError, match="lower --nsamples or --seqlen, or raise --max-memory"):
        plan_memory(model, 128, 512, free.bounded_need)
