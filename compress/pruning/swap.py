"""Prune-and-grow swaps ranked by their exact effect on a row's reconstruction error (``--refine swap``).

DSnoT (``compress.pruning.dsnot``) proposes swaps from the inputs' channel means and revives weights at their
dense values, which assumes the kept weights are the dense ones (Wanda, magnitude). After SparseGPT they are
not: its updates have already absorbed part of what each pruned weight did. Here every proposal comes from the
row's exact error on the calibration inputs, ``E = d G dᵀ`` with ``d = Ŵ_i - W_i`` and the inputs' Gram matrix
``G``, and a revived weight takes the value that minimizes it given the rest of the row.

With ``g = d G`` (kept up to date by rank-one steps), per row and per cycle:

- growing a pruned weight ``j`` to its best value ``-g_j / G_jj`` lowers ``E`` by ``g_j² / G_jj``;
- pruning a kept weight ``k`` (``δ = -Ŵ_k``) raises it by ``δ² G_kk + 2 δ g_k``;
- the cheapest prune and the best grow of each group (the row, or each group of ``m`` for N:M) are paired,
  their exact change (cross term included) computed, and the row's best pair taken if it lowers ``E``.

A row stops at its first cycle without an improving pair. Rows are independent, so all of them move at once;
the count of zeros per row (and per N:M group) never changes and ``E`` never rises.
"""

from __future__ import annotations

import torch

from compress.config import Pattern


def refine(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor, pattern: Pattern, cycles: int = 50,
           rtol: float = 1e-6) -> torch.Tensor:
    """Refine the pruned ``W_hat`` of dense ``W`` (both ``(out, in)``) by exact-error swaps (module docstring).

    Args:
        G: ``(in, in)`` mean Gram matrix of the calibration inputs.
        pattern: the pruning pattern; N:M swaps stay inside a group of ``m``.
        cycles: at most this many swaps per row.
        rtol: a swap must lower the row's error by more than this fraction of it.

    Returns:
        A new fp32 ``(out, in)`` tensor with the zeros of each row (and N:M group) as many as in ``W_hat``.
    """
    dense, W_hat, G = W.double(), W_hat.double().clone(), G.double()  # fp64: the swap test must not drift
    diag = G.diagonal().clone()
    live = diag > 0  # a dead input channel: reviving its weight changes no output
    inv_diag = torch.where(live, 1 / diag.clamp_min(1e-300), 0)
    delta = W_hat - dense
    g = delta @ G  # (out, in)
    error = (delta * g).sum(1)  # (out,) the rows' errors, times the token count
    out, n = W.shape
    m = pattern.m if pattern.is_nm else n
    offset = torch.arange(0, n, m, device=W.device)  # each group's first column
    rows = torch.arange(out, device=W.device)
    active = ((W_hat == 0) & live).any(1) & (W_hat != 0).any(1)
    # Every cycle works on all rows (a stopped row proposes but never takes): tensors of one shape per layer,
    # which the pipeline's block cache reuses, where shrinking row subsets left a new size each cycle.
    for _ in range(cycles):
        pruned = W_hat == 0
        gain = torch.where(pruned & live, g.square() * inv_diag, -torch.inf).view(out, -1, m)
        cost = torch.where(pruned, torch.inf, W_hat.square() * diag - 2 * W_hat * g).view(out, -1, m)
        best_gain, j = gain.max(-1)  # (out, groups)
        best_cost, k = cost.min(-1)
        j, k = j + offset, k + offset  # column indices
        delta_k = -W_hat.gather(1, k)
        g_j = g.gather(1, j) + delta_k * G[k, j]  # g_j once k is pruned
        change = best_cost - g_j.square() * inv_diag[j]
        change = torch.where(best_gain.isfinite() & best_cost.isfinite() & (g_j != 0), change, torch.inf)
        change, group = change.min(1)  # each row's best pair
        take = active & (change < -rtol * error.abs())
        active = take
        if not take.any():
            break
        group = group.unsqueeze(1)
        j, k = j.gather(1, group).squeeze(1), k.gather(1, group).squeeze(1)
        delta_k = torch.where(take, delta_k.gather(1, group).squeeze(1), 0)
        delta_j = torch.where(take, -g_j.gather(1, group).squeeze(1) * inv_diag[j], 0)
        W_hat[rows, k] += delta_k  # to zero where taken
        W_hat[rows, j] += delta_j  # from zero where taken
        g += delta_k.unsqueeze(1) * G[k] + delta_j.unsqueeze(1) * G[j]
        error += torch.where(take, change, 0)
    return W_hat.float()
