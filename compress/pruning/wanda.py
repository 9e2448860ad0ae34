"""Wanda: weight magnitude times input activation norm, compared per output row.

Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695.
"""

import torch


def score(W: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` ``(out, in)``, from ``sq`` ``(in,)`` the mean of ``x_j²`` over tokens
    (``‖X_j‖₂² = T · sq_j``; the constant does not change any ranking)."""
    return W.abs() * sq.clamp_min(0).sqrt().to(W.dtype)  # (out, in) * (in,)
