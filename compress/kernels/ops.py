"""Products with packed weights: the compiled GEMV kernels for batches of up to 16 rows (decode); above that
(prefill) the compiled dequantization and one BLAS product; without a compiler, the pure-torch reference.

``x`` may have any leading shape ``(..., in)``; results are fp32 ``(..., out)``.
"""

from __future__ import annotations

import torch

from compress.kernels import reference
from compress.kernels.build import ops
from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24

MAX_KERNEL_BATCH = 16  # the C++ kernels' limit; above it a dequantized BLAS product is as fast


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def _use_kernel(x2: torch.Tensor):
    """The compiled kernels if they exist and take ``x2`` (rows on the CPU, at most ``MAX_KERNEL_BATCH``)."""
    k = ops()
    return k if k is not None and x2.device.type == "cpu" and x2.shape[0] <= MAX_KERNEL_BATCH else None


def q4_dense_mm(x: torch.Tensor, w: Q4Dense) -> torch.Tensor:
    return quantized_product(w)(x)


def q4_sparse24_mm(x: torch.Tensor, w: Q4Sparse24) -> torch.Tensor:
    return quantized_product(w)(x)


def q4_input_major_mm(x: torch.Tensor, w: Q4InputMajor) -> torch.Tensor:
    return quantized_product(w)(x)


def quantized_product(w: Q4Dense | Q4Sparse24 | Q4InputMajor):
    """``x -> x @ Wᵀ`` for the packed ``w``, its arguments bound once: the GEMV kernel (up to 16 rows), the
    compiled dequantization + BLAS above that, or the reference. A decode step calls the products of every
    linear once per token, so what does not depend on ``x`` is not redone per call."""
    out, n_in = w.shape
    k = ops() if w.data.device.type == "cpu" else None
    if isinstance(w, Q4Sparse24):
        k = k if w.group_size % 8 == 0 else None
        fallback, gemv = reference.q4_sparse24_mm, k and k.q4_sparse24_mm
        args = (w.data, w.pos, w.scale, w.zero, out, w.group_size)
        unpack = k and (lambda: k.q4_unpack(w.data, w.pos, w.scale, w.zero, out, w.group_size))
    elif isinstance(w, Q4InputMajor):
        fallback, gemv = reference.q4_input_major_mm, k and k.q4_input_major_mm
        args = (w.data, w.scale, w.zero, out, w.group_size)
        unpack = k and (lambda: k.q4_input_major_unpack(w.data, w.scale, w.zero, out, w.group_size))
    else:
        fallback, gemv = reference.q4_dense_mm, k and k.q4_dense_mm
        args = (w.data, w.scale, w.zero, out, w.group_size)
        unpack = k and (lambda: k.q4_unpack(w.data, None, w.scale, w.zero, out, w.group_size))

    def product(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, n_in)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if k is None or x2.device.type != "cpu":
            y = fallback(x2, w)
        elif x2.shape[0] <= MAX_KERNEL_BATCH:
            y = gemv(x2, *args)
        else:
            y = x2 @ unpack().t()
        return y.reshape(*x.shape[:-1], out)

    return product


def act_sparse_mm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    k = _use_kernel(x2)
    y = k.act_sparse_mm(x2, wt) if k else reference.act_sparse_mm(x2, wt)
    return y.reshape(*x.shape[:-1], wt.shape[1])
