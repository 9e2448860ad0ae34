"""The lean decoder (compress/decode.py) and its attention kernel against transformers and a slow reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build

from compress import decode
from compress.kernels import reference
from compress.kernels.build import ops

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
