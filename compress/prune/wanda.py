"""Wanda: weight magnitude times input activation norm, compared per output row.

Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695.
"""

import torch


def score(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` ``(out, in)``, with ``‖X_j‖₂² ∝ G_jj`` (the scale does not change any ranking)."""
    return W.abs() * G.diagonal().clamp_min(0).sqrt().to(W.dtype)  # (out, in) * (in,)
