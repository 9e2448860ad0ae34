"""GPTQ: quantize a layer column by column, compensating each column's rounding error on the columns not
yet quantized (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323).

The OBS loop is SparseGPT's (``prune.sparsegpt.solve``) with columns rounded to a ``QuantGrid``: one loop
serves GPTQ alone, GPTQ on an already-pruned layer (fixed keep-mask: zeros stay zero), and the SparseGPT
paper's joint pruning + quantization (masks chosen inside the loop).

Static groups: the grid is fitted once, up front, on the layer's weights. Act-order then visits columns by
decreasing Hessian diagonal (the most active inputs first, while the most columns remain to absorb their
error) without changing which scale a weight uses, so the stored layout is the plain grouped one. Columns
are reordered in whole units (the N:M group or the pruning group), so structured masks stay aligned.

Shrinkage (``QuantConfig.hessian_shrink``, 0.5 by default): the Hessian is ``(1 - a) H + a diag(H)``. Each
input's energy (the diagonal) is a property of the model and carries over to other text; the correlations
between inputs are partly the calibration text's, and plain GPTQ (``a = 0``) spends the error feedback on
fitting them. On SmolLM2-135M with WikiText-2 calibration, ``a = 0.5`` lowered llama-perplexity on WikiText-2
and on two texts of other kinds alike, where plain GPTQ lost to importance-weighted rounding (``a = 1``) off
WikiText (benchmarks/RESULTS.md, issue 24). The joint pass with SparseGPT keeps the plain Hessian: a pruned
weight's error is far larger than a rounding error, and compensating it needs the correlations.
"""

from __future__ import annotations

import torch

from compress.config import Pattern, QuantConfig
from compress.pruning import InputStats
from compress.pruning.sparsegpt import Result, solve
from compress.quant.grid import QuantGrid


def activation_order(diag: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Permutation of the ``(in,)`` columns by decreasing Hessian diagonal, moving ``unit`` columns together."""
    n_in = diag.shape[0]
    order = torch.argsort(diag.reshape(n_in // unit, unit).sum(-1), descending=True, stable=True)  # (in/unit,)
    return (order[:, None] * unit + torch.arange(unit, device=diag.device)).reshape(-1)  # (in,)


def quantize(
    W: torch.Tensor,
    stats: InputStats,
    cfg: QuantConfig,
    *,
    pattern: Pattern | None = None,
    keep: torch.Tensor | None = None,
    blocksize: int | None = None,
    dampening: float | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Result, QuantGrid]:
    """GPTQ-quantize ``W`` ``(out, in)``, optionally pruning it to ``pattern`` in the same pass.

    Args:
        stats: the layer's input statistics; its Gram matrix is the Hessian.
        pattern: prune while quantizing (SparseGPT joint); ``keep``: the layer was pruned already.
        blocksize, dampening: default to ``cfg``'s.
        scale_dtype: the model's dtype; scales are rounded to it.

    Returns:
        ``(Result, grid)``: weights on the grid (zeros where pruned; in the Hessian's dtype) and mask, and the grid.
    """
    W = W.detach().to(stats.G.dtype, copy=True)  # (out, in), in the Hessian's precision
    unit = pattern.unit if pattern is not None else 1
    perm = activation_order(stats.G.diagonal(), unit) if cfg.actorder else None
    shrink = cfg.hessian_shrink if pattern is None else 0.0  # pruning's error needs the whole Hessian
    factor = stats.hessian_inverse_factor(cfg.dampening if dampening is None else dampening, perm, shrink)
    W[:, factor.dead_original] = 0
    grid = QuantGrid.fit(W if keep is None else W * keep, cfg, scale_dtype, importance=stats.G.diagonal())
    if perm is not None:
        W = W[:, perm]
        keep = keep[:, perm] if keep is not None else None
    result = solve(W, factor.Hinv, pattern, blocksize or cfg.blocksize, factor.dead, keep=keep,
                   round_column=grid.round_column, columns=perm)
    if perm is not None:
        inverse = torch.argsort(perm)
        result = Result(W=result.W[:, inverse], mask=result.mask[:, inverse])
    return result, grid
