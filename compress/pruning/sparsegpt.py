"""SparseGPT: optimal-brain-surgeon pruning with weight update, column by column.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774. Symbols follow the paper:

    W     (out, in)   weights, updated in place as columns are frozen
    H     (in, in)    Hessian of the layer-wise loss, ∝ X Xᵀ (here the mean Gram matrix), dampened
    Hinv  (in, in)    upper Cholesky factor of H⁻¹: row i holds the OBS update for column i
    M     (out, in)   keep-mask, chosen per block of ``blocksize`` columns (or per N:M group) by the
                      saliency w² / [H⁻¹]_ii²

Pruning column i sets the masked weights to zero and spreads their error over the columns not yet frozen:
``W[:, i:] -= (w_i - q_i) / Hinv_ii · Hinv[i, i:]``; blocks are updated lazily (one GEMM per block).

The same loop is GPTQ (Frantar et al. 2022, arXiv:2210.17323) when ``q_i`` is the column rounded to a
quantization grid instead of masked, and the paper's joint sparse + quantized variant when it is both:
kept weights are rounded, pruned ones zeroed, and the error of either is compensated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from compress.config import Pattern
from compress.pruning import masks

log = logging.getLogger(__name__)


@dataclass
class Result:
    W: torch.Tensor  # (out, in) pruned and updated weights
    mask: torch.Tensor  # (out, in) bool, True where kept


def inverse_hessian_factor(H: torch.Tensor, dampening: float, retries: int = 5,
                           shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dampen ``H`` (after scaling its off-diagonal by ``1 - shrink``) and return ``(upper Cholesky factor of
    H⁻¹, dead)``, ``dead`` the zero-input columns.

    The Cholesky is retried with ten times the dampening each time it fails (H is only PSD). Dampening is
    added to the diagonal of one working copy, and each intermediate is dropped as soon as the next exists:
    at most three (in, in) matrices besides ``H`` are alive (an identity matrix would be one more, 300 MB for
    an 8640-wide input).
    """
    work = H.clone()
    if shrink:  # (1 - shrink) H + shrink diag(H)
        diagonal = work.diagonal().clone()
        work.mul_(1 - shrink).diagonal().copy_(diagonal)
        del diagonal
    dead = work.diagonal() == 0  # (in,) inputs never active: their weights can go for free
    work[dead, dead] = 1
    diagonal = work.diagonal().clone()
    mean_diag = diagonal.mean()
    damp = dampening if dampening > 0 else 1e-6
    for attempt in range(retries):
        try:
            work.diagonal().copy_(diagonal + damp * mean_diag)
            Hinv = torch.cholesky_inverse(torch.linalg.cholesky(work))
            return torch.linalg.cholesky(Hinv, upper=True), dead
        except torch.linalg.LinAlgError:
            log.warning("Cholesky failed with dampening %.3g (attempt %d); retrying with 10x more", damp, attempt + 1)
            damp *= 10
    raise RuntimeError(f"Hessian not positive definite even with dampening {damp / 10:.3g}")


def solve(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    pattern: Pattern | None,
    blocksize: int = 128,
    dead: torch.Tensor | None = None,
    *,
    keep: torch.Tensor | None = None,
    round_column: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    columns: torch.Tensor | None = None,
) -> Result:
    """Prune ``W`` ``(out, in)`` to ``pattern`` (and/or round it to a grid) with OBS weight updates.

    Args:
        Hinv: ``(in, in)`` upper Cholesky factor of the dampened inverse Hessian (``inverse_hessian_factor``).
        pattern: what to prune, masks chosen on the fly; ``None`` prunes nothing beyond ``keep``.
        blocksize: columns per lazy-update block; for unstructured and group patterns also the
            mask-selection group (each block of ``out × blocksize`` weights loses the same fraction).
        dead: ``(in,)`` bool, input channels that never fire; their weights are zeroed first.
        keep: ``(out, in)`` bool, a fixed keep-mask (pruned beforehand); exclusive with ``pattern``.
        round_column: ``(w (out,), original column index) -> w rounded to the grid`` (GPTQ); kept weights
            are rounded as their column is frozen.
        columns: ``(in,)`` original index of each column of ``W`` when the caller permuted them (act-order).

    Returns:
        Result with the weights (in ``Hinv``'s dtype) and the keep-mask.
    """
    if pattern is not None and keep is not None:
        raise ValueError("give a pattern to choose masks or a fixed keep-mask, not both")
    W = W.detach().to(Hinv.dtype, copy=True)  # (out, in), in the Hessian's precision (fp32 or fp64)
    n_out, n_in = W.shape
    unit = pattern.unit if pattern is not None else 1
    if blocksize % unit:
        blocksize = max(unit, blocksize - blocksize % unit)
    if dead is not None:
        W[:, dead] = 0
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.clone()  # (out, in)
    original = columns.tolist() if columns is not None else range(n_in)
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        # The block runs transposed, (b, out): each column is a contiguous row, so each step is two small ops.
        W1 = W[:, i1:i2].t().contiguous()  # (b, out)
        Err1 = torch.empty_like(W1)  # (b, out)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        d = Hinv1.diagonal()  # (b,)
        if pattern is not None and not pattern.is_nm:
            saliency = W1.t() ** 2 / d**2  # (out, b)
            if pattern.group:
                saliency = saliency.reshape(n_out, -1, pattern.group).sum(-1)  # (out, b/g)
            flat = saliency.reshape(1, -1)
            kept = masks.prune_lowest(flat, masks.n_pruned(flat.numel(), pattern.sparsity)).reshape(saliency.shape)
            keep[:, i1:i2] = kept.repeat_interleave(pattern.group, dim=1) if pattern.group else kept
        # error per unit of weight: 1/d where pruned, 0 where kept (N:M fills it m columns at a time)
        dropped = (~keep[:, i1:i2]).t().to(W1.dtype) / d[:, None]  # (b, out)
        for i in range(i2 - i1):
            if pattern is not None and pattern.is_nm and i % pattern.m == 0:
                saliency = W1[i : i + pattern.m].t() ** 2 / d[i : i + pattern.m] ** 2  # (out, m)
                kept = masks.prune_lowest(saliency, pattern.m - pattern.n)  # (out, m)
                keep[:, i1 + i : i1 + i + pattern.m] = kept
                torch.div((~kept).t().to(W1.dtype), d[i : i + pattern.m, None], out=dropped[i : i + pattern.m])
            if round_column is None:
                torch.mul(W1[i], dropped[i], out=Err1[i])  # (w - w·keep) / d
                W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1)  # row i itself becomes w·keep, up to rounding
            else:
                q = round_column(W1[i], original[i1 + i]) * keep[:, i1 + i]  # (out,)
                torch.div(W1[i] - q, d[i], out=Err1[i])
                W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1)
                W1[i] = q  # exactly on the grid
        W[:, i1:i2] = W1.t() * keep[:, i1:i2]  # pruned weights exactly zero
        W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)
    return Result(W=W, mask=keep)
