"""OWL: non-uniform per-block sparsity from each block's share of outlier weights.

Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL)", arXiv:2310.05175.

A block's outlier ratio is the fraction of its weights whose Wanda score ``|W_ij|·‖X_j‖`` exceeds ``m`` times
the mean score over the whole block (all its pruned linears together), measured on the dense model. Ratios
are scaled linearly onto ``[0, 2λ]``, centred, and subtracted from the target: blocks rich in outliers are
pruned less, the mean over blocks is the target (all decoder blocks have the same size, so the model's
sparsity is too, up to each row's rounding to whole weights).
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of the entries of ``scores`` (a block's Wanda score matrices) above ``m`` x their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def allocate(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities with mean ``sparsity``, in ``sparsity ± lam``, lower for higher outlier ratios.

    Raises:
        ValueError: ``sparsity ± lam`` leaves (0, 1).
    """
    if not 0 <= lam < min(sparsity, 1 - sparsity):
        raise ValueError(f"--owl-lambda {lam} must be in [0, {min(sparsity, 1 - sparsity):g}) at sparsity {sparsity}: "
                         f"every block's sparsity must stay inside (0, 1); 0.08 is the paper's value")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0:
        return [sparsity] * len(ratios)
    d = (r - r.min()) / spread * 2 * lam
    return [sparsity - x for x in (d - d.mean()).tolist()]
