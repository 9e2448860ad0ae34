"""Products with packed weights: the compiled GEMV kernels for batches of up to 16 rows (decode); above that
(prefill) the compiled dequantization and one BLAS product; without a compiler, the pure-torch reference.

``x`` may have any leading shape ``(..., in)``; results are fp32 ``(..., out)``. The GEMV kernels of ``Q4Dense``,
``Q4Sparse24`` and ``Q4InputMajor`` weights with groups of 32·k round their input to int8 per block of 32 and
take integer dot products (``act_precision`` ``int8``, the default; ``int8x2`` rounds twice, the second int8
level taking what the first left over), and prefill rounds its input the same way before the BLAS product, so a perplexity
measures what decode computes; ``fp32`` keeps the input in fp32 (the reference the integer paths are measured
against). ``COMPRESS_ACT_PRECISION`` sets the starting choice.
Without the compiled kernels (or off the CPU) inputs stay fp32.
"""

from __future__ import annotations

import os

import torch

from compress.kernels import reference
from compress.kernels.build import ops
from compress.kernels.formats import Q4Dense, Q4InputMajor, Q4Sparse24

MAX_KERNEL_BATCH = 16  # the C++ kernels' limit; above it a dequantized BLAS product is as fast
ACT_LEVELS = {"int8": 1, "int8x2": 2, "fp32": 0}  # int8 roundings of each input; 0: none (fp32 kernels)
ACT_PRECISIONS = tuple(ACT_LEVELS)
ACT_ENV = "COMPRESS_ACT_PRECISION"
_act = {"precision": os.environ.get(ACT_ENV, "int8")}  # checked where it is used: the compress command exits 2


def set_act_precision(precision: str) -> None:
    """``int8``: the GEMV kernels round their input to int8 per block of 32 (integer dot products, as
    llama.cpp's Q8_0 activations); ``int8x2``: twice, ``x ≈ d₁q₁ + d₂q₂`` (~15 bits; the weights are read once,
    the integer dot products double); ``fp32``: they multiply the fp32 input (the reference path)."""
    if precision not in ACT_PRECISIONS:
        raise ValueError(f"act precision {precision!r}: use one of {', '.join(ACT_PRECISIONS)}")
    _act["precision"] = precision


def act_precision() -> str:
    if _act["precision"] not in ACT_LEVELS:
        raise ValueError(f"{ACT_ENV}={_act['precision']!r}: use one of {', '.join(ACT_PRECISIONS)}")
    return _act["precision"]


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
    integer = None  # the int8-input GEMV, where the layout has one
    if isinstance(w, Q4Sparse24):
        k = k if w.group_size % 8 == 0 else None
        fallback, gemv = reference.q4_sparse24_mm, k and k.q4_sparse24_mm
        integer = k and w.group_size % 32 == 0 and k.q4_sparse24_i8_mm
        args = (w.data, w.pos, w.scale, w.zero, out, w.group_size)
        unpack = k and (lambda: k.q4_unpack(w.data, w.pos, w.scale, w.zero, out, w.group_size))
    elif isinstance(w, Q4InputMajor):
        fallback, gemv = reference.q4_input_major_mm, k and k.q4_input_major_mm
        integer = k and w.group_size % 32 == 0 and k.q4_input_major_i8_mm
        args = (w.data, w.scale, w.zero, out, w.group_size)
        unpack = k and (lambda: k.q4_input_major_unpack(*gemv_args()))
    else:
        fallback, gemv = reference.q4_dense_mm, k and k.q4_dense_mm
        integer = k and w.group_size % 32 == 0 and k.q4_dense_i8_mm
        args = (w.data, w.scale, w.zero, out, w.group_size)
        unpack = k and (lambda: k.q4_unpack(w.data, None, w.scale, w.zero, out, w.group_size))

    fp32_args = None  # the fp32-input kernels read fp32 scales: fp16 ones (issue 25's step 0) converted once, if used

    def gemv_args() -> tuple:
        nonlocal fp32_args
        if fp32_args is None:
            fp32_args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        return fp32_args

    def product(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, n_in)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        levels = ACT_LEVELS[act_precision()] if integer else 0
        if k is None or x2.device.type != "cpu":
            y = fallback(x2, w)
        elif x2.shape[0] <= MAX_KERNEL_BATCH:
            y = integer(x2, *args, levels) if levels else gemv(x2, *gemv_args())
        else:  # prefill: one BLAS product, its input rounded as the integer kernel rounds it
            y = (reference.int8_rows(x2, levels=levels) if levels else x2) @ unpack().t()
        return y.reshape(*x.shape[:-1], out)

    return product


def act_sparse_mm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    k = _use_kernel(x2)
    y = k.act_sparse_mm(x2, wt) if k else reference.act_sparse_mm(x2, wt)
    return y.reshape(*x.shape[:-1], wt.shape[1])
