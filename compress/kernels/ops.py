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
    x2 = _rows(x)
    k = _compiled(x2)
    if k is None:
        y = reference.q4_dense_mm(x2, w)
    elif x2.shape[0] <= MAX_KERNEL_BATCH:
        y = k.q4_dense_mm(x2, w.data, w.scale, w.zero, w.shape[0], w.group_size)
    else:
        y = x2 @ k.q4_unpack(w.data, None, w.scale, w.zero, w.shape[0], w.group_size).t()
    return y.reshape(*x.shape[:-1], w.shape[0])


def q4_sparse24_mm(x: torch.Tensor, w: Q4Sparse24) -> torch.Tensor:
    x2 = _rows(x)
    k = _compiled(x2) if w.group_size % 8 == 0 else None
    if k is None:
        y = reference.q4_sparse24_mm(x2, w)
    elif x2.shape[0] <= MAX_KERNEL_BATCH:
        y = k.q4_sparse24_mm(x2, w.data, w.pos, w.scale, w.zero, w.shape[0], w.group_size)
    else:
        y = x2 @ k.q4_unpack(w.data, w.pos, w.scale, w.zero, w.shape[0], w.group_size).t()
    return y.reshape(*x.shape[:-1], w.shape[0])


def act_sparse_mm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    k = _use_kernel(x2)
    y = k.act_sparse_mm(x2, wt) if k else reference.act_sparse_mm(x2, wt)
    return y.reshape(*x.shape[:-1], wt.shape[1])
