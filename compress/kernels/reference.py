"""Pure-torch products with packed weights: the kernels' test oracle and their fallback without a compiler.

Each function computes exactly what its kernel computes (in fp32), from the layouts in ``formats``.
"""

from __future__ import annotations

import torch

from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24


def q4_dense_mm(x: torch.Tensor, w: Q4Dense) -> torch.Tensor:
    """``x @ Wᵀ`` for ``x`` ``(batch, in)`` fp32."""
    return x @ w.unpack().t()


def q4_sparse24_mm(x: torch.Tensor, w: Q4Sparse24) -> torch.Tensor:
    return x @ w.unpack().t()


def q4_input_major_mm(x: torch.Tensor, w: Q4InputMajor) -> torch.Tensor:
    """``x @ Wᵀ`` reading only the weights of inputs that are non-zero in some row (what the kernel skips)."""
    live = (x != 0).any(dim=0).nonzero().view(-1)
    return x[:, live] @ w.unpack()[:, live].t()


def act_sparse_mm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``x @ WT`` for input-major ``wt`` ``(in, out)`` fp32 or bf16, reading only rows of non-zero inputs."""
    live = (x != 0).any(dim=0).nonzero().view(-1)
    return x[:, live] @ wt[live].float()
