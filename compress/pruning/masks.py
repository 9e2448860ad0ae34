"""Turn scores into keep-masks: the one place that knows comparison groups and N:M.

``select(score, pattern, scope)`` returns a bool mask, ``True`` where a weight is kept. Lower score means
pruned first. Counts are exact: each comparison group loses ``round(size * sparsity)`` weights (ties broken
by position), and N:M keeps exactly ``n`` of every ``m`` consecutive input weights of a row. Group
patterns rank runs of ``group`` consecutive weights of a row by their summed score and keep or drop whole runs.
"""

from __future__ import annotations

import torch

from compress.config import Pattern


def n_pruned(size: int, sparsity: float) -> int:
    """How many of ``size`` weights a group at ``sparsity`` loses."""
    return int(round(size * sparsity))


def prune_lowest(score: torch.Tensor, k: int, min_select: int = 64) -> torch.Tensor:
    """Keep-mask of the same shape as ``score`` ``(..., cols)`` dropping the ``k`` lowest of each row.

    Rows of at least ``min_select`` columns first try a threshold at the k-th value (a selection, 3-4x
    faster than ``topk``'s partial sort for SparseGPT's 100k-weight blocks): when no row has a tie at its
    threshold, the k lowest are exactly the ones at or below it. Otherwise, and for short rows, ``topk``.
    """
    cols = score.shape[-1]
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if k >= cols:
        return torch.zeros_like(score, dtype=torch.bool)
    if cols >= min_select:
        dropped = score <= torch.kthvalue(score, k, dim=-1, keepdim=True).values
        if bool((dropped.sum(-1) == k).all()):
            return ~dropped
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(score, k, dim=-1, largest=False).indices, False)
    return keep


def select_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights of every ``m`` consecutive columns of each row.

    Raises:
        ValueError: the number of columns is not divisible by ``m``.
    """
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)  # (out, in/m, m)
    return prune_lowest(groups, m - n).reshape(rows, cols)


def select(score: torch.Tensor, pattern: Pattern, scope: str = "row") -> torch.Tensor:
    """Keep-mask ``(out, in)`` for ``score`` ``(out, in)`` under ``pattern``.

    Args:
        scope: comparison group of an unstructured pattern: ``row`` (each output row loses the same
            count) or ``matrix`` (one ranking over the whole matrix). Ignored for N:M.
    """
    if pattern.is_nm:
        return select_nm(score, pattern.n, pattern.m)
    if pattern.group:
        rows, cols = score.shape
        if cols % pattern.group:
            raise ValueError(f"groups of {pattern.group} need in_features divisible by {pattern.group}, got {cols}")
        summed = score.reshape(rows, cols // pattern.group, pattern.group).sum(-1)  # (out, in/g)
        ungrouped = Pattern(pattern.sparsity)
        return select(summed, ungrouped, scope).repeat_interleave(pattern.group, dim=1)
    if scope == "row":
        return prune_lowest(score, n_pruned(score.shape[1], pattern.sparsity))
    if scope == "matrix":
        flat = score.reshape(1, -1)
        return prune_lowest(flat, n_pruned(flat.shape[1], pattern.sparsity)).reshape(score.shape)
    raise ValueError(f"scope {scope!r} is not row or matrix")


def satisfies_nm(nonzero: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``nonzero`` ``(out, in)`` has at most ``n`` True in every ``m`` consecutive inputs of each row."""
    rows, cols = nonzero.shape
    return cols % m == 0 and bool((nonzero.reshape(rows, cols // m, m).sum(-1) <= n).all())
