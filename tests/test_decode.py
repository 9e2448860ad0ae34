"""The lean decoder (compress/decode.py) and its attention kernel against transformers and a slow reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build

from compress import decode, models
from compress.activations import thresholds
from compress.config import QuantConfig
from compress.kernels import reference
from compress.kernels.build import ops
from compress.kernels.formats import PACKED_SCALE_DTYPE, Q4InputMajor
from compress.kernels.linear import PackedLinear
from compress.quant.grid import QuantGrid

kernels = ops()
needs_kernels = pytest.mark.skipif(kernels is None, reason="compiled kernels unavailable")


def _attention_by_sdpa(q, keys, values, k_new, v_new, pos, scaling):
    """The same attention through torch's SDPA on the sliced cache, key/value heads repeated as transformers does."""
    H, KV = q.shape[0], keys.shape[0]
    k = torch.cat([keys[:, :pos], k_new.unsqueeze(1)], dim=1).repeat_interleave(H // KV, dim=0)  # (H, pos + 1, D)
    v = torch.cat([values[:, :pos], v_new.unsqueeze(1)], dim=1).repeat_interleave(H // KV, dim=0)
    return F.scaled_dot_product_attention(q.unsqueeze(1), k, v, scale=scaling).squeeze(1)


ATTENTION_SHAPES = [(4, 2, 16, 8), (6, 3, 40, 33), (5, 5, 24, 17), (8, 1, 72, 64), (9, 3, 64, 40), (4, 2, 128, 23)]


def _attention_cases(H, KV, D, max_len):
    """Random inputs, at cache fills with and without a tail of the exp's vector width: (args, SDPA's answer)."""
    g = torch.Generator().manual_seed(H * D)
    q, k_new, v_new = torch.randn(H, D, generator=g), torch.randn(KV, D, generator=g), torch.randn(KV, D, generator=g)
    keys, values = torch.randn(KV, max_len, D, generator=g), torch.randn(KV, max_len, D, generator=g)
    for pos in sorted({p for p in (0, 1, 7, 15, 16, max_len // 2, max_len) if p <= max_len}):
        want = _attention_by_sdpa(q, keys, values, k_new, v_new, pos, D ** -0.5)
        yield (q, keys, values, k_new, v_new, torch.tensor(pos), D ** -0.5), want


@pytest.mark.parametrize(("H", "KV", "D", "max_len"), ATTENTION_SHAPES)
def test_decode_attention_reference_matches_sdpa_at_every_cache_fill(H, KV, D, max_len):
    for args, want in _attention_cases(H, KV, D, max_len):
        torch.testing.assert_close(reference.decode_attention(*args), want)


@pytest.mark.parametrize(("H", "KV", "D", "max_len"), ATTENTION_SHAPES)
def test_decode_attention_kernel_matches_sdpa_at_every_cache_fill(isa, H, KV, D, max_len):
    """Each ISA path the CPU has; head sizes with and without vector tails."""
    for args, want in _attention_cases(H, KV, D, max_len):
        torch.testing.assert_close(isa.decode_attention(*args), want)


@needs_kernels
def test_decode_attention_refuses_a_position_outside_the_cache():
    keys = torch.zeros(2, 8, 16)
    with pytest.raises(RuntimeError, match="pos 9 outside the cache of 8"):
        kernels.decode_attention(torch.zeros(4, 16), keys, keys, torch.zeros(2, 16), torch.zeros(2, 16),
                                 torch.tensor(9), 0.25)


def _varied(family: str) -> torch.nn.Module:
    """A tiny model whose greedy tokens vary (default-initialised tiny llamas repeat one token)."""
    return build(family, seed=3, initializer_range=0.2)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_lean_decoder_picks_transformers_greedy_tokens(family):
    model = _varied(family)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 6:]
    assert len(set(want.tolist())) > 4  # a test that could fail: the tokens are not one repeated token
    assert torch.equal(decode.LeanDecoder(model, 32, compile=False).generate(ids, 24), want)


def test_compiled_lean_decoder_picks_the_eager_tokens_and_reuses_its_cache():
    """Compiled (biases of qwen2's q|k|v, grouped-query heads): the eager tokens, for a second prompt too (the
    static cache is refilled, no stale positions), without compiling again."""
    model = _varied("qwen2")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (5, 9)]
    eager = decode.LeanDecoder(model, 48, compile=False)
    compiled = decode.LeanDecoder(model, 48)
    for ids in prompts:
        assert torch.equal(compiled.generate(ids, 20), eager.generate(ids, 20))


def _thresholds(model, ids, sparsity: float) -> dict[str, torch.Tensor]:
    """One TEAL threshold per linear: the ``sparsity`` quantile of |x| over ``ids``' inputs to it."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, linear in models.linears(layer).items():
            full = f"model.layers.{i}.{name}"
            handles.append(linear.register_forward_pre_hook(
                lambda m, args, full=full: seen.__setitem__(full, args[0].detach().abs().flatten())))
    with torch.inference_mode():
        model(ids)
    for h in handles:
        h.remove()
    return {name: torch.full((model.get_submodule(name).in_features,), float(x.quantile(sparsity)))
            for name, x in seen.items()}


def _input_major(model) -> torch.nn.Module:
    """``model`` with every decoder linear packed input-major (W4 g32, fp16 scales), as activation-sparse runs pack."""
    for layer in model.model.layers:
        for name, linear in models.linears(layer).items():
            parent, _, leaf = name.rpartition(".")
            W = linear.weight.detach()
            grid = QuantGrid.fit(W, QuantConfig(4, 32, symmetric=True), scale_dtype=PACKED_SCALE_DTYPE)
            packed = Q4InputMajor.pack(grid.encode(W), grid.scale, grid.zero, 32)
            setattr(layer.get_submodule(parent), leaf, PackedLinear(packed))
    return model


@pytest.mark.parametrize("variant", ["teal", "token-scale", "chess", "bands"])
def test_lean_decoder_zeroes_inputs_as_the_sparsifier_hooks_do(variant):
    """Activation sparsifiers (per-linear thresholds; relative to each token's RMS; CHESS's gate-space
    thresholds on the down projections; position bands, the step's position picking its thresholds) are traced
    into the step: the hooked model's greedy tokens."""
    model = _varied("llama")
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        dense = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 6:]
    table = _thresholds(model, ids, 0.5)
    gate_space = None
    if variant == "token-scale":
        table = {n: torch.full_like(t, 0.6) for n, t in table.items()}  # |x| under 0.6 of the token's RMS
    if variant == "chess":
        gate_space = {f"model.layers.{i}.mlp.down_proj": f"model.layers.{i}.mlp.up_proj" for i in range(len(model.model.layers))}
        table.update({n: torch.full_like(table[n], 0.3) for n in gate_space})  # |act(gate)| · |up| under 0.3 · |up|
    edges = ()
    if variant == "bands":  # positions 0..9 at the 50% thresholds, from 10 on at the 80% ones
        table = {n: torch.stack([t, t80]) for (n, t), t80 in zip(table.items(), _thresholds(model, ids, 0.8).values())}
        edges = (10,)
    hooks = thresholds.install(model, table, gate_space=gate_space, token_scale=variant == "token-scale", edges=edges)
    assert decode.supports(model)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 6:]
    assert not torch.equal(want, dense)  # a test that could fail: the thresholds change the tokens
    assert 0.2 < hooks["model.layers.0.mlp.down_proj"].sparsity < 0.9
    assert torch.equal(decode.LeanDecoder(model, 32, compile=False).generate(ids, 20), want)


@needs_kernels
def test_compiled_lean_decoder_skips_zeroed_inputs_of_input_major_weights():
    """Packed input-major W4 with TEAL thresholds, compiled: the integer input-major kernel traced into the
    step gives the hooked model's tokens."""
    model = _input_major(_varied("llama"))
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    thresholds.install(model, _thresholds(model, ids, 0.4))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 6:]
    assert len(set(want.tolist())) > 4
    assert torch.equal(decode.LeanDecoder(model, 32).generate(ids, 20), want)


def test_lean_decoder_declines_what_it_does_not_run():
    model = _varied("llama")
    assert decode.supports(model)
    assert not decode.supports(build("qwen3"))  # q/k norms: not a llama layer
    assert not decode.supports(build("gpt2"))
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, x: None)
    assert not decode.supports(model)  # an activation sparsifier's hook would be skipped
    with pytest.raises(ValueError, match="use transformers' generate"):
        decode.LeanDecoder(model, 16, compile=False)
    handle.remove()
    lean = decode.LeanDecoder(model, 16, compile=False)
    with pytest.raises(ValueError, match=r"at most 16 positions"):
        lean.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match=r"at least one new token"):
        lean.generate(torch.zeros(1, 10, dtype=torch.long), 0)
