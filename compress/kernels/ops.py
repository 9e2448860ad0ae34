"""Products with packed weights: the compiled GEMV kernels for batches of up to 16 rows (decode); above that
(prefill) the compiled dequantization and one BLAS product; without a compiler, the pure-torch reference.

``x`` may have any leading shape ``(..., in)``; results are fp32 ``(..., out)``.
"""

from __future__ import annotations

import torch

from compress.kernels import reference
from compress.kernels.build import ops
from compress.kernels.formats import Q4Dense, Q4Sparse24

MAX_KERNEL_BATCH = 16  # the C++ kernels' limit; above it a dequantized BLAS product is as fast


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def _compiled(x2: torch.Tensor):
    kernels = ops()
    return kernels if kernels is not None and x2.device.type == "cpu" else None


def _use_kernel(x2: torch.Tensor):
    k = _compiled(x2)
    return k if k is not None and x2.shape[0] <= MAX_KERNEL_BATCH else None


def q4_dense_mm(x: torch.Tensor, w: Q4Dense) -> torch.Tensor:
    return _quantized_mm(x, w, "q4_dense_mm", (w.data,), reference.q4_dense_mm)


def q4_sparse24_mm(x: torch.Tensor, w: Q4Sparse24) -> torch.Tensor:
    return _quantized_mm(x, w, "q4_sparse24_mm", (w.data, w.pos), reference.q4_sparse24_mm, w.group_size % 8 == 0)


def _quantized_mm(x: torch.Tensor, w: Q4Dense | Q4Sparse24, kernel: str, packed: tuple, fallback, usable: bool = True):
    """``x @ Wᵀ`` by the GEMV ``kernel`` (up to 16 rows), the compiled dequantization + BLAS, or ``fallback``."""
    x2 = _rows(x)
    k = _compiled(x2) if usable else None
    if k is None:
        y = fallback(x2, w)
    elif x2.shape[0] <= MAX_KERNEL_BATCH:
        y = getattr(k, kernel)(x2, *packed, w.scale, w.zero, w.shape[0], w.group_size)
    else:
        y = x2 @ k.q4_unpack(w.data, getattr(w, "pos", None), w.scale, w.zero, w.shape[0], w.group_size).t()
    return y.reshape(*x.shape[:-1], w.shape[0])


def act_sparse_mm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    k = _use_kernel(x2)
    y = k.act_sparse_mm(x2, wt) if k else reference.act_sparse_mm(x2, wt)
    return y.reshape(*x.shape[:-1], wt.shape[1])
