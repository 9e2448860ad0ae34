"""Pure-torch products with packed weights: the kernels' test oracle and their fallback without a compiler.

Each function computes exactly what its kernel computes (in fp32), from the layouts in ``formats``.
"""

from __future__ import annotations

import torch

from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24


def q4_dense_mm(x: torch.Tensor, w: Q4Dense) -> torch.Tensor:
    """``x @ Wᵀ`` for ``x`` ``(batch, in)`` fp32."""
    return x @ w.unpack().t()


def int8_rows(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``x`` ``(batch, in)`` as the integer kernels see it: per row and block of ``block`` inputs,
    ``d = max|x| / 127``, ``q = round(x · (1/d))`` (ties to even), returned dequantized, ``q · d``."""
    blocks = x.reshape(x.shape[0], -1, block)  # (batch, blocks, block)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(x.shape)


def q4_dense_i8_mm(x: torch.Tensor, w: Q4Dense) -> torch.Tensor:
    """``x @ Wᵀ`` with ``x`` rounded to int8 per block of 32, as the integer kernel computes it."""
    return int8_rows(x) @ w.unpack().t()


def q4_sparse24_mm(x: torch.Tensor, w: Q4Sparse24) -> torch.Tensor:
    return x @ w.unpack().t()


def q4_sparse24_i8_mm(x: torch.Tensor, w: Q4Sparse24) -> torch.Tensor:
    return int8_rows(x) @ w.unpack().t()


def q4_input_major_mm(x: torch.Tensor, w: Q4InputMajor) -> torch.Tensor:
    """``x @ Wᵀ`` reading only the weights of inputs that are non-zero in some row (what the kernel skips)."""
    live = (x != 0).any(dim=0).nonzero().view(-1)
    return x[:, live] @ w.unpack()[:, live].t()


def act_sparse_mm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``x @ WT`` for input-major ``wt`` ``(in, out)`` fp32 or bf16, reading only rows of non-zero inputs."""
    live = (x != 0).any(dim=0).nonzero().view(-1)
    return x[:, live] @ wt[live].float()
