"""Pure-torch products with packed weights: the kernels' test oracle and their fallback without a compiler.

Each function computes exactly what its kernel computes (in fp32), from the layouts in ``formats``.
"""

from __future__ import annotations

import torch

from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24


def q4_dense_mm(x: torch.Tensor, w: Q4Dense) -> torch.Tensor:
    """``x @ Wᵀ`` for ``x`` ``(batch, in)`` fp32."""
    return x @ w.unpack().t()


def int8_rows(x: torch.Tensor, block: int = 32, levels: int = 1) -> torch.Tensor:
    """``x`` ``(batch, in)`` as the integer kernels see it: per row and block of ``block`` inputs,
    ``d = max|x| / 127``, ``q = round(x · (1/d))`` (ties to even), returned dequantized, ``q · d``; with
    ``levels`` 2, plus the same rounding of what the first left over (``x - q · d``)."""
    left = x.reshape(x.shape[0], -1, block)  # (batch, blocks, block)
    total = torch.zeros_like(left)
    for _ in range(levels):
        d = left.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        rounded = torch.round(left * inv) * d
        total, left = total + rounded, left - rounded
    return total.reshape(x.shape)


def q4_dense_i8_mm(x: torch.Tensor, w: Q4Dense, levels: int = 1) -> torch.Tensor:
    """``x @ Wᵀ`` with ``x`` rounded to int8 per block of 32 (``levels`` times), as the integer kernel computes it."""
    return int8_rows(x, levels=levels) @ w.unpack().t()


def q4_sparse24_mm(x: torch.Tensor, w: Q4Sparse24) -> torch.Tensor:
    return x @ w.unpack().t()


def q4_sparse24_i8_mm(x: torch.Tensor, w: Q4Sparse24, levels: int = 1) -> torch.Tensor:
    return int8_rows(x, levels=levels) @ w.unpack().t()


def q4_input_major_mm(x: torch.Tensor, w: Q4InputMajor) -> torch.Tensor:
    """``x @ Wᵀ`` reading only the weights of inputs that are non-zero in some row (what the kernel skips)."""
    live = (x != 0).any(dim=0).nonzero().view(-1)
    return x[:, live] @ w.unpack()[:, live].t()


def q4_input_major_i8_mm(x: torch.Tensor, w: Q4InputMajor, levels: int = 1) -> torch.Tensor:
    """``x @ Wᵀ`` with ``x`` rounded to int8 per block of 32: inputs that round to 0 are the ones the kernel skips."""
    return int8_rows(x, levels=levels) @ w.unpack().t()


def act_sparse_mm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``x @ WT`` for input-major ``wt`` ``(in, out)`` fp32 or bf16, reading only rows of non-zero inputs."""
    live = (x != 0).any(dim=0).nonzero().view(-1)
    return x[:, live] @ wt[live].float()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, pos: torch.Tensor, scaling: float) -> torch.Tensor:
    """One position's attention: ``q`` ``(H, D)`` against the cache's positions ``[0, pos)`` (``keys``,
    ``values`` ``(KV, max_len, D)``) and its own ``k_new``, ``v_new`` ``(KV, D)``; query head ``h`` reads
    key/value head ``h // (H / KV)``. Returns ``(H, D)``. Traceable: the cache is masked, not sliced."""
    H, D = q.shape
    KV, max_len, _ = keys.shape
    q = q.view(KV, H // KV, 1, D)
    before = torch.where(torch.arange(max_len, device=q.device) < pos, 0.0, float("-inf")).to(q.dtype)
    scores = torch.cat([(q * keys.unsqueeze(1)).sum(-1) + before,  # (KV, G, max_len + 1)
                        (q * k_new.view(KV, 1, 1, D)).sum(-1)], dim=-1) * scaling
    weights = torch.softmax(scores, dim=-1).unsqueeze(-1)  # (KV, G, max_len + 1, 1)
    out = (weights[:, :, :-1] * values.unsqueeze(1)).sum(2) + weights[:, :, -1] * v_new.view(KV, 1, D)
    return out.reshape(H, D)
