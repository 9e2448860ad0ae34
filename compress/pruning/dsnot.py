"""DSnoT: training-free prune-and-grow swaps that refine a pruned layer's mask.

Zhang et al. 2023, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", arXiv:2310.08915.

Each output row ``i`` of a pruned layer has an expected output error ``e_i = sum_j (W_ij - Ŵ_ij) E[x_j]``.
A cycle proposes, in every row at once, one swap that keeps the row's count of zeros (and, for N:M, the
count of its group of ``m``):

- grow the pruned weight ``j`` whose revival moves ``e_i`` towards zero the most, ``sign(W_ij E[x_j]) =
  sign(e_i)``, ranked by ``|W_ij E[x_j]| / Var[x_j]^p`` (channels whose mean is a reliable summary first);
- prune the kept weight ``k`` (in ``j``'s group of ``m`` for N:M) that Wanda ranks lowest among those whose
  removal also moves ``e_i`` towards zero, ``sign(Ŵ_ik E[x_k]) = -sign(e_i)``.

DSnoT revives a weight at its dense value, which fits an update-free start (Wanda, magnitude). After SparseGPT
the kept weights already compensate for the pruned ones, and the dense value counts that twice; with ``fit``
a pruned weight's candidate value is instead the one that minimizes the row's error given the rest of the
row, ``v_j / G_jj`` with ``v = (W - Ŵ) G``, and both of DSnoT's growing tests above read that value in place
of ``W_ij``.

The paper walks each row down its ranked candidates and stops it on its expected error alone. Here a swap is
taken only if it also lowers the row's exact reconstruction error on the calibration inputs,
``(W_i - Ŵ_i) G (W_i - Ŵ_i)ᵀ`` with the inputs' Gram matrix ``G``, a rank-two update of ``v = (W - Ŵ) G`` per
swap. A refused proposal sets its grown candidate aside for that row, and the row goes on down the ranking;
it stops when no weight passes the growing test or after ``cycles`` proposals. So the refinement never raises
the error the report measures, whatever the calibration data. It applies to every linear it is given, MLP and
attention alike (the reference code skips the MLP's by default).
"""

from __future__ import annotations

import torch

from compress.config import Pattern


def refine(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor, mean: torch.Tensor, sq: torch.Tensor,
           pattern: Pattern, cycles: int = 50, var_power: float = 1.0, fit: bool = False) -> torch.Tensor:
    """Refine the pruned ``W_hat`` of dense ``W`` (both ``(out, in)`` fp32) by DSnoT swaps (module docstring).

    Args:
        G: ``(in, in)`` mean Gram matrix of the calibration inputs.
        mean, sq: ``(in,)`` mean and mean square of each input channel.
        pattern: the pruning pattern; N:M swaps stay inside a group of ``m``.
        cycles: at most this many proposals per row, taken or refused.
        var_power: ``p`` in the growing score ``|W E[x]| / Var[x]^p``.
        fit: revive weights at their error-minimizing value rather than their dense one (for a start whose
            kept weights were updated, as SparseGPT's).

    Returns:
        A new ``(out, in)`` tensor with the same number of zeros per row (and per N:M group) as ``W_hat``;
        revived weights take their dense (or, with ``fit``, fitted) values, the kept ones keep ``W_hat``'s.
    """
    W, W_hat = W.float(), W_hat.float().clone()
    G, mean, sq = G.double(), mean.double(), sq.double()  # fp64: the swap test must not drift over cycles
    var = (sq - mean.square()).clamp_min(1e-12 * float(sq.max().clamp_min(1e-30)))
    var_pow = var.pow(var_power)
    prune_sign = torch.sign(W_hat.double() * mean)  # what pruning a kept weight does to e; kept entries only
    norms = sq.clamp_min(0).sqrt().float()
    wanda = W_hat.abs() * norms  # Wanda's score of the kept weights
    pruned = W_hat == 0
    delta = (W - W_hat).double()
    e = delta @ mean  # (out,) expected output error of each row
    v = delta @ G  # (out, in): the row's error gradient, updated by rank-two steps
    active = pruned.any(1) & (~pruned).any(1)
    refused = torch.zeros_like(pruned)  # grown candidates whose swap a row refused: not proposed again
    group = torch.arange(W.shape[1], device=W.device) // pattern.m if pattern.is_nm else None
    diag = G.diagonal()
    inv_diag = torch.where(diag > 0, 1 / diag.clamp_min(1e-300), 0)  # a dead input: reviving changes nothing
    rows = torch.arange(W.shape[0], device=W.device)
    # Every cycle works on all rows (a stopped row proposes but never takes): tensors of one shape per layer,
    # which the pipeline's block cache reuses, where shrinking row subsets left a new size each cycle.
    for _ in range(cycles):
        if not active.any():
            break
        s = torch.sign(e).unsqueeze(1)  # (out, 1)
        # the value each pruned weight would be revived at: its dense one, or with ``fit`` the one minimizing the
        # row's error given the rest of the row; reviving it moves e by -value·E[x] (0: nothing to revive)
        value = torch.where(pruned, (v * inv_diag).float() if fit else W, 0)
        moved = value * mean  # what reviving each weight takes off e
        grow_ok = (value != 0) & (torch.sign(moved) == s) & ~refused
        j = torch.where(grow_ok, (moved.abs() / var_pow).float(), -torch.inf).argmax(1)
        prune_ok = ~pruned & (prune_sign == -s)
        if group is not None:
            prune_ok &= group.unsqueeze(0) == group[j].unsqueeze(1)
        k = torch.where(prune_ok, wanda, torch.inf).argmin(1)
        proposed = active & grow_ok[rows, j]
        found = proposed & prune_ok[rows, k]
        revived = value[rows, j]
        a_j = -revived.double()  # delta_j: W_j -> W_j - revived
        a_k = W_hat[rows, k].double()  # delta_k: W_k - Ŵ_k -> W_k
        change = (2 * (a_j * v[rows, j] + a_k * v[rows, k]) + a_j.square() * G[j, j] + a_k.square() * G[k, k]
                  + 2 * a_j * a_k * G[j, k])
        take = found & (change < 0)
        active &= proposed
        refused[rows[proposed & ~take], j[proposed & ~take]] = True
        r, j, k, a_j, a_k, revived = rows[take], j[take], k[take], a_j[take], a_k[take], revived[take]
        W_hat[r, j], W_hat[r, k] = revived, 0
        pruned[r, j], pruned[r, k] = False, True
        prune_sign[r, j] = torch.sign(revived.double() * mean[j])
        wanda[r, j], wanda[r, k] = revived.abs() * norms[j], 0
        v[r] += a_j.unsqueeze(1) * G[j] + a_k.unsqueeze(1) * G[k]
        e[r] += a_j * mean[j] + a_k * mean[k]
    return W_hat
